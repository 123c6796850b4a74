"""Training batches by global batch number, the same in every process of a run."""

from __future__ import annotations

import torch

from dpbp.data import Dataset, batch_generator, epoch_permutation, train_batch
from dpbp.errors import ConfigError


def steps_per_epoch(ds: Dataset, batch_size: int) -> int:
    """Full batches per epoch (the last partial one is dropped so boundary shapes stay fixed)."""
    steps = ds.train_x.shape[0] // batch_size
    if steps < 1:
        raise ConfigError(f"trainer.batch_size={batch_size} is larger than the "
                          f"{ds.train_x.shape[0]} training images; lower it.")
    return steps


class Feed:
    """Training batches by global batch number: epoch = b // steps, shuffled per epoch by seed.

    Every process computes the same order, so the first stage's inputs and the last stage's labels
    match without sending labels; augmentation is seeded per batch, so it does not depend on
    what ran before (resume and every executor see the same batches).
    """

    def __init__(self, ds: Dataset, batch_size: int, seed: int, device: torch.device,
                 replica: int = 0, replicas: int = 1) -> None:
        """With data-parallel replicas, global batch b holds replicas x batch_size samples and
        replica r takes the r-th share of it (disjoint shards)."""
        self.ds, self.batch_size, self.seed, self.device = ds, batch_size, seed, device
        self.replica, self.replicas = replica, replicas
        self.steps = steps_per_epoch(ds, batch_size * replicas)
        # replica 0 augments exactly as a single pipeline does; the others get their own stream
        self.aug_seed = seed + 1_000_003 * replica
        self._perm: tuple[int, torch.Tensor] | None = None

    def _indices(self, batch: int) -> torch.Tensor:
        epoch, i = divmod(batch, self.steps)
        if self._perm is None or self._perm[0] != epoch:
            n = self.ds.train_x.shape[0]
            self._perm = (epoch, epoch_permutation(n, self.seed, epoch, self.device))
        start = (i * self.replicas + self.replica) * self.batch_size
        return self._perm[1][start:start + self.batch_size]

    def inputs(self, batch: int) -> torch.Tensor:
        gen = batch_generator(self.aug_seed, batch, self.device)
        return train_batch(self.ds, self._indices(batch), gen)[0]

    def labels(self, batch: int) -> torch.Tensor:
        return self.ds.train_y[self._indices(batch)]
