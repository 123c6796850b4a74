"""The run-directory lock: two runs never share a directory.

A run holds `<run dir>/.lock` from before Hydra writes anything there (when the directory is
named on the command line) until the process exits. The lock is an advisory `flock` on that file,
which the kernel releases when its holder dies however it dies (kill -9 included), so a lock left
by a dead run is stale by construction and the next run simply takes it; the file also names the
holder (host, pid, start time, command) so that a refused run can say who has the directory.

A second run in the same directory (`resume=true` while the run is still going, two sweeps with
one `hydra.run.dir`) is refused at once with one sentence and exit status 2, and the run that
holds the directory is not touched. Under torchrun only the process of global rank 0 takes the
lock (every process of a torchrun job shares the run directory by design).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpbp.errors import ConfigError

LOCK_FILE = ".lock"
_held: dict[Path, list[int]] = {}  # directory -> [file descriptor, holds] of this process's locks


def owner(run_dir: Path) -> dict[str, Any] | None:
    """Who holds (or last held) the lock of `run_dir`, as its lock file says; None if unknown."""
    try:
        return json.loads((run_dir / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None


def holds(run_dir: Path) -> bool:
    """Whether this process holds the lock of `run_dir`."""
    return _key(run_dir) in _held


def _key(run_dir: Path) -> Path:
    return Path(os.path.abspath(run_dir))


def _in_use(run_dir: Path) -> ConfigError:
    who = owner(run_dir) or {}
    since = time.strftime("%H:%M:%S", time.localtime(who["started"])) if "started" in who else "?"
    by = (f"process {who.get('pid', '?')} on {who.get('host', '?')} (started {since})"
          if who else "another process")
    return ConfigError(f"the run directory {run_dir} is in use by {by}; wait for that run to end "
                       "or stop it, or choose another directory with hydra.run.dir=DIR.")


def acquire(run_dir: Path) -> None:
    """Take the lock of `run_dir` for this process (kept until it exits or `release`); raise
    ConfigError naming the holder if another live process has it. Taking it again counts: it is
    given back when every `acquire` has had its `release`."""
    key = _key(run_dir)
    if key in _held:
        _held[key][1] += 1
        return
    path = key / LOCK_FILE
    while True:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot use the run directory {run_dir} "
                              f"({describe_os_error(e)}); choose another with "
                              "hydra.run.dir=DIR.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(run_dir) from None
        # the holder before us may have removed the file between our open and our flock
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
          "command": " ".join(sys.argv)[:500]}
    with contextlib.suppress(OSError):  # a full disk: the lock holds, unnamed
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
    _held[key] = [fd, 1]


def release(run_dir: Path) -> None:
    """Undo one `acquire`; the last one gives the lock back (removing its file)."""
    key = _key(run_dir)
    if key not in _held:
        return
    _held[key][1] -= 1
    if _held[key][1] > 0:
        return
    fd, _ = _held.pop(key)
    with contextlib.suppress(OSError):
        (key / LOCK_FILE).unlink()
    os.close(fd)


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Hold the lock of `run_dir` for the block (see `acquire`); no lock for a torchrun process
    of rank > 0."""
    if not takes_lock():
        yield
        return
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)


def check_free(run_dir: Path) -> None:
    """Raise ConfigError if another live process holds the lock of `run_dir` (a checkpoint to
    resume from that a running run is still writing)."""
    if holds(run_dir) or not (run_dir / LOCK_FILE).exists():
        return
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(run_dir) from None
    finally:
        os.close(fd)


def describe_os_error(e: OSError) -> str:
    """An OSError in a few words: 'the disk is full', 'permission denied', ..."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    return (e.strerror or type(e).__name__).lower()


def takes_lock() -> bool:
    """Whether this process should lock its run directory (not a torchrun process of rank > 0)."""
    return os.environ.get("RANK", "0") == "0"
