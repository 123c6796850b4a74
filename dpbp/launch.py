"""Start a run: checks and the split in the parent, then the workers; and how a run ends.

    dpbp train algo=fdg gpus=2 device=cpu          # parent + 2 worker processes (elastic_launch)
    torchrun --nproc-per-node 4 -m dpbp.cli train algo=ddg gpus=4 hydra.run.dir=runs/ddg4
                                                   # already under torchrun: each process joins

The parent (the Hydra job) holds the run directory's lock (rundir.py) and validates everything
that can be validated without workers (data present, split possible, devices present, output
directory writable, resume possible: the checkpoint not past the run's end, the same split), so
bad input never starts a process; a resume whose checkpoint already ends the run starts none.
It then starts `gpus` workers with torchelastic's programmatic launcher on a free port (sweeps
never collide), passing the resolved config as a plain dict and the run directory; or, with one
worker or executor=local, trains in-process.

Ending (lifecycle.py owns it: phases, what each signal or death means in each, a bounded
shutdown). A worker that dies or raises makes torchelastic stop the others (SIGTERM, then
SIGKILL); its neighbours' communication fails at once, and any wait is bounded by dist.timeout_s.
The parent names the rank, module, phase and cause in one line (lifecycle.diagnose), writes
summary.json and raises RuntimeError. SIGINT/SIGTERM on the parent are passed on to the workers
(and a STOP file is left for workers still starting); they stop at a tick they agree on, after a
checkpoint there (interrupt.py, train.py), and exit with 128 + the signal, and the parent raises
Interrupted. A parent killed outright takes its workers along: they get SIGINT from the kernel
(torch sets PR_SET_PDEATHSIG), checkpoint and exit.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import signal
import sys
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

from dpbp import algos, custom, failures, lifecycle, rundir
from dpbp.build import (
    WorkerContext,
    build_model,
    make_optimizer,
    output_shapes,
    pick_device,
    resolve_balance,
)
from dpbp.checkpoint import check_extend, check_position, check_resume, find
from dpbp.companion import seeded
from dpbp.config import RunConfig, from_dict
from dpbp.data import load_dataset
from dpbp.errors import ConfigError, Interrupted
from dpbp.feed import steps_per_epoch
from dpbp.interrupt import STOP_FILE, StopRequest, install
from dpbp.logs import RunLogger
from dpbp.models import describe_blocks
from dpbp.split import boundaries
from dpbp.train import train
from dpbp.user_data import FolderItems


def preflight(cfg: RunConfig, quiet: bool = False, run_dir: Path | None = None) -> list[int]:
    """Check devices, data, split, output directory and resume in this process; return the
    block counts per module."""
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
    keep_statistics(cfg, ds)
    run = check_resume(cfg, run_dir) if cfg.resume and run_dir is not None else None
    steps = steps_per_epoch(ds, cfg.trainer.batch_size * cfg.algo.replicas)
    if run is not None:
        check_position(run, cfg, steps)
        batches = cfg.trainer.epochs * steps
        if cfg.trainer.max_steps is not None:
            batches = min(batches, cfg.trainer.max_steps)
        check_extend(run, math.ceil(batches / steps), cfg)
    blocks = build_model(cfg, ds)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    counts = resolve_balance(cfg, blocks, ds, pick_device(cfg, local_rank)
                             if cfg.split.by == "time" else torch.device("cpu"))
    if run is not None:
        check_same_split(run, counts)
    if not quiet:
        labels = (describe_blocks(cfg.model, blocks) if cfg.model_args is None
                  else custom.describe(blocks))
        print_split(cfg, blocks, counts, labels, aux_parameters(cfg, blocks, counts, ds))
        Console(stderr=True, highlight=False, soft_wrap=True).print(data_path(cfg, ds))
    return counts


def keep_statistics(cfg: RunConfig, ds) -> None:
    """A streamed image folder's normalisation statistics, just computed here in one pass over
    its training images, go to the workers as data.mean/std: each would take that pass again
    (and the run's saved config then holds the values it trained with)."""
    if isinstance(ds.train_items, FolderItems) and (cfg.data.mean is None or cfg.data.std is None):
        cfg.data.mean, cfg.data.std = ds.mean.tolist(), ds.std.tolist()


def aux_parameters(cfg: RunConfig, blocks, counts: list[int], ds) -> list[int] | None:
    """Parameters of each module's companion (DGL's head, DNI's predictor; 0 for the last
    module), for the run header; None when the algorithm has none."""
    build = algos.get(cfg.algo.name).companion
    if build is None:
        return None
    modules = [torch.nn.Sequential(*blocks[a:b]) for a, b in boundaries(counts)]
    shapes = output_shapes(modules, ds)
    def count(shape: tuple[int, ...]) -> int:
        companion = build(cfg.algo, shape, ds.num_classes, torch.device("cpu"),
                          lambda m: make_optimizer(cfg, m), cfg.optim.lr)
        return sum(p.numel() for p in companion.params)

    return [0 if k == len(shapes) - 1 else seeded(cfg.seed, k, lambda s=shape: count(s))
            for k, shape in enumerate(shapes)]


def data_path(cfg: RunConfig, ds) -> str:
    """The run header's line on where training batches come from (the summary's
    `data_loading`)."""
    mib = ds.train_nbytes / 2**20
    where = (f"streamed through a DataLoader with {cfg.data.loader_workers} worker(s)"
             if ds.streamed else "held on the device")
    return (f"data={cfg.data.name}: {ds.num_train} training samples ({mib:.1f} MiB, "
            f"data.stream={cfg.data.stream}, budget {cfg.data.stream_budget_mb:g} MiB), {where}")


def check_same_split(run: dict[str, Any], counts: list[int]) -> None:
    """A resumed run cuts the model where its checkpoint did (each stage file holds one
    module's weights)."""
    saved = (run.get("config") or {}).get("split", {}).get("balance")
    if saved is not None and list(saved) != list(counts):
        raise ConfigError(f"the checkpoint was trained with split.balance={list(saved)} but this "
                          f"run cuts the model as {list(counts)}; resume with "
                          f"split.balance=[{','.join(map(str, saved))}].")


def nothing_left(cfg: RunConfig, run_dir: Path) -> dict[str, Any] | None:
    """The summary of the run that a resume continues when its checkpoint already ends where this
    run would end (nothing left to train); None when there is training to do, or no finished
    summary to give (then the workers write one from the checkpoint)."""
    if not cfg.resume:
        return None
    src = find(cfg.resume, run_dir)
    run = torch.load(src / "run.pt", map_location="cpu", weights_only=True)
    steps = steps_per_epoch(load_dataset(cfg.data, "cpu", seed=cfg.seed),
                            cfg.trainer.batch_size * cfg.algo.replicas)
    batches = cfg.trainer.epochs * steps
    if cfg.trainer.max_steps is not None:
        batches = min(batches, cfg.trainer.max_steps)
    if run["epoch"] < math.ceil(batches / steps):
        return None
    try:
        summary = json.loads((src.parent / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("status") != "completed" or summary.get("epochs") != run["epoch"]:
        return None
    print(f"dpbp: nothing left to train: the checkpoint in {src} is at the end of epoch "
          f"{run['epoch']} of {run['epoch']}; its summary follows.", file=sys.stderr)
    if src.parent.resolve() != run_dir.resolve():
        lifecycle.write_outcome(run_dir, summary)
    return summary


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


def print_split(cfg: RunConfig, blocks, counts: list[int], labels: list[str],
                aux: list[int] | None = None) -> None:
    """The run header: each module's blocks and parameters (and its companion's, apart)."""
    t = Table(title=f"{cfg.model} cut into {len(counts)} module(s) for algo={cfg.algo.name}")
    cols = ("module", "blocks", "first..last", "parameters") + (("auxiliary",) if aux else ())
    for col in cols:
        t.add_column(col, justify="right" if col != "first..last" else "left")
    start = 0
    for k, c in enumerate(counts):
        params = sum(p.numel() for b in blocks[start:start + c] for p in b.parameters())
        t.add_row(str(k + 1), str(c), f"{labels[start]}..{labels[start + c - 1]}", f"{params:,}",
                  *((f"{aux[k]:,}",) if aux else ()))
        start += c
    Console(stderr=True).print(t)


def launch(cfg: RunConfig, run_dir: Path) -> dict[str, Any] | None:
    """Run training as configured; return the summary (None on non-last torchrun ranks).

    Raises Interrupted after SIGINT/SIGTERM, RuntimeError naming the worker when one failed,
    ConfigError when the run directory is in use by another run (rundir.py)."""
    # under torchrun every process runs this; each checks and splits (rank 0 prints)
    joined = "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if joined and int(os.environ["WORLD_SIZE"]) != cfg.gpus:
        raise ConfigError(f"torchrun started {os.environ['WORLD_SIZE']} processes but "
                          f"gpus={cfg.gpus}; make them equal.")
    with rundir.hold(run_dir):
        if cfg.resume and cfg.resume is not True:
            rundir.check_free(find(cfg.resume, run_dir).parent)
        (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop asked of an earlier run
        cfg.split.balance = preflight(cfg, quiet=joined and os.environ.get("RANK", "0") != "0",
                                      run_dir=run_dir)
        if (done := nothing_left(cfg, run_dir)) is not None:
            return done
        if joined:
            return worker_main(cfg.to_dict(), str(run_dir), joined=True)
        if cfg.gpus == 1 or cfg.executor == "local":
            return train_here(cfg, run_dir)
        return launch_workers(cfg, run_dir)


def train_here(cfg: RunConfig, run_dir: Path) -> dict[str, Any] | None:
    """Train in this process (one worker, or executor=local): SIGINT/SIGTERM stop it at a
    checked chunk end with a checkpoint (at once during start-up)."""
    stop = StopRequest()
    restore = install(stop)
    try:
        return train(cfg, run_dir, logger_factory=RunLogger, stop=stop)
    finally:
        restore()


def launch_workers(cfg: RunConfig, run_dir: Path) -> dict[str, Any] | None:
    """Start the workers with torchelastic and wait for them, under a Supervisor (signals passed
    on, a bounded shutdown); name the cause if the run did not complete."""
    failures.clear(run_dir)
    lc = launch_config(
        min_nodes=1, max_nodes=1, nproc_per_node=cfg.gpus, run_id=uuid.uuid4().hex,
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
        monitor_interval=0.1, start_method="spawn",
        # after a worker failed, the others get SIGTERM, then SIGKILL SLACK_S later: with a peer
        # gone there is no consistent checkpoint to write, and a worker blocked in a collective
        # with the dead one (while starting) cannot even run its signal handler
        shutdown_timeout=int(lifecycle.SLACK_S),
        signals_to_handle="SIGHUP,SIGQUIT",  # SIGINT/SIGTERM: lifecycle.Supervisor
    )
    with lifecycle.Supervisor(run_dir, cfg.dist.timeout_s) as sup:
        try:
            with quiet_torchelastic(), lifecycle.deaf_children():
                results = elastic_launch(lc, worker_main)(cfg.to_dict(), str(run_dir))
        except ChildFailedError as e:
            _, first = e.get_first_failure()
            status, line = sup.conclude(cfg.modules, cfg.algo.replicas,
                                        {r: f.exitcode for r, f in e.failures.items()},
                                        last_line(first.message),
                                        {r: worker_error(f) for r, f in e.failures.items()})
            _end(cfg, run_dir, status, line, sup.asked or _signum(first.exitcode))
        except lifecycle.Abandoned:
            _end(cfg, run_dir, "interrupted" if sup.asked else "failed", sup.late(),
                 sup.asked or int(signal.SIGTERM))
        except SignalException as e:  # a signal we do not handle (SIGHUP, SIGQUIT)
            raise Interrupted(f"stopped by {e.sigval.name}; the workers were terminated",
                              int(e.sigval)) from None
    return results.get(cfg.modules - 1)  # replica 0's last stage reports


def launch_config(**settings: Any) -> LaunchConfig:
    """torchelastic's LaunchConfig with the settings this torch has: shutdown_timeout and
    signals_to_handle are newer than torch 2.4 (without them torchelastic waits its own 30 s
    and handles every signal itself)."""
    known = inspect.signature(LaunchConfig).parameters
    return LaunchConfig(**{k: v for k, v in settings.items() if k in known})


def _end(cfg: RunConfig, run_dir: Path, status: str, line: str, signum: int) -> None:
    """Raise what a run that did not complete ends with (the CLI writes summary.json)."""
    if status == "interrupted":
        raise Interrupted(line, signum)
    lifecycle.write_outcome(run_dir, {"status": "failed", "error": line,
                                      "config": cfg.to_dict()})
    raise RuntimeError(line)


def _signum(exitcode: int | None) -> int:
    """The signal a worker that stopped on one exits for (128 + N)."""
    return exitcode - 128 if exitcode and exitcode > 128 else int(signal.SIGTERM)


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


def worker_error(failure: Any) -> str:
    """The error a worker raised, as torchelastic collected it ("" if it raised none: killed,
    or exited with a status of its own), in the words failures.error_line uses."""
    if failure.exitcode != 1 or not isinstance(failure.message, dict):
        return ""
    line = last_line(failure.message)
    name, _, text = line.partition(": ")
    return text if name in ("CheckpointError", "ConfigError", "Divergence") else line


def last_line(message: Any) -> str:
    """The exception line of a worker's error message (its last line)."""
    if isinstance(message, dict):
        message = message.get("message", message)
    text = str(message).strip().splitlines()
    return text[-1] if text else "unknown error"


@record  # a worker's exception reaches the parent's ChildFailedError with its message
def worker_main(cfg_dict: dict[str, Any], run_dir: str, joined: bool = False
                ) -> dict[str, Any] | None:
    """One worker: join the process group, train its stage, leave cleanly; its lifecycle
    (signals, phase, record, exit status) is lifecycle.WorkerLife's."""
    with lifecycle.WorkerLife(Path(run_dir), int(os.environ["RANK"]),
                              cfg_dict["dist"]["timeout_s"], wait_on_peer=not joined,
                              config=cfg_dict) as life:
        cfg = from_dict(cfg_dict)
        ctx = WorkerContext(rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]),
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
            summary = train(cfg, Path(run_dir), ctx, logger_factory=RunLogger, stop=life.stop)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        life.completed()
    return summary
