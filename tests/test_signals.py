"""Issue 16's matrix with real processes: the `dpbp` command with 2 gloo workers, signalled or
killed from outside in each phase, for each family whose code differs there.

Every case checks the same things: the exit status, summary.json's status and line, exactly one
line naming the cause (no traceback), a bounded time from the event to the parent's exit, no
process of the run left 3 s after the parent exits (the parent runs in a session of its own, and
every process it starts stays in it), and a resumable checkpoint where one was due.

Which family where, and why that covers the others: start-up is the same code in every family
(lifecycle.WorkerLife around the runner's construction), but the runners build different process
groups, so a kill while starting runs for all three (tick, threads, pipelining). Mid-training,
the tick family is covered by test_failures.py (kill -9 of ddg/fdg workers, SIGTERM to fr); here
the threads family (pdasgd) and torch pipelining (gpipe). Signals while starting go through the
same worker code in every family: SIGINT to the parent with fdg, Ctrl-C to the group with
pdasgd. The pre-flight and the disk are the parent's and the checkpoint writer's, shared by all.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import QUICK, dpbp_exe, make_cfg

from dpbp import failures
from dpbp.checkpoint import check_resume

pytestmark = pytest.mark.slow

TIMEOUT_S = 20  # dist.timeout_s: a worker gives up on a silent peer, or on its own stop, then
BOUND_S = TIMEOUT_S + 2 * 5 + 10  # the parent ends within it (+ 2 x SLACK_S) + room for load
COMMON = (*QUICK, "model.name=resnet8", "gpus=2", "trainer.check_every=5",
          f"dist.timeout_s={TIMEOUT_S}")


def session(sid: int) -> list[str]:
    """The live processes of session `sid` (pid and command)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ")
                found.append(f"{d} {cmd[:100].decode(errors='replace')}")
    return found


