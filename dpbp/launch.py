"""Start a run: checks and the split in the parent, then the workers; and how a run ends.

    dpbp train algo=fdg gpus=2 device=cpu          # parent + 2 worker processes (elastic_launch)
    torchrun --nproc-per-node 4 -m dpbp.cli train algo=ddg gpus=4 hydra.run.dir=runs/ddg4
                                                   # already under torchrun: each process joins

The parent (the Hydra job) validates everything that can be validated without workers (data
present, split possible, devices present, output directory writable, resume possible), so bad
input never starts a process. It then starts `gpus` workers with torchelastic's programmatic
launcher on a free port (sweeps never collide), passing the resolved config as a plain dict and
the run directory; or, with one worker or executor=local, trains in-process.

Ending. A worker that dies or raises makes torchelastic stop the others (SIGTERM, then SIGKILL);
its neighbours' communication fails at once, and any wait is bounded by dist.timeout_s (a
signalled worker also exits by itself that long after the signal). The parent names the rank,
module and cause in one line (failures.py), writes summary.json and raises RuntimeError.
SIGINT/SIGTERM on the parent are passed on to the workers (and a STOP file is left for workers
still starting; Ctrl-C reaches the whole process group anyway); they stop at a tick they agree
on, after a checkpoint there (interrupt.py, train.py), and exit with 128 + the signal, and the
parent raises Interrupted. A parent killed outright takes its workers along: they get SIGINT
from the kernel (torch sets PR_SET_PDEATHSIG), checkpoint and exit.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from dpbp import failures
from dpbp.build import WorkerContext, build_model, pick_device, resolve_balance
from dpbp.checkpoint import check_extend, check_resume
from dpbp.config import RunConfig, from_dict
from dpbp.data import load_dataset
from dpbp.errors import ConfigError, Interrupted
from dpbp.feed import steps_per_epoch
from dpbp.interrupt import STOP_FILE, StopRequest, install
from dpbp.logs import RunLogger, write_summary
from dpbp.models import describe_blocks
from dpbp.train import train


def preflight(cfg: RunConfig, quiet: bool = False, run_dir: Path | None = None) -> list[int]:
    """Check devices, data, split, output directory and resume in this process; return the
    block counts per module."""
    run = check_resume(cfg, run_dir) if cfg.resume and run_dir is not None else None
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available here; use device=cpu or auto.")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda and cfg.executor == "dist" and cfg.gpus > torch.cuda.device_count() \
            and "LOCAL_WORLD_SIZE" not in os.environ:
        raise ConfigError(f"gpus={cfg.gpus} but this machine has {torch.cuda.device_count()} "
                          "GPUs; lower gpus, or use executor=local to put every module on one.")
    if run_dir is not None:
        check_writable(run_dir)
    ds = load_dataset(cfg.data, "cpu", seed=cfg.seed)
    steps = steps_per_epoch(ds, cfg.trainer.batch_size * cfg.algo.replicas)
    if run is not None:
        batches = cfg.trainer.epochs * steps
        if cfg.trainer.max_steps is not None:
            batches = min(batches, cfg.trainer.max_steps)
        check_extend(run, math.ceil(batches / steps), cfg)
    blocks = build_model(cfg, ds)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    counts = resolve_balance(cfg, blocks, ds, pick_device(cfg, local_rank)
                             if cfg.split.by == "time" else torch.device("cpu"))
    if not quiet:
        print_split(cfg, blocks, counts, describe_blocks(cfg.model, blocks))
    return counts


def check_writable(run_dir: Path) -> None:
    """The run directory must take files (checkpoints): say so before training."""
    probe = run_dir / f".probe-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"dpbp")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to the run directory {run_dir} "
                          f"({e.strerror or type(e).__name__}); choose another with "
                          "hydra.run.dir=... (or free space there).") from None


def print_split(cfg: RunConfig, blocks, counts: list[int], labels: list[str]) -> None:
    t = Table(title=f"{cfg.model} cut into {len(counts)} module(s) for algo={cfg.algo.name}")
    for col in ("module", "blocks", "first..last", "parameters"):
        t.add_column(col, justify="right" if col != "first..last" else "left")
    start = 0
    for k, c in enumerate(counts):
        params = sum(p.numel() for b in blocks[start:start + c] for p in b.parameters())
        t.add_row(str(k + 1), str(c), f"{labels[start]}..{labels[start + c - 1]}", f"{params:,}")
        start += c
    Console(stderr=True).print(t)


def launch(cfg: RunConfig, run_dir: Path) -> dict[str, Any] | None:
    """Run training as configured; return the summary (None on non-last torchrun ranks).

    Raises Interrupted after SIGINT/SIGTERM, RuntimeError naming the worker when one failed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop asked of an earlier run
    # under torchrun every process runs this; each checks and splits (rank 0 prints)
    joined = "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if joined and int(os.environ["WORLD_SIZE"]) != cfg.gpus:
        raise ConfigError(f"torchrun started {os.environ['WORLD_SIZE']} processes but "
                          f"gpus={cfg.gpus}; make them equal.")
    cfg.split.balance = preflight(cfg, quiet=joined and os.environ.get("RANK", "0") != "0",
                                  run_dir=run_dir)
    if joined:
        return worker_main(cfg.to_dict(), str(run_dir), joined=True)
    if cfg.gpus == 1 or cfg.executor == "local":
        stop = StopRequest()
        restore = install(stop)
        try:
            return train(cfg, run_dir, logger_factory=RunLogger, stop=stop)
        finally:
            restore()
    return launch_workers(cfg, run_dir)


