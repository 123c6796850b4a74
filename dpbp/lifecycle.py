"""A run's lifecycle in one place: its phases, in the parent and in every worker; what a signal,
a worker's death or a write error means in each; and a shutdown that always ends.

Phases (`Phase`): the parent runs the pre-flight checks, then supervises its workers, then shuts
down; each worker (or the only process of a single-process run) goes through start-up, then
training, evaluation and checkpoint per epoch, then shutdown, and records its phase in its record
(failures.py) so that the parent can say what a worker that died was doing.

What each event ends with, per phase (exit status; summary.json status; the one line):

- SIGINT/SIGTERM (signal N) to the parent, to the process group (Ctrl-C) or to every worker:
  - pre-flight: 128+N; interrupted; "stopped by SIGTERM during the pre-flight checks; nothing
    was started" (`guard_preflight`);
  - start-up: 128+N at once; interrupted; "stopped by SIGINT while starting; before training
    began" (a resumed run keeps the checkpoint it started from);
  - training, evaluation, checkpoint: 128+N; interrupted; the processes agree on a tick (an
    evaluation or a checkpoint in progress finishes first), write a checkpoint there and say
    where ("stopped by SIGTERM at tick T (epoch E, ...); checkpoint written to DIR");
  - shutdown: 0; completed (the run had finished; the late signal changes nothing).
- A worker killed (kill -9, out of memory), in any phase of its own: 1; failed; "worker rank R
  (module M) was killed by signal 9 (SIGKILL) while starting | while training epoch E | while
  evaluating epoch E | while writing the checkpoint of epoch E"; the last complete checkpoint
  is kept (the survivors, stopped by the launcher, are not blamed).
- A worker that raises (out of memory, a divergence, a full disk, a damaged file): 1; failed;
  "worker rank R (module M) failed while ...: <its error>"; a write error names the checkpoint
  that is kept ("the disk is full: cannot write checkpoint file stage0.pt; the checkpoint of
  epoch 1 (tick 22) is kept in DIR"). When summary.json itself cannot be written, the console
  says so in one more line.
- A worker that hangs (or is stopped): 1; failed after dist.timeout_s; "... stopped responding".
- Bad input, including a full disk or an unusable run directory found before anything started,
  a resume past trainer.epochs or with another split, a run directory in use: 2; one sentence.

A second signal while the workers stop kills them at once (the last complete checkpoint stays).
A parent killed outright (kill -9) cannot answer: its workers get SIGINT from the kernel, stop
with a checkpoint, and rank 0 writes summary.json ("the parent process P was killed; ...").

Bounded shutdown (`Supervisor`): from the user's first signal, the workers get dist.timeout_s +
SLACK_S to stop (each also exits by itself dist.timeout_s after its own first signal); from the
first worker that dies or fails, the others get SLACK_S / 2 (with a peer gone there is no
consistent checkpoint to write; torch.multiprocessing alone would give a worker blocked in a
collective 30 s). Then the supervisor kills what is left with SIGKILL, and if the launcher still
has not returned SLACK_S later, it interrupts the parent's wait. So the parent exits at most
dist.timeout_s + 2 * SLACK_S after a signal or a worker's end, and no worker outlives it. A hang
with no end in sight is found by the workers themselves after dist.timeout_s (a wait for a peer
gives up), which makes it a worker's end.

Why workers never let KeyboardInterrupt out: torch.multiprocessing treats a worker that ends
with KeyboardInterrupt as killed by its parent and exits it with status 0 without a result, which
torchelastic then waits for forever. `WorkerLife` turns every way a worker ends into an exit
status of its own (128+N, 1) and a record. Workers start with SIGINT/SIGTERM blocked
(`deaf_children`) and unblock them once their handlers are in place, so a signal during their
imports is neither lost nor a traceback.
"""

from __future__ import annotations

import _thread
import contextlib
import enum
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dpbp import failures
from dpbp.errors import Interrupted, Stopped
from dpbp.interrupt import STOP_FILE, StopRequest, install
from dpbp.rundir import describe_os_error

SLACK_S = 5.0  # what shutting down may take beyond dist.timeout_s, per step


