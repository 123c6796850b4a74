"""algo=gpipe: torch.distributed.pipelining schedules over dpbp's split, in real gloo processes."""

import pytest
from conftest import compose_dict, make_cfg

from dpbp.config import from_dict, validate
from dpbp.errors import ConfigError
from dpbp.launch import launch
from dpbp.train import train


def config(algo, gpus, pipeline="gpipe", executor="dist"):
    own = [f"algo.pipeline={pipeline}", "algo.microbatches=4"] if algo == "gpipe" else []
    return make_cfg(f"algo={algo}", f"gpus={gpus}", "model=mlp", "data.augment=none",
                    f"executor={executor}", "seed=1", *own, "sched.milestones=[100]",
                    "trainer.epochs=1", "trainer.max_steps=12", "trainer.checkpoint=false")


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["gpipe", "1f1b"])
def test_pipeline_trains_exactly_like_bp(tmp_path, pipeline):
    """Without BatchNorm, the microbatches' summed gradients are the batch's: the same run as BP."""
    pipe = launch(config("gpipe", 2, pipeline), tmp_path / "pipe")
    bp = train(config("bp", 1), tmp_path / "bp")
    assert (pipe["modules"], pipe["config"]["algo"]["pipeline"], pipe["steps"]) == (2, pipeline, 12)
    for a, b in zip(pipe["history"], bp["history"], strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


@pytest.mark.parametrize(("change", "message"), [
    ({"gpus": 1}, "gpus >= 2"),
    ({"executor": "local"}, "gpus >= 2"),
    ({"microbatches": 5}, "not divisible by algo.microbatches=5"),
    ({"pipeline": "zb"}, "gpipe or 1f1b"),
])
def test_bad_settings_name_the_fix(change, message):
    cfg = from_dict(compose_dict("algo=gpipe", f"gpus={change.get('gpus', 2)}",
                                 f"executor={change.get('executor', 'dist')}",
                                 "trainer.batch_size=128",
                                 f"algo.microbatches={change.get('microbatches', 4)}",
                                 f"algo.pipeline={change.get('pipeline', 'gpipe')}"))
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
