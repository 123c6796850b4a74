"""Data parallelism + FDG (Pham & Ahn, arXiv 2509.05679): `algo.replicas` FDG pipelines of
gpus/replicas modules each train on disjoint shards of every global batch; module k averages
its gradient over the replicas (one all-reduce, grid.GradSync) before each update.
"""

from dataclasses import dataclass

from dpbp.algorithm import Algorithm, ShrinkConfig
from dpbp.algos.fdg import delay


@dataclass
class DataParallelFDGConfig(ShrinkConfig):
    """FDG's options plus the learning-rate scaling of data parallelism."""

    scale_lr: bool  # true: optim.lr x replicas (the linear scaling rule)

    def lr_scale(self) -> float:
        return float(self.replicas) if self.scale_lr else 1.0


def layout(workers: int) -> tuple[int, int] | None:
    """2-module pipelines, W/2 replicas: needs an even W >= 4."""
    return (2, workers // 2) if workers >= 4 and workers % 2 == 0 else None


ALGORITHM = Algorithm(
    name="dp_fdg",
    title="data parallel + FDG (Pham & Ahn 2025)",
    family="tick",
    options=DataParallelFDGConfig,
    delay=delay,
    pipelined=True,
    data_parallel="gradients",
    replicas="option",
    layout=layout,
)
