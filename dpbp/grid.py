"""The process grid of a run and what each process executes on it.

Ranks form a replicas x modules grid, replica-major: rank = replica * K + module. Each replica is
one pipeline (its own P2P groups per boundary, p2p.py); module k of every replica forms a
data-parallel group (an algorithm whose record says data_parallel="gradients", dp_fdg, averages
gradients over it with `GradSync`; "torch_ddp" hands it to torch's DistributedDataParallel). `Grid`
runs ranges of ticks on this process's stages: all of them in one process (executor=local) or
one stage per process over P2P (executor=dist, p2p.py).
"""

from __future__ import annotations

import resource
import time
from typing import Any

import torch
import torch.distributed as dist

from dpbp import algos, p2p, schedule
from dpbp.build import WorkerContext
from dpbp.config import RunConfig
from dpbp.executor import LocalExecutor, Totals, in_flight, run_program
from dpbp.feed import Feed
from dpbp.stage import Stage


class Grid:
    """Runs tick ranges on this process's stages: all of them (local) or one over P2P (dist)."""

    def __init__(self, cfg: RunConfig, ctx: WorkerContext, shapes: list[tuple[int, ...]],
                 device: torch.device, replica: int = 0) -> None:
        self.cfg, self.ctx, self.device, self.shapes = cfg, ctx, device, shapes
        k = len(shapes)
        self.ranks = [replica * k + i for i in range(k)]  # this replica's pipeline
        self.busy = 0.0  # dist: wall seconds inside run(), idle included
        self.grad_sync = None
        self.control_group = None  # interrupt.Agreement's flags (gloo even under NCCL)
        if ctx.distributed:
            # group creation is collective: every rank creates every group, in the same order
            pipes = [p2p.make_groups([r * k + i for i in range(k)])
                     for r in range(cfg.algo.replicas)]
            data_parallel = [dist.new_group([r * k + i for r in range(cfg.algo.replicas)])
                             for i in range(k)]
            self.groups = pipes[replica]
            self.dp_group = data_parallel[ctx.rank % k]
            if cfg.algo.replicas > 1 and algos.get(cfg.algo.name).data_parallel == "gradients":
                self.grad_sync = GradSync(self.dp_group, cfg.algo.replicas)
            self.control_group = dist.new_group(backend="gloo")

    def attach(self, stages: list[Stage], feed: Feed) -> None:
        """The stages this process runs and their data."""
        self.stages, self.feed = stages, feed
        self.data_bytes = sum(t.untyped_storage().nbytes() for t in
                              (feed.ds.train_x, feed.ds.train_y, feed.ds.test_x, feed.ds.test_y)
                              if t.device == self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rusage = resource.getrusage(resource.RUSAGE_SELF)
        if self.ctx.distributed:
            gloo = dist.get_backend() == "gloo"  # NCCL enforces its timeout by itself
            self.link = p2p.P2P(self.ctx.rank % len(self.shapes), self.ranks, self.shapes,
                                self.cfg.trainer.batch_size, self.device, self.groups,
                                timeout_s=self.cfg.dist.timeout_s if gloo else None)
        else:
            self.local = LocalExecutor(stages, feed)

    def run(self, ticks: range, num_batches: int, end_tick: int) -> None:
        algo, k = self.cfg.algo.name, len(self.shapes)
        programs = [schedule.program(algo, s.index, k, ticks, num_batches, end_tick,
                                     self.cfg.algo.accumulation())
                    for s in self.stages]
        if not self.ctx.distributed:
            self.local.run(programs)
            return
        t0 = time.perf_counter()
        self.link.expect(programs[0])
        for _ in run_program(self.stages[0], programs[0], self.link, self.feed):
            raise RuntimeError("a blocking receive returned nothing")
        self.busy += time.perf_counter() - t0

    def _link(self, stage: Stage):
        return self.link if self.ctx.distributed else self.local.ends[stage.index]

    def in_flight(self, tick: int, num_batches: int, end_tick: int
                  ) -> dict[int, list[tuple[str, int, torch.Tensor]]]:
        """Per own stage, the messages it sent before `tick` that are taken at `tick` or later
        (for a checkpoint between ticks `tick - 1` and `tick`)."""
        algo, k = self.cfg.algo.name, len(self.shapes)
        return {s.index: in_flight(self._link(s), schedule.carried(algo, s.index, k, tick,
                                                                   num_batches, end_tick))
                for s in self.stages}

    def resend(self, messages: dict[int, list[tuple[str, int, torch.Tensor]]]) -> None:
        """Send a checkpoint's in-flight messages again, before the first tick of a resume."""
        for s in self.stages:
            for kind, batch, tensor in messages.get(s.index, []):
                self._link(s).send(kind, batch, tensor)

    def drain(self, tick: int, num_batches: int, end_tick: int) -> None:
        """Before stopping at `tick` (interrupt): take the messages the neighbours have in
        flight off the wire (a checkpoint holds them), so that every send completes."""
        if not self.ctx.distributed:
            return
        algo, k = self.cfg.algo.name, len(self.shapes)
        incoming = schedule.carried_to(algo, self.stages[0].index, k, tick, num_batches,
                                       end_tick)
        self.link.expect(incoming)
        for ins in incoming:
            self.link.recv("act" if ins.op == schedule.RECV_ACT else "grad", ins.batch)

    def evaluate(self, batches) -> tuple[float, float]:
        if not self.ctx.distributed:
            return self.local.evaluate(batches)
        if self.ranks[0] != 0:  # replicas hold the same weights: replica 0 evaluates
            return float("nan"), float("nan")
        totals = Totals()
        self.link.evaluate(self.stages[0], batches, totals)
        return totals.result() if self.stages[0].last else (float("nan"), float("nan"))

    def stage_stats(self) -> list[dict[str, Any]] | None:
        """Cumulative per-module statistics, gathered on the process of the last stage.

        compute = time the module's process computed (dist: wall time minus time blocked on a
        message; local: time spent running that stage); idle = time blocked on a message. Both
        are host times, meaningful on CPU only (CUDA work is asynchronous): None on CUDA.
        peak_memory_bytes = the CUDA allocator's peak above the data held on the device when
        the module has a GPU of its own, else the bytes the algorithm holds for in-flight
        batches (history_bytes). process_cpu = [user, system] CPU seconds of the process since
        the stages were attached, on its first stage only (a local run's stages share one).
        """
        cuda = self.device.type == "cuda"
        own_gpu = cuda and self.ctx.distributed
        mine = []
        for s in self.stages:
            if self.ctx.distributed:
                idle = self.link.idle_seconds
                compute = self.busy - idle
            else:
                idle, compute = 0.0, self.local.seconds[s.index]
            peak = (torch.cuda.max_memory_allocated(self.device) - self.data_bytes if own_gpu
                    else s.stats.peak_bytes)
            mine.append({
                "stage": s.index,
                "replica": self.ranks[0] // len(self.shapes),
                "history_bytes": s.stats.peak_bytes,
                "peak_memory_bytes": peak,
                "memory_measure": "cuda_allocator" if own_gpu else "held_tensors",
                "compute_seconds": None if cuda else compute,
                "idle_seconds": None if cuda else idle,
                "updates": s.stats.updates,
                "skipped": s.stats.skipped,
                "process_cpu": None,
                "aux": None if s.companion is None else s.companion.info(),
            })
        # the process's CPU time since attach (user, system), with its first stage: a local
        # run's stages share one process
        now = resource.getrusage(resource.RUSAGE_SELF)
        mine[0]["process_cpu"] = [now.ru_utime - self.rusage.ru_utime,
                                  now.ru_stime - self.rusage.ru_stime]
        if not self.ctx.distributed:
            return mine
        last = len(self.shapes) - 1  # replica 0's last stage reports for the run
        everyone: list[Any] | None = [None] * self.ctx.world_size if self.ctx.rank == last else None
        dist.gather_object(mine, everyone, dst=last)
        if everyone is None:
            return None
        return [m for part in everyone for m in part if m["replica"] == 0]

    def sum_over_replicas(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over this module's data-parallel group (itself with one replica)."""
        if self.ctx.distributed and self.cfg.algo.replicas > 1:
            dist.all_reduce(t, group=self.dp_group)
        return t

    def sync(self) -> None:
        """Wait until every module has finished the ticks run so far."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.ctx.distributed:
            dist.barrier()

    def finish(self) -> None:
        """Wait for the last sends (before the process group goes away)."""
        if self.ctx.distributed:
            self.link.flush()


class GradSync:
    """Average a module's gradients over its data-parallel group before each update (dp_fdg),
    overlapped with the backward.

    A hook on every weight tensor a forward used (`watch`) starts an asynchronous all-reduce of
    that weight's gradient the moment the backward has computed it, so the reductions of the
    last layers run while the first layers are still being back-propagated; the update
    (`__call__`) waits for them and divides by the number of replicas. Every replica's module k
    runs the same graph at the same ticks, so the hooks fire, and the collectives are issued, in
    the same order everywhere.
    """

    def __init__(self, group, replicas: int) -> None:
        self.group, self.replicas = group, replicas
        self.pending: list[Any] = []  # all-reduces in flight

    def watch(self, weight: torch.Tensor) -> None:
        """All-reduce `weight`'s gradient as soon as a backward computes it."""
        weight.register_hook(self._reduce)

    def _reduce(self, grad: torch.Tensor) -> torch.Tensor:
        self.pending.append(dist.all_reduce(grad, group=self.group, async_op=True))
        return grad  # reduced in place: the backward returns this very tensor

    def __call__(self, grads: list[torch.Tensor]) -> None:
        """Wait for this backward's all-reduces; leave the replicas' mean in `grads`."""
        for work in self.pending:
            work.wait()
        self.pending.clear()
        torch._foreach_div_(grads, self.replicas)
