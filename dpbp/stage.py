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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel

from dpbp.schedule import delay as schedule_delay
from dpbp.schedule import pipelined as schedule_pipelined


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


@dataclass
class Pending:
    """What a stage keeps for one batch between its forward and its backward."""

    x: torch.Tensor  # the module's input
    out: torch.Tensor | None = None  # output with its graph (None for replay)
    weights: dict[str, torch.Tensor] | None = None  # the weights the graph was built on
    nbytes: int = 0  # memory held for this batch beyond the module's own weights


@dataclass
class StageStats:
    """Counters of one stage; tensors stay on the device until read (no sync per tick)."""

    peak_bytes: int = 0
    held_bytes: int = 0
    loss_sum: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    seen: int = 0
    updates: int = 0
    first_bad: torch.Tensor | None = None  # last stage: first batch with a non-finite loss


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
        grad_sync: Callable[[list[torch.Tensor]], None] | None = None,
    ) -> None:
        """`grad_sync(grads)` averages the gradients in place across data-parallel replicas
        before every update (dp_fdg); None for a single pipeline."""
        self.module = module
        self.index = index
        self.num_stages = num_stages
        self.algo = algo
        self.optimizer = optimizer
        self.delay = schedule_delay(algo, index, num_stages)
        self.last = index == num_stages - 1
        self.replay = algo == "fr" and self.delay > 0
        self.stash = weights == "stash" and self.delay > 0
        self.live_alias = weights == "live" and self.delay > 0
        self.beta = beta if schedule_pipelined(algo) and not self.last else 1.0
        self.grad_sync = grad_sync
        self.params = dict(module.named_parameters())
        self._param_storages = {p.untyped_storage().data_ptr() for p in self.params.values()}
        self.pending: dict[int, Pending] = {}
        self._graph_bytes: int | None = None  # bytes one in-flight batch holds (graph modes)
        self.stats = StageStats()
        self.autocast = autocast

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
        self.pending[batch] = p
        self.stats.held_bytes += p.nbytes
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.held_bytes)
        return message(out)

    def _forward_weights(self) -> dict[str, torch.Tensor]:
        if self.stash:
            return {n: p.detach().clone().requires_grad_(True) for n, p in self.params.items()}
        if self.live_alias:
            return {n: p.data.requires_grad_(True) for n, p in self.params.items()}
        return self.params  # no delay: nothing changes the weights before the backward

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

    def step(self) -> None:
        """Apply the gradient the last backward set (SGD with momentum and weight decay)."""
        if self.grad_sync is not None:
            self.grad_sync([p.grad for p in self.params.values()])
        self.optimizer.step()
        for p in self.params.values():
            p.grad = None
        self.stats.updates += 1

    # -- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Inference forward with the current weights (BatchNorm in eval mode)."""
        self.module.eval()
        with self._autocast():
            out = self.module(x)
        self.module.train()
        return message(out)

    def drop_pending(self) -> None:
        """Forget in-flight batches (end of training: their gradients are dropped)."""
        self.pending.clear()
        self.stats.held_bytes = 0
