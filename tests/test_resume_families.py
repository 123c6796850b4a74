"""Every family resumes: gpipe (torch pipelining) exactly, pdasgd/hogwild/lpp_sgd (threads) from
the checkpoint's weights, momentum and batch. Each run is killed with SIGKILL after its first
checkpoint, then resumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import torch
from conftest import QUICK, dpbp_exe, make_cfg
from test_failures import SETTINGS, running, when_checkpointed, worker_pids

from dpbp.launch import launch

pytestmark = pytest.mark.slow


def untimed(summary: dict) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "train_seconds"} for e in summary["history"]]


def test_gpipe_killed_after_a_checkpoint_resumes_exactly(tmp_path):
    run_dir, ref_dir = tmp_path / "run", tmp_path / "reference"
    overrides = ("algo=gpipe", "gpus=2", *SETTINGS)
    when_checkpointed(run_dir, lambda: os.kill(worker_pids(run_dir)[0], signal.SIGKILL))
    with pytest.raises(RuntimeError, match=r"worker rank 0 \(module 1\) was killed by signal 9"):
        launch(make_cfg(*overrides), run_dir)
    assert not any(running(p) for p in worker_pids(run_dir).values())
    resumed = launch(make_cfg(*overrides, "resume=true"), run_dir)
    ref = launch(make_cfg(*overrides), ref_dir)
    assert untimed(resumed) == untimed(ref) and resumed["epochs"] == 3
    for s in range(2):
        a = torch.load(ref_dir / "checkpoints" / f"stage{s}.pt", weights_only=True)
        b = torch.load(run_dir / "checkpoints" / f"stage{s}.pt", weights_only=True)
        assert all(torch.equal(a["module"][n], b["module"][n]) for n in a["module"])


@pytest.mark.parametrize("algo", ["pdasgd", "hogwild", "lpp_sgd"])
def test_threads_killed_after_a_checkpoint_resume_from_it(tmp_path, algo):
    """One device, its process killed with SIGKILL in epoch 2: the resumed run starts from the
    epoch-1 checkpoint (history, update count, staleness counters) and completes."""
    run_dir = tmp_path / "run"
    args = [dpbp_exe(), "train", *QUICK, f"algo={algo}", *SETTINGS, f"hydra.run.dir={run_dir}"]
    p = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    saved: list[dict] = []

    def kill() -> None:
        saved.append(torch.load(run_dir / "checkpoints" / "run.pt", weights_only=True))
        p.send_signal(signal.SIGKILL)

    when_checkpointed(run_dir, kill).join(timeout=300)
    assert p.wait(timeout=60) == -signal.SIGKILL
    part = torch.load(run_dir / "checkpoints" / "stage0.pt", weights_only=True)
    assert part["tick"] == saved[0]["tick"] == part["steps"]  # a batch boundary, all applied
    resumed = launch(make_cfg(f"algo={algo}", *SETTINGS, "resume=true"), run_dir)
    assert resumed["status"] == "completed" and resumed["epochs"] == 3
    assert untimed(resumed)[:1] == [{k: v for k, v in saved[0]["history"][0].items()
                                     if k != "train_seconds"}]
    assert resumed["updates"] == [resumed["steps"]]  # every batch once, across the kill
    assert resumed["final_test_acc"] > 0.5  # it kept learning from the checkpoint's weights
    assert "thread timing" in resumed["resume_guarantee"]


def test_hogwild_on_two_devices_killed_names_the_worker_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ("algo=hogwild", "gpus=2", *SETTINGS)
    when_checkpointed(run_dir, lambda: os.kill(worker_pids(run_dir)[1], signal.SIGKILL))
    with pytest.raises(RuntimeError, match=r"worker rank 1 \(replica 1\) was killed"):
        launch(make_cfg(*overrides), run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    resumed = launch(make_cfg(*overrides, "resume=true"), run_dir)
    assert resumed["status"] == "completed" and resumed["epochs"] == 3
    assert resumed["updates"] == [resumed["steps"]]