def left_after_3s(sid: int) -> list[str]:
    """What of session `sid` still runs 3 s after its parent exited (checked as it goes)."""
    deadline = time.monotonic() + 3
    while session(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return session(sid)


class Run:
    """`dpbp train` in a session of its own, its output in files."""

    def __init__(self, run_dir: Path, *overrides: str, log: Path) -> None:
        """`log`: where its stderr goes (not on a disk that a test fills)."""
        self.run_dir, self.err_path = run_dir, log
        env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [dpbp_exe(), "train", *COMMON, *overrides, f"hydra.run.dir={run_dir}"],
                cwd=run_dir.parent, env=env, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True)
        self.acted_at = time.monotonic()

    def when(self, ready: Callable[[], bool], timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, self.err_path.read_text()
            assert time.monotonic() < deadline, "the run never got there"
            time.sleep(0.02)

    def records(self) -> dict[int, dict]:
        return failures.read(self.run_dir)

    def starting(self) -> bool:
        """Both workers have started (their records exist) and are still starting."""
        recs = self.records()
        return len(recs) == 2 and all(r.get("phase") == "start-up" for r in recs.values())

    def importing(self) -> bool:
        """Both workers exist but are still importing (no record, no signal handler yet)."""
        spawned = [p for p in session(self.proc.pid) if "spawn_main" in p]
        return len(spawned) == 2 and not self.records()

    def checkpointed(self) -> bool:
        return (self.run_dir / "checkpoints" / "run.pt").exists()

    def act(self, action: Callable[[], None]) -> None:
        action()
        self.acted_at = time.monotonic()

    def end(self, code: int) -> tuple[str, dict]:
        """Wait for the parent (within BOUND_S of the action); check its exit status, that
        nothing of it is left 3 s later, one cause line and no traceback; return that line and
        summary.json."""
        try:
            rc = self.proc.wait(timeout=BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit {BOUND_S} s after the event (a hang)")
        took = time.monotonic() - self.acted_at
        err = self.err_path.read_text()
        assert left_after_3s(self.proc.pid) == [], err
        assert rc == code, err
        assert took < BOUND_S and "Traceback" not in err, err
        lines = [ln[len("dpbp: "):] for ln in err.splitlines() if ln.startswith("dpbp: ")]
        assert len(lines) == 2 and lines[1].startswith(("there is no checkpoint yet",
                                                        "continue from the checkpoint")), err
        summary = json.loads((self.run_dir / "summary.json").read_text())
        line = lines[0].removeprefix("run failed: ")
        assert summary["error"] == line
        return line, summary

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def runs(tmp_path) -> Iterator[Callable[..., Run]]:
    """Start runs; whatever happens, none is left behind."""
    started: list[Run] = []

    def start(*overrides: str) -> Run:
        started.append(Run(tmp_path / "run", *overrides,
                           log=tmp_path / f"stderr{len(started)}.txt"))
        return started[-1]

    yield start
    for r in started:
        r.kill()


def assert_resumable(run: Run, *overrides: str) -> None:
    """The checkpoint the run left is complete: the parent's resume checks accept it."""
    check_resume(make_cfg(*COMMON[len(QUICK):], *overrides, "resume=true"), run.run_dir)


# -- pre-flight ----------------------------------------------------------------------------------


def test_sigterm_during_the_preflight_checks(runs):
    run = runs("algo=fdg")
    run.when(lambda: (run.run_dir / ".hydra" / "overrides.yaml").exists())
    run.act(lambda: run.proc.send_signal(signal.SIGTERM))
    line, summary = run.end(128 + signal.SIGTERM)
    assert line == "stopped by SIGTERM during the pre-flight checks; nothing was started"
    assert summary["status"] == "interrupted" and not (run.run_dir / failures.RECORDS).exists()


# -- start-up ------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo,victim", [("fdg", 0), ("pdasgd", 1), ("gpipe", 1)])
def test_a_worker_killed_while_starting(runs, algo, victim):
    run = runs(f"algo={algo}")
    run.when(run.starting)
    run.act(lambda: os.kill(run.records()[victim]["pid"], signal.SIGKILL))
    line, summary = run.end(1)
    modules = 1 if algo == "pdasgd" else 2
    assert line == (f"{failures.worker_name(victim, modules, 2 // modules)} was killed by "
                    "signal 9 (SIGKILL) while starting")
    assert summary["status"] == "failed"


@pytest.mark.parametrize("algo,to_group,when", [("fdg", False, "starting"),
                                                ("pdasgd", True, "starting"),
                                                ("gpipe", True, "importing")])
def test_sigint_while_starting(runs, algo, to_group, when):
    """SIGINT to the parent (passed on to the workers), or Ctrl-C to the whole process group
    (every worker gets it twice: from the terminal and from the parent); also while the workers
    are still importing, before they have a handler (no KeyboardInterrupt traceback)."""
    run = runs(f"algo={algo}")
    run.when(getattr(run, when))
    pid = run.proc.pid
    run.act(lambda: (os.killpg if to_group else os.kill)(pid, signal.SIGINT))
    line, summary = run.end(128 + signal.SIGINT)
    assert line == "stopped by SIGINT while starting; before training began"
    assert summary["status"] == "interrupted"
    assert not run.checkpointed()


# -- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo,victim", [("pdasgd", 1), ("gpipe", 0)])
def test_a_worker_killed_while_training(runs, algo, victim):
    run = runs(f"algo={algo}", "trainer.epochs=30")
    run.when(run.checkpointed)
    run.act(lambda: os.kill(run.records()[victim]["pid"], signal.SIGKILL))
    line, summary = run.end(1)
    modules = 1 if algo == "pdasgd" else 2
    assert line.startswith(f"{failures.worker_name(victim, modules, 2 // modules)} was killed "
                           "by signal 9 (SIGKILL) while "), line
    assert line.split(" while ")[1].startswith(("training epoch", "evaluating epoch",
                                                "writing the checkpoint of epoch"))
    assert summary["status"] == "failed"
    assert_resumable(run, f"algo={algo}", "trainer.epochs=30")


@pytest.mark.parametrize("algo", ["pdasgd", "gpipe"])
def test_sigterm_while_training_stops_with_a_checkpoint(runs, algo):
    """And, while it runs, a second run in its directory is refused at once (the lock)."""
    run = runs(f"algo={algo}", "trainer.epochs=30")
    run.when(run.checkpointed)
    if algo == "pdasgd":
        second = runs(f"algo={algo}", "trainer.epochs=30", "resume=true")  # the same dir
        assert second.proc.wait(timeout=60) == 2
        assert f"is in use by process {run.proc.pid} " in second.err_path.read_text()
        assert run.proc.poll() is None
    run.act(lambda: run.proc.send_signal(signal.SIGTERM))
    line, summary = run.end(128 + signal.SIGTERM)
    assert line.startswith("stopped by SIGTERM at tick ") and summary["status"] == "interrupted"
    tick = int(line.split("tick ")[1].split(" ")[0])
    import torch

    assert torch.load(run.run_dir / "checkpoints" / "run.pt", weights_only=True)["tick"] == tick
    assert_resumable(run, f"algo={algo}", "trainer.epochs=30")


# -- the disk --------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 16 MiB tmpfs (mounting one needs root: skipped otherwise, see test_lifecycle.py for the
    in-process equivalent)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full."""
    filler = disk / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as f:
        while True:
            f.write(b"\0" * 2**16)
            f.flush()
    return filler


def test_the_disk_fills_after_epoch_1_then_is_full_at_start(small_disk, tmp_path):
    run = Run(small_disk / "run", "algo=fdg", "trainer.epochs=30", log=tmp_path / "stderr.txt")
    try:
        run.when(run.checkpointed)
        run.act(lambda: fill(small_disk))
        try:
            rc = run.proc.wait(timeout=BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail("no exit after the disk filled")
        err = run.err_path.read_text()
        lines = [ln[len("dpbp: "):] for ln in err.splitlines() if ln.startswith("dpbp: ")]
        assert rc == 1 and "Traceback" not in err, err
        assert left_after_3s(run.proc.pid) == [], err
        # the checkpoint it names is the one on disk (epoch 1's, or epoch 2's when the files
        # epoch 1's commit removed made room for one more)
        import torch

        ck = run.run_dir / "checkpoints"
        kept = torch.load(ck / "run.pt", weights_only=True)
        line = lines[0].removeprefix("run failed: ")
        assert "the disk is full" in line and (
            f"the checkpoint of epoch {kept['epoch']} (tick {kept['tick']}) is kept in {ck}"
            in line), err
        if (run.run_dir / "summary.json").exists():  # the failure freed room for it
            summary = json.loads((run.run_dir / "summary.json").read_text())
            assert summary["status"] == "failed" and summary["error"] == line
            assert len(lines) == 2, err
        else:  # said on the console instead
            assert lines[1:-1] == [f"summary.json could not be written in {run.run_dir} (the "
                                   "disk is full)"], err
        # the disk full at start (the run's ending freed its lock file): refused in one sentence
        fill(small_disk)
        again = subprocess.run([dpbp_exe(), "train", *COMMON, "algo=fdg",
                                f"hydra.run.dir={small_disk / 'run2'}"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 2 and again.stderr.strip() == (
            f"dpbp: cannot create the run directory {small_disk / 'run2'}: {small_disk} takes "
            "no files (the disk is full); choose another with hydra.run.dir=DIR.")
        (small_disk / "filler").unlink()
        assert_resumable(run, "algo=fdg", "trainer.epochs=30")
    finally:
        run.kill()
