"""PD-ASGD (Fokam et al., arXiv 2410.05985) and its Hogwild! baseline: asynchronous SGD with
forward and backward in separate threads on one shared model per device.

The algorithms' records are dpbp/algos/pdasgd.py and hogwild.py; their options say whether the
updates are layer-wise (`layerwise`).

- `pdasgd`: layer-wise updates. During a backward thread's pass, each parameter tensor is updated
  in place (momentum SGD, lock-free) the moment its gradient is ready (a post-accumulate-grad
  hook), before the backward reaches the layers below.
- `hogwild`: the same threads, but the whole model is updated after the full backward (LPP-SGD /
  Hogwild! scaled to several devices), so the layer-wise effect is measured against it.
- `lpp_sgd`: hogwild, plus a partition (the options' `partition`): after a warm-up a backward
  thread's update may cover only its own parameter tensors; each thread has its own momentum.

Forward threads take batches, compute the loss with the parameters as they are and queue it
(at most `backward_threads` waiting); backward threads back-propagate and update.

The in-place-update problem, solved deliberately: a forward reads the parameters through aliases
of their storage that autograd does not version-track (`Tensor.data`), so a backward runs on the
activations its forward saved and on the weights as they are by then, which other threads keep
updating. That is the asynchronous algorithms' semantics; stashing a copy per batch would make
them synchronous in disguise. BatchNorm running statistics are likewise shared without locks.

Across devices (gpus > 1, one process each, disjoint shards of every global batch), an averaging
thread all-reduces the parameters every `algo.average_every` local steps (the algorithm's
`averages_after`: lpp_sgd also after every step in its first epochs), asynchronously to the
compute threads; every epoch ends with one more average, then replica 0 evaluates.

Staleness: per parameter tensor, the number of updates it received between the forward that read
it and the update that used its gradient (mean and max go to summary.json).
"""

from __future__ import annotations

import copy
import math
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dpbp import checkpoint
from dpbp.build import split_model
from dpbp.data import test_batches
from dpbp.errors import Divergence
from dpbp.executor import Totals
from dpbp.feed import Feed


class Staleness:
    """Per-parameter update counters and the staleness of each update."""

    def __init__(self, names: list[str]) -> None:
        self.lock = threading.Lock()
        self.version = dict.fromkeys(names, 0)
        self.total = dict.fromkeys(names, 0)
        self.max = dict.fromkeys(names, 0)
        self.count = dict.fromkeys(names, 0)

    def read(self) -> dict[str, int]:
        """The versions a forward is about to read."""
        with self.lock:
            return dict(self.version)

    def update(self, name: str, read_version: int) -> None:
        """Count an update of `name` with a gradient of a forward that read `read_version`."""
        with self.lock:
            stale = self.version[name] - read_version
            self.total[name] += stale
            self.max[name] = max(self.max[name], stale)
            self.count[name] += 1
            self.version[name] += 1

    def summary(self) -> dict[str, dict[str, float]]:
        return {n: {"mean": self.total[n] / max(self.count[n], 1), "max": self.max[n]}
                for n in self.version}


class AsyncSGD:
    """Shared model + momentum SGD applied per parameter tensor, from any thread."""

    def __init__(self, model: nn.Module, lr: float, momentum: float, weight_decay: float,
                 layerwise: bool, partition: Any = None, momenta: int = 1) -> None:
        """`partition` (lpp_sgd.Partition): which tensors a thread updates for a batch; None:
        all. `momenta`: momentum buffer sets, one per backward thread (lpp_sgd) or one shared."""
        self.model, self.lr, self.mom, self.wd = model, lr, momentum, weight_decay
        self.layerwise, self.partition = layerwise, partition
        self.params = dict(model.named_parameters())
        self.buffers = dict(model.named_buffers())  # shared by every thread, updated in place
        self.bufs = [{n: torch.zeros_like(p) for n, p in self.params.items()}
                     for _ in range(momenta)]
        self.buf = self.bufs[0]
        self.meter = Staleness(list(self.params))
        self.lock = threading.Lock()
        self.loss_sum = 0.0
        self.correct = 0
        self.seen = 0
        self.steps = 0
        self.stepped = threading.Condition()

    @torch.no_grad()
    def apply(self, name: str, grad: torch.Tensor, read_version: int, thread: int = 0) -> None:
        p = self.params[name]
        g = grad.add(p, alpha=self.wd) if self.wd else grad
        buf = self.bufs[thread % len(self.bufs)][name]
        buf.mul_(self.mom).add_(g)
        p.add_(buf, alpha=-self.lr)
        self.meter.update(name, read_version)

    def shell(self) -> nn.Module:
        """A weightless copy of the model for one forward thread: functional_call swaps the
        tensors of the module it is given, so threads must not share one."""
        return copy.deepcopy(self.model).to("meta")

    def forward(self, shell: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 0):
        """Loss of one batch on the current weights; returns what the backward needs."""
        read = self.meter.read()
        aliases = {n: p.data.requires_grad_(True) for n, p in self.params.items()}
        logits = functional_call(shell, {**aliases, **self.buffers}, (x,))
        return F.cross_entropy(logits, y), logits.detach(), y, aliases, read, batch

    def backward(self, item, thread: int = 0) -> None:
        """Back-propagate a forward's loss and update, as backward thread `thread`."""
        loss, logits, y, aliases, read, batch = item
        if self.layerwise:
            for n, a in aliases.items():
                def hook(t: torch.Tensor, n: str = n) -> None:
                    self.apply(n, t.grad, read[n])
                    t.grad = None
                a.register_post_accumulate_grad_hook(hook)
            loss.backward()
        else:
            mask = self.partition.mask(thread, batch) if self.partition is not None else None
            names = [n for i, n in enumerate(aliases) if mask is None or mask[i]]
            grads = torch.autograd.grad(loss, [aliases[n] for n in names]) if names else ()
            for n, g in zip(names, grads):
                self.apply(n, g, read[n], thread)
        with self.lock:
            self.loss_sum += loss.item() * y.numel()
            self.correct += int((logits.argmax(1) == y).sum())
            self.seen += y.numel()
        with self.stepped:
            self.steps += 1
            self.stepped.notify_all()


