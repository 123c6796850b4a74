"""DNI's synthetic gradients (Jaderberg et al., "Decoupled Neural Interfaces using Synthetic
Gradients", ICML 2017).

The variant: the paper's update-decoupled DNI with bootstrapping, not conditioned on labels.

- Boundary k (after module k < K) has a model M_k that predicts the error gradient at the
  module's output from the output alone: delta_hat_k = M_k(h_k). Module k back-propagates
  delta_hat_k and steps at once (tick t); its input gradient goes down as usual.
- The target of M_k is the gradient module k+1 sends down for the same batch: the backward of
  module k+1's own synthetic gradient delta_hat_{k+1} through module k+1 (bootstrapping; the
  last module sends the true gradient of the loss). It arrives a tick later, and M_k takes one
  step (the run's optimizer settings) on the L2 loss
      0.5 * sum_i ||M_k(h_k)_i - delta_k_i||^2 / B   (summed over features, averaged over the batch)
  of the very prediction it made: M_k does not change between the prediction and its target.
  M_k's optimizer is the run's (SGD with its momentum and weight decay) at its own learning
  rate `algo.predictor_lr`, which the run's schedule scales like the network's: at the
  network's 0.1 the regression diverges within a few steps (its curvature, summed over every
  position of the map, is far larger than the network's); on digits 1e-2 diverges and 1e-3
  is stable. (The paper trains everything with Adam; eugenium/DGL's DNI comparison notes that
  SGD at its lr 0.01 does not converge.)
- M_k (the paper's CIFAR CNN model): for image maps (C, H, W), conv5x5(C->hidden), BatchNorm,
  ReLU, conv5x5(hidden->hidden), BatchNorm, ReLU, conv5x5(hidden->C), resolution preserving; for
  vectors, the same with Linear layers. `algo.hidden=null` (default) makes hidden = C, as in the
  paper, whose CIFAR network has C = hidden = 128 channels everywhere. The output layer is
  zero-initialised (weight and bias), so the first predictions are 0 and module k < K starts
  by not moving.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from dpbp.companion import Companion, full_precision


def gradient_model(shape: tuple[int, ...], hidden: int | None, kernel: int) -> nn.Module:
    """M_k for outputs of `shape` (see the module docstring); its last layer is zero."""
    hidden = hidden or shape[0]
    if len(shape) == 3:
        c = shape[0]

        def conv(i: int, o: int) -> nn.Conv2d:
            return nn.Conv2d(i, o, kernel, padding=kernel // 2)

        layers = [conv(c, hidden), nn.BatchNorm2d(hidden), nn.ReLU(),
                  conv(hidden, hidden), nn.BatchNorm2d(hidden), nn.ReLU(), conv(hidden, c)]
    else:
        d = math.prod(shape)
        layers = [nn.Flatten(), nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                  nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                  nn.Linear(hidden, d), nn.Unflatten(1, tuple(shape))]
    model = nn.Sequential(*layers)
    last = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return model


class SyntheticGradient(Companion):
    """M_k with the predictions waiting for their targets (see the module docstring)."""

    takes = "nothing"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 shape: tuple[int, ...], lr_ratio: float = 1.0) -> None:
        super().__init__(model, optimizer, shape, lr_ratio)
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # batch: (h, prediction)

    def target(self, batch: int, out: torch.Tensor, given: Any
               ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        h = full_precision(out.detach())
        prediction = self.model(h)
        self.pending[batch] = (h, prediction)
        return out, prediction.detach().to(out.dtype), []

    def learn(self, batch: int, grad: torch.Tensor) -> None:
        """One step of M_k on its prediction for `batch` against the gradient that came down."""
        h, prediction = self.pending.pop(batch)
        loss = 0.5 * (prediction - grad).pow(2).sum() / prediction.shape[0]
        for p, g in zip(self.params, torch.autograd.grad(loss, self.params)):
            p.grad = g
        self.optimizer.step()
        for p in self.params:
            p.grad = None

    def held_bytes(self) -> int:
        return sum(h.untyped_storage().nbytes() + p.untyped_storage().nbytes()
                   for h, p in self.pending.values())

    def inflight(self) -> dict[str, Any]:
        return {"pending": [[b, h] for b, (h, _) in sorted(self.pending.items())]}

    def restore_inflight(self, state: dict[str, Any], device: torch.device) -> None:
        # the prediction again, from the saved input and the restored (unchanged) weights; on
        # copies of the buffers, which counted this batch already
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        self.pending = {}
        for b, h in state["pending"]:
            h = h.to(device)
            params = dict(self.model.named_parameters())
            self.pending[int(b)] = (h, functional_call(self.model, {**params, **buffers}, (h,)))

    def drop_pending(self) -> None:
        self.pending.clear()


def build(options: Any, shape: tuple[int, ...], classes: int, device: torch.device,
          make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], lr: float
          ) -> SyntheticGradient:
    """M_k for an output of `shape`, `algo.hidden` channels (units; None: the output's),
    `algo.kernel` wide, trained by the run's optimizer at `algo.predictor_lr` (the run's
    learning rate is `lr`; the schedule scales both alike)."""
    model = gradient_model(shape, options.hidden, options.kernel).to(device)
    companion = SyntheticGradient(model, make_optimizer(model), shape,
                                  lr_ratio=options.predictor_lr / lr)
    companion.set_lr(lr)
    return companion
