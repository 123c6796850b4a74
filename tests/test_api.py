"""`dpbp.fit`: the Python API runs the `dpbp train` command itself (same validation, launcher,
run directory and summary.json), with the user's objects passed to the workers as files."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import call_main
from torch import nn

import dpbp
from dpbp import api
from dpbp.errors import ConfigError

FAST = {"trainer": {"epochs": 2, "max_steps": 10, "batch_size": 32, "progress": False},
        "device": "cpu", "seed": 5}


def digits_arrays() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits as uint8 (N, 8, 8) images: 300 to train on, 100 to test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * 255 / 16).astype(np.uint8)
    return (x[:300], d.target[:300]), (x[300:400], d.target[300:400])


def blocks() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh()),
                         nn.Sequential(nn.Linear(32, 32), nn.Tanh()), nn.Linear(32, 10))


@pytest.fixture(autouse=True)
def _restore_logging():
    """Hydra points the root logger at the run; the API puts it back (checked here)."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    yield
    assert root.handlers == handlers


def test_fit_is_the_packages_function():
    assert dpbp.fit is api.fit


def test_fit_trains_objects_exactly_as_the_command_does(tmp_path, monkeypatch):
    train, test = digits_arrays()
    model = blocks()
    before = [p.clone() for p in model.parameters()]
    argv = sys.argv[:]
    s = dpbp.fit(model, train, test, run_dir=tmp_path / "fit", **FAST)
    assert sys.argv == argv  # the command's changes to the process are undone
    assert s == json.loads((tmp_path / "fit" / "summary.json").read_text())
    assert s["status"] == "completed" and s["data"] == "arrays" and s["epochs"] == 2
    assert s["model"] == "dpbp.custom.load_saved"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # left as given
    # the same run from the command line, on the files fit wrote: the same numbers
    inputs = tmp_path / "fit" / "inputs"
    rc = call_main(["train", "model=custom", "model._target_=dpbp.custom.load_saved",
                    f"model.path={inputs / 'model.pt'}", "data=arrays",
                    f"data.path={inputs / 'data.npz'}", "device=cpu", "seed=5",
                    "trainer.epochs=2", "trainer.max_steps=10", "trainer.batch_size=32",
                    "trainer.progress=false", f"hydra.run.dir={tmp_path / 'cli'}"], monkeypatch)
    assert rc == 0
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    for key in ("final_test_acc", "final_test_loss", "final_train_loss", "num_parameters"):
        assert cli[key] == s[key], key


def test_fit_takes_a_builders_path_a_dataset_object_and_overrides(tmp_path):
    class Items:  # a torchvision-style dataset: (image, label) items
        def __init__(self, xy):
            self.x, self.y = xy

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return torch.from_numpy(self.x[i]), int(self.y[i])

    train, test = digits_arrays()
    s = dpbp.fit("dpbp.custom.load_saved", Items(train), Items(test), run_dir=tmp_path / "a",
                 overrides=[f"model.path={_saved(tmp_path)}", "optim.lr=0.05"], **FAST)
    assert s["config"]["optim"]["lr"] == 0.05 and s["config"]["data"]["num_classes"] is None
    named = dpbp.fit("mlp", run_dir=tmp_path / "b", data="digits", **FAST)  # built-in, digits
    assert named["model"] == "mlp" and named["data"] == "digits"


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "blocks.pt"
    torch.save(list(blocks()), path)
    return path


def test_bad_input_raises_config_error_and_leaves_nothing(tmp_path, capsys):
    (x, y), test = digits_arrays()
    with pytest.raises(ConfigError, match="x_train has 300 samples but y_train has shape"):
        dpbp.fit(blocks(), (x, y[:-1]), test, run_dir=tmp_path / "bad", **FAST)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="cannot cut 3 blocks into 4 modules"):
        dpbp.fit(blocks(), (x, y), test, gpus=4, executor="local", run_dir=tmp_path / "k",
                 **FAST)
    with pytest.raises(ConfigError, match="give \\(x, y\\) arrays"):
        dpbp.fit(blocks(), 42, run_dir=tmp_path / "c")
    assert "dpbp: " in capsys.readouterr().err  # the command's own line is still shown


def test_values_become_override_strings():
    assert api._setting_args({"trainer": {"epochs": 2, "max_steps": None}, "device": "cpu",
                              "split": {"balance": [1, 2]}, "resume": True}) == [
        "trainer.epochs=2", "trainer.max_steps=null", "device=cpu", "split.balance=[1,2]",
        "resume=true"]
    assert api._value("/a b/it's") == "'/a b/it\\'s'"
