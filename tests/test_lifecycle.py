"""The lifecycle without worker processes: how a worker's every way of ending becomes an exit
status and a record, how the parent names the cause from the records, the bounded shutdown, and
the rows of issue 16 that end before any worker starts (the CLI in-process: bad paths, a full
disk, resumes the pre-flight refuses, a resume with nothing left to train, bench's keys).

The rows with real workers and signals are in test_signals.py.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import QUICK, make_cfg
from test_failures import write_records

from dpbp import failures, lifecycle, rundir
from dpbp.cli import main
from dpbp.errors import ConfigError, Interrupted, Stopped
from dpbp.lifecycle import Phase, WorkerLife

SMALL = ("model.name=resnet8", "dist.timeout_s=20")


def dpbp_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("dpbp: ")]


# -- a worker's ending -------------------------------------------------------------------------


@pytest.mark.parametrize("raised,code,status", [
    (Stopped(signal.SIGTERM), 143, "interrupted"),  # a signal during start-up
    (KeyboardInterrupt(), 130, "interrupted"),  # torch.multiprocessing would exit 0 on it
    (Interrupted("stopped by SIGINT at tick 9", signal.SIGINT), 130, "interrupted"),
])
def test_a_worker_never_ends_with_keyboard_interrupt(tmp_path, raised, code, status):
    """torch.multiprocessing swallows a KeyboardInterrupt and exits 0 without a result, which
    torchelastic waits for forever (the hang of issue 16's SIGINT rows): WorkerLife turns it into
    128+N and records why."""
    with pytest.raises(SystemExit) as e:
        with WorkerLife(tmp_path, 1, timeout_s=5, wait_on_peer=False):
            raise raised
    assert e.value.code == code
    rec = failures.read(tmp_path)[1]
    assert rec["status"] == status and rec["phase"] == Phase.STARTUP.value
    if isinstance(raised, KeyboardInterrupt):
        assert rec["error"].endswith("while starting; before training began")


def test_a_worker_records_its_phases_and_its_error(tmp_path):
    with pytest.raises(ValueError):
        with WorkerLife(tmp_path, 0, timeout_s=5, wait_on_peer=False) as life:
            life.stop.enter(Phase.TRAINING, 2)
            assert failures.read(tmp_path)[0]["phase"] == "training"
            life.stop.enter(Phase.CHECKPOINT, 2)
            raise ValueError("bad\nsecond line")
    rec = failures.read(tmp_path)[0]
    assert (rec["status"], rec["phase"], rec["epoch"], rec["error"]) == \
        ("failed", "checkpoint", 2, "ValueError: bad")
    assert rec["pid"] == os.getpid() and life.stop.watched


def test_a_signal_stops_start_up_at_once_and_training_at_a_checked_chunk(tmp_path):
    from dpbp.interrupt import StopRequest, install

    stop = StopRequest()
    restore = install(stop, grace_s=60)
    try:
        with pytest.raises(Stopped) as e:
            os.kill(os.getpid(), signal.SIGTERM)
        assert e.value.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # a second signal in a worker: no second exception
        stop2 = StopRequest()
        restore()
        restore = install(stop2, grace_s=60)
        stop2.enter(Phase.TRAINING, 1)
        os.kill(os.getpid(), signal.SIGTERM)  # polled from now on: only the flag
        assert stop2.signum == signal.SIGTERM
    finally:
        restore()
        for t in threading.enumerate():  # the exit timers a worker's first signal starts
            if isinstance(t, threading.Timer):
                t.cancel()


def test_a_stop_swallowed_by_a_finalizer_is_raised_before_the_run_begins(capsys):
    """A signal during start-up that lands inside a finalizer (or an import-lock callback):
    Python drops the handler's Stopped there. Nothing is printed for it, the request keeps it,
    and the process stops when it would begin polling, as if the exception had gone through.
    (Seen once in CI: SIGINT while a worker imported, a traceback on stderr.)"""
    from dpbp.interrupt import StopRequest, install

    class SignalledWhileDying:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100_000):  # the handler runs here, inside the finalizer
                pass

    stop, before = StopRequest(), sys.unraisablehook
    stop.enter(Phase.STARTUP)
    restore = install(stop)
    try:
        SignalledWhileDying()  # collected at once: the Stopped raised in __del__ is dropped
        assert stop.signum == signal.SIGINT
        stop.enter(Phase.STARTUP)  # not a polled phase: still starting
        with pytest.raises(Stopped) as e:
            stop.enter(Phase.EVALUATION, 0)
        assert (e.value.signum, e.value.phase) == (signal.SIGINT, Phase.STARTUP)
    finally:
        restore()
    assert "Traceback" not in capsys.readouterr().err
    assert sys.unraisablehook is before  # put back


# -- naming the cause --------------------------------------------------------------------------


def test_a_worker_killed_while_starting_is_named_not_the_survivor_the_launcher_stopped(tmp_path):
    write_records(tmp_path, [
        {"rank": 0, "phase": "start-up"},  # killed: never reported
        {"rank": 1, "phase": "start-up", "status": "interrupted", "ended": 1.0,
         "error": "stopped by SIGTERM while starting; before training began"},
    ])
    assert lifecycle.diagnose(tmp_path, 2, 1, {0: -9}) == (
        "failed", "worker rank 0 (module 1) was killed by signal 9 (SIGKILL) while starting")
    # the same records after the user's Ctrl-C: an interrupt
    assert lifecycle.diagnose(tmp_path, 2, 1, {1: 130}, asked=signal.SIGINT)[0] == "interrupted"


def test_a_worker_that_hangs_in_a_collective_is_named_as_such(tmp_path):
    """SIGSTOP of a pdasgd or gpipe worker: its peer's collective times out (no PeerTimeout
    naming the rank); the silent one is the cause, not a death."""
    write_records(tmp_path, [
        {"rank": 0, "phase": "training", "epoch": 3, "status": "failed", "ended": 1.0,
         "peer_lost": True, "error": "RuntimeError: [unbound_buffer.cc:78] Timed out waiting "
                                     "20000ms for recv operation to complete"},
        {"rank": 1, "phase": "training", "epoch": 3},
    ])
    assert lifecycle.diagnose(tmp_path, 1, 2, {0: 1}) == (
        "failed", "worker rank 1 (replica 1) stopped responding while training epoch 3: worker "
                  "rank 0 (replica 0) waited dist.timeout_s for it; it was terminated")


def test_a_worker_the_users_signal_caught_still_importing_was_stopped_not_failed(tmp_path):
    """Ctrl-C reaches a worker before it has a record or a handler (it dies of SIGINT)."""
    assert lifecycle.diagnose(tmp_path, 2, 1, {0: -signal.SIGINT}, asked=signal.SIGINT) == (
        "interrupted", "stopped by SIGINT while starting; before training began")


def test_the_cause_names_the_phase_and_epoch(tmp_path):
    write_records(tmp_path, [
        {"rank": 0, "phase": "evaluation", "epoch": 3},
        {"rank": 1, "phase": "checkpoint", "epoch": 2, "status": "failed", "ended": 1.0,
         "peer_lost": False, "error": "the disk is full: cannot write checkpoint file x"},
    ])
    assert lifecycle.diagnose(tmp_path, 2, 1, {1: 1})[1] == (
        "worker rank 1 (module 2) failed while writing the checkpoint of epoch 2: the disk is "
        "full: cannot write checkpoint file x")
    (tmp_path / failures.RECORDS / "rank1.json").unlink()
    assert lifecycle.diagnose(tmp_path, 1, 2, {0: -9})[1] == (
        "worker rank 0 (replica 0) was killed by signal 9 (SIGKILL) while evaluating epoch 3")


# -- the bounded shutdown ----------------------------------------------------------------------


def stubborn_process() -> subprocess.Popen:
    """A process that ignores SIGTERM, like a worker blocked in a collective (its Python
    handler never runs)."""
    p = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal("
                          "signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
                          "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


@pytest.mark.slow  # starts small helper processes (no torch)
@pytest.mark.parametrize("event", ["signal", "death"])
def test_the_supervisor_bounds_the_shutdown(tmp_path, event):
    """After the user's signal (passed on, then dist.timeout_s + slack) or a worker's death
    (slack / 2: with a peer gone there is nothing to wait for), a worker that does not end is
    killed, and the parent's wait is given up (Abandoned) soon after, whatever the launcher
    does; the killed survivor is not named as the cause."""
    stubborn = stubborn_process()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        write_records(tmp_path, [{"rank": 0, "pid": stubborn.pid, "phase": "training"},
                                 {"rank": 1, "pid": dead.pid, "phase": "start-up"}][
            :1 if event == "signal" else 2])
        before = signal.getsignal(signal.SIGTERM)
        t0 = time.monotonic()
        with pytest.raises(lifecycle.Abandoned):
            with lifecycle.Supervisor(tmp_path, timeout_s=1.5, slack_s=0.5) as sup:
                if event == "signal":
                    os.kill(os.getpid(), signal.SIGTERM)  # passed on to the "worker": ignored
                    assert sup.asked == signal.SIGTERM and (tmp_path / "STOP").exists()
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:  # the launcher's wait, interrupted
                    time.sleep(0.05)
        took = time.monotonic() - t0
        assert stubborn.wait(timeout=5) == -signal.SIGKILL and sup.killed == [stubborn.pid]
        assert (2.0 <= took < 4.5) if event == "signal" else (0.75 <= took < 2.0), took
        assert not (tmp_path / "STOP").exists()
        assert signal.getsignal(signal.SIGTERM) is before  # handlers given back
        status, line = sup.conclude(2, 1, {0: -signal.SIGKILL, 1: -signal.SIGKILL})
        if event == "signal":
            assert (status, line) == ("interrupted", sup.late())
        else:
            assert line == "worker rank 1 (module 2) was killed by signal 9 (SIGKILL) while " \
                           "starting"
    finally:
        stubborn.kill()
        stubborn.wait()


# -- the run-directory lock ----------------------------------------------------------------------


def test_the_lock_is_reentrant_names_its_owner_and_goes_away(tmp_path):
    rundir.acquire(tmp_path / "run")
    rundir.acquire(tmp_path / "run")
    owner = rundir.owner(tmp_path / "run")
    assert owner["pid"] == os.getpid() and owner["host"]
    rundir.release(tmp_path / "run")
    assert rundir.holds(tmp_path / "run")
    rundir.release(tmp_path / "run")
    assert not rundir.holds(tmp_path / "run") and not (tmp_path / "run" / ".lock").exists()


def test_a_stale_lock_file_is_taken_over(tmp_path):
    """A run killed with -9 leaves its lock file, but not its lock."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": 0}))
    with rundir.hold(run):
        assert rundir.owner(run)["pid"] == os.getpid()


