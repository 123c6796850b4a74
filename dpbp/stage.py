"""Module k of K and what the algorithm keeps for its in-flight batches.

A `Stage` is transport-free: `forward(batch, x)` returns the output to send up, `backward(batch,
grad)` returns the input gradient to send down, `step()` applies the update. Which batch is passed
when is the schedule's business (schedule.py); how tensors travel is the executor's.

The stale-graph problem. A delayed backward goes through a graph built before some optimizer steps.
PyTorch refuses when those steps changed the saved weights in place, and silently mixing versions
is not what the papers analyse. So each forward of a delayed stage runs on an explicit set of weight
tensors (`torch.func.functional_call`):

- `stash` (default): a copy of the current weights, kept with the batch until its backward. The
  gradient is then exactly the gradient at the weights that batch's forward used (DDG's analysis,
  PipeDream's weight stashing). Costs one weight copy per in-flight batch.
- `live`: an alias of the live weight storage that autograd does not version-track (`Tensor.data`),
  so the backward sees stored activations with the *current* weights: what the 2018/2019 reference
  code computed under PyTorch 0.3/1.0. Opt-in, for comparison only.
- Features Replay keeps no graph: it stores the module's input and, at backward time, recomputes
  the forward with the current weights. BatchNorm in the replay normalises with batch statistics
  like the first forward but its running statistics are *not* updated a second time (the replay
  runs on copies of the buffers), so they advance once per batch as in plain training.

Gradient shrinking (FDG): the error gradient received from the next module is multiplied by beta
before the backward, so the gradient sent further down carries it too (beta^(K-k) in module k).
Weight decay is added by SGD afterwards and is not scaled.

Between two ticks (`inflight` / `restore_inflight`, for checkpoints) a stage holds, per batch it
has forwarded but not yet back-propagated: the input, and under `stash` the weight copy. An
autograd graph cannot be saved, but it is a pure function of these two in train mode (BatchNorm
normalises with the batch's own statistics), so it is rebuilt by running that forward again on
copies of the buffers: the same saved tensors bit for bit, and the running statistics, already
advanced by the first forward and restored from the checkpoint, are not advanced twice. Under
`live` the graph also refers to the live weight storage, which later updates change: the rebuild
runs the forward with the live storage temporarily holding the weights that forward used (a copy
kept only for batches in flight at a checkpoint, `keep_weights_from`), then puts the current
weights back, so the rebuilt graph again sees whatever the weights are at its backward.

Non-finite values: `step` checks the (replica-averaged) gradient. With on_nonfinite=stop the
first bad batch is remembered on the device (no sync per step; the run reads it once per chunk);
with skip a step whose gradient is not finite is skipped (one device sync per step), the
optimizer's state untouched, and counted. Skipping only guards the gradient: a step that is finite
but so large that the weights overflow (learning rate far too high) is applied, after which every
gradient is non-finite; the run stops when a module has skipped a whole chunk of steps in a row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel

from dpbp import algos


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """float32 for autocast's half types; float32/float64 stay as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def message(t: torch.Tensor) -> torch.Tensor:
    """A stage output as it travels: detached, full precision, contiguous (NCHW).

    The layout matters for exactness: a CPU convolution may return channels-last outputs, and the
    next module computes slightly different sums on a channels-last than on a contiguous input.
    Every executor hands the next stage the same contiguous tensor, so their numbers agree.
    """
    return full_precision(t.detach()).contiguous()


