"""The learning rate of each epoch: linear warm-up, then multistep, cosine or constant."""

from __future__ import annotations

import math

from dpbp.config import RunConfig


def milestones(cfg: RunConfig) -> list[int]:
    """Multistep's epochs: sched.milestones as given (the papers' presets), else the fractions
    sched.milestones_at of trainer.epochs, so a shorter run still lowers the rate."""
    s = cfg.sched
    if s.milestones is not None:
        return list(s.milestones)
    return [round(f * cfg.trainer.epochs) for f in s.milestones_at or []]


def lr_at(cfg: RunConfig, epoch: int) -> float:
    """Learning rate of `epoch` (0-based): warm-up, then the schedule; constant within an epoch.
    Includes the algorithm's own scaling (dp_fdg's algo.scale_lr)."""
    s, base = cfg.sched, cfg.optim.lr * cfg.algo.lr_scale()
    if epoch < s.warmup_epochs:
        return base * (epoch + 1) / (s.warmup_epochs + 1)
    if s.name == "multistep":
        return base * s.gamma ** sum(epoch >= m for m in milestones(cfg))
    if s.name == "cosine":
        span = max(cfg.trainer.epochs - s.warmup_epochs, 1)
        return base * 0.5 * (1 + math.cos(math.pi * (epoch - s.warmup_epochs) / span))
    return base
