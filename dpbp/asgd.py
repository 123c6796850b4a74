"""PD-ASGD (Fokam et al., arXiv 2410.05985) and its Hogwild! baseline: asynchronous SGD with
forward and backward in separate threads on one shared model per device.

- `pdasgd`: layer-wise updates. During a backward thread's pass, each parameter tensor is updated
  in place (momentum SGD, lock-free) the moment its gradient is ready (a post-accumulate-grad
  hook), before the backward reaches the layers below.
- `hogwild`: the same threads, but the whole model is updated after the full backward (LPP-SGD /
  Hogwild! scaled to several devices), so the layer-wise effect is measured against it.

Forward threads take batches, compute the loss with the parameters as they are and queue it
(at most `backward_threads` waiting); backward threads back-propagate and update.

The in-place-update problem, solved deliberately: a forward reads the parameters through aliases
of their storage that autograd does not version-track (`Tensor.data`), so a backward runs on the
activations its forward saved and on the weights as they are by then, which other threads keep
updating. That is the asynchronous algorithms' semantics; stashing a copy per batch would make
them synchronous in disguise. BatchNorm running statistics are likewise shared without locks.

Across devices (gpus > 1, one process each, disjoint shards of every global batch), an averaging
thread all-reduces the parameters every `algo.average_every` local steps, asynchronously to the
compute threads; every epoch ends with one more average, then replica 0 evaluates.

Staleness: per parameter tensor, the number of updates it received between the forward that read
it and the update that used its gradient (mean and max go to summary.json).
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

ALGOS = ("pdasgd", "hogwild")


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
                 layerwise: bool) -> None:
        self.model, self.lr, self.mom, self.wd = model, lr, momentum, weight_decay
        self.layerwise = layerwise
        self.params = dict(model.named_parameters())
        self.buffers = dict(model.named_buffers())  # shared by every thread, updated in place
        self.buf = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.meter = Staleness(list(self.params))
        self.lock = threading.Lock()
        self.loss_sum = 0.0
        self.correct = 0
        self.seen = 0
        self.steps = 0
        self.stepped = threading.Condition()

    @torch.no_grad()
    def apply(self, name: str, grad: torch.Tensor, read_version: int) -> None:
        p = self.params[name]
        g = grad.add(p, alpha=self.wd) if self.wd else grad
        buf = self.buf[name]
        buf.mul_(self.mom).add_(g)
        p.add_(buf, alpha=-self.lr)
        self.meter.update(name, read_version)

    def shell(self) -> nn.Module:
        """A weightless copy of the model for one forward thread: functional_call swaps the
        tensors of the module it is given, so threads must not share one."""
        return copy.deepcopy(self.model).to("meta")

    def forward(self, shell: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """Loss of one batch on the current weights; returns what the backward needs."""
        read = self.meter.read()
        aliases = {n: p.data.requires_grad_(True) for n, p in self.params.items()}
        logits = functional_call(shell, {**aliases, **self.buffers}, (x,))
        return F.cross_entropy(logits, y), logits.detach(), y, aliases, read

    def backward(self, item) -> None:
        loss, logits, y, aliases, read = item
        if self.layerwise:
            for n, a in aliases.items():
                def hook(t: torch.Tensor, n: str = n) -> None:
                    self.apply(n, t.grad, read[n])
                    t.grad = None
                a.register_post_accumulate_grad_hook(hook)
            loss.backward()
        else:
            grads = torch.autograd.grad(loss, list(aliases.values()))
            for (n, _), g in zip(aliases.items(), grads):
                self.apply(n, g, read[n])
        with self.lock:
            self.loss_sum += loss.item() * y.numel()
            self.correct += int((logits.argmax(1) == y).sum())
            self.seen += y.numel()
        with self.stepped:
            self.steps += 1
            self.stepped.notify_all()


def average_parameters(model: nn.Module, world: int, group=None) -> None:
    """Replace every parameter by its mean over the processes (one flat all-reduce)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    ps = [p.data for p in model.parameters()]
    flat = _flatten_dense_tensors(ps)
    dist.all_reduce(flat, group=group)
    flat /= world
    for p, avg in zip(ps, _unflatten_dense_tensors(flat, ps)):
        p.copy_(avg)