def average_parameters(model: nn.Module, world: int, group=None) -> None:
    """Replace every parameter by its mean over the processes (one flat all-reduce)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    ps = [p.data for p in model.parameters()]
    flat = _flatten_dense_tensors(ps)
    dist.all_reduce(flat, group=group)
    flat /= world
    for p, avg in zip(ps, _unflatten_dense_tensors(flat, ps)):
        p.copy_(avg)


class _Span:
    """The threads of one span of batches: forwards feed a bounded queue, backwards drain it,
    an averaging thread (world > 1) all-reduces the parameters at its marks."""

    def __init__(self, sgd: AsyncSGD, feed, batches: range, forward_threads: int,
                 backward_threads: int, average_after: Callable[[int], bool],
                 world: int) -> None:
        self.sgd, self.feed, self.world = sgd, feed, world
        self.it, self.take = iter(batches), threading.Lock()
        self.q: queue.Queue = queue.Queue(maxsize=backward_threads)
        self.errors: list[BaseException] = []
        self.stop = object()
        self.forwards_left, self.backward_threads = forward_threads, backward_threads
        self.start_steps = sgd.steps
        # local steps (from the start of `batches`) after which to average
        self.marks = [m - batches.start for m in range(batches.start + 1, batches.stop + 1)
                      if average_after(m)]

    def fail(self, e: BaseException) -> None:
        self.errors.append(e)
        with self.sgd.stepped:  # wake the averaging thread: it must not wait for steps forever
            self.sgd.stepped.notify_all()

    def forward_loop(self) -> None:
        try:
            shell = self.sgd.shell()
            while True:
                with self.take:
                    b = next(self.it, None)
                if b is None or self.errors:
                    break
                x, y = self.feed.inputs(b), self.feed.labels(b)
                self.q.put(self.sgd.forward(shell, x, y, b))
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            self.fail(e)
        finally:
            with self.take:
                self.forwards_left -= 1
                if self.forwards_left == 0:
                    for _ in range(self.backward_threads):
                        self.q.put(self.stop)

    def backward_loop(self, thread: int = 0) -> None:
        while (item := self.q.get()) is not self.stop:
            if self.errors:
                continue  # drain the queue so the forward threads can finish
            try:
                self.sgd.backward(item, thread)
            except BaseException as e:  # noqa: BLE001
                self.fail(e)

    def average_loop(self) -> None:
        sgd = self.sgd
        try:
            for mark in self.marks:
                with sgd.stepped:
                    sgd.stepped.wait_for(lambda mark=mark: sgd.steps - self.start_steps >= mark
                                         or bool(self.errors))
                if self.errors:
                    return
                average_parameters(sgd.model, self.world)
        except BaseException as e:  # noqa: BLE001
            self.errors.append(e)


def run_epoch(sgd: AsyncSGD, feed, batches: range, forward_threads: int, backward_threads: int,
              average_after: Callable[[int], bool], world: int) -> None:
    """Train on `batches` with the threads; return when every thread has finished.

    With world > 1, the parameters are averaged each time the global batch count passes a
    count m with `average_after(m)` (the algorithm's `averages_after`; every process runs the
    same ranges, so the collectives match).
    """
    span = _Span(sgd, feed, batches, forward_threads, backward_threads, average_after, world)
    threads = [threading.Thread(target=span.forward_loop) for _ in range(forward_threads)]
    threads += [threading.Thread(target=span.backward_loop, args=(j,))
                for j in range(backward_threads)]
    if world > 1 and span.marks:
        threads.append(threading.Thread(target=span.average_loop))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if span.errors:
        raise span.errors[0]


class ThreadsRunner:
    """The threads family for the run loop (train.Runner): one process per device, a shared
    model and its threads inside; positions are batches."""

    def __init__(self, cfg, run_dir: Path, ctx) -> None:
        self.cfg, self.ctx = cfg, ctx
        split = split_model(cfg, ctx)  # one module: the whole model, shared by the threads
        self.device, self.data = split.device, split.data
        self.world = cfg.gpus if ctx.distributed else 1
        self.model = split.modules[0].to(self.device).train()
        self.num_parameters, self.counts = split.num_parameters, split.counts
        self.feed = Feed(self.data, cfg.trainer.batch_size, cfg.seed, self.device, ctx.rank,
                         self.world, workers=cfg.data.loader_workers)
        self.steps = self.feed.steps
        o = cfg.optim
        a = cfg.algo
        self.sgd = AsyncSGD(self.model, o.lr, o.momentum, o.weight_decay,
                            layerwise=type(a).layerwise,
                            partition=a.partition([p.numel() for p in self.model.parameters()],
                                                  self.steps),
                            momenta=a.backward_threads if type(a).thread_momentum else 1)
        self.reports = ctx.rank == 0
        self.control_group = None
        if ctx.distributed:
            self.control_group = dist.new_group(backend="gloo")

    def end(self, num_batches: int) -> int:
        return num_batches

    def restore(self, directory: Path, tick: int) -> None:
        """The shared model, momentum, staleness counters and loss sums at batch `tick`."""
        ck = checkpoint.load_part(directory, 0, self.ctx.rank, tick)
        self.model.load_state_dict(ck["module"])
        sgd = self.sgd
        for bufs, saved in zip(sgd.bufs, [ck["momentum"], *ck.get("thread_momentum", [])]):
            for n, buf in saved.items():
                bufs[n].copy_(buf)
        sgd.steps, sgd.loss_sum, sgd.correct, sgd.seen = (ck["steps"], ck["loss_sum"],
                                                          ck["correct"], ck["seen"])
        for key in ("version", "total", "max", "count"):
            getattr(sgd.meter, key).update(ck["staleness"][key])

    def set_lr(self, lr: float) -> None:
        self.sgd.lr = lr

    def begin_epoch(self, stop: int, checkpoint_due: bool) -> None:
        pass

    def run(self, start: int, stop: int) -> None:
        a = self.cfg.algo
        run_epoch(self.sgd, self.feed, range(start, stop), a.forward_threads,
                  a.backward_threads, lambda done: a.averages_after(done, self.steps),
                  self.world)

    def check(self, kept: str) -> None:
        if not math.isfinite(self.sgd.loss_sum):
            raise Divergence(f"non-finite training loss on device {self.ctx.rank}; {kept}; "
                             "lower optim.lr")

    def running_loss(self) -> float | None:
        s = self.sgd
        return s.loss_sum / s.seen if s.seen else None

    def before_stop(self, tick: int, stop: int) -> int:
        return tick

    def end_epoch(self, final: bool) -> None:
        if self.world > 1:
            average_parameters(self.model, self.world)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def evaluate(self, split: str = "test") -> tuple[float, float]:
        if not self.reports:  # the devices hold the same weights after the epoch's average
            return float("nan"), float("nan")
        totals = Totals()
        with torch.no_grad():
            self.model.eval()
            for x, y in test_batches(self.data, self.cfg.trainer.eval_batch_size, split):
                totals.add(self.model(x), y)
            self.model.train()
        return totals.result()

    def train_sums(self) -> torch.Tensor | None:
        s = self.sgd
        sums = torch.tensor([s.loss_sum, s.correct, s.seen], dtype=torch.float64)
        s.loss_sum, s.correct, s.seen = 0.0, 0, 0
        if self.world > 1:
            sums = sums.to(self.device)
            dist.all_reduce(sums)
        return sums.cpu()

    def stats(self) -> list[dict[str, Any]] | None:
        return None

    def save(self, directory: Path, state) -> None:
        s = self.sgd
        meter = s.meter
        checkpoint.save_part(directory, 0, self.ctx.rank, {
            "stage": 0, "replica": self.ctx.rank, "modules": 1, "algo": self.cfg.algo.name,
            "model": self.cfg.model, "epoch": state.epoch, "tick": state.tick,
            "module": self.model.state_dict(),
            "momentum": {n: b.detach().clone() for n, b in s.buf.items()},
            "thread_momentum": [{n: b.detach().clone() for n, b in bufs.items()}
                                for bufs in s.bufs[1:]],
            "steps": s.steps, "loss_sum": s.loss_sum, "correct": s.correct, "seen": s.seen,
            "staleness": {"version": dict(meter.version), "total": dict(meter.total),
                          "max": dict(meter.max), "count": dict(meter.count)},
        })

    def sync(self) -> None:
        if self.ctx.distributed:
            dist.barrier()

    def drain(self, tick: int) -> None:
        pass

    def finish(self) -> None:
        self.feed.close()

    def summary(self, stats: list[dict[str, Any]] | None) -> dict[str, Any]:
        stale = self.sgd.meter.summary()
        cuda = self.device.type == "cuda"
        return {
            "modules": 1,
            "peak_memory_bytes": [torch.cuda.max_memory_allocated(self.device) if cuda
                                  else None],
            "memory_measure": "cuda_allocator" if cuda else "none",
            "updates": [self.sgd.steps],
            "staleness": stale,
            "staleness_mean": sum(s["mean"] for s in stale.values()) / len(stale),
            "staleness_max": max(s["max"] for s in stale.values()),
        }
