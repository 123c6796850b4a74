"""Features Replay (Huo et al., NeurIPS 2018): DDG's delays, but module k keeps only the inputs
of its batches in flight and, K-k ticks after a batch's forward, recomputes ("replays") that
forward with the current weights and back-propagates through it.
"""

from dataclasses import dataclass

from dpbp.algorithm import AlgoConfig, Algorithm
from dpbp.algos.ddg import delay, layout


@dataclass
class ReplayConfig(AlgoConfig):
    """Features Replay has no options of its own: the replay always uses the current weights."""

    def weight_policy(self) -> str:
        return "replay"


ALGORITHM = Algorithm(
    name="fr",
    title="Features Replay (Huo et al., NeurIPS 2018)",
    family="tick",
    options=ReplayConfig,
    delay=delay,
    keeps="input",
    layout=layout,
)
