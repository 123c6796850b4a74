"""algo=gpipe: torch.distributed.pipelining schedules over dpbp's split, in real gloo processes."""

import pytest

from dpbp.config import RunConfig, validate
from dpbp.data import DataConfig
from dpbp.errors import ConfigError
from dpbp.launch import launch
from dpbp.train import train


def config(algo, gpus, pipeline="gpipe", executor="dist"):
    cfg = RunConfig(model="mlp", data=DataConfig(name="digits", augment="none"), gpus=gpus,
                    device="cpu", executor=executor, seed=1)
    cfg.algo.name, cfg.algo.pipeline, cfg.algo.microbatches = algo, pipeline, 4
    cfg.sched.milestones = [100]
    cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.max_steps = 1, 64, 12
    cfg.trainer.progress, cfg.trainer.checkpoint = False, False
    validate(cfg)
    return cfg


@pytest.mark.parametrize("pipeline", ["gpipe", "1f1b"])
def test_pipeline_trains_exactly_like_bp(tmp_path, pipeline):
    """Without BatchNorm, the microbatches' summed gradients are the batch's: the same run as BP."""
    pipe = launch(config("gpipe", 2, pipeline), tmp_path / "pipe")
    bp = train(config("bp", 1), tmp_path / "bp")
    assert (pipe["modules"], pipe["pipeline"], pipe["steps"]) == (2, pipeline, 12)
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
    cfg = RunConfig(gpus=change.get("gpus", 2), executor=change.get("executor", "dist"))
    cfg.algo.name = "gpipe"
    cfg.algo.microbatches = change.get("microbatches", 4)
    cfg.algo.pipeline = change.get("pipeline", "gpipe")
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
