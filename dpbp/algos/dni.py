"""DNI, decoupled neural interfaces with synthetic gradients (Jaderberg et al., ICML 2017).

Update-decoupled, bootstrapped, not conditioned on labels (synthetic.py has the rule): module
k < K back-propagates the gradient its predictor M_k guesses from its output and steps at once;
the gradient module k+1 sends down for that batch (its own backward of its synthetic gradient,
or of the loss on the last module) arrives a tick later and trains M_k. The forward is not
pipelined: batch t passes through every module in tick t (DNI unlocks the update, not the
forward).
"""

from dataclasses import dataclass
from typing import Any

from dpbp import synthetic
from dpbp.algorithm import AlgoConfig, Algorithm
from dpbp.algos.ddg import layout
from dpbp.errors import ConfigError


@dataclass
class SyntheticConfig(AlgoConfig):
    """The gradient predictor's width and kernel."""

    hidden: int | None  # channels (units) of M_k's two hidden layers; None: the output's
    kernel: int  # odd conv kernel size (resolution preserving)
    predictor_lr: float  # M_k's learning rate (the run's optimizer; scaled by its schedule)

    def check(self, cfg: Any) -> None:
        if self.predictor_lr <= 0:
            raise ConfigError(f"algo.predictor_lr={self.predictor_lr} must be positive.")
        if (self.hidden is not None and self.hidden < 1) or self.kernel < 1 \
                or self.kernel % 2 == 0:
            raise ConfigError(f"algo.hidden={self.hidden} must be null or at least 1 and "
                              f"algo.kernel={self.kernel} an odd number >= 1.")


ALGORITHM = Algorithm(
    name="dni",
    title="DNI: synthetic gradients (Jaderberg et al., ICML 2017)",
    family="tick",
    options=SyntheticConfig,
    boundary="synthetic",
    companion=synthetic.build,
    tasks=("classify",),  # the predictor is a conv net over image activations
    layout=layout,
)
