"""The exact-gradient pipeline users would otherwise pick: torch.distributed.pipelining's GPipe
(or 1F1B) schedule over dpbp's split, one stage per process (pipelining.py). Each batch is cut
into `algo.microbatches`; every module steps after the flush, so the update is plain BP's, up to
BatchNorm, which normalises each microbatch with its own statistics.
"""

from dataclasses import dataclass
from typing import Any

from dpbp.algorithm import AlgoConfig, Algorithm
from dpbp.algos.ddg import layout
from dpbp.errors import ConfigError

PIPELINES = ("gpipe", "1f1b")


@dataclass
class PipelineConfig(AlgoConfig):
    """Microbatches per batch and torch's schedule."""

    microbatches: int
    pipeline: str  # gpipe | 1f1b

    def check(self, cfg: Any) -> None:
        if self.pipeline not in PIPELINES:
            raise ConfigError(f"algo.pipeline must be gpipe or 1f1b, not '{self.pipeline}'.")
        if self.microbatches < 1 or cfg.trainer.batch_size % self.microbatches:
            raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} is not divisible by "
                              f"algo.microbatches={self.microbatches}; change one of them.")


ALGORITHM = Algorithm(
    name="gpipe",
    title="GPipe / 1F1B (torch.distributed.pipelining)",
    family="pipelining",
    options=PipelineConfig,
    min_workers=2,
    local=False,
    simulate="microbatches",
    layout=layout,
)