def launch_workers(cfg: RunConfig, run_dir: Path) -> dict[str, Any] | None:
    """Start the workers with torchelastic and wait for them; name the cause if one fails."""
    failures.clear(run_dir)
    stop = StopRequest()
    # workers get dist.timeout_s to stop after a signal; then they are killed
    grace = cfg.dist.timeout_s + 15
    killed: list[int] = []
    restore = forward_signals(stop, run_dir, grace, killed)
    lc = launch_config(
        min_nodes=1, max_nodes=1, nproc_per_node=cfg.gpus, run_id=uuid.uuid4().hex,
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
        monitor_interval=0.1, start_method="spawn",
        # on SIGINT/SIGTERM the workers stop at an agreed tick and checkpoint; they give up by
        # themselves dist.timeout_s after the signal, before torchelastic's SIGKILL
        shutdown_timeout=int(grace),
        signals_to_handle="SIGHUP,SIGQUIT",  # SIGINT/SIGTERM: forward_signals
    )
    try:
        with quiet_torchelastic():
            results = elastic_launch(lc, worker_main)(cfg.to_dict(), str(run_dir))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        status, line = failures.diagnose(run_dir, cfg.modules, cfg.algo.replicas, rank,
                                         failure.exitcode, last_line(failure.message))
        if killed and stop.signum is not None:
            status, line = "interrupted", (
                f"stopped by {signal.Signals(stop.signum).name}: the workers did not stop "
                f"within {grace:g} s and were killed; the last checkpoint is kept")
        if status == "interrupted":
            raise Interrupted(line, stop.signum or _signum(failure.exitcode)) from None
        write_summary(run_dir, {"status": "failed", "error": line, "config": cfg.to_dict()})
        raise RuntimeError(line) from None
    except SignalException as e:  # a signal we do not handle (SIGHUP, SIGQUIT)
        raise Interrupted(f"stopped by {e.sigval.name}; the workers were terminated",
                          int(e.sigval)) from None
    finally:
        restore()
        (run_dir / STOP_FILE).unlink(missing_ok=True)
    return results.get(cfg.modules - 1)  # replica 0's last stage reports


def launch_config(**settings: Any) -> LaunchConfig:
    """torchelastic's LaunchConfig with the settings this torch has: shutdown_timeout and
    signals_to_handle are newer than torch 2.4 (without them torchelastic waits its own 30 s
    and handles every signal itself)."""
    known = inspect.signature(LaunchConfig).parameters
    return LaunchConfig(**{k: v for k, v in settings.items() if k in known})


def _signum(exitcode: int | None) -> int:
    """The signal a worker that stopped on one exits for (128 + N)."""
    return exitcode - 128 if exitcode and exitcode > 128 else int(signal.SIGTERM)


