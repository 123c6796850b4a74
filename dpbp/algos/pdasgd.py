"""PD-ASGD (Fokam et al., arXiv 2410.05985): per device, forward and backward threads share one
model; during a backward each parameter tensor is updated in place the moment its gradient is
ready (layer-wise), and devices average their parameters every `algo.average_every` steps.
The threads live in asgd.py.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

from dpbp.algorithm import AlgoConfig, Algorithm
from dpbp.errors import ConfigError


@dataclass
class ThreadsConfig(AlgoConfig):
    """Threads per device and how often devices average."""

    forward_threads: int
    backward_threads: int
    average_every: int  # gpus > 1: local steps between parameter averages

    layerwise: ClassVar[bool] = True  # update each layer as soon as its gradient exists
    thread_momentum: ClassVar[bool] = False  # one momentum buffer set per backward thread

    def averages_after(self, done: int, steps_per_epoch: int) -> bool:
        """Whether devices average their parameters once `done` batches (counted from the
        start of training) are done: every `average_every`."""
        return done % self.average_every == 0

    def partition(self, sizes: list[int], steps_per_epoch: int) -> Any:
        """Which tensors each backward thread updates (lpp_sgd); None: every thread all."""
        return None

    def check(self, cfg: Any) -> None:
        if min(self.forward_threads, self.backward_threads, self.average_every) < 1:
            raise ConfigError("algo.forward_threads, algo.backward_threads and "
                              "algo.average_every must be at least 1.")


def layout(workers: int) -> tuple[int, int] | None:
    """The whole model on every worker (threads inside)."""
    return 1, workers


ALGORITHM = Algorithm(
    name="pdasgd",
    title="PD-ASGD: asynchronous layer-wise SGD (Fokam et al. 2024)",
    family="threads",
    options=ThreadsConfig,
    data_parallel="parameters",
    replicas="workers",
    resume="weights",
    simulate=None,
    layout=layout,
)
