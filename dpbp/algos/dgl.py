"""DGL, decoupled greedy learning (Belilovsky, Eickenberg & Oyallon, ICML 2020; eugenium/DGL).

Module k < K trains on the cross-entropy of its own auxiliary classifier (aux.py) and nothing
crosses a module boundary downwards: module k needs only its input. The forward is pipelined as
FDG's: module k forwards, at tick t, what module k-1 sent at tick t-1, and steps on that batch in
the same tick (no delay, no gradient to wait for). The last module trains on the network's own
head and loss. The auxiliary heads are trained with the module's optimizer settings; they are
not part of the network that is evaluated.
"""

from dataclasses import dataclass
from typing import Any

from dpbp import aux
from dpbp.algorithm import AlgoConfig, Algorithm
from dpbp.algos.ddg import layout
from dpbp.errors import ConfigError


@dataclass
class GreedyConfig(AlgoConfig):
    """The auxiliary classifier's size (the reference code's `n_lin` and `mlp_layers`)."""

    n_lin: int  # 1x1 conv + BatchNorm + ReLU layers on the pooled maps
    mlp_layers: int  # Linear + BatchNorm + ReLU layers before the classifying Linear

    def check(self, cfg: Any) -> None:
        if self.n_lin < 0 or self.mlp_layers < 0:
            raise ConfigError(f"algo.n_lin={self.n_lin} and algo.mlp_layers={self.mlp_layers} "
                              "must be 0 or more.")


ALGORITHM = Algorithm(
    name="dgl",
    title="DGL: decoupled greedy learning, auxiliary classifiers (Belilovsky et al., ICML 2020)",
    family="tick",
    options=GreedyConfig,
    pipelined=True,
    boundary="none",
    companion=aux.build,
    tasks=("classify",),  # the auxiliary head classifies images; text has no per-module head
    layout=layout,
)