class Phase(str, enum.Enum):
    """Where a process of a run is; `polled`: the run loop polls its stop request (a signal asks
    for a stop at an agreed tick) rather than being stopped at once."""

    PREFLIGHT = "pre-flight"
    STARTUP = "start-up"
    TRAINING = "training"
    EVALUATION = "evaluation"
    CHECKPOINT = "checkpoint"
    SHUTDOWN = "shutdown"

    @property
    def polled(self) -> bool:
        """Whether a signal in this phase only sets the stop request."""
        return self not in (Phase.PREFLIGHT, Phase.STARTUP)


def during(phase: str | None, epoch: int | None = None) -> str:
    """'while training epoch 2', 'while starting', ... (a phase as words, for the one line)."""
    e = f" {epoch}" if epoch else ""
    return {
        Phase.PREFLIGHT: "during the pre-flight checks",
        Phase.STARTUP: "while starting",
        Phase.TRAINING: f"while training epoch{e}",
        Phase.EVALUATION: f"while evaluating epoch{e}",
        Phase.CHECKPOINT: f"while writing the checkpoint of epoch{e}",
        Phase.SHUTDOWN: "while shutting down",
    }.get(phase, "while starting")


def signal_name(signum: int) -> str:
    """'SIGTERM' for 15."""
    return signal.Signals(signum).name


# -- the parent ----------------------------------------------------------------------------------


def _route(handler: Callable[[int, Any], None]) -> Callable[[], None]:
    """Route SIGINT and SIGTERM to `handler` (main thread only); return the function that puts
    the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


_held: dict[str, Any] = {"depth": 0, "signum": None}  # see held_signals


def guard_preflight() -> Callable[[], None]:
    """From the start of `dpbp train` until workers run: SIGINT/SIGTERM stop the parent at once
    (Stopped, which the CLI turns into one line and 128+N); nothing has started yet. Return the
    function that puts the previous handlers back."""

    def handler(signum: int, frame: Any) -> None:
        if _held["depth"]:
            _held["signum"] = _held["signum"] or signum
            return
        raise Stopped(signum, Phase.PREFLIGHT)

    return _route(handler)


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Under guard_preflight: a signal during the block stops the parent when the block ends,
    not inside it (an import of torch cut in the middle cannot be done again, and the clean-up
    needs it)."""
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1
    if _held["depth"] == 0 and _held["signum"] is not None:
        signum, _held["signum"] = _held["signum"], None
        raise Stopped(signum, Phase.PREFLIGHT)


def defer_signals() -> Callable[[], None]:
    """The parent's shutdown: the outcome is known and being written; a late signal changes
    nothing (the run ends by itself within moments). Return the function that puts the previous
    handlers back (the next job of a sweep)."""
    return _route(lambda signum, frame: None)


def stopped_line(e: Stopped) -> str:
    """The one line for a process stopped at once by a signal."""
    what = "nothing was started" if e.phase == Phase.PREFLIGHT else "before training began"
    return f"stopped by {signal_name(e.signum)} {during(e.phase)}; {what}"


def write_outcome(run_dir: Path, summary: dict[str, Any]) -> str | None:
    """Write summary.json; None, or the sentence that says why it could not be written (a full
    disk must not turn the run's one line into a traceback)."""
    path = run_dir / "summary.json"
    tmp = path.with_name("summary.json.tmp")
    try:  # like logs.write_summary, without its imports (torch: a signal may have cut one)
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return f"summary.json could not be written in {run_dir} ({describe_os_error(e)})"
    return None


def failure_line(e: BaseException, run_dir: Path) -> str:
    """The one line for a run that failed with `e` in this process: an OSError (a full disk, a
    directory gone) as a sentence with the checkpoint that is kept, else the error's first
    line."""
    if isinstance(e, OSError):
        from dpbp.checkpoint import last_good

        what = f" ({e.filename})" if e.filename else ""
        return f"{describe_os_error(e)}{what}; {last_good(run_dir / 'checkpoints')}"
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def children() -> list[int]:
    """Pids of this process's live child processes (Linux /proc; empty elsewhere)."""
    me, found = os.getpid(), []
    with contextlib.suppress(OSError):
        for d in os.listdir("/proc"):
            if d.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
                    if int(fields[1]) == me and fields[0] != "Z":
                        found.append(int(d))
    return found


class Abandoned(BaseException):
    """Raised in the parent's main thread when the workers did not end in time and the wait for
    the launcher is given up (after the workers were killed)."""


