"""DGL's auxiliary classifiers (Belilovsky, Eickenberg & Oyallon, ICML 2020; eugenium/DGL).

Module k < K of a DGL network trains on the cross-entropy of a small classifier of its own
output; no gradient crosses a module boundary. The head follows the reference code's
`auxillary_classifier2` (the one its ResNet/DDG comparison uses, n_lin=3, mlp_layers=3):

    image maps (C, H, W): average-pool to ceil(H/4) x ceil(W/4),
                          n_lin x [1x1 conv C->C (no bias), BatchNorm, ReLU],
                          average-pool to 2 x 2, flatten (4C),
                          mlp_layers x [Linear 4C->4C, BatchNorm1d, ReLU], Linear 4C->classes
    vectors (D,):         mlp_layers x [Linear D->D, BatchNorm1d, ReLU], Linear D->classes

The head's parameters are updated together with its module's, with the module's optimizer
settings (the reference code puts both in one SGD).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpbp.companion import Companion, full_precision


class AuxClassifier(nn.Module):
    """The auxiliary classifier of one module's output (see the module docstring)."""

    def __init__(self, shape: tuple[int, ...], classes: int, n_lin: int, mlp_layers: int
                 ) -> None:
        super().__init__()
        self.maps = len(shape) == 3
        if self.maps:
            c, h, w = shape
            self.pool = (math.ceil(h / 4), math.ceil(w / 4))
            self.convs = nn.ModuleList(
                nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
                for _ in range(n_lin))
            features = 4 * c
        else:
            features = math.prod(shape)
        layers: list[nn.Module] = []
        for _ in range(mlp_layers):
            layers += [nn.Linear(features, features), nn.BatchNorm1d(features), nn.ReLU()]
        self.classifier = nn.Sequential(*layers, nn.Linear(features, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.maps:
            x = F.adaptive_avg_pool2d(x, self.pool)
            for conv in self.convs:
                x = F.relu(conv(x))
            x = F.adaptive_avg_pool2d(x, (2, 2))
        return self.classifier(x.flatten(1))


class LocalLoss(Companion):
    """Module k < K steps on the cross-entropy of its auxiliary classifier (DGL)."""

    takes = "labels"

    def target(self, batch: int, out: torch.Tensor, given: Any
               ) -> tuple[torch.Tensor, None, list[torch.Tensor]]:
        # float32 (autocast's bf16 outputs): the head runs outside the module's autocast
        logits = self.model(full_precision(out))
        return F.cross_entropy(logits, given), None, self.params

    def step(self, apply: bool) -> None:
        if apply:
            self.optimizer.step()
        for p in self.params:
            p.grad = None


def build(options: Any, shape: tuple[int, ...], classes: int, device: torch.device,
          make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], lr: float
          ) -> LocalLoss:
    """The auxiliary classifier of an output of `shape`, with `algo.n_lin`/`algo.mlp_layers`,
    trained by the run's optimizer (`make_optimizer`, at the run's learning rate `lr`)."""
    head = AuxClassifier(shape, classes, options.n_lin, options.mlp_layers).to(device)
    return LocalLoss(head, make_optimizer(head), shape)
