"""Stopping on SIGINT/SIGTERM at a tick that every process agrees on, so that the checkpoint
written there is consistent.

A signal only sets a flag (`StopRequest`); the run polls it between chunks of ticks. With one
process the run stops at the next chunk end. With several, processes are at different ticks when
a signal lands (or only one of them got it), so they agree first: at every chunk end each posts
its flag in a non-blocking all-reduce (max, on a gloo group of its own) and reads the result of
the previous chunk's one, which every process has posted by then unless it is a whole chunk
behind: all of them see the same value at the same chunk end and stop at the same tick, with no
blocking collective per chunk. At epoch ends, where the processes wait for each other anyway,
the flag is agreed with one blocking all-reduce.

A file named STOP in the run directory asks the same as SIGTERM (where signalling every process
is awkward, or from a test); the run deletes it when it has stopped.

A process whose run does not poll yet (start-up: before its first tick) is stopped at once
(`Stopped`, a KeyboardInterrupt that names the signal). A second signal in a process that runs
alone stops it at once too (the last checkpoint stays intact); a worker instead exits by itself
`grace_s` after the first signal if the stop has not finished by then, so that nothing waits
forever on a dead peer. What a signal means in each phase of a run: lifecycle.py.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpbp.errors import Stopped

if TYPE_CHECKING:
    import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)


STOP_FILE = "STOP"


class StopRequest:
    """The signal that asked this process to stop (None: none yet) and why, in words; and the
    phase the process is in (lifecycle.Phase), which says what a signal does there."""

    def __init__(self, listener: Callable[[Any, int | None], None] | None = None) -> None:
        """`listener(phase, epoch)`: told of every phase change (a worker records it)."""
        self.signum: int | None = None
        self.reason = ""
        self.watched = False  # the run polls the request: a signal need not interrupt it
        self.phase: Any = None
        self.epoch: int | None = None
        self.listener = listener

    def set(self, signum: int, reason: str | None = None) -> None:
        if self.signum is None:
            self.signum = signum
            self.reason = reason or f"by {signal.Signals(signum).name}"

    def enter(self, phase: Any, epoch: int | None = None) -> None:
        """The process enters `phase` (a lifecycle.Phase) of `epoch` (1-based; None: none)."""
        if (phase, epoch) == (self.phase, self.epoch):
            return
        if self.signum is not None and not self.watched and getattr(phase, "polled", False):
            # the handler's Stopped was swallowed (raised inside a finalizer or an import-lock
            # callback, which Python reports and drops): stop here, before the run begins
            raise Stopped(self.signum, self.phase)
        self.phase, self.epoch = phase, epoch
        self.watched = self.watched or bool(getattr(phase, "polled", False))
        if self.listener is not None:
            self.listener(phase, epoch)


def install(request: StopRequest, grace_s: float | None = None) -> Callable[[], None]:
    """Route SIGINT and SIGTERM to `request`; return a function that restores the previous
    handlers. Until the run polls the request (start-up), the first signal raises Stopped at
    once: there is nothing to save yet.

    `grace_s` (a worker): exit the process that long after the first signal if it is still
    running, and ignore further signals (a second exception would escape the clean-up); None (a
    process that runs alone): a second signal raises KeyboardInterrupt at once."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals are delivered to the main thread only

    def handler(signum: int, frame: Any) -> None:
        first = request.signum is None
        request.set(signum)
        if first and grace_s is not None:
            timer = threading.Timer(grace_s, os._exit, args=(128 + signum,))
            timer.daemon = True
            timer.start()
        if first and not request.watched:
            raise Stopped(signum, request.phase)
        if not first and grace_s is None:
            raise KeyboardInterrupt

    def unraisable(u: Any) -> None:
        if not isinstance(u.exc_value, Stopped):  # a dropped Stopped: `request` holds it
            hook(u)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    hook, sys.unraisablehook = sys.unraisablehook, unraisable

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)
        sys.unraisablehook = hook

    return restore


def _stop_file_request(path: Path) -> tuple[int, str]:
    """(signal, reason) a STOP file asks for: the signal the parent forwarded, when it wrote
    the file for its workers (its name inside), else SIGTERM because the file exists."""
    try:
        name = path.read_text().strip()
        return int(signal.Signals[name]), f"by {name}"
    except (OSError, KeyError):
        return int(signal.SIGTERM), f"because {path} exists"


class Agreement:
    """Polls a StopRequest at the same points in every process; all get the same answer."""

    def __init__(self, request: StopRequest, group: Any = None,
                 stop_file: Path | None = None) -> None:
        """`group`: a process group over every rank (distributed runs), None for one process;
        `stop_file`: a path whose existence asks for a stop like SIGTERM."""
        self.request, self.group, self.stop_file = request, group, stop_file
        self.pending: tuple[Any, torch.Tensor] | None = None

    def _flag(self) -> torch.Tensor:
        if self.request.signum is None and self.stop_file is not None \
                and self.stop_file.exists():
            self.request.set(*_stop_file_request(self.stop_file))
        import torch

        return torch.tensor([self.request.signum or 0], dtype=torch.int64)

    def reason(self, signum: int) -> str:
        """How to name the stop this process agreed to (another process may have asked)."""
        return self.request.reason if self.request.signum == signum \
            else f"by {signal.Signals(signum).name}"

    def _take(self) -> int:
        if self.pending is None:
            return 0
        work, buf = self.pending
        work.wait()
        self.pending = None
        return int(buf.item())

    def poll(self) -> int | None:
        """At a chunk end: the signal to stop on now, or None to go on."""
        self.request.watched = True
        if self.group is None:
            return int(self._flag().item()) or None
        import torch.distributed as dist

        agreed = self._take()
        buf = self._flag()
        self.pending = (dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group,
                                        async_op=True), buf)
        return agreed or None

    def settle(self) -> int | None:
        """At an epoch end (every process is there): the signal to stop on, agreed at once."""
        self.request.watched = True
        if self.group is None:
            return int(self._flag().item()) or None
        import torch.distributed as dist

        agreed = self._take()
        buf = self._flag()
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group)
        return max(agreed, int(buf.item())) or None

    def close(self) -> None:
        """Wait for the last posted flag (before the process group goes away)."""
        self._take()
