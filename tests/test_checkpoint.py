"""Checkpoint files: atomic, weights-only loadable; bad or foreign ones are refused on resume."""

from __future__ import annotations

import datetime
import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_cfg

from dpbp import checkpoint
from dpbp.errors import CheckpointError, ConfigError
from dpbp.launch import preflight
from dpbp.models import build_blocks
from dpbp.train import train

QUICK_RUN = ("trainer.epochs=1", "trainer.max_steps=3", "seed=2")


@pytest.fixture(scope="module")
def done_run(tmp_path_factory) -> tuple[Path, dict]:
    """A finished 3-step bp run with its checkpoint (read-only: copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("done")
    return run_dir, train(make_cfg(*QUICK_RUN), run_dir)


@pytest.fixture
def run_copy(done_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(done_run[0], dst)
    return dst


def test_checkpoint_files_are_complete_and_weights_only(done_run):
    run_dir, summary = done_run
    ck_dir = run_dir / "checkpoints"
    assert sorted(p.name for p in ck_dir.iterdir()) == ["run.pt", "stage0.pt"]
    assert not list(run_dir.rglob("*.tmp"))
    stage = torch.load(ck_dir / "stage0.pt", weights_only=True)
    run = torch.load(ck_dir / "run.pt", weights_only=True)
    assert stage["format"] == run["format"] == checkpoint.FORMAT
    assert (stage["stage"], stage["modules"], stage["algo"], stage["model"], stage["epoch"],
            stage["tick"]) == (0, 1, "bp", "resnet20", 1, 3)
    assert stage["inflight"]["pending"] == [] and stage["messages"] == []  # bp: nothing in flight
    model = torch.nn.Sequential(*build_blocks("resnet20", 1, 10))
    assert stage["module"].keys() == model.state_dict().keys()
    assert stage["updates"] == 3 and len(stage["optimizer"]["state"]) > 0
    assert run["epoch"] == 1 and run["tick"] == 3 and run["history"] == summary["history"]
    assert run["drained"]  # the end of the run


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "stage0.pt"
    checkpoint._atomic_save({"format": checkpoint.FORMAT, "epoch": 1}, path)
    before = path.read_bytes()

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"\x80\x02partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        checkpoint._atomic_save({"format": checkpoint.FORMAT, "epoch": 2}, path)
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage0.pt"]  # no *.tmp left


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _foreign_dict(path: Path) -> None:
    torch.save({"epoch": 1, "module": {}}, path)


def _random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def _planted_global(path: Path) -> None:
    # a pickle that would build an arbitrary object: weights_only must refuse it
    torch.save({"format": checkpoint.FORMAT, "epoch": 1, "x": datetime.date(2020, 1, 1)}, path)


def _missing(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("damage", [_truncate, _foreign_dict, _random_bytes, _planted_global,
                                    _missing])
@pytest.mark.parametrize("name", ["stage0.pt", "run.pt"])
def test_a_damaged_checkpoint_is_refused(run_copy, name, damage):
    damage(run_copy / "checkpoints" / name)
    with pytest.raises(ConfigError) as e:
        train(make_cfg(*QUICK_RUN, "resume=true"), run_copy)
    assert "\n" not in str(e.value)
    # the parent refuses it too, before any worker would start
    cfg = make_cfg(*QUICK_RUN, "resume=true")
    if name == "run.pt" or damage is _missing:
        with pytest.raises(ConfigError):
            preflight(cfg, quiet=True, run_dir=run_copy)


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(make_cfg(*QUICK_RUN, "resume=true"), tmp_path / "fresh")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(make_cfg(*QUICK_RUN, f"resume={tmp_path / 'elsewhere'}"), tmp_path / "new")
    assert not (tmp_path / "new" / "summary.json").exists()


@pytest.mark.parametrize("where", ["run", "checkpoints"])
def test_resume_from_another_directory(done_run, tmp_path, where):
    src, summary = done_run
    target = src if where == "run" else src / "checkpoints"
    resumed = train(make_cfg(*QUICK_RUN, f"resume={target}"), tmp_path / "new")
    # the run was complete: nothing left to train, same numbers, written to the new directory
    assert resumed["history"] == summary["history"]
    assert resumed["updates"] == summary["updates"] == [3]
    assert (tmp_path / "new" / "summary.json").exists()


@pytest.mark.parametrize("overrides, words", [
    (("model=resnet32",), "model=resnet20"),
    (("seed=3",), "seed=2"),
    (("trainer.batch_size=32",), "trainer.batch_size=64"),
    (("optim.lr=0.05",), "optim.lr=0.1"),
    (("data.augment=none",), "data.augment=auto"),
    (("data=synthetic", "data.shape=[1,8,8]", "data.train_size=128", "data.test_size=16"),
     "trained with data"),
])
def test_resume_with_other_settings_is_refused(run_copy, overrides, words):
    with pytest.raises(ConfigError, match=words):
        train(make_cfg(*QUICK_RUN, *overrides, "resume=true"), run_copy)


def test_resume_may_change_what_does_not_change_the_numbers(run_copy, tmp_path):
    cfg = make_cfg(*QUICK_RUN, "resume=true", "trainer.check_every=3", "trainer.eval_batch_size=7",
                   "executor=local", f"+data.root={tmp_path}", "trainer.checkpoint=false")
    assert train(cfg, run_copy)["epochs"] == 1


def test_a_checkpoint_without_its_config_still_resumes(run_copy):
    # files written before run.pt carried the config
    path = run_copy / "checkpoints" / "run.pt"
    run = torch.load(path, weights_only=True)
    del run["config"]
    torch.save(run, path)
    assert train(make_cfg(*QUICK_RUN, "resume=true"), run_copy)["epochs"] == 1


def test_a_stage_file_of_another_split_is_refused(tmp_path):
    settings = ("gpus=2", "executor=local", *QUICK_RUN)
    train(make_cfg(*settings, "split.balance=[5,6]"), tmp_path)
    with pytest.raises(ConfigError, match="does not fit module 1"):
        train(make_cfg(*settings, "split.balance=[6,5]", "resume=true"), tmp_path)


def test_stages_of_another_tick_are_refused(run_copy):
    # run.pt names a tick that no stage file holds (files of different checkpoints)
    path = run_copy / "checkpoints" / "run.pt"
    run = torch.load(path, weights_only=True)
    run["tick"] = 7
    torch.save(run, path)
    with pytest.raises(ConfigError, match="tick") as e:
        train(make_cfg(*QUICK_RUN, "resume=true"), run_copy)
    assert "different checkpoints" in str(e.value)


def test_a_checkpoint_of_an_older_dpbp_is_refused_as_such(run_copy):
    path = run_copy / "checkpoints" / "run.pt"
    run = torch.load(path, weights_only=True)
    run["format"] = "dpbp-checkpoint-1"
    torch.save(run, path)
    with pytest.raises(ConfigError, match="another version of dpbp"):
        train(make_cfg(*QUICK_RUN, "resume=true"), run_copy)


def test_a_full_disk_fails_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The disk fills up while epoch 2's checkpoint is written: a clear error, and epoch 1's
    checkpoint stays complete and resumable."""
    settings = ("trainer.epochs=3", "trainer.max_steps=30", "seed=2")
    real_save = torch.save

    def fills_up(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            f.write(b"\x80\x02partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_up)
    with pytest.raises(CheckpointError) as e:
        train(make_cfg(*settings), tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    line = str(e.value)
    assert line.startswith("the disk is full: cannot write checkpoint file stage0.pt; the "
                           "checkpoint of epoch 1 (tick 22) is kept in ") and "\n" not in line
    ck_dir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck_dir.iterdir()) == ["run.pt", "stage0.pt"]
    assert torch.load(ck_dir / "run.pt", weights_only=True)["epoch"] == 1
    assert torch.load(ck_dir / "stage0.pt", weights_only=True)["epoch"] == 1
    resumed = train(make_cfg(*settings, "resume=true"), tmp_path)
    assert resumed["epochs"] == 2 and resumed["updates"] == [30]
