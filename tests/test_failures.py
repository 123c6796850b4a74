"""Failures of distributed runs with real gloo worker processes: a worker killed with SIGKILL,
SIGTERM to the parent; how the parent names the cause; and the diagnosis rules on their own.

Each killed or stopped run is then resumed under executor=local (the same numbers as dist, see
test_executor.py) and compared, bit for bit, with a run that was never stopped.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import make_cfg

from dpbp import failures, lifecycle, schedule
from dpbp.launch import launch
from dpbp.train import train

TIMEOUT_S = 20
SETTINGS = ("model.name=resnet8", "trainer.epochs=3", "seed=3", "trainer.check_every=5",
            "sched.milestones=[2]", f"dist.timeout_s={TIMEOUT_S}")


def running(pid: int) -> bool:
    """Whether a process with this pid still runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def worker_pids(run_dir: Path) -> dict[int, int]:
    return {r: rec["pid"] for r, rec in failures.read(run_dir).items()}


def when_checkpointed(run_dir: Path, action) -> threading.Thread:
    """Run `action()` as soon as the run's first checkpoint is committed (epoch 1 done)."""
    def wait() -> None:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "run.pt").exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        action()

    th = threading.Thread(target=wait, daemon=True)
    th.start()
    return th


def assert_resumes_exactly(run_dir: Path, algo: str, k: int) -> None:
    """Resume the stopped run (executor=local) and compare it with a run never stopped."""
    overrides = (f"algo={algo}", f"gpus={k}", *SETTINGS)
    ref_dir = run_dir.parent / "reference"
    ref = train(make_cfg(*overrides, "executor=local"), ref_dir)
    resumed = train(make_cfg(*overrides, "executor=local", "resume=true"), run_dir)
    untimed = [[{key: v for key, v in e.items() if key != "train_seconds"} for e in s["history"]]
               for s in (ref, resumed)]
    assert untimed[0] == untimed[1] and ref["updates"] == resumed["updates"]
    for s in range(k):
        a = torch.load(ref_dir / "checkpoints" / f"stage{s}.pt", weights_only=True)
        b = torch.load(run_dir / "checkpoints" / f"stage{s}.pt", weights_only=True)
        assert all(torch.equal(a["module"][n], b["module"][n]) for n in a["module"])


@pytest.mark.slow
@pytest.mark.parametrize("algo,k,victim", [("ddg", 2, 1), ("fdg", 3, 1)])
def test_a_killed_worker_ends_the_run_at_once_naming_it(tmp_path, algo, k, victim):
    run_dir = tmp_path / "run"
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(worker_pids(run_dir)[victim], signal.SIGKILL)

    when_checkpointed(run_dir, kill)
    with pytest.raises(RuntimeError) as e:
        launch(make_cfg(f"algo={algo}", f"gpus={k}", *SETTINGS), run_dir)
    took = time.monotonic() - killed_at[0]
    line = str(e.value)
    assert line.startswith(f"worker rank {victim} (module {victim + 1}) was killed by signal 9 "
                           "(SIGKILL) while "), line
    assert line.split(" while ")[1].startswith(("training epoch", "evaluating epoch",
                                                "writing the checkpoint of epoch"))
    assert took < TIMEOUT_S, took  # nobody waited for a timeout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == line
    pids = worker_pids(run_dir)
    assert len(pids) == k and not any(running(p) for p in pids.values())
    # the neighbours saw the peer go; none of them is blamed
    records = failures.read(run_dir)
    assert all(records[r]["peer_lost"] for r in records if r != victim)
    assert "status" not in records[victim]
    assert_resumes_exactly(run_dir, algo, k)


