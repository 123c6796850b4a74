"""LPP-SGD, locally-partitioned asynchronous parallel SGD (Chatterjee et al., "Scaling the Wild:
Decentralizing Hogwild!-style Shared-memory SGD"; code bapi/LPP-SGD, train/LPPSGD.py): the
baseline PD-ASGD reports beating by up to 2.97x. Hogwild! threads on one shared model per device
(asgd.py, as `hogwild`: whole-model updates after each backward), plus partitioning:

- warm-up: for the first `algo.partition_after` epochs (the code's `--prepassmepochs`; its
  sample scripts use about a tenth of the epochs) every update is a full one;
- then each backward thread alternates a full update with a partitioned one, starting with a
  full one (the code toggles `is_passm` after every mini-batch once the global progress has
  passed the warm-up). A partitioned update computes and applies the gradient of the thread's
  own parameter tensors only (`torch.autograd.grad` over that slice);
- the partition (`get_indices`): parameter tensors in model order, chunk = ceil(N / P) for N
  parameters and P = `algo.backward_threads`; a tensor belongs to the thread floor(s / chunk),
  s = the number of parameters before it. (The code's index arithmetic gives the same slices
  except where a tensor starts exactly at a chunk boundary, which it hands to both threads, and
  where one tensor spans several chunks, where it fails; a thread that owns no tensor here
  skips its partitioned updates.)
- each thread has its own momentum buffers (one optimizer per process in the code), SGD with
  momentum and weight decay as `hogwild`;
- devices average their parameters every `algo.average_every` local steps and at epoch ends,
  as `hogwild`, and after every step during the first `algo.dense_average_epochs` epochs (the
  code's `--pre_post_epochs`: its averaging thread uses a frequency of 1 while the progress in
  epochs is below it; default 0 as there, its ImageNet script sets 45 of 90).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

from dpbp.algorithm import Algorithm
from dpbp.algos.pdasgd import ThreadsConfig, layout
from dpbp.errors import ConfigError


def owners(sizes: list[int], threads: int) -> list[int]:
    """The thread that owns each parameter tensor, given the tensors' sizes in model order."""
    chunk = math.ceil(sum(sizes) / threads)
    out, start = [], 0
    for n in sizes:
        out.append(start // chunk)
        start += n
    return out


class Partition:
    """Which tensors a backward thread updates for a batch (thread-safe: each thread counts its
    own updates)."""

    def __init__(self, owner: list[int], warmup_batches: int) -> None:
        self.owner, self.warmup = owner, warmup_batches
        self.done: dict[int, int] = {}  # per thread: its updates since the warm-up ended
        self.lock = threading.Lock()

    def mask(self, thread: int, batch: int) -> list[bool] | None:
        """None for a full update; else, per tensor, whether `thread` updates it."""
        if batch < self.warmup:
            return None
        with self.lock:
            k = self.done.get(thread, 0)
            self.done[thread] = k + 1
        return None if k % 2 == 0 else [o == thread for o in self.owner]


@dataclass
class PartitionedConfig(ThreadsConfig):
    """Hogwild!'s options plus the warm-up before partitioned updates."""

    partition_after: int  # epochs of full updates only (the code's --prepassmepochs)
    dense_average_epochs: int  # epochs averaging after every step (the code's --pre_post_epochs)

    layerwise: ClassVar[bool] = False
    thread_momentum: ClassVar[bool] = True

    def partition(self, sizes: list[int], steps_per_epoch: int) -> Partition | None:
        return Partition(owners(sizes, self.backward_threads),
                         self.partition_after * steps_per_epoch)

    def averages_after(self, done: int, steps_per_epoch: int) -> bool:
        return (done <= self.dense_average_epochs * steps_per_epoch
                or super().averages_after(done, steps_per_epoch))

    def check(self, cfg: Any) -> None:
        super().check(cfg)
        if self.partition_after < 0:
            raise ConfigError(f"algo.partition_after={self.partition_after} must be >= 0 "
                              "(epochs of full updates before the partitioned ones).")
        if self.dense_average_epochs < 0:
            raise ConfigError(f"algo.dense_average_epochs={self.dense_average_epochs} must be "
                              ">= 0 (epochs in which devices average after every step).")


ALGORITHM = Algorithm(
    name="lpp_sgd",
    title="LPP-SGD: partitioned Hogwild! (Chatterjee et al.; PD-ASGD's baseline)",
    family="threads",
    options=PartitionedConfig,
    data_parallel="parameters",
    replicas="workers",
    resume="weights",
    simulate=None,
    layout=layout,
)