def run_epoch(sgd: AsyncSGD, feed, batches: range, forward_threads: int, backward_threads: int,
              average_every: int, world: int) -> None:
    """Train on `batches` with the threads; return when every thread has finished."""
    it, take = iter(batches), threading.Lock()
    q: queue.Queue = queue.Queue(maxsize=backward_threads)
    errors: list[BaseException] = []
    stop = object()
    forwards_left = [forward_threads]
    start_steps = sgd.steps

    def forward_loop() -> None:
        try:
            shell = sgd.shell()
            while True:
                with take:
                    b = next(it, None)
                if b is None or errors:
                    break
                q.put(sgd.forward(shell, feed.inputs(b), feed.labels(b)))
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
        finally:
            with take:
                forwards_left[0] -= 1
                if forwards_left[0] == 0:
                    for _ in range(backward_threads):
                        q.put(stop)

    def backward_loop() -> None:
        while (item := q.get()) is not stop:
            if errors:
                continue  # drain the queue so the forward threads can finish
            try:
                sgd.backward(item)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

    def average_loop() -> None:
        try:
            for r in range(1, len(batches) // average_every + 1):
                with sgd.stepped:
                    sgd.stepped.wait_for(lambda r=r: sgd.steps - start_steps >= r * average_every)
                average_parameters(sgd.model, world)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=forward_loop) for _ in range(forward_threads)]
    threads += [threading.Thread(target=backward_loop) for _ in range(backward_threads)]
    if world > 1:
        threads.append(threading.Thread(target=average_loop))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def train_async(cfg, run_dir: Path, ctx, logger_factory=None) -> dict[str, Any] | None:
    """The run of pdasgd/hogwild: one process per device, threads inside."""
    from dpbp.data import load_dataset, test_batches
    from dpbp.executor import Totals
    from dpbp.train import EpochLog, Feed, RunState, build_model, finish_run, lr_at, pick_device

    device = pick_device(cfg, ctx.local_rank)
    if device.type == "cpu" and cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    world = cfg.gpus if ctx.distributed else 1
    ds = load_dataset(cfg.data, device, seed=cfg.seed)
    model = nn.Sequential(*build_model(cfg, ds)).to(device).train()
    num_parameters = sum(p.numel() for p in model.parameters())
    feed = Feed(ds, cfg.trainer.batch_size, cfg.seed, device, ctx.rank, world)
    o, a = cfg.optim, cfg.algo
    sgd = AsyncSGD(model, o.lr, o.momentum, o.weight_decay, layerwise=a.name == "pdasgd")
    num_batches = cfg.trainer.epochs * feed.steps
    if cfg.trainer.max_steps is not None:
        num_batches = min(num_batches, cfg.trainer.max_steps)
    epochs = -(-num_batches // feed.steps)
    report = ctx.rank == 0
    state = RunState(wall_start=time.time())
    log = logger_factory(cfg, run_dir, feed.steps, epochs, num_batches, state.wall_start) \
        if logger_factory and report else None
    try:
        for epoch in range(epochs):
            sgd.lr = lr_at(cfg, epoch)
            first, stop = epoch * feed.steps, min((epoch + 1) * feed.steps, num_batches)
            t0 = time.perf_counter()
            run_epoch(sgd, feed, range(first, stop), a.forward_threads, a.backward_threads,
                      a.average_every, world)
            if world > 1:
                average_parameters(model, world)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            state.train_seconds += seconds
            images = (stop - first) * cfg.trainer.batch_size * world
            state.images += images
            sums = torch.tensor([sgd.loss_sum, sgd.correct, sgd.seen], dtype=torch.float64)
            sgd.loss_sum, sgd.correct, sgd.seen = 0.0, 0, 0
            if world > 1:
                import torch.distributed as dist

                sums = sums.to(device)
                dist.all_reduce(sums)
            state.epoch = epoch + 1
            if not report:
                continue
            totals = Totals()
            with torch.no_grad():
                model.eval()
                for x, y in test_batches(ds, cfg.trainer.eval_batch_size):
                    totals.add(model(x), y)
                model.train()
            test_loss, test_acc = totals.result()
            loss_sum, correct, seen = sums.tolist()
            state.best_test_acc = max(state.best_test_acc, test_acc)
            entry = EpochLog(epoch + 1, loss_sum / seen, correct / seen, test_loss, test_acc,
                             sgd.lr, state.train_seconds, images)
            state.history.append(entry.__dict__)
            if log is not None:
                log.advance(stop, images / max(seconds, 1e-9), loss_sum / seen)
                log.epoch(entry, seconds)
    finally:
        if log is not None:
            log.close_progress()
    if not report:
        return None
    stale = sgd.meter.summary()
    return finish_run(cfg, run_dir, log, state, ctx, device, num_parameters, [len(model)],
                      num_batches, {
                          "modules": 1,
                          "peak_memory_bytes": [torch.cuda.max_memory_allocated(device)
                                                if device.type == "cuda" else None],
                          "memory_measure": "cuda_allocator" if device.type == "cuda"
                          else "none",
                          "updates": [sgd.steps],
                          "staleness": stale,
                          "staleness_mean": sum(s["mean"] for s in stale.values()) / len(stale),
                          "staleness_max": max(s["max"] for s in stale.values()),
                      })
