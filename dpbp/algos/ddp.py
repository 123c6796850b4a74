"""The data-parallel baseline users would otherwise pick: torch's DistributedDataParallel, the
whole model on each of `gpus` workers, each on its share of every global batch; gradients are
averaged in buckets overlapped with the backward. One module per worker (K = 1).
"""

from dpbp.algorithm import AlgoConfig, Algorithm


def layout(workers: int) -> tuple[int, int] | None:
    """The whole model on every worker."""
    return (1, workers) if workers >= 2 else None


ALGORITHM = Algorithm(
    name="ddp",
    title="DistributedDataParallel (the data-parallel baseline)",
    family="tick",
    options=AlgoConfig,
    data_parallel="torch_ddp",
    replicas="workers",
    simulate="allreduce",
    layout=layout,
)
