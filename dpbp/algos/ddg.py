"""DDG, decoupled parallel backpropagation with delayed gradients (Huo et al., ICML 2018).

The forward of batch t passes through every module in tick t; module k (stage s = k-1)
back-propagates batch t-(K-k) with the error gradient module k+1 sent in tick t-1: a delay of
K-k. `algo.weights=stash` takes that gradient at the weights the batch's forward used (the
paper's analysis); `live` reproduces the 2018 reference code (stored activations, current
weights).
"""

from dpbp.algorithm import Algorithm, DelayedConfig


def delay(stage: int, num_stages: int) -> int:
    """K - k ticks between the forward and the backward of a batch on module k."""
    return num_stages - 1 - stage


def layout(workers: int) -> tuple[int, int] | None:
    """One module per worker; one worker would be plain backprop."""
    return (workers, 1) if workers >= 2 else None


ALGORITHM = Algorithm(
    name="ddg",
    title="DDG: delayed gradients (Huo et al., ICML 2018)",
    family="tick",
    options=DelayedConfig,
    delay=delay,
    layout=layout,
)
