"""Which worker of a distributed run failed first, and why: one line for the user.

When one worker dies, its neighbours fail too ("connection closed by peer") and torchelastic
reports whichever exit it noticed first, often a victim. So every worker writes a small record in
`<run dir>/.workers/rank<R>.json`: its pid when it starts, and how it ended (an error line, whether
that error was only a lost peer, the tick of a divergence, or an interrupt). A worker that lost a
peer waits a moment before it exits, so that the agent sees the culprit's exit first (with its
signal, when it was killed). The parent then names the cause (`diagnose`):

1. a worker that raised an error of its own (not a lost peer): the earliest one;
2. else the exit torchelastic reported, when it was a signal (kill -9, out of memory);
3. else a worker that started but never reported: one a neighbour waited for in vain (it hung,
   or was stopped), or one that died without a word;
4. else what torchelastic reported.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from dpbp.p2p import PeerTimeout

RECORDS = ".workers"
PEER_LOST_GRACE_S = 2.0  # how long a worker that lost a peer waits for the agent to stop it
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe",
              "timed out", "timeout", "socket closed", "connection refused")


def worker_name(rank: int, modules: int, replicas: int = 1) -> str:
    """'worker rank 3 (module 2)' (with its replica when there are several)."""
    replica, k = divmod(rank, modules)
    where = f"module {k + 1}" + (f" of replica {replica}" if replicas > 1 else "")
    return f"worker rank {rank} ({where})"


def _path(run_dir: Path, rank: int) -> Path:
    return run_dir / RECORDS / f"rank{rank}.json"


def _write(path: Path, record: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
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


def ended(run_dir: Path, record: dict[str, Any], status: str, error: str | None = None,
          peer_lost: bool = False, tick: int | None = None, peer: int | None = None) -> None:
    """Record how this worker ended: completed, interrupted or failed (`peer`: the rank it
    waited for in vain)."""
    record.update(status=status, error=error, peer_lost=peer_lost, tick=tick, peer=peer,
                  ended=time.time())
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
    if isinstance(e, (PeerTimeout, getattr(torch.distributed, "DistError", ()))):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in _PEER_LOST)


def error_line(e: BaseException) -> str:
    """The exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(e, RuntimeError) and "connection closed by peer" in first.lower():
        first = "a neighbouring worker went away (connection closed by peer)"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def signal_name(exitcode: int | None) -> str | None:
    """'signal 9 (SIGKILL)' for a process killed by a signal, else None."""
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return f"signal {-exitcode} ({signal.Signals(-exitcode).name})"
    except ValueError:
        return f"signal {-exitcode}"


def diagnose(run_dir: Path, modules: int, replicas: int, rank: int, exitcode: int | None,
             message: str) -> tuple[str, str]:
    """(status, one line) for a launch that torchelastic reports as failed at `rank`."""
    records = read(run_dir)
    name = lambda r: worker_name(r, modules, replicas)  # noqa: E731
    own = [r for r in records.values() if r.get("status") == "failed" and not r.get("peer_lost")]
    if own:
        # a divergence names its tick: the earliest one is the cause, the others followed it
        first = min(own, key=lambda r: (r.get("tick") is None, r.get("tick") or 0, r["ended"]))
        return "failed", f"{name(first['rank'])} failed: {first['error']}"
    stopped = [r for r in records.values() if r.get("status") == "interrupted"]
    if stopped:
        return "interrupted", stopped[0]["error"]
    killed = signal_name(exitcode)
    if killed and records.get(rank, {}).get("status") is None:
        return "failed", f"{name(rank)} was killed by {killed}"
    silent = [r for r, rec in sorted(records.items()) if rec.get("status") is None]
    waited_for = [rec for rec in records.values() if rec.get("peer") in silent]
    if waited_for:  # alive but silent: stopped (SIGSTOP), or stuck
        rec = waited_for[0]
        return "failed", (f"{name(rec['peer'])} stopped responding: {name(rec['rank'])} waited "
                          "dist.timeout_s for it; it was terminated")
    if silent:
        return "failed", (f"{name(silent[0])} died without reporting an error (killed by a "
                          "signal, e.g. out of memory or kill -9)")
    lost = [r for r in records.values() if r.get("status") == "failed"]
    if lost:
        first = min(lost, key=lambda r: r["ended"])
        return "failed", f"{name(first['rank'])} failed: {first['error']}"
    return "failed", f"{name(rank)} failed: {message}"
