"""Models from the user's code (`model=custom model._target_=...`): built through Hydra's
instantiate from a module the test writes, cut and trained like a built-in model, the same
numbers under executor=local and executor=dist, and one sentence (exit 2) for each bad input."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_cfg
from test_cli import assert_one_line_error, call_main

from dpbp import cmdline, custom
from dpbp.build import WorkerContext, build_model, split_model
from dpbp.config import from_dict
from dpbp.data import DataConfig, load_dataset
from dpbp.errors import ConfigError
from dpbp.launch import launch
from dpbp.train import train

NETS = "dpbp_test_nets"  # the user's module, written into the test's working directory
SOURCE = textwrap.dedent('''
    from torch import nn

    def build(width=8, in_channels=3, num_classes=10):
        """Four blocks for 8x8 digits; `width` from model.width."""
        return nn.Sequential(
            nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.Tanh()),
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.Tanh()),
            nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16 * width, 32), nn.Tanh()),
            nn.Linear(32, num_classes),
        )

    def as_list(hidden=16):
        return [nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)]

    def not_blocks():
        return "a string"

    def broken(width):
        raise ValueError("width must be even")

    class Wide(nn.Sequential):
        def __init__(self, in_channels, num_classes):
            super().__init__(nn.Flatten(), nn.Linear(64 * in_channels, num_classes))

    NOT_CALLABLE = 3
''')
CUSTOM = ("model=custom", f"model._target_={NETS}.build", "algo=bp", "trainer.epochs=1",
          "trainer.max_steps=12", "trainer.check_every=5", "seed=3")


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's working directory with the module in it (sys.path restored after)."""
    (tmp_path / f"{NETS}.py").write_text(SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, NETS, raising=False)
    return tmp_path


def digits():
    return load_dataset(DataConfig(name="digits"))


def test_the_builder_gets_its_keys_and_the_datas_shape(user_dir):
    cfg = make_cfg(*CUSTOM, "+model.width=4")
    assert cfg.model == f"{NETS}.build" and cfg.model_args == {"width": 4}
    blocks = build_model(cfg, digits())
    assert len(blocks) == 4
    assert blocks[0][0].in_channels == 1 and blocks[0][0].out_channels == 4  # digits: 1 channel
    assert blocks[-1].out_features == 10
    assert str(user_dir) in sys.path  # found from the working directory, as `python -m` would


def test_a_list_of_blocks_and_a_class_work(user_dir):
    ds = digits()
    blocks = build_model(make_cfg("model=custom", f"model._target_={NETS}.as_list",
                                  "+model.hidden=5"), ds)
    assert [type(b).__name__ for b in blocks] == ["Flatten", "Linear", "Tanh", "Linear"]
    assert blocks[1].out_features == 5
    wide = build_model(make_cfg("model=custom", f"model._target_={NETS}.Wide"), ds)
    assert len(wide) == 2 and wide[1].in_features == 64


def test_the_seed_fixes_the_initial_weights(user_dir):
    a, b = (build_model(make_cfg(*CUSTOM), digits()) for _ in range(2))
    c = build_model(make_cfg(*CUSTOM, "seed=4"), digits())
    assert torch.equal(a[0][0].weight, b[0][0].weight)
    assert not torch.equal(a[0][0].weight, c[0][0].weight)


def test_the_config_round_trips_for_the_workers(user_dir):
    cfg = make_cfg(*CUSTOM, "+model.width=4")
    d = cfg.to_dict()
    assert d["model"] == {"_target_": f"{NETS}.build", "width": 4}  # as the user wrote it
    again = from_dict(d)
    assert (again.model, again.model_args) == (cfg.model, cfg.model_args)
    builtin = make_cfg()
    assert builtin.model_args is None and builtin.to_dict()["model"] == "resnet20"


def test_the_split_cuts_the_users_blocks(user_dir):
    split = split_model(make_cfg(*CUSTOM, "gpus=2", "executor=local", "split.balance=[1,3]"),
                        WorkerContext())
    assert split.counts == [1, 3]
    assert split.shapes == [(8, 8, 8), (10,)]


@pytest.mark.parametrize("overrides, words", [
    ([f"model._target_={NETS}.nowhere"], f"cannot import model._target_={NETS}.nowhere"),
    (["model._target_=no_such_package.build"], "No module named 'no_such_package'"),
    ([f"model._target_={NETS}.NOT_CALLABLE"], "not a function or class"),
    ([f"model._target_={NETS}.not_blocks"], "returned a str; it must return an nn.Sequential"),
    ([f"model._target_={NETS}.broken", "model.width=3"], "width must be even"),
    ([f"model._target_={NETS}.build", "model.widht=3"], "unexpected keyword argument 'widht'"),
    ([f"model._target_={NETS}.build", "gpus=5", "executor=local"], "cannot cut 4 blocks into 5"),
    ([f"model._target_={NETS}.Wide", "data=synthetic", "data.shape=[3,4,4]"],
     "fails on data=synthetic's samples of shape [3, 4, 4] at block 1"),
    ([], "needs the function that builds the network"),
    (["model=resnet20", "model.width=3"], "unknown setting model.width; valid keys of model are "
     "name; a network of your own is model=custom model._target_=module.function"),
])
def test_bad_custom_models_exit_2_with_one_line(user_dir, overrides, words, monkeypatch,
                                                capsys):
    run_dir = user_dir / "run"
    rc = call_main(["train", "device=cpu", "trainer.epochs=1", "model=custom",
                    f"hydra.run.dir={run_dir}", *overrides], monkeypatch)
    out, err = capsys.readouterr()
    assert words in assert_one_line_error(rc, out, err)
    assert not run_dir.exists()


