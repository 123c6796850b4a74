"""The tick family: K stages run the algorithm's schedule tick by tick (bp, ddg, fr, fdg,
dp_fdg, ddp).

`TickRunner` builds this process's stages (all of them under executor=local, one under dist),
runs ranges of ticks through the grid, and saves/restores the stages' state at a tick, with the
batches and messages in flight there, so that a resume continues bit for bit. The run loop
(train.py) decides when.

weights=live keeps no weight copies, so a checkpoint needs the weights its in-flight forwards
read: before a checkpoint is due, forwards keep a copy (`begin_epoch`), and a stop first runs up
to 2(K-1) more ticks so that every batch still in flight has one (`before_stop`). Non-finite
losses and gradients are looked for once per chunk (`check`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from dpbp import algos, checkpoint, schedule
from dpbp.build import WorkerContext, make_optimizer, split_model
from dpbp.companion import Companion, seeded
from dpbp.config import RunConfig
from dpbp.data import test_batches
from dpbp.errors import ConfigError, Divergence
from dpbp.feed import Feed
from dpbp.grid import Grid
from dpbp.stage import Stage, compact


class TickRunner:
    """This process's stages of a tick pipeline, for the run loop (train.Runner)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, ctx: WorkerContext) -> None:
        split = split_model(cfg, ctx)
        self.cfg, self.ctx, self.record = cfg, ctx, algos.get(cfg.algo.name)
        self.device, self.num_parameters, self.counts = (split.device, split.num_parameters,
                                                         split.counts)
        self.k = len(split.modules)
        self.replica, k_mine = divmod(ctx.rank, self.k)  # ranks: replica-major, module-minor
        mine = [k_mine] if ctx.distributed else list(range(self.k))
        self.grid = Grid(cfg, ctx, split.shapes, self.device, self.replica)
        self.shapes, self.classes = split.shapes, split.data.num_classes
        self.stages = [self._stage(split.modules[k], k) for k in mine]
        # replica 0's last stage reports for the run (the replicas hold the same weights)
        self.reports = self.stages[-1].last and self.replica == 0
        self.feed = Feed(split.data, cfg.trainer.batch_size, cfg.seed, self.device,
                         self.replica, cfg.algo.replicas, workers=cfg.data.loader_workers)
        self.data = split.data
        self.steps = self.feed.steps
        self.control_group = self.grid.control_group
        self.grid.attach(self.stages, self.feed)

    def _stage(self, module: torch.nn.Module, k: int) -> Stage:
        cfg, device = self.cfg, self.device
        m = module.to(device)
        if cfg.trainer.channels_last and device.type == "cuda":
            m = m.to(memory_format=torch.channels_last)
        if self.record.data_parallel == "torch_ddp" and self.ctx.distributed:
            # buffers stay per replica (BatchNorm statistics), so that replica 0 can evaluate
            # alone: broadcasting them would be a collective in every forward
            m = DistributedDataParallel(m, process_group=self.grid.dp_group,
                                        broadcast_buffers=False,
                                        device_ids=[device] if device.type == "cuda" else None)
        autocast = None
        if cfg.trainer.amp and device.type == "cuda":
            def autocast():
                return torch.autocast("cuda", dtype=torch.bfloat16)
        return Stage(m, k, self.k, cfg.algo.name, make_optimizer(cfg, m),
                     weights=cfg.algo.weight_policy(), beta=cfg.algo.shrink(),
                     autocast=autocast, grad_sync=self.grid.grad_sync,
                     on_nonfinite=cfg.trainer.on_nonfinite, companion=self._companion(k),
                     accumulate=cfg.algo.accumulation(), predict=cfg.algo.predicts_weights())

    def _companion(self, k: int) -> Companion | None:
        """Module k's local model (DGL's auxiliary head, DNI's gradient predictor), if any:
        seeded by (seed, k), the same under every executor."""
        build = self.record.companion
        if build is None or k == self.k - 1:
            return None
        return seeded(self.cfg.seed, k, lambda: build(
            self.cfg.algo, self.shapes[k], self.classes, self.device,
            lambda m: make_optimizer(self.cfg, m), self.cfg.optim.lr))

    # -- the run loop's calls, in the order it makes them -----------------------------------

    def end(self, num_batches: int) -> int:
        self.num_batches = num_batches
        self.end_tick = schedule.num_ticks(self.cfg.algo.name, self.k, num_batches)
        return self.end_tick

    def restore(self, directory: Path, tick: int) -> None:
        """Load this process's stages at `tick`; send the messages in flight there again."""
        messages = {}
        for s in self.stages:
            ck = checkpoint.load_part(directory, s.index, self.replica, tick)
            _check_part(ck, s, self.cfg, directory)
            try:
                s.module.load_state_dict(ck["module"])
                s.optimizer.load_state_dict(ck["optimizer"])
                s.restore_inflight(ck["inflight"], self.device)
                if s.companion is not None:
                    s.companion.load_state_dict(ck["companion"], self.device)
            except (RuntimeError, ValueError, KeyError) as e:  # other split.balance or data
                raise ConfigError(
                    f"{checkpoint.stage_file(directory, s.index, self.replica)} does not fit "
                    f"module {s.index + 1} of this run ({checkpoint.first_line(e)}); resume "
                    "with the same split.balance and data.") from None
            s.stats.updates = ck["updates"]
            messages[s.index] = [(kind, int(b), t.to(self.device))
                                 for kind, b, t in ck["messages"]]
        self.grid.resend(messages)  # what was in flight at the checkpoint, before the first tick

    def set_lr(self, lr: float) -> None:
        for s in self.stages:
            for g in s.optimizer.param_groups:
                g["lr"] = lr
            if s.companion is not None:
                s.companion.set_lr(lr)

    def begin_epoch(self, stop: int, checkpoint_due: bool) -> None:
        """weights=live: the batches in flight at `stop` (a checkpoint) keep a copy of the
        weights their forward read."""
        for s in self.stages:
            s.keep_weights_from = (schedule.forward_batch(self.cfg.algo.name, s.index,
                                                          stop - s.delay)
                                   if checkpoint_due else None)

    def run(self, start: int, stop: int) -> None:
        self.grid.run(range(start, stop), self.num_batches, self.end_tick)

    def check(self, kept: str) -> None:
        check_finite(self.stages, self.cfg.algo.name, self.k, self.steps, kept,
                     streak=self.cfg.trainer.skip_limit)

    def running_loss(self) -> float | None:
        return self.stages[-1].running_loss() if self.reports else None

    def before_stop(self, tick: int, stop: int) -> int:
        """weights=live: forwards before `tick` kept no copy of their weights; run until those
        batches have left the pipeline (at most 2(K-1) ticks)."""
        algo = self.cfg.algo.name
        extra = schedule.delay(algo, 0, self.k) if self.cfg.algo.weight_policy() == "live" else 0
        if not extra:
            return tick
        for s in self.stages:
            s.keep_weights_from = schedule.forward_batch(algo, s.index, tick)
        t_end = min(tick + extra, stop)
        self.run(tick, t_end)
        return t_end

    def end_epoch(self, final: bool) -> None:
        self.grid.sync()
        if final:
            for s in self.stages:
                s.drop_pending()  # gradients that would arrive after the last tick

    def evaluate(self, split: str = "test") -> tuple[float, float]:
        return self.grid.evaluate(test_batches(self.data, self.cfg.trainer.eval_batch_size,
                                               split))

    def train_sums(self) -> torch.Tensor | None:
        if not self.stages[-1].last:
            return None
        # every replica's last stage adds its shard's sums
        return self.grid.sum_over_replicas(self.stages[-1].take_train_sums())

    def stats(self) -> list[dict[str, Any]] | None:
        return self.grid.stage_stats()

    def save(self, directory: Path, state) -> None:
        """This process's stage files at state.tick (the messages in flight included)."""
        tick = state.tick
        flight = self.grid.in_flight(tick, self.num_batches, self.end_tick)
        for s in self.stages:
            part = {
                "stage": s.index, "replica": self.replica, "modules": s.num_stages,
                "algo": self.cfg.algo.name, "model": self.cfg.model,
                "epoch": state.epoch, "tick": tick,
                "module": s.module.state_dict(), "optimizer": s.optimizer.state_dict(),
                "updates": s.stats.updates, "inflight": s.inflight(),
                "messages": [[kind, b, compact(t)] for kind, b, t in flight.get(s.index, [])],
                "companion": None if s.companion is None else s.companion.state_dict(),
            }
            checkpoint.save_part(directory, s.index, self.replica, part)

    def sync(self) -> None:
        self.grid.sync()

    def drain(self, tick: int) -> None:
        self.grid.drain(tick, self.num_batches, self.end_tick)

    def finish(self) -> None:
        self.grid.finish()
        self.feed.close()

    def summary(self, stats: list[dict[str, Any]] | None) -> dict[str, Any]:
        stats = stats or []
        return {
            "modules": self.k,
            "peak_memory_bytes": [s["peak_memory_bytes"] for s in stats],
            "memory_measure": stats[0]["memory_measure"] if stats else None,
            "history_memory_bytes": [s["history_bytes"] for s in stats],
            "compute_seconds": [s["compute_seconds"] for s in stats],
            "idle_seconds": [s["idle_seconds"] for s in stats],
            "updates": [s["updates"] for s in stats],
            "skipped_steps": [s["skipped"] for s in stats],
            "process_cpu_seconds": [s["process_cpu"] for s in stats if s["process_cpu"]],
            **aux_keys(stats),
        }


def aux_keys(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The companions' cost per module (DGL's heads, DNI's predictors; 0 for the last module),
    apart from the network's; {} when no module has one."""
    if not any(s.get("aux") for s in stats):
        return {}
    aux = [s.get("aux") or {"parameters": 0, "parameter_bytes": 0, "flops": 0} for s in stats]
    return {"aux_parameters": [a["parameters"] for a in aux],
            "aux_parameter_bytes": [a["parameter_bytes"] for a in aux],
            "aux_flops": [a["flops"] for a in aux]}


def _check_part(ck: dict[str, Any], s: Stage, cfg: RunConfig, directory: Path) -> None:
    if (ck["modules"], ck["algo"], ck["model"]) != (s.num_stages, cfg.algo.name, cfg.model):
        raise ConfigError(
            f"checkpoint in {directory} is for algo={ck['algo']} model={ck['model']} with "
            f"{ck['modules']} modules, not this run's; resume with the same settings.")


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
