"""Module k of K and what the algorithm keeps for its in-flight batches.

A `Stage` is transport-free: `forward(batch, x)` returns the output to send up, `backward(batch,
grad)` returns the input gradient to send down, `step()` applies the update. Which batch is passed
when is the schedule's business (schedule.py); how tensors travel is the executor's.

What a stage keeps for a batch in flight, and how a checkpoint saves and rebuilds it, is its
weight policy (keep.py: plain, stash, live, replay), chosen from the algorithm's record and
`algo.weights`. Between two ticks (`inflight` / `restore_inflight`, for checkpoints) a stage
holds, per batch it has forwarded but not yet back-propagated, what its policy saves, plus the
counters that run across the tick boundary.

A module k < K of DGL or DNI has a companion (companion.py): its backward differentiates the
companion's target (DGL: the auxiliary classifier's loss on the labels; DNI: the output with the
predicted gradient) instead of the error gradient from module k+1, and `learn` (DNI) hands the
gradient that came down to the companion.

Gradient shrinking (FDG): the error gradient received from the next module is multiplied by beta
before the backward, so the gradient sent further down carries it too (beta^(K-k) in module k).
Weight decay is added by SGD afterwards and is not scaled.

Non-finite values: `step` checks the (replica-averaged) gradient. With on_nonfinite=stop the
first bad batch is remembered on the device (no sync per step; the run reads it once per chunk);
with skip a step whose gradient is not finite is skipped (one device sync per step), the
optimizer's state untouched, and counted. Skipping only guards the gradient: a step that is finite
but so large that the weights overflow (learning rate far too high) is applied, after which every
gradient is non-finite; the run stops when a module has skipped a whole chunk of steps in a row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dpbp import algos, keep


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
        companion: Any = None,
        accumulate: int = 1,
        predict: bool = False,
    ) -> None:
        """`grad_sync` (grid.GradSync) all-reduces each weight's gradient across data-parallel
        replicas as the backward computes it and averages them before the update (dp_fdg);
        None for a single pipeline. `on_nonfinite`: stop
        (remember the first bad batch, the run stops) or skip (skip that update).
        `companion` (companion.py): the local model of a module k < K that trains on a local
        loss (DGL) or predicts its error gradient (DNI); None for the others.
        `accumulate`: backward passes per update (ADL's M; the schedule places the steps, the
        gradients add up in between). `predict`: delayed forwards run on weights extrapolated
        along the momentum (keep.Predicted)."""
        self.module = module
        self.index = index
        self.num_stages = num_stages
        self.algo = algo
        self.optimizer = optimizer
        record = algos.get(algo)
        self.delay = record.delay(index, num_stages)
        self.last = index == num_stages - 1
        self.accumulate = accumulate
        self.keeps = keep.policy("replay" if record.keeps == "input" else weights, self.delay,
                                 predict)
        self.beta = beta if not self.last else 1.0
        self.grad_sync = grad_sync
        self.params = dict(module.named_parameters())
        if not self.keeps.fresh_weights:  # the same weight tensors at every backward
            self.watch(self.params)
        self.pending: dict[int, keep.Pending] = {}
        self.graph_bytes: int | None = None  # bytes one in-flight batch holds (graph modes)
        self.stats = StageStats()
        self.autocast = autocast
        self.skip_nonfinite = on_nonfinite == "skip"
        # live: forwards of batches >= this keep a copy of their weights for a checkpoint
        self.keep_weights_from: int | None = None
        self.companion = companion if not self.last else None
        # what the executor hands `backward`: labels | gradient (from k+1) | nothing
        self.backward_input = ("labels" if self.last else "gradient" if companion is None
                               else companion.takes)
        self.sends_gradient = index > 0 and record.boundary != "none"

    # -- forward -----------------------------------------------------------------------------

    def forward(self, batch: int, x: torch.Tensor) -> torch.Tensor:
        """Forward `batch`; keep what its backward needs; return the output (detached)."""
        if not self.module.training:  # a walk over every submodule: skip it when possible
            self.module.train()
        p, out = self.keeps.forward(self, batch, x)
        self.pending[batch] = p
        self.stats.held_bytes += p.nbytes
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.held_bytes)
        return message(out)

    def watch(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Data parallel: each weight's gradient is all-reduced as soon as the backward has
        computed it, overlapped with the rest of the backward (grid.GradSync)."""
        if self.grad_sync is not None:
            for w in weights.values():
                self.grad_sync.watch(w)
        return weights

    def autocast_context(self):
        """bf16 autocast on CUDA when trainer.amp is on; a no-op context otherwise."""
        if self.autocast is not None:
            return self.autocast()
        return torch.autocast("cpu", enabled=False)

    # -- backward ----------------------------------------------------------------------------

    def backward(self, batch: int, grad: torch.Tensor) -> torch.Tensor | None:
        """Back-propagate `batch`. `grad` is the error gradient at the output, or the labels on
        the last stage. Sets the parameters' .grad; returns the input gradient (None on stage 0)."""
        p = self.pending.pop(batch)
        self.stats.held_bytes -= p.nbytes
        out, weights = self.keeps.graph(self, p)
        x = p.x
        extra: list[torch.Tensor] = []  # companion weights this backward trains
        if self.last:
            loss = F.cross_entropy(full_precision(out), grad)
            self._count(out, grad, loss, batch)
            target, grad_out = loss, None
        elif self.companion is not None:
            target, grad_out, extra = self.companion.target(batch, out, grad)
            self._hold()
        else:
            target, grad_out = out, grad * self.beta if self.beta != 1.0 else grad
        if isinstance(self.module, DistributedDataParallel):
            # DDP averages gradients from hooks on gradient accumulation, overlapped with the
            # backward: it needs .backward(), which autograd.grad would bypass
            torch.autograd.backward(target, grad_out)
            return None
        inputs = list(weights.values()) + extra + ([x] if self.sends_gradient else [])
        grads = torch.autograd.grad(target, inputs, grad_out)
        for param, g in zip([*self.params.values(), *extra], grads):
            # between two steps (ADL's accumulation) the backwards add up; step() clears them
            param.grad = g if param.grad is None else param.grad + g
        return grads[-1] if self.sends_gradient else None

    def learn(self, batch: int, grad: torch.Tensor) -> None:
        """DNI: the gradient module k+1 sent down for `batch` trains this module's predictor."""
        self.companion.learn(batch, grad)
        self._hold()

    def _hold(self) -> None:
        """Count what the companion holds now (its batches in flight) in the peak."""
        s = self.stats
        s.peak_bytes = max(s.peak_bytes, s.held_bytes + self.companion.held_bytes())

    def lookahead(self, batch: int) -> int:
        """Updates this module makes between a forward of `batch` now and the update that
        applies its gradient (SpecTrain's s): the batches in flight here are back-propagated
        first, in order, and the j-th backward (batch j) ends an update when (j + 1) is a
        multiple of `accumulate`."""
        done = batch - len(self.pending)  # batches back-propagated here so far
        return batch // self.accumulate - done // self.accumulate

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
                if self.companion is not None:
                    self.companion.step(apply=False)
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
        if self.companion is not None:
            self.companion.step(apply=True)
        s.updates += 1

    # -- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Inference forward with the current weights (BatchNorm in eval mode)."""
        self.module.eval()
        with self.autocast_context():
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
            pending.append({"batch": b, "x": compact(p.x.detach()),
                            **self.keeps.save(self, b, p)})
        s = self.stats
        return {
            "pending": pending,
            "graph_bytes": self.graph_bytes,
            "peak_bytes": s.peak_bytes,
            "loss_sum": None if s.loss_sum is None else s.loss_sum.detach(),
            "correct": s.correct,
            "seen": s.seen,
            "skipped": s.skipped,
            "skipped_in_a_row": s.skipped_in_a_row,
            # ADL: gradients summed since the last update
            "grads": {n: p.grad.detach() for n, p in self.params.items() if p.grad is not None},
        }

    def restore_inflight(self, state: dict[str, Any], device: torch.device) -> None:
        """Rebuild what `inflight` saved; the module's weights and buffers must be restored
        already (the rebuilt graphs of `live` refer to the current weights)."""
        s = self.stats
        self.pending.clear()
        s.held_bytes = 0
        self.graph_bytes = state["graph_bytes"]
        for entry in state["pending"]:
            x = entry["x"].to(device).detach().requires_grad_(self.index > 0)
            p = self.keeps.rebuild(self, x, entry)
            self.pending[entry["batch"]] = p
            s.held_bytes += p.nbytes
        s.peak_bytes = state["peak_bytes"]
        s.loss_sum = None if state["loss_sum"] is None else state["loss_sum"].to(device)
        s.correct = None if state["correct"] is None else state["correct"].to(device)
        s.seen, s.skipped = state["seen"], state["skipped"]
        s.skipped_in_a_row = state["skipped_in_a_row"]
        for n, g in state.get("grads", {}).items():
            self.params[n].grad = g.to(device)

    def drop_pending(self) -> None:
        """Forget in-flight batches (end of training: their gradients are dropped)."""
        self.pending.clear()
        self.stats.held_bytes = 0
        if self.companion is not None:
            self.companion.drop_pending()
