"""A module's companion: a small model of its own that module k < K trains beside its block of
the split network (DGL's auxiliary classifier, aux.py; DNI's gradient predictor,
synthetic.py).

The companion lives with its stage: built once per module from the run's seed and the module's
output shape (the same in every process, so executor=local and executor=dist agree), trained
with an optimizer of the run's settings (`optim.*`, the learning-rate schedule), saved in the
module's checkpoint with its optimizer state and whatever it keeps between two ticks. Its
parameters and multiply-adds are reported apart from the network's (`aux_parameters`,
`aux_flops` in summary.json): they are cost, not model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpbp.split import block_flops


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """float32 for autocast's half types; float32/float64 stay as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def seeded(seed: int, index: int, make) -> nn.Module:
    """`make()` under a generator seeded by (run seed, module index): the same weights however
    many other modules this process builds first."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1_000_003 * (seed + 1) + index)
        return make()


class Companion:
    """The parts every companion shares: its model, its optimizer, its checkpoint."""

    takes = "labels"  # what its stage's backward needs: labels | nothing

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 shape: tuple[int, ...], lr_ratio: float = 1.0) -> None:
        """`shape` is the per-sample shape of the module output the companion reads;
        `lr_ratio`: its learning rate over the run's, kept as the schedule changes the run's."""
        self.model, self.optimizer, self.shape = model, optimizer, tuple(shape)
        self.lr_ratio = lr_ratio
        self.params = list(model.parameters())

    # -- what the stage asks -------------------------------------------------------------------

    def target(self, batch: int, out: torch.Tensor, given: Any
               ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """What the module's backward differentiates, given its output with the graph:
        (target, gradient at target or None for a scalar loss, companion parameters that the
        same backward trains)."""
        raise NotImplementedError

    def step(self, apply: bool) -> None:
        """After the module's update (`apply` False: the module skipped it)."""

    def learn(self, batch: int, grad: torch.Tensor) -> None:
        """A gradient from the next module arrived for `batch`."""
        raise RuntimeError(f"{type(self).__name__} receives no gradient")

    def set_lr(self, lr: float) -> None:
        """The run's learning rate is now `lr` (the schedule)."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr * self.lr_ratio

    def held_bytes(self) -> int:
        """Bytes kept for batches in flight (beyond the companion's own weights)."""
        return 0

    # -- reporting and checkpoints -------------------------------------------------------------

    def info(self) -> dict[str, int]:
        """Parameters, their bytes with the optimizer's state per parameter (SGD momentum: one
        copy, Adam: two) and multiply-adds of one sample's forward."""
        n = sum(p.numel() for p in self.params)
        nbytes = sum(p.numel() * p.element_size() for p in self.params)
        opt = self.optimizer
        copies = (2 if isinstance(opt, torch.optim.Adam)
                  else 1 if any(g.get("momentum", 0) for g in opt.param_groups) else 0)
        device = self.params[0].device if self.params else torch.device("cpu")
        flops = block_flops([self.model], torch.zeros(1, *self.shape, device=device))[0]
        return {"parameters": n, "parameter_bytes": nbytes * (1 + copies), "flops": int(flops)}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "inflight": self.inflight()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.restore_inflight(state["inflight"], device)

    def inflight(self) -> dict[str, Any]:
        """What it keeps between two ticks, as plain tensors."""
        return {}

    def restore_inflight(self, state: dict[str, Any], device: torch.device) -> None:
        """Rebuild what `inflight` saved (the model's weights restored already)."""

    def drop_pending(self) -> None:
        """Forget batches in flight (end of training)."""
