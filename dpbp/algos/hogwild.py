"""Hogwild! as PD-ASGD's baseline: the same forward and backward threads on a shared model, but
the whole model is updated after each full backward (no layer-wise updates)."""

from dataclasses import dataclass
from typing import ClassVar

from dpbp.algorithm import Algorithm
from dpbp.algos.pdasgd import ThreadsConfig, layout


@dataclass
class HogwildConfig(ThreadsConfig):
    """PD-ASGD's options; only the update differs."""

    layerwise: ClassVar[bool] = False


ALGORITHM = Algorithm(
    name="hogwild",
    title="Hogwild! (whole-model lock-free updates; PD-ASGD's baseline)",
    family="threads",
    options=HogwildConfig,
    data_parallel="parameters",
    replicas="workers",
    resume="weights",
    simulate=None,
    layout=layout,
)
