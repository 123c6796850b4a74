"""Start a run: checks and the split in the parent, then the workers.

    dpbp train algo=fdg gpus=2 device=cpu          # parent + 2 worker processes (elastic_launch)
    torchrun --nproc-per-node 4 -m dpbp.cli train algo=ddg gpus=4 hydra.run.dir=runs/ddg4
                                                   # already under torchrun: each process joins

The parent (the Hydra job) validates everything that can be validated without workers (data
present, split possible, devices present), so bad input never starts a process. It then starts
`gpus` workers with torchelastic's programmatic launcher on a free port (sweeps never collide),
passing the resolved config as a plain dict and the run directory; or, with one worker or
executor=local, trains in-process.
"""

from __future__ import annotations

import os
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch.distributed.elastic.multiprocessing.errors import record

from dpbp.config import RunConfig, from_dict
from dpbp.errors import ConfigError


def preflight(cfg: RunConfig, quiet: bool = False, run_dir: Path | None = None) -> list[int]:
    """Check devices, data, split and resume in this process; return the block counts per module."""
    from dpbp.checkpoint import check_resume
    from dpbp.data import load_dataset
    from dpbp.models import describe_blocks
    from dpbp.train import build_model, pick_device, resolve_balance, steps_per_epoch

    if cfg.resume and run_dir is not None:
        check_resume(cfg, run_dir)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available here; use device=cpu or auto.")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda and cfg.executor == "dist" and cfg.gpus > torch.cuda.device_count() \
            and "LOCAL_WORLD_SIZE" not in os.environ:
        raise ConfigError(f"gpus={cfg.gpus} but this machine has {torch.cuda.device_count()} "
                          "GPUs; lower gpus, or use executor=local to put every module on one.")
    ds = load_dataset(cfg.data, "cpu", seed=cfg.seed)
    steps_per_epoch(ds, cfg.trainer.batch_size * cfg.algo.replicas)
    blocks = build_model(cfg, ds)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    counts = resolve_balance(cfg, blocks, ds, pick_device(cfg, local_rank)
                             if cfg.split.by == "time" else torch.device("cpu"))
    if not quiet:
        print_split(cfg, blocks, counts, describe_blocks(cfg.model, blocks))
    return counts


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
    """Run training as configured; return the summary (None on non-last torchrun ranks)."""
    from dpbp.logs import write_summary

    run_dir.mkdir(parents=True, exist_ok=True)
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
        from dpbp.logs import RunLogger
        from dpbp.train import train

        return train(cfg, run_dir, logger_factory=RunLogger)

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    lc = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=cfg.gpus, run_id=uuid.uuid4().hex,
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
        monitor_interval=0.1, start_method="spawn",
    )
    try:
        results = elastic_launch(lc, worker_main)(cfg.to_dict(), str(run_dir))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()  # the earliest: the cause, not a victim
        msg = f"worker rank {rank} (module {rank + 1}) failed: {last_line(failure.message)}"
        write_summary(run_dir, {"status": "failed", "error": msg, "config": cfg.to_dict()})
        raise RuntimeError(msg) from None
    return results.get(cfg.modules - 1)  # replica 0's last stage reports


def last_line(message: Any) -> str:
    """The exception line of a worker's error message (its last line)."""
    if isinstance(message, dict):
        message = message.get("message", message)
    text = str(message).strip().splitlines()
    return text[-1] if text else "unknown error"


@record  # a worker's exception reaches the parent's ChildFailedError with its message
def worker_main(cfg_dict: dict[str, Any], run_dir: str, joined: bool = False
                ) -> dict[str, Any] | None:
    """One worker: join the process group, train its stage, leave cleanly."""
    import torch.distributed as dist

    from dpbp.logs import RunLogger
    from dpbp.train import WorkerContext, pick_device, train

    cfg = from_dict(cfg_dict)
    ctx = WorkerContext(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                        local_rank=int(os.environ.get("LOCAL_RANK", "0")), distributed=True)
    device = pick_device(cfg, ctx.local_rank)
    backend = cfg.dist.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.dist.timeout_s),
                            device_id=device if device.type == "cuda" else None)
    try:
        if joined and cfg.split.by == "time":  # measured times differ a little per process
            box = [cfg.split.balance]
            dist.broadcast_object_list(box, src=0)
            cfg.split.balance = box[0]
        summary = train(cfg, Path(run_dir), ctx, logger_factory=RunLogger)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    return summary
