"""Cut a model's block list into K consecutive modules, balanced by compute.

CIFAR ResNets have equal FLOPs per basic block across stages (channels double as the map halves),
but the stem, the first block of a stage and the head differ, and other models (WRN, ResNet-18)
do not follow the rule at all. So the default weighs each block by its counted multiply-adds on a
sample input (`split.by=flops`); `split.by=time` profiles forward+backward time of each block on
the training device instead; `split.balance=[..]` sets block counts by hand.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from dpbp.errors import ConfigError


def block_flops(blocks: Sequence[nn.Module], sample: torch.Tensor) -> list[float]:
    """Multiply-adds of each block's forward on `sample` (conv and linear; the rest is small)."""
    counts: list[float] = []
    total = [0.0]

    def hook(mod: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            k = mod.weight[0].numel()  # in_channels/groups * kh * kw
            total[0] += out.numel() * k
        elif isinstance(mod, nn.Linear):
            total[0] += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for b in blocks for m in b.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    x = sample
    try:
        with torch.no_grad():
            for b in blocks:
                total[0] = 0.0
                was_training = b.training
                b.eval()  # a single sample cannot go through train-mode BatchNorm
                x = b(x)
                b.train(was_training)
                counts.append(max(total[0], 1.0))  # cost > 0 keeps the partition well defined
    finally:
        for h in handles:
            h.remove()
    return counts


def block_times(blocks: Sequence[nn.Module], sample: torch.Tensor, repeats: int = 3) -> list[float]:
    """Median forward+backward seconds of each block on `sample`'s device (train mode)."""
    times: list[float] = []
    x = sample
    sync = torch.cuda.synchronize if sample.is_cuda else (lambda: None)
    for b in blocks:
        runs = []
        for _ in range(repeats + 1):  # the first run warms up kernels and the allocator
            # token ids (an embedding's input) take no gradient
            xi = x.detach().requires_grad_(x.is_floating_point())
            sync()
            t0 = time.perf_counter()
            y = b(xi)
            y.backward(torch.ones_like(y))
            sync()
            runs.append(time.perf_counter() - t0)
        times.append(sorted(runs[1:])[len(runs[1:]) // 2])
        with torch.no_grad():
            x = b(x)
    return times


def balanced_counts(costs: Sequence[float], k: int) -> list[int]:
    """Block counts of K consecutive, non-empty modules that minimise the largest module cost.

    Exact dynamic programme over prefix sums (blocks <= a few hundred, K <= 8: instant); ties are
    broken towards putting less on the last module, which also computes the loss.
    """
    n = len(costs)
    if k > n:
        raise ConfigError(
            f"cannot cut {n} blocks into {k} modules; use at most gpus={n} for this model."
        )
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[j][i]: smallest max-cost of cutting the first i blocks into j modules
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for s in range(j - 1, i):
                v = max(best[j - 1][s], prefix[i] - prefix[s])
                if v < best[j][i] - 1e-12 * prefix[n] or (v <= best[j][i] and s > cut[j][i]):
                    best[j][i], cut[j][i] = v, s
    counts, i = [], n
    for j in range(k, 0, -1):
        s = cut[j][i]
        counts.append(i - s)
        i = s
    return counts[::-1]


def check_balance(balance: Sequence[int], num_blocks: int) -> list[int]:
    """Validate a hand-given split.balance against the model's block count."""
    balance = [int(b) for b in balance]
    if any(b < 1 for b in balance):
        raise ConfigError(f"split.balance={balance}: every module needs at least one block.")
    if sum(balance) != num_blocks:
        raise ConfigError(
            f"split.balance={balance} sums to {sum(balance)} but the model has {num_blocks} "
            "blocks; make the counts add up."
        )
    return balance


def boundaries(counts: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) block index range of each module."""
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out