class Supervisor:
    """The parent while its workers run: forwards SIGINT/SIGTERM to them, and bounds how long
    the shutdown takes once a signal came or a worker ended (see the module docstring)."""

    def __init__(self, run_dir: Path, timeout_s: float, slack_s: float = SLACK_S) -> None:
        self.run_dir, self.slack_s, self.grace_s = run_dir, slack_s, timeout_s + slack_s
        self.asked: int | None = None  # the signal the user sent (forwarded to the workers)
        self.second: int | None = None  # a second one: kill the workers at once
        self.killed: list[int] = []  # workers killed because they did not end in time
        self.deadline: float | None = None
        self.abandon = False
        self._done = threading.Event()
        self._restore: Callable[[], None] = lambda: None

    def __enter__(self) -> Supervisor:
        self._restore = _route(self._handler)
        threading.Thread(target=self._watch, daemon=True, name="dpbp-supervisor").start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._restore()
        os.environ.pop("TORCHELASTIC_SIGNALS_TO_HANDLE", None)  # set by elastic_launch
        with contextlib.suppress(OSError):
            (self.run_dir / STOP_FILE).unlink(missing_ok=True)

    def workers(self) -> list[int]:
        """Pids of the workers still running (their records, and the children not yet recorded;
        the resource tracker is a child too and ends with the parent)."""
        pids = {rec["pid"] for rec in failures.read(self.run_dir).values()
                if rec.get("status") is None and failures.running(rec["pid"])}
        return sorted(pids | {p for p in children() if _is_worker(p)})

    def _handler(self, signum: int, frame: Any) -> None:
        if self.abandon:
            raise Abandoned
        if self.asked is not None:  # a second signal: stop now, keep the last checkpoint
            self.second = signum
            self._arm(0.0)
            return
        self.asked = signum
        with contextlib.suppress(OSError):  # for workers that have not installed handlers yet
            (self.run_dir / STOP_FILE).write_text(signal.Signals(signum).name)
        for pid in self.workers():
            with contextlib.suppress(OSError):
                os.kill(pid, signum)
        self._arm(self.grace_s)

    def _arm(self, after_s: float) -> None:
        """Kill what is left `after_s` from now (unless an earlier deadline is set)."""
        deadline = time.monotonic() + after_s
        if self.deadline is None or deadline < self.deadline:
            self.deadline = deadline

    def _watch(self) -> None:
        """Arm the deadline when a worker ends (slack/2 after a death or an error, grace after a
        stop or the end); at the deadline kill the rest; slack later, give up waiting for the
        launcher."""
        while not self._done.wait(0.25):
            for rec in failures.read(self.run_dir).values():
                if not failures.running(rec["pid"]):
                    # after a stop or the end, the others finish theirs; after a death or an
                    # error there is nothing left to wait for (torch.multiprocessing would give
                    # a worker blocked in a collective with the dead one 30 s)
                    ended = rec.get("status") in ("completed", "interrupted")
                    self._arm(self.grace_s if ended else self.slack_s / 2)
            if self.deadline is None or time.monotonic() < self.deadline:
                continue
            for pid in self.workers():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
            if self._done.wait(self.slack_s):
                return
            self.abandon = True
            _thread.interrupt_main(signal.SIGINT)
            return

    def conclude(self, modules: int, replicas: int, exits: dict[int, int | None],
                 message: str = "", messages: dict[int, str] | None = None
                 ) -> tuple[str, str]:
        """(status, line) of a launch that did not complete: the user's stop that had to kill
        the workers, else the cause in the workers' records (diagnose), where the workers the
        supervisor killed itself are not a cause."""
        if self.asked is not None and self.killed:
            return "interrupted", self.late()
        pids = {r: rec.get("pid") for r, rec in failures.read(self.run_dir).items()}
        exits = {r: c for r, c in exits.items() if pids.get(r) not in self.killed}
        return diagnose(self.run_dir, modules, replicas, exits, message, self.asked, messages)

    def late(self) -> str:
        """The line for workers that had to be killed."""
        from dpbp.checkpoint import last_good

        kept = last_good(self.run_dir / "checkpoints")
        if self.second is not None:
            return (f"stopped by a second {signal_name(self.second)}: the workers were killed "
                    f"at once; {kept}")
        return (f"the workers did not stop within {self.grace_s:g} s (dist.timeout_s + "
                f"{self.slack_s:g}) and were killed; {kept}")


