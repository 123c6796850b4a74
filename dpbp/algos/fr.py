"""Features Replay (Huo et al., NeurIPS 2018): DDG's delays, but module k keeps only the inputs
of its batches in flight and, K-k ticks after a batch's forward, recomputes ("replays") that
forward with the current weights and back-propagates through it.

`algo.weight_prediction=true`: the forward whose output goes up runs on the weights extrapolated
to the update its gradient will be applied to (keep.PredictedReplay); the replay, as always, on
the current weights.
"""

from dataclasses import dataclass
from typing import Any

from dpbp.algorithm import AlgoConfig, Algorithm, check_weight_prediction
from dpbp.algos.ddg import delay, layout


@dataclass
class ReplayConfig(AlgoConfig):
    """Features Replay's options: the replay always uses the current weights."""

    weight_prediction: bool  # the first forward on weights extrapolated along the momentum

    def weight_policy(self) -> str:
        return "replay"

    def predicts_weights(self) -> bool:
        return self.weight_prediction

    def check(self, cfg: Any) -> None:
        if self.weight_prediction:
            check_weight_prediction(cfg)


ALGORITHM = Algorithm(
    name="fr",
    title="Features Replay (Huo et al., NeurIPS 2018)",
    family="tick",
    options=ReplayConfig,
    delay=delay,
    keeps="input",
    layout=layout,
)