def forward_signals(stop: StopRequest, run_dir: Path, grace_s: float, killed: list[int]):
    """SIGINT/SIGTERM on the parent: pass the signal to every worker and leave a STOP file
    (for workers not started yet); the workers stop at an agreed tick with a checkpoint. The
    parent goes on waiting for them, `grace_s` at most, then kills what is left (pids appended
    to `killed`). torchelastic's own handlers, which raise in the middle of whatever the parent
    does, are not used."""

    def kill_the_rest() -> None:
        for rec in failures.read(run_dir).values():
            if rec.get("status") is None:  # has not ended by itself
                with contextlib.suppress(OSError):
                    os.kill(rec["pid"], signal.SIGKILL)
                    killed.append(rec["pid"])

    timer = threading.Timer(grace_s, kill_the_rest)
    timer.daemon = True

    def handler(signum: int, frame: Any) -> None:
        if stop.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop waiting (torchelastic kills them)
        if stop.signum is None:
            timer.start()
        stop.set(signum)
        with contextlib.suppress(OSError):
            (run_dir / STOP_FILE).touch()
        for rec in failures.read(run_dir).values():
            if rec.get("status") is None:
                with contextlib.suppress(OSError):
                    os.kill(rec["pid"], signum)

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        timer.cancel()  # the workers are gone: their pids may belong to others soon
        for s, h in previous.items():
            signal.signal(s, h)
        os.environ.pop("TORCHELASTIC_SIGNALS_TO_HANDLE", None)  # set by elastic_launch

    return restore


@contextlib.contextmanager
def quiet_torchelastic():
    """torchelastic logs its own view of a failure (a victim's exit code, "closing process")
    before dpbp names the cause in one line: keep only that line."""
    prefixes = ("torch.distributed.elastic", "torch.multiprocessing")
    # torch gives each of its modules' loggers a level of its own: quiet every one
    loggers = [logging.getLogger(n) for n in [*prefixes, *logging.root.manager.loggerDict]
               if n.startswith(prefixes)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def last_line(message: Any) -> str:
    """The exception line of a worker's error message (its last line)."""
    if isinstance(message, dict):
        message = message.get("message", message)
    text = str(message).strip().splitlines()
    return text[-1] if text else "unknown error"


@record  # a worker's exception reaches the parent's ChildFailedError with its message
def worker_main(cfg_dict: dict[str, Any], run_dir: str, joined: bool = False
                ) -> dict[str, Any] | None:
    """One worker: join the process group, train its stage, leave cleanly; on the way out
    record how it ended (failures.py)."""
    cfg = from_dict(cfg_dict)
    ctx = WorkerContext(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                        local_rank=int(os.environ.get("LOCAL_RANK", "0")), distributed=True)
    stop = StopRequest()
    install(stop, grace_s=cfg.dist.timeout_s)
    rec = failures.started(Path(run_dir), ctx.rank)
    device = pick_device(cfg, ctx.local_rank)
    backend = cfg.dist.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.dist.timeout_s),
                                device_id=device if device.type == "cuda" else None)
        try:
            if joined and cfg.split.by == "time":  # measured times differ a little per process
                box = [cfg.split.balance]
                dist.broadcast_object_list(box, src=0)
                cfg.split.balance = box[0]
            summary = train(cfg, Path(run_dir), ctx, logger_factory=RunLogger, stop=stop)
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except Interrupted as e:
        failures.ended(Path(run_dir), rec, "interrupted", str(e))
        sys.stdout.flush()
        raise SystemExit(128 + e.signum) from None
    except KeyboardInterrupt:  # a signal before the first tick: nothing to save yet
        failures.ended(Path(run_dir), rec, "interrupted",
                       f"stopped {stop.reason or 'by SIGINT'} before training began; nothing saved")
        raise
    except BaseException as e:
        lost = failures.is_peer_lost(e)
        peer = getattr(e, "peer", None)
        failures.ended(Path(run_dir), rec, "failed", failures.error_line(e), peer_lost=lost,
                       tick=getattr(e, "tick", None), peer=peer)
        if lost and not joined:  # let the agent see the culprit's exit first, then stop us
            deadline = time.monotonic() + failures.PEER_LOST_GRACE_S
            while stop.signum is None and time.monotonic() < deadline:
                time.sleep(0.05)
        raise
    failures.ended(Path(run_dir), rec, "completed")
    sys.stdout.flush()
    return summary