@contextlib.contextmanager
def deaf_children() -> Iterator[None]:
    """Block SIGINT/SIGTERM in this thread while it starts workers: a child inherits the mask
    through fork and exec, so that a signal during a worker's imports waits until its handlers
    are in place (WorkerLife unblocks them) instead of printing a KeyboardInterrupt traceback
    from half-started interpreters. The parent still gets them (the supervisor's thread does not
    block them; its Python handler runs in the main thread as usual)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # multiprocessing starts its resource tracker with the first worker and unblocks both
    # signals in this thread afterwards: start it first
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, signal.SIGTERM))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _is_worker(pid: int) -> bool:
    """A child started by multiprocessing's spawn (a worker), not its resource tracker."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"spawn_main" in cmd


# -- naming the cause -------------------------------------------------------------------------


def _where(rec: dict[str, Any]) -> str:
    return f" {during(rec['phase'], rec.get('epoch'))}" if rec.get("phase") else ""


def diagnose(run_dir: Path, modules: int, replicas: int, exits: dict[int, int | None],
             message: str = "", asked: int | None = None,
             messages: dict[int, str] | None = None) -> tuple[str, str]:
    """(status, one line) for a launch that torchelastic reports as failed, from the workers'
    records: `exits` {rank: exit code} of the workers it saw end (negative: killed by that
    signal), `message` the first one's error, `asked` the signal the user sent the parent,
    `messages` {rank: error} that torchelastic collected from workers that raised (for a worker
    that could not write its record: a full disk).

    1. a worker that raised an error of its own (not a lost peer): the earliest one (a divergence:
       the earliest tick);
    2. a stop the user asked for: interrupted, as the workers' records say (a worker that was
       still importing when the signal came has no record: it stopped while starting);
    3. a worker killed by a signal (kill -9, out of memory) that never reported: named with the
       phase it was in (a survivor that the launcher stopped afterwards is not the cause);
    4. a worker that started but never reported: one a neighbour waited for in vain (it hung, or
       was stopped), or one that died without a word;
    5. a stop asked of the workers themselves (a STOP file, a signal to each): interrupted;
    6. else a lost peer, or what torchelastic reported.
    """
    records = failures.read(run_dir)
    for rank, error in (messages or {}).items():  # raised, but the record could not say so
        rec = records.setdefault(rank, {"rank": rank})
        if rec.get("status") is None and error:
            rec.update(status="failed", error=error, ended=0.0,
                       peer_lost=failures.is_peer_lost(RuntimeError(error)))
    name = lambda r: failures.worker_name(r, modules, replicas)  # noqa: E731
    own = [r for r in records.values() if r.get("status") == "failed" and not r.get("peer_lost")]
    if own:
        first = min(own, key=lambda r: (r.get("tick") is None, r.get("tick") or 0, r["ended"]))
        return "failed", f"{name(first['rank'])} failed{_where(first)}: {first['error']}"
    stopped = sorted((r for r in records.values() if r.get("status") == "interrupted"),
                     key=lambda r: r["rank"])
    if asked is not None:  # the user's stop; a worker still importing died of the signal itself
        return "interrupted", (stopped[0]["error"] if stopped
                               else stopped_line(Stopped(asked, Phase.STARTUP)))
    for rank, code in sorted(exits.items()):
        rec = records.get(rank, {})
        if failures.signal_name(code) and rec.get("status") is None:
            return "failed", f"{name(rank)} was killed by {failures.signal_name(code)}{_where(rec)}"
    silent = [r for r, rec in sorted(records.items()) if rec.get("status") is None]
    waited = [rec for rec in records.values() if rec.get("peer") in silent or (
        silent and rec.get("peer_lost") and "timed out" in str(rec.get("error")).lower())]
    if waited:  # alive but silent: stopped (SIGSTOP), or stuck
        rec = waited[0]
        hung = rec["peer"] if rec.get("peer") in silent else silent[0]
        return "failed", (f"{name(hung)} stopped responding{_where(records[hung])}: "
                          f"{name(rec['rank'])} waited dist.timeout_s for it; it was terminated")
    if silent:
        return "failed", (f"{name(silent[0])} died without reporting an error"
                          f"{_where(records[silent[0]])} (killed by a signal, e.g. out of memory "
                          "or kill -9)")
    if stopped:
        return "interrupted", stopped[0]["error"]
    lost = [r for r in records.values() if r.get("status") == "failed"]
    if lost:
        first = min(lost, key=lambda r: r["ended"])
        return "failed", f"{name(first['rank'])} failed{_where(first)}: {first['error']}"
    rank = min(exits) if exits else 0
    return "failed", f"{name(rank)} failed: {message or 'unknown error'}"


