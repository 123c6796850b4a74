"""The workers' own records of a distributed run, and the words that name a worker and an error.

When one worker dies, its neighbours fail too ("connection closed by peer") and torchelastic
reports whichever exit it noticed first, often a victim. So every worker writes a small record in
`<run dir>/.workers/rank<R>.json`: its pid when it starts, the phase it is in (lifecycle.Phase,
with the epoch), and how it ended (an error line, whether that error was only a lost peer, the
tick of a divergence, or an interrupt). A worker that lost a peer waits a moment before it exits,
so that the agent sees the culprit's exit first (with its signal, when it was killed). The parent
names the cause from these records (lifecycle.diagnose).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from dpbp.errors import CheckpointError, ConfigError, Divergence

RECORDS = ".workers"
RECORD_BYTES = 4096  # every record file has this size (see _write)
PEER_LOST_GRACE_S = 2.0  # how long a worker that lost a peer waits for the agent to stop it
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe",
              "timed out", "timeout", "socket closed", "connection refused")


def worker_name(rank: int, modules: int, replicas: int = 1) -> str:
    """'worker rank 3 (module 2)' (with its replica when there are several; 'replica 1' alone
    when every worker holds the whole model)."""
    replica, k = divmod(rank, modules)
    if modules == 1 and replicas > 1:
        return f"worker rank {rank} (replica {replica})"
    where = f"module {k + 1}" + (f" of replica {replica}" if replicas > 1 else "")
    return f"worker rank {rank} ({where})"


def _path(run_dir: Path, rank: int) -> Path:
    return run_dir / RECORDS / f"rank{rank}.json"


def _write(path: Path, record: dict[str, Any]) -> None:
    """Write a record, padded to RECORD_BYTES: through a temporary file and a rename (a reader
    sees the old record or the new one), or, when that finds no space, over the old file in
    place (it keeps its size), so that a worker can still say what went wrong when the disk has
    filled up (a reader that catches that write half done skips the record until the next
    read)."""
    data = json.dumps(record).encode()
    data += b" " * (RECORD_BYTES - len(data))
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)
    except OSError:  # a full disk must not hide the error being reported
        pass


def clear(run_dir: Path) -> None:
    """Forget the records of an earlier launch in this directory (a resumed run)."""
    folder = run_dir / RECORDS
    if folder.is_dir():
        for p in folder.glob("rank*.json"):
            p.unlink(missing_ok=True)


def started(run_dir: Path, rank: int) -> dict[str, Any]:
    """Record that this worker runs (its pid: tests and users can check that none is left)."""
    record = {"rank": rank, "pid": os.getpid(), "started": time.time()}
    _write(_path(run_dir, rank), record)
    return record


def update(run_dir: Path, record: dict[str, Any], **fields: Any) -> None:
    """Record what this worker is doing now (its phase and epoch: lifecycle.py)."""
    record.update(fields)
    _write(_path(run_dir, record["rank"]), record)


def running(pid: int) -> bool:
    """Whether a process with this pid still runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def ended(run_dir: Path, record: dict[str, Any], status: str, error: str | None = None,
          peer_lost: bool = False, tick: int | None = None, peer: int | None = None) -> None:
    """Record how this worker ended: completed, interrupted or failed (`peer`: the rank it
    waited for in vain)."""
    record.update(status=status, error=error and error[:1000], peer_lost=peer_lost, tick=tick,
                  peer=peer, ended=time.time())
    _write(_path(run_dir, record["rank"]), record)


def read(run_dir: Path) -> dict[int, dict[str, Any]]:
    """{rank: record} of the last launch in `run_dir`."""
    out = {}
    for p in sorted((run_dir / RECORDS).glob("rank*.json")):
        try:
            r = json.loads(p.read_text())
            out[int(r["rank"])] = r
        except (OSError, ValueError, KeyError):
            continue
    return out


def is_peer_lost(e: BaseException) -> bool:
    """Whether an exception only says that another process went away or stopped answering."""
    import torch

    from dpbp.p2p import PeerTimeout

    if isinstance(e, (PeerTimeout, getattr(torch.distributed, "DistError", ()))):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in _PEER_LOST)


def error_line(e: BaseException) -> str:
    """The exception as one line: the first line of its message, after its type unless it is one
    of dpbp's own sentences (a full disk, a bad checkpoint, a divergence)."""
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(e, RuntimeError) and "connection closed by peer" in first.lower():
        first = "a neighbouring worker went away (connection closed by peer)"
    if isinstance(e, (CheckpointError, ConfigError, Divergence)) and first:
        return first
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def signal_name(exitcode: int | None) -> str | None:
    """'signal 9 (SIGKILL)' for a process killed by a signal, else None."""
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return f"signal {-exitcode} ({signal.Signals(-exitcode).name})"
    except ValueError:
        return f"signal {-exitcode}"
