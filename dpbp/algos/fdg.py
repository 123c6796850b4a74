"""FDG, fully decoupled training with gradient shrinking (Zhuang et al., TNNLS 2021).

The forward is pipelined too: module k forwards what module k-1 sent the tick before, so batch
t reaches module k in tick t+k-1, and module k back-propagates it 2(K-k) ticks after its forward
there. The error gradient is multiplied by `algo.beta` at every boundary (beta^(K-k) in module
k; beta = 1 turns shrinking off).
"""

from dpbp.algorithm import Algorithm, ShrinkConfig
from dpbp.algos.ddg import layout


def delay(stage: int, num_stages: int) -> int:
    """2(K - k) ticks between the forward and the backward of a batch on module k."""
    return 2 * (num_stages - 1 - stage)


ALGORITHM = Algorithm(
    name="fdg",
    title="FDG: fully decoupled, gradient shrinking (Zhuang et al., TNNLS 2021)",
    family="tick",
    options=ShrinkConfig,
    delay=delay,
    pipelined=True,
    layout=layout,
)
