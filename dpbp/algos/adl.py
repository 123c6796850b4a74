"""ADL, accumulated decoupled learning (Zhuang et al., ICML 2021; code
ZHUANGHP/Accumulated-Decoupled-Learning): FDG with module-wise gradient accumulation.

The schedule is FDG's (pipelined forward; module k back-propagates a batch 2(K-k) ticks after
its forward there, the error gradient scaled by beta at every boundary), but a module sums the
gradients of `algo.accumulate` = M consecutive backward passes and updates once per M of them.
What the reference code does, and dpbp with it (main.py `trainfdg`, models.py `BuildDG`):

- accumulation: `graph.backward(beta * dg)` adds into `.grad`, and `optimizer.step()` +
  `zero_grad()` run once `update_count` reaches `--ac-step` (M): the *sum* of M mini-batch
  gradients, the learning rate unchanged (no division by M, no lr scaling). The j-th backward
  of a module (batch j, counted from 0) is followed by an update when (j + 1) is a multiple of M;
  the count runs across epochs, and a partial window at the end of training is dropped.
- what is delayed: the gradient still comes from a forward 2(K-k) ticks earlier, but only
  every M-th tick updates, so the weights it is applied to are floor(j/M) - floor((j - 2(K-k))/M)
  updates newer than the ones its forward used: about 2(K-k)/M instead of FDG's 2(K-k). That is
  the paper's staleness reduction.
- gradient shrinking stays (`--beta`; the code's default is 1, dpbp's conf keeps FDG's 0.5).
- every module, the last included, accumulates M backward passes.

Differences from the reference code, on purpose: its default `--mode B` runs the delayed
backward and step before the forward; dpbp's FDG schedule forwards first (the code's mode A),
so the forward reads the weights before this tick's update. In mode A the code's last module
also waits for module K-1's first backward before its first step (summing the gradients of
the fill ticks); here every module follows the rule above from batch 0.
"""

from dataclasses import dataclass
from typing import Any

from dpbp.algorithm import Algorithm, ShrinkConfig
from dpbp.algos.ddg import layout
from dpbp.algos.fdg import delay
from dpbp.errors import ConfigError


@dataclass
class AccumulatedConfig(ShrinkConfig):
    """FDG's options plus the accumulation steps M."""

    accumulate: int  # M: backward passes summed per update

    def accumulation(self) -> int:
        return self.accumulate

    def check(self, cfg: Any) -> None:
        if self.accumulate < 1:
            raise ConfigError(f"algo.accumulate={self.accumulate} must be at least 1 (1 is "
                              "FDG: an update after every backward).")
        super().check(cfg)


ALGORITHM = Algorithm(
    name="adl",
    title="ADL: FDG with gradient accumulation (Zhuang et al., ICML 2021)",
    family="tick",
    options=AccumulatedConfig,
    delay=delay,
    pipelined=True,
    layout=layout,
)
