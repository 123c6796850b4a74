"""The streaming path: training batches of a dataset of (x, y) items through a DataLoader.

For training sets that do not fit the device budget (`data.stream`, data.py). The batch order is
the in-memory path's: global batch b of epoch e = b // steps holds the samples at positions
[i * B, (i + 1) * B) of `epoch_permutation(n, seed, e)` (feed.Feed computes them), so every
process of a pipeline, and a resumed run, sees the same batches. The DataLoader's workers read
and collate items ahead of the training loop (pinned memory on CUDA); the batch is copied to the
device without blocking and augmented and normalized there exactly as the in-memory path does.

The loader runs from a start batch onwards. A request for a batch it has passed (a resume, or a
thread that asks late) restarts it at that batch: reading is a pure function of the batch
number, so a restart changes nothing but time.

Any dataset of (x, y) items works: `__len__`, `__getitem__(i) -> (x, y)` with x a tensor of the
stored type (uint8 images (C, H, W), token ids (T,)), and optionally `targets` (the labels of
every item, as torchvision datasets have): then a process that only needs labels (a pipeline's
last module) reads them from it and never starts a loader.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from itertools import count
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from dpbp.errors import ConfigError

# batches kept that were loaded but not yet asked for (a forward thread that fell behind); older
# ones are dropped and, if asked for after all, read again
KEEP = 64
MODES = ("auto", True, False)


def wanted(mode: str | bool, budget_mb: float, workers: int, nbytes: int) -> bool:
    """Whether a training set of `nbytes` is streamed: `data.stream` auto streams what exceeds
    `data.stream_budget_mb`; true always, false never. ConfigError for a bad setting."""
    if isinstance(mode, str) and mode.lower() in ("true", "false"):
        mode = mode.lower() == "true"
    if mode not in MODES:
        raise ConfigError(f"data.stream must be auto, true or false, not {mode!r}.")
    if isinstance(budget_mb, bool) or not isinstance(budget_mb, (int, float)) or budget_mb <= 0:
        raise ConfigError(f"data.stream_budget_mb must be a positive number of MiB, got "
                          f"{budget_mb!r}.")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"data.loader_workers must be an integer >= 0, got {workers!r}.")
    return nbytes > budget_mb * 2**20 if mode == "auto" else bool(mode)


class TensorItems(torch.utils.data.Dataset):
    """A dataset of (x, y) items over two tensors held on the host: what a built-in dataset that
    does not fit the device budget is streamed from. `targets` gives the labels without loading
    the inputs (the torchvision convention; ImageFolder has it)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.targets = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.targets[i]


def in_order(items: Any, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every (x, y) item once, in order, in batches of `batch_size` (the last may be smaller),
    read in this process: the training set's evaluation."""
    return iter(DataLoader(items, batch_size=batch_size, shuffle=False, num_workers=0))


class BatchOrder(Sampler[list[int]]):
    """The sample indices of global batches start, start + 1, ... (endless: the run ends it)."""

    def __init__(self, indices: Callable[[int], torch.Tensor], start: int) -> None:
        self.indices, self.start = indices, start

    def __iter__(self) -> Iterator[list[int]]:
        for b in count(self.start):
            yield self.indices(b).tolist()


class Stream:
    """Batches of `items` by global batch number, read ahead by a DataLoader.

    `indices(b)` gives batch b's sample indices (on the host). `inputs(b)` and `labels(b)` return
    batch b's stored inputs and its labels on `device`; each is handed out once (the cache keeps
    a batch until both are taken). Thread-safe: forward threads (asgd.py) share one stream.
    """

    def __init__(self, items: Any, indices: Callable[[int], torch.Tensor],
                 device: torch.device, workers: int) -> None:
        self.items, self.indices, self.device, self.workers = items, indices, device, workers
        self.targets = getattr(items, "targets", None)
        if self.targets is not None:
            self.targets = torch.as_tensor(self.targets)
        self.lock = threading.Lock()
        self.cache: dict[int, list[torch.Tensor | None]] = {}  # b -> [x, y]; None: taken
        self.it: Iterator[Any] | None = None
        self.next = 0  # the batch the loader yields next
        self.restarts = 0  # loaders started (one per run without resume or late requests)

    def _start(self, b: int) -> None:
        self.it = iter(DataLoader(self.items, batch_sampler=BatchOrder(self.indices, b),
                                  num_workers=self.workers,
                                  pin_memory=self.device.type == "cuda",
                                  persistent_workers=False))
        self.next = b
        self.restarts += 1

    def _take(self, b: int, part: int) -> torch.Tensor:
        with self.lock:
            entry = self.cache.get(b)
            if entry is None or entry[part] is None:
                if self.it is None or b < self.next:
                    self._start(b)
                while self.next <= b:
                    x, y = next(self.it)
                    self.cache[self.next] = [x.to(self.device, non_blocking=True),
                                             None if self.targets is not None else
                                             y.to(self.device, non_blocking=True)]
                    self.next += 1
                entry = self.cache[b]
            value, entry[part] = entry[part], None
            if entry[0] is None and entry[1] is None:
                del self.cache[b]
            for old in [k for k in self.cache if k < b - KEEP]:
                del self.cache[old]
            return value

    def inputs(self, b: int) -> torch.Tensor:
        """Batch b's stored inputs (not yet augmented or normalized), on the device."""
        return self._take(b, 0)

    def labels(self, b: int) -> torch.Tensor:
        """Batch b's labels on the device (from `targets` when the items have them)."""
        if self.targets is not None:
            return self.targets[self.indices(b)].to(self.device, non_blocking=True)
        return self._take(b, 1)

    def close(self) -> None:
        """Stop the loader's workers."""
        with self.lock:
            self.it, self.cache = None, {}
