"""The run: data, model, split, stages, the epoch loop, evaluation, checkpoints, summary.

`train(cfg, run_dir, ctx)` is called once per process: by the only process of a single-worker or
`executor=local` run, or by each worker of a distributed run (ctx says which stage it owns). The
loop is the same for both; only the executor differs.

Time: ticks are global across epochs (the pipeline is not flushed between epochs). Epoch e covers
the ticks in which the first stage takes the epoch's batches; evaluation and the checkpoint come
after them, with every module at its current weights. `train_seconds` excludes evaluation and
checkpoints, so accuracy-versus-time curves of different runs compare directly.

Stopping and resuming. Checkpoints are written at every epoch end and, on SIGINT/SIGTERM (or a
STOP file in the run directory), at the next tick all processes agree on (interrupt.py); they hold
the batches and messages in flight there (checkpoint.py), and a resumed run continues from that
tick with the same numbers. Under algo.weights=live a stop first runs up to 2(K-1) more ticks,
so that every batch still in flight has kept the weights its forward read. Non-finite losses and
gradients are looked for once per chunk of `trainer.log_every` ticks (check_finite).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dpbp import checkpoint, schedule
from dpbp.config import ASYNC, RunConfig
from dpbp.data import Dataset, batch_generator, epoch_permutation, load_dataset, test_batches
from dpbp.data import train_batch as make_train_batch
from dpbp.errors import ConfigError, Divergence, Interrupted
from dpbp.grid import Executor
from dpbp.interrupt import STOP_FILE, Agreement, StopRequest
from dpbp.logs import write_summary
from dpbp.models import build_blocks
from dpbp.split import balanced_counts, block_flops, block_times, boundaries, check_balance
from dpbp.stage import Stage


@dataclass
class WorkerContext:
    """Where this process sits: all stages (local) or one stage of a distributed pipeline."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    lr: float
    train_seconds: float
    images: int


@dataclass
class RunState:
    """What the last stage knows about the run so far (checkpointed with it)."""

    epoch: int = 0  # epochs completed
    tick: int = 0  # the next tick to run (a checkpoint lies between tick-1 and tick)
    drained: bool = False  # the last epoch ran: the pipeline was drained, late gradients dropped
    epoch_seconds: float = 0.0  # training seconds of the unfinished epoch (checkpoint inside it)
    train_seconds: float = 0.0
    images: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_test_acc: float = 0.0
    wall_start: float = 0.0  # time.time() when the run first started: origin of the time axis


def pick_device(cfg: RunConfig, local_rank: int = 0) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))


def lr_at(cfg: RunConfig, epoch: int) -> float:
    """Learning rate of `epoch` (0-based): warm-up, then the schedule; constant within an epoch."""
    s, base = cfg.sched, cfg.optim.lr
    if epoch < s.warmup_epochs:
        return base * (epoch + 1) / (s.warmup_epochs + 1)
    if s.name == "multistep":
        return base * s.gamma ** sum(epoch >= m for m in s.milestones)
    if s.name == "cosine":
        span = max(cfg.trainer.epochs - s.warmup_epochs, 1)
        return base * 0.5 * (1 + math.cos(math.pi * (epoch - s.warmup_epochs) / span))
    return base


def build_model(cfg: RunConfig, ds: Dataset) -> list[nn.Module]:
    """The whole model's blocks, initialised from the seed: identical in every process."""
    torch.manual_seed(cfg.seed)
    return build_blocks(cfg.model, ds.in_channels, ds.num_classes)


def resolve_balance(cfg: RunConfig, blocks: list[nn.Module], ds: Dataset,
                    device: torch.device) -> list[int]:
    """Block counts per module: split.balance if given, else balanced by flops or measured time."""
    k = cfg.modules
    if cfg.split.balance is not None:
        return check_balance(cfg.split.balance, len(blocks))
    if k > len(blocks):
        balanced_counts([1.0] * len(blocks), k)  # raises the clear error
    if cfg.split.by == "time":
        x = torch.randn(cfg.trainer.batch_size, ds.in_channels, ds.image_size, ds.image_size,
                        device=device)
        return balanced_counts(block_times([b.to(device) for b in blocks], x), k)
    x = torch.zeros(1, ds.in_channels, ds.image_size, ds.image_size)
    return balanced_counts(block_flops(blocks, x), k)