@pytest.mark.slow  # a helper process holds the lock
def test_a_second_run_in_a_directory_in_use_is_refused_and_touches_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from pathlib import Path; from dpbp import rundir; "
         f"rundir.acquire(Path({str(run)!r})); print('held', flush=True); "
         "import time; time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in run.iterdir())
        code = main(["train", *QUICK, *SMALL, "resume=true", f"hydra.run.dir={run}"])
        err = capsys.readouterr().err
        since = time.strftime("%H:%M:%S", time.localtime(rundir.owner(run)["started"]))
        assert code == 2 and dpbp_lines(err) == [
            f"dpbp: the run directory {run} is in use by process {holder.pid} on "
            f"{os.uname().nodename} (started {since}); wait for that run to end or stop it, or "
            "choose another directory with hydra.run.dir=DIR."]
        assert sorted(p.name for p in run.iterdir()) == before == [".lock"]
        with pytest.raises(ConfigError, match="is in use by process"):
            rundir.check_free(run)  # a resume=<run> from elsewhere is refused too
        holder.kill()  # killed: its lock goes with it
        holder.wait(timeout=10)
        with rundir.hold(run):
            pass
    finally:
        holder.kill()
        holder.wait()


# -- the rows that end before any worker starts (the CLI, in-process) ----------------------------