def test_a_failed_import_logs_nothing_beside_the_one_line(caplog):
    """Hydra's get_object logs its own ERROR line before raising; the user sees dpbp's only."""
    from dpbp.custom import locate

    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigError, match="cannot import"):
        locate("no_such_package.build", "model._target_")
    assert not caplog.records
    assert not logging.getLogger("hydra.utils").disabled  # put back for everything else


def test_model_keys_become_builder_arguments_only_for_a_target_model():
    args = ["model=custom", "model._target_=a.b", "model.width=3", "trainer.epochs=1"]
    assert cmdline.model_arguments(args) == [
        "model=custom", "model._target_=a.b", "++model.width=3", "trainer.epochs=1"]
    plain = ["model=resnet20", "model.width=3"]
    assert cmdline.model_arguments(plain) == plain  # a built-in model: still an unknown key


def test_a_result_that_is_not_blocks_is_refused():
    with pytest.raises(ConfigError, match="holding a int"):
        custom.as_blocks([torch.nn.Linear(1, 1), 3], "f")
    with pytest.raises(ConfigError, match="no blocks"):
        custom.as_blocks(torch.nn.Sequential(), "f")


def test_cli_trains_a_custom_model(user_dir, monkeypatch, capsys):
    """The README's command shape: model=custom, a builder key as model.KEY, a finished run."""
    run_dir = user_dir / "run"
    rc = call_main(["train", "device=cpu", *CUSTOM, "model.width=4", "trainer.progress=false",
                    f"hydra.run.dir={run_dir}"], monkeypatch)
    err = capsys.readouterr().err
    assert rc == 0, err
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["model"] == f"{NETS}.build" and s["config"]["model"]["width"] == 4
    assert s["num_parameters"] == sum(p.numel() for b in build_model(
        make_cfg(*CUSTOM, "+model.width=4"), digits()) for p in b.parameters())
    assert "0:Sequential..3:Linear" in err  # the split table names the user's blocks


def stage_params(run_dir: Path, k: int) -> list[dict[str, torch.Tensor]]:
    return [torch.load(run_dir / "checkpoints" / f"stage{s}.pt", weights_only=True)["module"]
            for s in range(k)]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["bp", "ddg", "fdg"])
def test_local_and_dist_train_a_custom_model_identically(user_dir, algo):
    """The workers (spawned interpreters) import the user's module from the working directory
    and compute exactly what one process computes."""
    settings = (*CUSTOM, f"algo={algo}", "gpus=2", "trainer.epochs=2", "trainer.max_steps=24")
    local = train(make_cfg(*settings, "executor=local"), user_dir / "local")
    dist = launch(make_cfg(*settings, "executor=dist"), user_dir / "dist")
    assert dist is not None and (local["executor"], dist["executor"]) == ("local", "dist")
    assert local["split"] == dist["split"] and len(dist["split"]) == 2
    for key in ("final_test_acc", "final_test_loss", "final_train_loss", "updates"):
        assert local[key] == dist[key], key
    for a, b in zip(stage_params(user_dir / "local", 2), stage_params(user_dir / "dist", 2)):
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_bench_and_predict_take_a_custom_model_section(user_dir):
    """dpbp bench hands each run the section as overrides that compose to the same model, and
    its profile (predict.py) builds the same blocks as a run."""
    from dpbp.bench import Case, train_overrides

    section = {"_target_": f"{NETS}.build", "width": 4}
    cfg = {"data": {"name": "digits"}, "steps_per_epoch": 5, "batch_size": 16,
           "model": section, "device": "cpu", "seed": 3, "epochs": 2, "threads": 1,
           "microbatches": 4, "train": []}
    args = train_overrides(cfg, Case("fdg", 2))
    assert args[2:5] == ["model=custom", f"model._target_={NETS}.build", "++model.width=4"]
    run = make_cfg(*args)
    assert (run.model, run.model_args) == (f"{NETS}.build", {"width": 4})
    torch.manual_seed(3)
    profiled = custom.section_blocks(section, 1, 10)
    built = build_model(run, digits())
    assert all(torch.equal(a, b) for a, b in zip(torch.nn.Sequential(*profiled).state_dict()
                                                 .values(),
                                                 torch.nn.Sequential(*built).state_dict()
                                                 .values()))
    assert custom.section_title(section) == f"{NETS}.build"
    assert custom.section_overrides({"name": "resnet20"}) == ["model=resnet20"]
    assert custom.section_overrides({"name": "gpt", "layers": 2, "dim": 32}) == [
        "model=gpt", "model.layers=2", "model.dim=32"]


def test_saved_blocks_load_and_a_class_the_process_lacks_is_one_sentence(user_dir, monkeypatch):
    """dpbp.fit's model file: loaded as saved; one whose layer class a worker cannot import
    (defined in a notebook) is refused in one sentence."""
    import importlib

    monkeypatch.syspath_prepend(str(user_dir))
    nets = importlib.import_module(NETS)  # the user's module, importable where it was saved
    blocks = [nets.Wide(1, 10), torch.nn.Linear(10, 10)]
    torch.save(blocks, user_dir / "model.pt")
    loaded = custom.load_saved(str(user_dir / "model.pt"))
    assert torch.equal(loaded[0][1].weight, blocks[0][1].weight)
    monkeypatch.delitem(sys.modules, NETS)
    (user_dir / f"{NETS}.py").unlink()  # as in a worker that has no such module
    importlib.invalidate_caches()
    with pytest.raises(ConfigError, match="uses a class this process cannot import"):
        custom.load_saved(str(user_dir / "model.pt"))
    with pytest.raises(ConfigError, match="cannot read the saved model"):
        custom.load_saved(str(user_dir / "missing.pt"))