def output_shapes(modules: list[nn.Module], ds: Dataset) -> list[tuple[int, ...]]:
    """Per-sample output shape of each module (fixed once; the transport sizes buffers by it)."""
    x = torch.zeros(2, ds.in_channels, ds.image_size, ds.image_size)
    shapes = []
    with torch.no_grad():
        for m in modules:
            m.eval()
            x = m(x)
            m.train()
            shapes.append(tuple(x.shape[1:]))
    return shapes


def steps_per_epoch(ds: Dataset, batch_size: int) -> int:
    """Full batches per epoch (the last partial one is dropped so boundary shapes stay fixed)."""
    steps = ds.train_x.shape[0] // batch_size
    if steps < 1:
        raise ConfigError(f"trainer.batch_size={batch_size} is larger than the "
                          f"{ds.train_x.shape[0]} training images; lower it.")
    return steps


class Feed:
    """Training batches by global batch number: epoch = b // steps, shuffled per epoch by seed.

    Every process computes the same order, so the first stage's inputs and the last stage's labels
    match without sending labels; augmentation is seeded per batch, so it does not depend on
    what ran before (resume and every executor see the same batches).
    """

    def __init__(self, ds: Dataset, batch_size: int, seed: int, device: torch.device,
                 replica: int = 0, replicas: int = 1) -> None:
        """With data-parallel replicas, global batch b holds replicas x batch_size samples and
        replica r takes the r-th share of it (disjoint shards)."""
        self.ds, self.batch_size, self.seed, self.device = ds, batch_size, seed, device
        self.replica, self.replicas = replica, replicas
        self.steps = steps_per_epoch(ds, batch_size * replicas)
        # replica 0 augments exactly as a single pipeline does; the others get their own stream
        self.aug_seed = seed + 1_000_003 * replica
        self._perm: tuple[int, torch.Tensor] | None = None

    def _indices(self, batch: int) -> torch.Tensor:
        epoch, i = divmod(batch, self.steps)
        if self._perm is None or self._perm[0] != epoch:
            n = self.ds.train_x.shape[0]
            self._perm = (epoch, epoch_permutation(n, self.seed, epoch, self.device))
        start = (i * self.replicas + self.replica) * self.batch_size
        return self._perm[1][start:start + self.batch_size]

    def inputs(self, batch: int) -> torch.Tensor:
        gen = batch_generator(self.aug_seed, batch, self.device)
        return make_train_batch(self.ds, self._indices(batch), gen)[0]

    def labels(self, batch: int) -> torch.Tensor:
        return self.ds.train_y[self._indices(batch)]