def test_a_run_directory_under_proc_is_one_sentence(tmp_path, capsys):
    code = main(["train", *QUICK, "hydra.run.dir=/proc/x"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and dpbp_lines(err) == [
        "dpbp: cannot create the run directory /proc/x: /proc takes no files (no such file or "
        "directory); choose another with hydra.run.dir=DIR."]


def test_a_disk_already_full_at_start_is_one_sentence(tmp_path, capsys, monkeypatch):
    """The probe write fails like a full disk does (test_signals.py fills a real tmpfs)."""
    real = tempfile.TemporaryFile

    def full(*args, **kwargs):
        f = real(*args, **kwargs)

        class Full:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, data):
                raise OSError(errno.ENOSPC, "No space left on device")

        return Full()

    monkeypatch.setattr(tempfile, "TemporaryFile", full)
    code = main(["train", *QUICK, f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and dpbp_lines(err) == [
        f"dpbp: cannot create the run directory {tmp_path / 'run'}: {tmp_path} takes no files "
        "(the disk is full); choose another with hydra.run.dir=DIR."]
    assert not (tmp_path / "run").exists()


def test_bench_with_a_train_key_is_one_sentence_naming_its_keys(capsys):
    code = main(["bench", "trainer.batch_size=128"])
    err = capsys.readouterr().err
    lines = dpbp_lines(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("dpbp: dpbp bench has no key trainer.batch_size; its keys are "
                               "algos, batch_size, ceiling, device, epochs, gpus, ")
    assert lines[0].endswith("goes to every run with train=[trainer.batch_size=128].")


FDG2 = ("algo=fdg", "gpus=2", *SMALL, "seed=4", "trainer.check_every=5")


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> Path:
    """A finished 2-epoch fdg run on 2 modules (trained in-process: executor=local)."""
    from dpbp.launch import launch

    run = tmp_path_factory.mktemp("done") / "run"
    launch(make_cfg(*FDG2, "trainer.epochs=2", "executor=local"), run)
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("change,message", [
    ("trainer.epochs=1", "the checkpoint is at epoch 2, past trainer.epochs=1; resume with "
                         "trainer.epochs=2 or more, or start a new run without resume."),
    ("trainer.max_steps=10", "the checkpoint is at epoch 2, past trainer.max_steps=10; resume "
                             "with a larger trainer.max_steps, or start a new run without "
                             "resume."),
    ("split.balance=[3,2]", "the checkpoint was trained with split.balance=[2, 3] but this run "
                            "cuts the model as [3, 2]; resume with split.balance=[2,3]."),
])
def test_a_resume_the_checkpoint_cannot_give_is_refused_before_any_worker(two_epochs, tmp_path,
                                                                         capsys, change,
                                                                         message):
    run = copy_of(two_epochs, tmp_path)
    summary = (run / "summary.json").read_text()
    code = main(["train", *QUICK, *FDG2, "trainer.epochs=2", change, "resume=true",
                 f"hydra.run.dir={run}"])
    err = capsys.readouterr().err
    assert code == 2 and dpbp_lines(err) == [f"dpbp: {message}"] and "Traceback" not in err
    assert not (run / failures.RECORDS).exists()  # no worker started
    assert (run / "summary.json").read_text() == summary


def test_a_resume_with_nothing_left_to_train_gives_the_summary_every_time(two_epochs, tmp_path,
                                                                         capsys):
    run = copy_of(two_epochs, tmp_path)
    done = json.loads((run / "summary.json").read_text())
    for _ in range(3):
        code = main(["train", *QUICK, *FDG2, "trainer.epochs=2", "resume=true",
                     f"hydra.run.dir={run}"])
        err = capsys.readouterr().err
        assert code == 0, err
        assert dpbp_lines(err) == [f"dpbp: nothing left to train: the checkpoint in "
                                   f"{run / 'checkpoints'} is at the end of epoch 2 of 2; its "
                                   "summary follows."]
        assert json.loads((run / "summary.json").read_text()) == done
        assert not (run / failures.RECORDS).exists()  # no worker started


def test_a_disk_that_fills_after_epoch_1_is_one_line_naming_the_kept_checkpoint(
        tmp_path, capsys, monkeypatch):
    """In-process (gpus=1): every write under the run directory fails from epoch 2's
    checkpoint on, summary.json included; test_signals.py fills a real tmpfs under workers."""
    run = tmp_path / "run"
    real_save, real_replace = torch.save, os.replace
    full = []

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            full.append(True)
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if full and str(dst).startswith(str(run)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(os, "replace", replace)
    code = main(["train", *QUICK, *SMALL, "trainer.epochs=3", f"hydra.run.dir={run}"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert dpbp_lines(err) == [
        "dpbp: run failed: the disk is full: cannot write checkpoint file stage0.pt; the "
        f"checkpoint of epoch 1 (tick 22) is kept in {run / 'checkpoints'}; free space, then "
        "resume.",
        f"dpbp: summary.json could not be written in {run} (the disk is full)",
        f"dpbp: continue from the checkpoint (epoch 1, tick 22) with the same command plus "
        f"resume={run}"]
    assert not (run / "summary.json").exists()
    assert torch.load(run / "checkpoints" / "run.pt", weights_only=True)["epoch"] == 1


# -- signals in the polled phases (in-process: the run loop is the same for every process) ------


@pytest.mark.parametrize("phase", ["evaluation", "checkpoint"])
def test_a_signal_while_evaluating_or_checkpointing_stops_at_the_next_agreed_tick(
        tmp_path, monkeypatch, phase):
    """SIGTERM during epoch 1's evaluation: the evaluation finishes, the run stops at the end of
    epoch 1 with its checkpoint; during epoch 1's checkpoint: the checkpoint finishes, the run
    stops at the next checked chunk of epoch 2 with another one."""
    from dpbp import checkpoint
    from dpbp.launch import launch
    from dpbp.tick import TickRunner

    target = (TickRunner, "evaluate") if phase == "evaluation" else (checkpoint, "commit")
    real = getattr(*target)
    calls = []

    # the run evaluates the untrained model twice (train and test split) before epoch 1
    first = 2 if phase == "evaluation" else 0

    def signalled(*args, **kwargs):
        if len(calls) == first:
            os.kill(os.getpid(), signal.SIGTERM)  # lands in the middle of this phase
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(*target, signalled)
    with pytest.raises(Interrupted) as e:
        launch(make_cfg(*SMALL, "trainer.epochs=3", "trainer.check_every=5"), tmp_path)
    run = torch.load(tmp_path / "checkpoints" / "run.pt", weights_only=True)
    if phase == "evaluation":
        assert str(e.value).startswith("stopped by SIGTERM at tick 22 (the end of epoch 1); ")
        assert (run["epoch"], run["tick"]) == (1, 22)
    else:
        assert str(e.value).startswith("stopped by SIGTERM at tick 27 (epoch 2, after 5 of ")
        assert (run["epoch"], run["tick"]) == (1, 27)
    assert e.value.signum == signal.SIGTERM


@pytest.mark.parametrize("algo", ["fdg", "pdasgd", "gpipe"])
def test_the_checkpoint_position_is_checked_in_each_familys_units(algo):
    """Ticks for the tick family (fdg drains K-1 more), batches for threads and pipelining."""
    from dpbp import schedule
    from dpbp.checkpoint import check_position

    cfg = make_cfg(f"algo={algo}", "gpus=2", "trainer.epochs=2")
    steps = 11 if algo == "pdasgd" else 22  # pdasgd: a global batch is 2 x 64
    end = schedule.num_ticks(algo, cfg.modules, 2 * steps)
    done = {"epoch": 2, "tick": end, "drained": True}
    check_position(done, cfg, steps)  # nothing left to train: accepted here
    inside = {"epoch": 1, "tick": steps + 3, "drained": False}
    check_position(inside, cfg, steps)
    with pytest.raises(ConfigError, match=r"^the checkpoint is at epoch 2, past trainer\."
                                          r"epochs=1; resume with trainer\.epochs=2 or more"):
        check_position(done, make_cfg(f"algo={algo}", "gpus=2", "trainer.epochs=1"), steps)
    with pytest.raises(ConfigError, match=rf"^the checkpoint is at tick {steps + 3} \(inside "
                                          r"epoch 2\), past trainer\.max_steps=5"):
        check_position(inside, make_cfg(f"algo={algo}", "gpus=2", "trainer.epochs=2",
                                        "trainer.max_steps=5"), steps)
