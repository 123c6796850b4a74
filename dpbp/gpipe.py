"""The exact-gradient pipeline users would pick instead: torch.distributed.pipelining's GPipe or
1F1B schedule over dpbp's split (`algo=gpipe`, `algo.pipeline=gpipe|1f1b`).

Each process holds one module (a `PipelineStage`) of the same split the decoupled algorithms use.
Every batch is cut into `algo.microbatches` microbatches; the schedule runs their forwards and
backwards through the pipeline (GPipe: all forwards, then all backwards; 1F1B: one forward, one
backward in the steady state), the gradients of the microbatches are summed with the loss of each
scaled by 1/M, and every module then steps at the same time: a flush per batch, so the update
is plain BP's with the batch's mean gradient. The difference to BP is BatchNorm, which normalises
each microbatch with its own statistics.

No checkpoints: gpipe is here as a speed baseline for `dpbp bench` and comparisons; a resume is
refused before start. Evaluation forwards the test set through dpbp's own P2P pipeline.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def make_schedule(stage, pipeline: str, microbatches: int):
    """torch's schedule object for `pipeline` over `stage` (loss: mean cross-entropy)."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[pipeline]
    return cls(stage, microbatches, loss_fn=F.cross_entropy)


def train_gpipe(cfg, run_dir: Path, ctx, logger_factory=None) -> dict[str, Any] | None:
    """One process of a gpipe run: module `ctx.rank` of K; returns the summary on the last."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage

    from dpbp import dist as p2p
    from dpbp.data import test_batches
    from dpbp.executor import Totals
    from dpbp.stage import Stage
    from dpbp.train import EpochLog, Feed, RunState, finish_run, lr_at, make_optimizer, split_model

    device, ds, modules, counts, shapes, num_parameters = split_model(cfg, ctx)
    k_total, k = len(modules), ctx.rank
    module = modules[k].to(device)
    optimizer = make_optimizer(cfg, module)
    a, t = cfg.algo, cfg.trainer
    pipe = PipelineStage(module, k, k_total, device)
    sched = make_schedule(pipe, a.pipeline, a.microbatches)
    # evaluation goes through dpbp's P2P pipeline (group creation is collective: every rank)
    link = p2p.P2P(k, list(range(k_total)), shapes, t.batch_size, device,
                   p2p.make_groups(list(range(k_total))))
    evaluator = Stage(module, k, k_total, "bp", optimizer)
    first_stage, last = k == 0, k == k_total - 1

    feed = Feed(ds, t.batch_size, cfg.seed, device)
    num_batches = t.epochs * feed.steps
    if t.max_steps is not None:
        num_batches = min(num_batches, t.max_steps)
    epochs = -(-num_batches // feed.steps)
    state = RunState(wall_start=time.time())
    log = logger_factory(cfg, run_dir, feed.steps, epochs, num_batches, state.wall_start) \
        if logger_factory and last else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, seen
    try:
        for epoch in range(epochs):
            lr = lr_at(cfg, epoch)
            for g in optimizer.param_groups:
                g["lr"] = lr
            first, stop = epoch * feed.steps, min((epoch + 1) * feed.steps, num_batches)
            t0 = time.perf_counter()
            for b in range(first, stop):
                if first_stage:
                    sched.step(feed.inputs(b))
                elif last:
                    y, losses = feed.labels(b), []
                    logits = sched.step(target=y, losses=losses)
                    sums += torch.stack([torch.stack(losses).mean().detach() * y.numel(),
                                         (logits.argmax(1) == y).sum(),
                                         torch.tensor(y.numel(), device=device)]).double()
                else:
                    sched.step()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if log is not None and (b + 1 - first) % t.log_every == 0:
                    log.advance(b + 1, (b + 1 - first) * t.batch_size
                                / (time.perf_counter() - t0), None)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dist.barrier()  # the epoch ends when every module has stepped its last batch
            seconds = time.perf_counter() - t0
            images = (stop - first) * t.batch_size
            state.train_seconds += seconds
            state.images += images
            totals = Totals()
            link.evaluate(evaluator, test_batches(ds, t.eval_batch_size), totals)
            state.epoch = epoch + 1
            if last:
                test_loss, test_acc = totals.result()
                loss_sum, correct, seen = sums.tolist()
                sums.zero_()
                state.best_test_acc = max(state.best_test_acc, test_acc)
                entry = EpochLog(epoch + 1, loss_sum / seen, correct / seen, test_loss,
                                 test_acc, lr, state.train_seconds, images)
                state.history.append(entry.__dict__)
                if log is not None:
                    log.advance(stop, images / max(seconds, 1e-9), loss_sum / seen)
                    log.epoch(entry, seconds)
        link.flush()
    finally:
        if log is not None:
            log.close_progress()
    cuda = device.type == "cuda"
    peaks: list[Any] = [None] * k_total
    dist.all_gather_object(peaks, torch.cuda.max_memory_allocated(device) if cuda else None)
    if not last:
        return None
    return finish_run(cfg, run_dir, log, state, ctx, device, num_parameters, counts,
                      num_batches, {
                          "modules": k_total,
                          "microbatches": a.microbatches,
                          "pipeline": a.pipeline,
                          "peak_memory_bytes": peaks,
                          "memory_measure": "cuda_allocator" if cuda else "none",
                          "compute_seconds": None,  # inside torch's schedule: not separable
                          "idle_seconds": None,
                          "updates": [num_batches] * k_total,
                      })