@pytest.mark.slow
def test_sigterm_to_the_parent_stops_cleanly_with_a_checkpoint_that_resumes(tmp_path):
    run_dir = tmp_path / "run"
    proc: list = []

    def terminate() -> None:
        while not proc:
            time.sleep(0.01)
        proc[0].send_signal(signal.SIGTERM)

    import subprocess

    from conftest import QUICK, dpbp_exe

    when_checkpointed(run_dir, terminate)
    args = [dpbp_exe(), "train", *QUICK, "algo=fr", "gpus=2", *SETTINGS,
            f"hydra.run.dir={run_dir}"]
    p = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    proc.append(p)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 128 + signal.SIGTERM, err
    lines = [ln for ln in err.splitlines() if ln.startswith("dpbp: ")]
    assert len(lines) == 2 and "Traceback" not in out + err, err
    assert lines[0].startswith("dpbp: stopped by SIGTERM at tick ")
    assert f"resume={run_dir}" in lines[1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == lines[0][len("dpbp: "):]
    tick = int(lines[0].split("tick ")[1].split(" ")[0])
    run = torch.load(run_dir / "checkpoints" / "run.pt", weights_only=True)
    # after the epoch-1 checkpoint the signal followed: inside epoch 2 or at its end (a fast
    # epoch can end before the parent's signal reaches the workers)
    assert run["tick"] == tick and tick > 22
    assert not any(running(pid) for pid in worker_pids(run_dir).values())
    assert_resumes_exactly(run_dir, "fr", 2)


def test_a_run_directory_that_takes_no_files_is_bad_input(tmp_path, monkeypatch):
    """A full disk (or a read-only one) under the run directory: found before training."""
    import errno

    from dpbp.errors import ConfigError
    from dpbp.launch import check_writable

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(ConfigError, match=r"cannot write to the run directory .* \(No space left "
                                          r"on device\); choose another with hydra.run.dir"):
        check_writable(tmp_path / "run")


def test_sigterm_to_a_single_process_run_stops_it_with_a_checkpoint(tmp_path):
    """gpus=1 trains in the parent itself: the handler launch() installs turns SIGTERM into a
    stop at the next chunk end, with a checkpoint there, and the run resumes to the end."""
    from dpbp.errors import Interrupted

    run_dir = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    when_checkpointed(run_dir, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(Interrupted, match="stopped by SIGTERM at tick") as e:
        launch(make_cfg(*SETTINGS), run_dir)
    assert e.value.signum == signal.SIGTERM
    run = torch.load(run_dir / "checkpoints" / "run.pt", weights_only=True)
    assert run["epoch"] >= 1 and f"at tick {run['tick']} " in str(e.value)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is gone again
    resumed = launch(make_cfg(*SETTINGS, "resume=true"), run_dir)
    assert resumed["epochs"] == 3 and resumed["updates"] == [3 * 22]


# -- without processes ---------------------------------------------------------------------------


def test_signal_handlers_set_a_flag_while_the_run_polls():
    from dpbp.interrupt import StopRequest, install

    stop = StopRequest()
    restore = install(stop)
    try:
        with pytest.raises(KeyboardInterrupt):  # nobody polls yet: the ordinary interrupt
            os.kill(os.getpid(), signal.SIGINT)
        stop.signum, stop.watched = None, True
        os.kill(os.getpid(), signal.SIGTERM)  # the run will stop at its next chunk end
        assert stop.signum == signal.SIGTERM and stop.reason == "by SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second signal stops a single process at once
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        restore()


def write_records(run_dir: Path, records: list[dict]) -> None:
    for rec in records:
        path = run_dir / failures.RECORDS / f"rank{rec['rank']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"pid": 1, "started": 0.0, **rec}))


def test_diagnose_blames_a_worker_that_raised_not_its_victims(tmp_path):
    write_records(tmp_path, [
        {"rank": 0, "status": "failed", "error": "RuntimeError: connection closed by peer",
         "peer_lost": True, "ended": 1.0},
        {"rank": 1, "status": "failed", "error": "OutOfMemoryError: CUDA out of memory",
         "peer_lost": False, "ended": 2.0},
        {"rank": 2, "status": "failed", "error": "RuntimeError: timed out", "peer_lost": True,
         "ended": 0.5},
    ])
    # torchelastic noticed rank 0 first: a victim
    status, line = lifecycle.diagnose(tmp_path, 3, 1, {0: 1}, "connection closed by peer")
    assert (status, line) == ("failed", "worker rank 1 (module 2) failed: OutOfMemoryError: "
                                        "CUDA out of memory")


def test_diagnose_picks_the_earliest_divergence(tmp_path):
    write_records(tmp_path, [
        {"rank": 0, "status": "failed", "error": "Divergence: at tick 9", "peer_lost": False,
         "tick": 9, "ended": 1.0},
        {"rank": 1, "status": "failed", "error": "Divergence: at tick 8", "peer_lost": False,
         "tick": 8, "ended": 2.0},
    ])
    assert lifecycle.diagnose(tmp_path, 2, 1, {0: 1})[1].endswith("at tick 8")


def test_diagnose_names_a_silent_death_and_replicas(tmp_path):
    write_records(tmp_path, [
        {"rank": 0, "status": "failed", "error": "RuntimeError: connection closed by peer",
         "peer_lost": True, "ended": 1.0},
        {"rank": 3},  # started, never reported: killed
    ])
    status, line = lifecycle.diagnose(tmp_path, 2, 2, {0: 1}, "connection closed by peer")
    assert line.startswith("worker rank 3 (module 2 of replica 1) died without reporting")
    status, line = lifecycle.diagnose(tmp_path, 2, 2, {3: -signal.SIGKILL})
    assert line == "worker rank 3 (module 2 of replica 1) was killed by signal 9 (SIGKILL)"


def test_a_lost_peer_is_told_from_an_error_of_its_own():
    assert failures.is_peer_lost(RuntimeError("[pair.cc:561] Connection closed by peer [::1]"))
    assert failures.is_peer_lost(torch.distributed.DistBackendError("NCCL watchdog timed out"))
    assert not failures.is_peer_lost(RuntimeError("CUDA out of memory"))
    assert not failures.is_peer_lost(ValueError("connection closed by peer"))


def test_diagnose_names_a_worker_that_stopped_responding(tmp_path):
    write_records(tmp_path, [
        {"rank": 0, "status": "failed", "error": "PeerTimeout: rank 1 sent no grad message",
         "peer_lost": True, "peer": 1, "ended": 1.0},
        {"rank": 1},  # stopped (SIGSTOP) or stuck: never reported
    ])
    status, line = lifecycle.diagnose(tmp_path, 2, 1, {0: 1})
    assert line == ("worker rank 1 (module 2) stopped responding: worker rank 0 (module 1) "
                    "waited dist.timeout_s for it; it was terminated")


def test_a_point_to_point_wait_gives_up_after_the_timeout():
    """gloo would wait for a message forever; P2P names the silent neighbour instead."""
    from dpbp.p2p import P2P, PeerTimeout

    class Work:
        def wait(self, timeout=None):
            assert timeout is not None and timeout.total_seconds() == 3
            raise RuntimeError("[unbound_buffer.cc:78] Timed out waiting 3000ms for recv")

    class Comm:
        def irecv(self, tensor, src, group):
            return Work()

    groups = {kind: ["g"] for kind in ("act", "grad", "eval")}
    link = P2P(1, [4, 5], [(3,), (2,)], 8, torch.device("cpu"), groups, comm=Comm(),
               timeout_s=3)
    link.expect([schedule.Instr(schedule.RECV_ACT, 0)])
    with pytest.raises(PeerTimeout, match="rank 4 sent no act message for 3 s") as e:
        link.recv("act", 0)
    assert e.value.peer == 4 and failures.is_peer_lost(e.value)