# -- a worker --------------------------------------------------------------------------------


class WorkerLife:
    """One worker's lifecycle: its signal handlers, its record and phase, and its exit status.

        with WorkerLife(run_dir, rank, cfg.dist.timeout_s) as life:
            ...                       # start-up, then train(..., stop=life.stop)
            life.completed()

    A signal during start-up stops the worker at once (exit 128+N); later ones set `life.stop`,
    which the run loop polls. Interrupted exits 128+N, an error 1 (re-raised, so that torchelastic
    gets its message); each is recorded first. The worker exits by itself `timeout_s` after its
    first signal if it has not ended by then (a stop that waits on a dead peer)."""

    def __init__(self, run_dir: Path, rank: int, timeout_s: float, wait_on_peer: bool,
                 config: dict[str, Any] | None = None) -> None:
        """`wait_on_peer`: after losing a peer, give the launcher a moment to see the culprit
        first; `config`: the run's, for a summary.json this worker may have to write."""
        self.run_dir, self.timeout_s, self.wait_on_peer = run_dir, timeout_s, wait_on_peer
        self.config, self.parent = config, os.getppid()
        self.stop = StopRequest(listener=self._entered)
        self.record: dict[str, Any] = {"rank": rank}
        self._restore: Callable[[], None] = lambda: None

    def __enter__(self) -> WorkerLife:
        self._restore = install(self.stop, grace_s=self.timeout_s)
        self.record = failures.started(self.run_dir, self.record["rank"])
        self._entered(Phase.STARTUP, None)
        try:  # started with them blocked (deaf_children): a signal that came meanwhile lands now
            signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM))
        except KeyboardInterrupt as e:
            self.__exit__(type(e), e, None)
        return self

    def _entered(self, phase: Any, epoch: int | None) -> None:
        failures.update(self.run_dir, self.record, phase=str(getattr(phase, "value", phase)),
                        epoch=epoch)

    def completed(self) -> None:
        """The worker's part of the run is done (its record says so)."""
        failures.ended(self.run_dir, self.record, "completed")

    def __exit__(self, typ: Any, e: BaseException | None, tb: Any) -> bool:
        sys.stdout.flush()
        if e is None:
            self._restore()  # a process that goes on (under torchrun: the CLI's)
            return False
        if isinstance(e, SystemExit):
            return False
        if isinstance(e, Interrupted):
            self._interrupted(str(e), e.signum)
        if isinstance(e, KeyboardInterrupt):  # Stopped, or an interrupt from elsewhere
            signum = getattr(e, "signum", None) or self.stop.signum or int(signal.SIGINT)
            self._interrupted(stopped_line(Stopped(signum, self.record.get("phase"))), signum)
        self._failed(e)
        return False

    def _interrupted(self, line: str, signum: int) -> None:
        """Record the stop and exit 128+N. A parent killed outright (kill -9) sends its workers
        SIGINT (PR_SET_PDEATHSIG) and can say nothing: rank 0 writes summary.json then."""
        failures.ended(self.run_dir, self.record, "interrupted", line)
        if self.record["rank"] == 0 and os.getppid() != self.parent:
            write_outcome(self.run_dir, {
                "status": "interrupted", "config": self.config,
                "error": f"the parent process {self.parent} was killed; {line}"})
        raise SystemExit(128 + signum) from None

    def _failed(self, e: BaseException) -> None:
        lost = failures.is_peer_lost(e)
        line = failure_line(e, self.run_dir) if isinstance(e, OSError) else \
            failures.error_line(e)  # a full disk outside the checkpoint writer: the same words
        failures.ended(self.run_dir, self.record, "failed", line,
                       peer_lost=lost, tick=getattr(e, "tick", None),
                       peer=getattr(e, "peer", None))
        if lost and self.wait_on_peer:  # let the agent see the culprit's exit first
            deadline = time.monotonic() + failures.PEER_LOST_GRACE_S
            while self.stop.signum is None and time.monotonic() < deadline:
                time.sleep(0.05)
