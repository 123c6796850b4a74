"""The pipelining family: torch.distributed.pipelining's GPipe or 1F1B schedule over dpbp's
split (`algo=gpipe`, `algo.pipeline=gpipe|1f1b`), one stage per process.

Every batch is cut into `algo.microbatches` microbatches; the schedule runs their forwards and
backwards through the pipeline (GPipe: all forwards, then all backwards; 1F1B: one forward, one
backward in the steady state), the gradients of the microbatches are summed with the loss of each
scaled by 1/M, and every module then steps at the same time: a flush per batch, so nothing is in
flight between batches and a checkpoint (module, optimizer, loss sums) resumes exactly.
Evaluation forwards the test set through dpbp's own P2P pipeline. Positions are batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from dpbp import algos, checkpoint, p2p
from dpbp.build import make_optimizer, split_model
from dpbp.data import test_batches
from dpbp.executor import Totals
from dpbp.feed import Feed
from dpbp.stage import Stage

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def make_schedule(stage: PipelineStage, pipeline: str, microbatches: int):
    """torch's schedule object for `pipeline` over `stage` (loss: mean cross-entropy)."""
    return SCHEDULES[pipeline](stage, microbatches, loss_fn=F.cross_entropy)


class PipeliningRunner:
    """Module `ctx.rank` of K under torch's schedule, for the run loop (train.Runner)."""

    def __init__(self, cfg, run_dir: Path, ctx) -> None:
        split = split_model(cfg, ctx)
        self.cfg, self.ctx, self.device = cfg, ctx, split.device
        self.num_parameters, self.counts = split.num_parameters, split.counts
        self.k_total, self.k = len(split.modules), ctx.rank
        self.module = split.modules[self.k].to(self.device)
        self.optimizer = make_optimizer(cfg, self.module)
        a, t = cfg.algo, cfg.trainer
        self.schedule = make_schedule(PipelineStage(self.module, self.k, self.k_total,
                                                    self.device), a.pipeline, a.microbatches)
        # evaluation goes through dpbp's P2P pipeline (group creation is collective: every rank)
        self.link = p2p.P2P(self.k, list(range(self.k_total)), split.shapes, t.batch_size,
                            self.device, p2p.make_groups(list(range(self.k_total))))
        self.evaluator = Stage(self.module, self.k, self.k_total, algos.reference().name,
                               self.optimizer)
        self.first, self.reports = self.k == 0, self.k == self.k_total - 1
        self.data = split.data
        self.feed = Feed(split.data, t.batch_size, cfg.seed, self.device,
                         workers=cfg.data.loader_workers)
        self.steps = self.feed.steps
        self.control_group = dist.new_group(backend="gloo")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, correct, seen

    def end(self, num_batches: int) -> int:
        self.num_batches = num_batches
        return num_batches

    def restore(self, directory: Path, tick: int) -> None:
        ck = checkpoint.load_part(directory, self.k, 0, tick)
        self.module.load_state_dict(ck["module"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.sums.copy_(ck["sums"])

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def begin_epoch(self, stop: int, checkpoint_due: bool) -> None:
        pass

    def run(self, start: int, stop: int) -> None:
        for b in range(start, stop):
            if self.first:
                self.schedule.step(self.feed.inputs(b))
            elif self.reports:
                y, losses = self.feed.labels(b), []
                logits = self.schedule.step(target=y, losses=losses)
                self.sums += torch.stack([torch.stack(losses).mean().detach() * y.numel(),
                                          (logits.argmax(1) == y).sum(),
                                          torch.tensor(y.numel(), device=self.device)]).double()
            else:
                self.schedule.step()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def check(self, kept: str) -> None:
        pass  # torch's schedule owns the backward; a non-finite loss shows in the epoch's loss

    def running_loss(self) -> float | None:
        return None

    def before_stop(self, tick: int, stop: int) -> int:
        return tick

    def end_epoch(self, final: bool) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dist.barrier()  # the epoch ends when every module has stepped its last batch

    def evaluate(self, split: str = "test") -> tuple[float, float]:
        totals = Totals()
        self.link.evaluate(self.evaluator, test_batches(self.data,
                                                        self.cfg.trainer.eval_batch_size, split),
                           totals)
        return totals.result() if self.reports else (float("nan"), float("nan"))

    def train_sums(self) -> torch.Tensor | None:
        sums = self.sums.cpu().clone()
        self.sums.zero_()
        return sums

    def stats(self) -> list[dict[str, Any]] | None:
        """Peak memory per module (CUDA), gathered by every process; compute time is inside
        torch's schedule and not separable."""
        cuda = self.device.type == "cuda"
        peaks: list[Any] = [None] * self.k_total
        dist.all_gather_object(peaks, torch.cuda.max_memory_allocated(self.device) if cuda
                               else None)
        return [{"stage": k, "peak_memory_bytes": p, "compute_seconds": None,
                 "idle_seconds": None} for k, p in enumerate(peaks)]

    def save(self, directory: Path, state) -> None:
        checkpoint.save_part(directory, self.k, 0, {
            "stage": self.k, "replica": 0, "modules": self.k_total, "algo": self.cfg.algo.name,
            "model": self.cfg.model, "epoch": state.epoch, "tick": state.tick,
            "module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
            "sums": self.sums.cpu()})

    def sync(self) -> None:
        dist.barrier()

    def drain(self, tick: int) -> None:
        pass

    def finish(self) -> None:
        self.link.flush()
        self.feed.close()

    def summary(self, stats: list[dict[str, Any]] | None) -> dict[str, Any]:
        return {
            "modules": self.k_total,
            "peak_memory_bytes": [s["peak_memory_bytes"] for s in stats or []],
            "memory_measure": "cuda_allocator" if self.device.type == "cuda" else "none",
            "updates": [self.num_batches] * self.k_total,
        }