def make_optimizer(cfg: RunConfig, module: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.SGD(module.parameters(), lr=o.lr, momentum=o.momentum,
                           weight_decay=o.weight_decay, nesterov=o.nesterov and o.momentum > 0)


def split_model(cfg: RunConfig, ctx: WorkerContext
                ) -> tuple[torch.device, Dataset, list[nn.Module], list[int],
                           list[tuple[int, ...]], int]:
    """What every pipeline process sets up alike: its device (and CPU threads), the data, the
    whole model cut into modules (on the CPU), their block counts and output shapes, and the
    number of parameters."""
    device = pick_device(cfg, ctx.local_rank)
    if device.type == "cpu" and cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    ds = load_dataset(cfg.data, device, seed=cfg.seed)
    blocks = build_model(cfg, ds)
    num_parameters = sum(p.numel() for b in blocks for p in b.parameters())
    counts = resolve_balance(cfg, blocks, ds, device)
    modules = [nn.Sequential(*blocks[a:b]) for a, b in boundaries(counts)]
    return device, ds, modules, counts, output_shapes(modules, ds), num_parameters


def train(cfg: RunConfig, run_dir: Path, ctx: WorkerContext | None = None,
          logger_factory=None, stop: StopRequest | None = None) -> dict[str, Any] | None:
    """Train as configured; return the summary on the process that holds the last stage.

    `stop`: set by a signal handler (interrupt.install); the run then stops at a tick that every
    process agrees on, writes a checkpoint there and raises Interrupted.
    """
    ctx = ctx or WorkerContext()
    if cfg.algo.name in ASYNC:
        from dpbp.asgd import train_async

        return train_async(cfg, run_dir, ctx, logger_factory)
    if cfg.algo.name == "gpipe":
        from dpbp.gpipe import train_gpipe

        return train_gpipe(cfg, run_dir, ctx, logger_factory)
    device, ds, modules, counts, shapes, num_parameters = split_model(cfg, ctx)
    k_total = len(modules)
    replicas = cfg.algo.replicas
    replica, k_mine = divmod(ctx.rank, k_total)  # ranks: replica-major, module-minor
    mine = [k_mine] if ctx.distributed else list(range(k_total))
    executor = Executor(cfg, ctx, shapes, device, replica)

    autocast = None
    if cfg.trainer.amp and device.type == "cuda":
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    stages = []
    for k in mine:
        m = modules[k].to(device)
        if cfg.trainer.channels_last and device.type == "cuda":
            m = m.to(memory_format=torch.channels_last)
        if cfg.algo.name == "ddp" and ctx.distributed:
            # buffers stay per replica (BatchNorm statistics), so that replica 0 can evaluate
            # alone: broadcasting them would be a collective in every forward
            m = DistributedDataParallel(m, process_group=executor.dp_group,
                                        broadcast_buffers=False,
                                        device_ids=[device] if device.type == "cuda" else None)
        stages.append(Stage(m, k, k_total, cfg.algo.name, make_optimizer(cfg, m),
                            weights=cfg.algo.weights, beta=cfg.algo.beta, autocast=autocast,
                            grad_sync=executor.grad_sync,
                            on_nonfinite=cfg.trainer.on_nonfinite))
    del modules
    # replica 0's last stage reports for the run (the replicas hold the same weights)
    last = stages[-1] if stages[-1].last and replica == 0 else None

    feed = Feed(ds, cfg.trainer.batch_size, cfg.seed, device, replica, replicas)
    total_epochs = cfg.trainer.epochs
    num_batches = total_epochs * feed.steps
    if cfg.trainer.max_steps is not None:
        num_batches = min(num_batches, cfg.trainer.max_steps)
        total_epochs = math.ceil(num_batches / feed.steps)
    end_tick = schedule.num_ticks(cfg.algo.name, k_total, num_batches)

    state = RunState()
    ckpt_dir = run_dir / "checkpoints"
    messages: dict[int, list] = {}
    if cfg.resume:
        src = checkpoint.find(cfg.resume, run_dir)
        state, messages = checkpoint.load(src, stages, cfg, replica, device)
        checkpoint.check_extend(asdict(state), total_epochs, cfg)
    executor.attach(stages, feed)
    executor.resend(messages)  # what was in flight at the checkpoint, before the first tick
    control = Agreement(stop or StopRequest(), executor.control_group, run_dir / STOP_FILE)
    state.wall_start = state.wall_start or time.time()
    log = logger_factory(cfg, run_dir, feed.steps, total_epochs, num_batches, state.wall_start) \
        if (logger_factory and last is not None) else None
    algo = cfg.algo.name

    def save(tick: int) -> None:
        """Checkpoint between ticks tick-1 and tick, in every process, consistently."""
        state.tick = tick
        checkpoint.save_stages(ckpt_dir, stages, executor.in_flight(tick, num_batches, end_tick),
                               state, cfg, replica)
        executor.sync()  # every stage file is on disk before run.pt names their tick
        if last is not None:
            checkpoint.commit(ckpt_dir, state, cfg)

    def stop_here(tick: int, signum: int) -> None:
        if cfg.trainer.checkpoint:
            save(tick)
        executor.drain(tick, num_batches, end_tick)  # the checkpoint holds those messages
        control.close()
        executor.finish()
        if last is not None:  # a resume must not stop again at once
            (run_dir / STOP_FILE).unlink(missing_ok=True)
        epoch, done = divmod(tick, feed.steps)
        saved = (f"checkpoint written to {ckpt_dir}" if cfg.trainer.checkpoint
                 else "nothing saved (trainer.checkpoint=false)")
        raise Interrupted(f"stopped {control.reason(signum)} at tick {tick} (epoch {epoch + 1}, "
                          f"after {done} of its {feed.steps} batches); {saved}", signum)

    def run_ticks(a: int, b: int) -> None:
        executor.run(range(a, b), num_batches, end_tick)
        # one device sync per chunk and stage, not per step
        check_finite(stages, algo, k_total, feed.steps, kept_note(state, cfg, ckpt_dir),
                     streak=cfg.trainer.log_every)

    try:
        for epoch in range(state.epoch, total_epochs):
            lr = lr_at(cfg, epoch) * (replicas if cfg.algo.scale_lr else 1)
            for s in stages:
                for g in s.optimizer.param_groups:
                    g["lr"] = lr
            first = epoch * feed.steps
            start = max(first, state.tick)  # a checkpoint may lie inside the epoch
            final = epoch == total_epochs - 1
            stop = end_tick if final else (epoch + 1) * feed.steps
            keep_weights_until(stages, algo, stop if cfg.trainer.checkpoint and not final
                               else None)
            carried_seconds, state.epoch_seconds = state.epoch_seconds, 0.0
            t0 = time.perf_counter()
            t, signum = start, None
            while t < stop:
                t_end = min(t + cfg.trainer.log_every, stop)
                run_ticks(t, t_end)
                if log is not None:
                    done = min(t_end, num_batches)
                    ips = ((done - start) * cfg.trainer.batch_size * replicas
                           / (time.perf_counter() - t0))
                    log.advance(done, ips, last.running_loss())
                t = t_end
                if t < stop and (signum := control.poll()) is not None:
                    # weights=live: forwards before t kept no copy of their weights; run until
                    # those batches have left the pipeline (at most 2(K-1) ticks)
                    extra = schedule.delay(algo, 0, k_total) if cfg.algo.weights == "live" else 0
                    if extra:
                        keep_weights_from(stages, algo, t)
                        t_end = min(t + extra, stop)
                        run_ticks(t, t_end)
                        t = t_end
                    if t < stop:
                        state.epoch_seconds = carried_seconds + time.perf_counter() - t0
                        stop_here(t, signum)
            executor.sync()  # the epoch ends when every module has finished its ticks
            seconds = carried_seconds + time.perf_counter() - t0
            images = ((min((epoch + 1) * feed.steps, num_batches) - first)
                      * cfg.trainer.batch_size * replicas)
            state.train_seconds += seconds
            state.images += images
            if final:
                for s in stages:
                    s.drop_pending()  # gradients that would arrive after the last tick
                state.drained = True
            test_loss, test_acc = executor.evaluate(
                test_batches(ds, cfg.trainer.eval_batch_size))
            state.epoch = epoch + 1
            if stages[-1].last:  # every replica's last stage: training metrics of all shards
                sums = executor.sum_over_replicas(stages[-1].take_train_sums())
            if last is not None:
                loss_sum, correct, seen = sums.tolist()
                train_loss, train_acc = ((loss_sum / seen, correct / seen) if seen
                                         else (float("nan"), float("nan")))
                state.best_test_acc = max(state.best_test_acc, test_acc)
                entry = EpochLog(epoch + 1, train_loss, train_acc, test_loss, test_acc, lr,
                                 state.train_seconds, images)
                state.history.append(entry.__dict__)
                if log is not None:
                    log.epoch(entry, seconds)
            epoch_stats = executor.stage_stats()
            if log is not None:
                log.stages(epoch + 1, epoch_stats, stop - start)
            if not final:
                signum = signum or control.settle()  # every process is here: agree at once
                if signum is not None:
                    stop_here(stop, signum)
            if cfg.trainer.checkpoint:
                save(stop)
        stats = executor.stage_stats()
        control.close()
        executor.finish()
    finally:
        if log is not None:
            log.close_progress()

    if last is None:
        return None
    return finish_run(cfg, run_dir, log, state, ctx, device, num_parameters, counts,
                      num_batches, {
                          "modules": k_total,
                          "peak_memory_bytes": [s["peak_memory_bytes"] for s in stats],
                          "memory_measure": stats[0]["memory_measure"],
                          "history_memory_bytes": [s["history_bytes"] for s in stats],
                          "compute_seconds": [s["compute_seconds"] for s in stats],
                          "idle_seconds": [s["idle_seconds"] for s in stats],
                          "updates": [s["updates"] for s in stats],
                          "skipped_steps": [s["skipped"] for s in stats],
                      })


def check_finite(stages: list[Stage], algo: str, modules: int, steps: int, kept: str,
                 streak: int | None = None) -> None:
    """Raise Divergence for the earliest non-finite loss or gradient these stages have seen
    (on_nonfinite=stop), naming its tick, module and batch; with on_nonfinite=skip, when a
    module has skipped `streak` steps in a row (it no longer recovers)."""
    for s in stages:
        if streak is not None and s.stats.skipped_in_a_row >= streak:
            raise Divergence(
                f"module {s.index + 1} skipped its last {s.stats.skipped_in_a_row} steps for "
                f"non-finite gradients (trainer.on_nonfinite=skip) and does not recover; {kept}; "
                "lower optim.lr")
    found = []
    for s in stages:
        for what, batch in (("training loss", s.first_nonfinite_batch() if s.last else None),
                            ("gradient", s.first_nonfinite_grad_batch())):
            if batch is not None:
                tick = schedule.backward_tick(algo, s.index, modules, batch)
                found.append((tick, -s.index, what != "training loss", batch, what))
    if found:
        tick, neg, _, batch, what = min(found)
        raise Divergence(
            f"non-finite {what} at batch {batch} (epoch {batch // steps + 1}, tick {tick}) in "
            f"module {1 - neg}; {kept}; lower optim.lr, or skip such steps with "
            "trainer.on_nonfinite=skip", tick=tick)


def kept_note(state: RunState, cfg: RunConfig, ckpt_dir: Path) -> str:
    """Which checkpoint a run that stops now leaves."""
    if cfg.trainer.checkpoint and state.tick:
        return f"the checkpoint of epoch {state.epoch} (tick {state.tick}) in {ckpt_dir} is the " \
               "last good one"
    return "no checkpoint was written before it"


def keep_weights_until(stages: list[Stage], algo: str, tick: int | None) -> None:
    """weights=live: the batches still in flight at `tick` (a checkpoint) keep a copy of the
    weights their forward read; None: no checkpoint is due."""
    for s in stages:
        s.keep_weights_from = (None if tick is None
                               else schedule.forward_batch(algo, s.index, tick - s.delay))


def keep_weights_from(stages: list[Stage], algo: str, tick: int) -> None:
    """weights=live: every forward from `tick` on keeps a copy of its weights."""
    for s in stages:
        s.keep_weights_from = schedule.forward_batch(algo, s.index, tick)


def finish_run(cfg: RunConfig, run_dir: Path, log, state: RunState, ctx: WorkerContext,
               device: torch.device, num_parameters: int, split: list[int], steps: int,
               per_algorithm: dict[str, Any]) -> dict[str, Any]:
    """The run's summary (the contract's keys plus `per_algorithm`'s): written to
    summary.json and handed to the logger; returned."""
    final = state.history[-1]
    summary = {
        "status": "completed",
        "algo": cfg.algo.name,
        "model": cfg.model,
        "data": cfg.data.name,
        "gpus": cfg.gpus,
        "replicas": cfg.algo.replicas,
        "seed": cfg.seed,
        "epochs": state.epoch,
        "steps": steps,
        "executor": "local" if not ctx.distributed else "dist",
        "device": device.type,
        "num_parameters": num_parameters,
        "split": split,
        "final_test_acc": final["test_acc"],
        "best_test_acc": state.best_test_acc,
        "final_test_loss": final["test_loss"],
        "final_train_loss": final["train_loss"],
        "train_seconds": state.train_seconds,
        "images_per_second": state.images / max(state.train_seconds, 1e-9),
        **per_algorithm,
        "history": state.history,
        "config": cfg.to_dict(),
    }
    if log is not None:
        log.finish(summary)
    write_summary(run_dir, summary)
    return summary