def compact(t: torch.Tensor) -> torch.Tensor:
    """`t` itself, or a copy if it is a view into a larger storage (torch.save writes the whole
    storage of a view)."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


@dataclass
class Pending:
    """What a stage keeps for one batch between its forward and its backward."""

    x: torch.Tensor  # the module's input
    out: torch.Tensor | None = None  # output with its graph (None for replay)
    weights: dict[str, torch.Tensor] | None = None  # the weights the graph was built on
    nbytes: int = 0  # memory held for this batch beyond the module's own weights
    snapshot: dict[str, torch.Tensor] | None = None  # live: forward weights, for a checkpoint


@dataclass
class StageStats:
    """Counters of one stage; tensors stay on the device until read (no sync per tick)."""

    peak_bytes: int = 0
    held_bytes: int = 0
    loss_sum: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    seen: int = 0
    updates: int = 0
    skipped: int = 0  # on_nonfinite=skip: updates skipped for a non-finite gradient
    skipped_in_a_row: int = 0  # ... since the last update that was applied
    first_bad: torch.Tensor | None = None  # last stage: first batch with a non-finite loss
    first_bad_grad: torch.Tensor | None = None  # first batch with a non-finite gradient


class Stage:
    """One module of the split network with its optimizer and its algorithm's memory."""

    def __init__(
        self,
        module: nn.Module,
        index: int,
        num_stages: int,
        algo: str,
        optimizer: torch.optim.Optimizer,
        weights: str = "stash",
        beta: float = 1.0,
        autocast: Callable[[], object] | None = None,
        grad_sync: Any = None,
        on_nonfinite: str = "stop",
    ) -> None:
        """`grad_sync` (grid.GradSync) all-reduces each weight's gradient across data-parallel
        replicas as the backward computes it and averages them before the update (dp_fdg);
        None for a single pipeline. `on_nonfinite`: stop
        (remember the first bad batch, the run stops) or skip (skip that update)."""
        self.module = module
        self.index = index
        self.num_stages = num_stages
        self.algo = algo
        self.optimizer = optimizer
        record = algos.get(algo)
        self.delay = record.delay(index, num_stages)
        self.last = index == num_stages - 1
        self.replay = record.keeps == "input" and self.delay > 0
        self.stash = weights == "stash" and self.delay > 0
        self.live_alias = weights == "live" and self.delay > 0
        self.beta = beta if not self.last else 1.0
        self.grad_sync = grad_sync
        if grad_sync is not None and not (self.stash or self.live_alias):
            self._watch(dict(module.named_parameters()))  # the same tensors at every backward
        self.params = dict(module.named_parameters())
        self._param_storages = {p.untyped_storage().data_ptr() for p in self.params.values()}
        self.pending: dict[int, Pending] = {}
        self._graph_bytes: int | None = None  # bytes one in-flight batch holds (graph modes)
        self.stats = StageStats()
        self.autocast = autocast
        self.skip_nonfinite = on_nonfinite == "skip"
        # live: forwards of batches >= this keep a copy of their weights for a checkpoint
        self.keep_weights_from: int | None = None

    # -- forward -----------------------------------------------------------------------------

    def forward(self, batch: int, x: torch.Tensor) -> torch.Tensor:
        """Forward `batch`; keep what its backward needs; return the output (detached)."""
        if not self.module.training:  # a walk over every submodule: skip it when possible
            self.module.train()
        if self.replay:
            with torch.no_grad(), self._autocast():
                out = self.module(x)
            p = Pending(x=x, nbytes=x.untyped_storage().nbytes())
        else:
            x = x.detach().requires_grad_(self.index > 0)  # stage 0 needs no input gradient
            weights = self._forward_weights()
            # what a batch holds is the same every time (fixed shapes): measure it once
            measure = self._graph_bytes is None
            saved: dict[int, int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                s = t.untyped_storage()
                saved[s.data_ptr()] = s.nbytes()
                return t

            hooks = (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if measure
                     else contextlib.nullcontext())
            with hooks, self._autocast():
                out = (self.module(x) if weights is self.params
                       else functional_call(self.module, weights, (x,)))
            if measure:
                for t in (x, out, *(weights.values() if self.stash else ())):
                    saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                self._graph_bytes = sum(n for ptr, n in saved.items()
                                        if ptr not in self._param_storages)
            p = Pending(x=x, out=out, weights=weights, nbytes=self._graph_bytes)
            if self.live_alias and self.keep_weights_from is not None \
                    and batch >= self.keep_weights_from:
                p.snapshot = {n: w.detach().clone() for n, w in self.params.items()}
        self.pending[batch] = p
        self.stats.held_bytes += p.nbytes
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.held_bytes)
        return message(out)

    def _forward_weights(self) -> dict[str, torch.Tensor]:
        if self.stash:
            return self._watch({n: p.detach().clone().requires_grad_(True)
                                for n, p in self.params.items()})
        if self.live_alias:
            return self._watch({n: p.data.requires_grad_(True) for n, p in self.params.items()})
        return self.params  # no delay: nothing changes the weights before the backward

    def _watch(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Data parallel: each weight's gradient is all-reduced as soon as the backward has
        computed it, overlapped with the rest of the backward (grid.GradSync)."""
        if self.grad_sync is not None:
            for w in weights.values():
                self.grad_sync.watch(w)
        return weights

    def _autocast(self):
        if self.autocast is not None:
            return self.autocast()
        return torch.autocast("cpu", enabled=False)

    # -- backward ----------------------------------------------------------------------------

    def backward(self, batch: int, grad: torch.Tensor) -> torch.Tensor | None:
        """Back-propagate `batch`. `grad` is the error gradient at the output, or the labels on
        the last stage. Sets the parameters' .grad; returns the input gradient (None on stage 0)."""
        p = self.pending.pop(batch)
        self.stats.held_bytes -= p.nbytes
        out, weights = self._replay(p.x) if self.replay else (p.out, p.weights)
        x = p.x
        if self.last:
            loss = F.cross_entropy(full_precision(out), grad)
            self._count(out, grad, loss, batch)
            target, grad_out = loss, None
        else:
            target, grad_out = out, grad * self.beta if self.beta != 1.0 else grad
        if isinstance(self.module, DistributedDataParallel):
            # DDP averages gradients from hooks on gradient accumulation, overlapped with the
            # backward: it needs .backward(), which autograd.grad would bypass
            torch.autograd.backward(target, grad_out)
            return None
        inputs = list(weights.values()) + ([x] if self.index > 0 else [])
        grads = torch.autograd.grad(target, inputs, grad_out)
        for param, g in zip(self.params.values(), grads):
            param.grad = g
        return grads[-1] if self.index > 0 else None

    def _replay(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Recompute the forward of a stored input with the current weights (Features Replay)."""
        x.requires_grad_(self.index > 0)
        # copies of the buffers: BatchNorm's running statistics were updated by the first forward
        buffers = {n: b.clone() for n, b in self.module.named_buffers()}
        with self._autocast():
            out = functional_call(self.module, {**self.params, **buffers}, (x,))
        return out, self.params

    def _count(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor,
               batch: int) -> None:
        n = labels.numel()
        s = self.stats
        if self.skip_nonfinite and not bool(torch.isfinite(loss.detach())):
            return  # its update is skipped too; the epoch's mean loss covers the others
        # remember the first batch with a non-finite loss without a device sync per step
        if s.first_bad is None:
            s.first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        s.first_bad = torch.where(~torch.isfinite(loss.detach()) & (s.first_bad < 0),
                                  torch.full_like(s.first_bad, batch), s.first_bad)
        lsum = loss.detach() * n
        corr = (logits.detach().argmax(1) == labels).sum()
        s.loss_sum = lsum if s.loss_sum is None else s.loss_sum + lsum
        s.correct = corr if s.correct is None else s.correct + corr
        s.seen += n

    def first_nonfinite_batch(self) -> int | None:
        """The first batch whose loss was NaN or infinite, if any (one device sync)."""
        fb = self.stats.first_bad
        return None if fb is None or fb.item() < 0 else int(fb.item())

    def first_nonfinite_grad_batch(self) -> int | None:
        """The first batch whose gradient here was NaN or infinite, if any (one device sync)."""
        fb = self.stats.first_bad_grad
        return None if fb is None or fb.item() < 0 else int(fb.item())

    def running_loss(self) -> float | None:
        """Mean training loss since the last `take_train_sums` (one device sync)."""
        s = self.stats
        return s.loss_sum.item() / s.seen if s.seen else None

    def take_train_sums(self) -> torch.Tensor:
        """[summed loss, correct, samples] of the batches trained since the last call (float64,
        on the device: replicas can add theirs up with one all-reduce)."""
        s = self.stats
        device = s.loss_sum.device if s.loss_sum is not None else "cpu"
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        if s.seen:
            sums[0], sums[1], sums[2] = s.loss_sum, s.correct, s.seen
        s.loss_sum, s.correct, s.seen = None, None, 0
        return sums

    # -- update ------------------------------------------------------------------------------

    def step(self, batch: int = -1) -> None:
        """Apply the gradient the last backward set for `batch` (SGD with momentum and weight
        decay); with on_nonfinite=skip, skip it if it is not finite."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        if self.grad_sync is not None:
            self.grad_sync(grads)
        # the largest magnitude is NaN or inf exactly when some entry is (no overflow, unlike a
        # sum of squares); one fused kernel, and the flag stays on the device
        bad = (~torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf"))).max())
               if grads else torch.zeros((), dtype=torch.bool))
        s = self.stats
        if self.skip_nonfinite:
            if bool(bad):
                s.skipped += 1
                s.skipped_in_a_row += 1
                for p in self.params.values():
                    p.grad = None
                return
            s.skipped_in_a_row = 0
        else:
            if s.first_bad_grad is None:
                s.first_bad_grad = torch.full((), -1, dtype=torch.long, device=bad.device)
            s.first_bad_grad = torch.where(bad & (s.first_bad_grad < 0),
                                           torch.full_like(s.first_bad_grad, batch),
                                           s.first_bad_grad)
        self.optimizer.step()
        for p in self.params.values():
            p.grad = None
        s.updates += 1

    # -- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Inference forward with the current weights (BatchNorm in eval mode)."""
        self.module.eval()
        with self._autocast():
            out = self.module(x)
        self.module.train()
        return message(out)

    # -- checkpoints ---------------------------------------------------------------------------

    def inflight(self) -> dict[str, Any]:
        """What this stage holds between two ticks, beyond its weights and optimizer: each
        pending batch's input (and the weights its forward used, where the backward needs them)
        and the counters that run across the tick boundary. Plain tensors, for a checkpoint."""
        pending = []
        for b, p in sorted(self.pending.items()):
            entry: dict[str, Any] = {"batch": b, "x": compact(p.x.detach())}
            if self.replay:
                pass  # the input is all a replay needs
            elif self.stash:
                entry["weights"] = {n: w.detach() for n, w in p.weights.items()}
            elif self.live_alias:
                if p.snapshot is None:  # the run sets keep_weights_from before a checkpoint
                    raise RuntimeError(f"module {self.index + 1} cannot checkpoint batch {b}: "
                                       "its forward weights were not kept")
                entry["weights"] = p.snapshot
            else:
                raise RuntimeError(f"module {self.index + 1} has batch {b} in flight between "
                                   "two ticks, which its schedule never leaves")
            pending.append(entry)
        s = self.stats
        return {
            "pending": pending,
            "graph_bytes": self._graph_bytes,
            "peak_bytes": s.peak_bytes,
            "loss_sum": None if s.loss_sum is None else s.loss_sum.detach(),
            "correct": s.correct,
            "seen": s.seen,
            "skipped": s.skipped,
            "skipped_in_a_row": s.skipped_in_a_row,
        }

    def restore_inflight(self, state: dict[str, Any], device: torch.device) -> None:
        """Rebuild what `inflight` saved; the module's weights and buffers must be restored
        already (the rebuilt graphs of `live` refer to the current weights)."""
        s = self.stats
        self.pending.clear()
        s.held_bytes = 0
        self._graph_bytes = state["graph_bytes"]
        for entry in state["pending"]:
            x = entry["x"].to(device)
            if self.replay:
                p = Pending(x=x, nbytes=x.untyped_storage().nbytes())
            else:
                p = self._rebuild(x, {n: w.to(device) for n, w in entry["weights"].items()})
            self.pending[entry["batch"]] = p
            s.held_bytes += p.nbytes
        s.peak_bytes = state["peak_bytes"]
        s.loss_sum = None if state["loss_sum"] is None else state["loss_sum"].to(device)
        s.correct = None if state["correct"] is None else state["correct"].to(device)
        s.seen, s.skipped = state["seen"], state["skipped"]
        s.skipped_in_a_row = state["skipped_in_a_row"]

    def _rebuild(self, x: torch.Tensor, used: dict[str, torch.Tensor]) -> Pending:
        """The graph of a pending batch, from its input and the weights its forward used."""
        x = x.detach().requires_grad_(self.index > 0)
        # copies of the buffers: BatchNorm's running statistics already count this batch
        buffers = {n: b.clone() for n, b in self.module.named_buffers()}
        if self.stash:
            weights = self._watch({n: w.requires_grad_(True) for n, w in used.items()})
            with self._autocast():
                out = functional_call(self.module, {**weights, **buffers}, (x,))
            return Pending(x=x, out=out, weights=weights, nbytes=self._graph_bytes)
        # live: the graph must alias the live storage, so the forward runs with the storage
        # holding the old weights; the aliases' version counters are their own (Tensor.data)
        with torch.no_grad():
            current = {n: p.detach().clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                p.copy_(used[n])
        weights = self._forward_weights()
        with self._autocast():
            out = functional_call(self.module, {**weights, **buffers}, (x,))
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(current[n])
        return Pending(x=x, out=out, weights=weights, nbytes=self._graph_bytes, snapshot=used)

    def drop_pending(self) -> None:
        """Forget in-flight batches (end of training: their gradients are dropped)."""
        self.pending.clear()
        self.stats.held_bytes = 0
