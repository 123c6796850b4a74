"""Training batches by global batch number, the same in every process of a run."""

from __future__ import annotations

import torch

from dpbp.data import Dataset, batch_generator, epoch_permutation, transform
from dpbp.errors import ConfigError
from dpbp.stream import Stream


def steps_per_epoch(ds: Dataset, batch_size: int) -> int:
    """Full batches per epoch (the last partial one is dropped so boundary shapes stay fixed)."""
    steps = ds.num_train // batch_size
    if steps < 1:
        raise ConfigError(f"trainer.batch_size={batch_size} is larger than the "
                          f"{ds.num_train} training samples; lower it.")
    return steps


class Feed:
    """Training batches by global batch number: epoch = b // steps, shuffled per epoch by seed.

    Every process computes the same order, so the first stage's inputs and the last stage's labels
    match without sending labels; augmentation is seeded per batch, so it does not depend on
    what ran before (resume and every executor see the same batches). A streamed dataset
    (ds.streamed) reads the same batches through a DataLoader (stream.py) instead of indexing
    tensors held on the device.
    """

    def __init__(self, ds: Dataset, batch_size: int, seed: int, device: torch.device,
                 replica: int = 0, replicas: int = 1, workers: int = 0) -> None:
        """With data-parallel replicas, global batch b holds replicas x batch_size samples and
        replica r takes the r-th share of it (disjoint shards). `workers`: the streaming path's
        DataLoader workers."""
        self.ds, self.batch_size, self.seed, self.device = ds, batch_size, seed, device
        self.replica, self.replicas = replica, replicas
        self.steps = steps_per_epoch(ds, batch_size * replicas)
        # replica 0 augments exactly as a single pipeline does; the others get their own stream
        self.aug_seed = seed + 1_000_003 * replica
        # the permutations of the last two epochs asked for (a loader reads across a boundary)
        self._perms: dict[int, torch.Tensor] = {}
        self.stream = Stream(ds.train_items, self._indices, device, workers) \
            if ds.streamed else None

    def _indices(self, batch: int) -> torch.Tensor:
        epoch, i = divmod(batch, self.steps)
        perm = self._perms.get(epoch)
        if perm is None:
            where = "cpu" if self.ds.streamed else self.device  # streamed: indexes host items
            perm = epoch_permutation(self.ds.num_train, self.seed, epoch, where)
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = perm
        start = (i * self.replicas + self.replica) * self.batch_size
        return perm[start:start + self.batch_size]

    def inputs(self, batch: int) -> torch.Tensor:
        gen = batch_generator(self.aug_seed, batch, self.device)
        x = (self.stream.inputs(batch) if self.stream is not None
             else self.ds.train_x[self._indices(batch)])
        return transform(self.ds, x, gen)

    def labels(self, batch: int) -> torch.Tensor:
        if self.stream is not None:
            return self.stream.labels(batch)
        return self.ds.train_y[self._indices(batch)]

    def close(self) -> None:
        """Stop the streaming path's loader workers (the run is over or stopped)."""
        if self.stream is not None:
            self.stream.close()
