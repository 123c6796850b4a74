"""What an algorithm is, as a record: the one place the rest of dpbp learns about it.

Every algorithm is one module under `dpbp/algos/` that defines `ALGORITHM = Algorithm(...)`,
its options dataclass (the `algo.*` keys, whose values live in `conf/algo/<name>.yaml`) and any
code only it needs. Validation, the schedule, Stage, the family runners, checkpoints, bench,
predict and report read these fields; none of them tests an algorithm's name.

Families (how a run spends its steps; train.py's run loop is the same for all):
- `tick`: the tick pipeline (schedule.py, stage.py, executor/grid): bp, ddg, fr, fdg, dp_fdg,
  and DDP (one module per worker, gradients averaged by torch's DistributedDataParallel).
- `threads`: forward and backward threads on one shared model per device (asgd.py).
- `pipelining`: torch.distributed.pipelining's schedules over the same split (pipelining.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from dpbp.errors import ConfigError

FAMILIES = ("tick", "threads", "pipelining")
WEIGHT_POLICIES = ("stash", "live")
BOUNDARIES = ("gradient", "none", "synthetic")
# what a model and its data are trained for (models.task, DataConfig.task)
TASKS = {"classify": "image classification",
         "lm": "language modelling (model=gpt data=text: a loss at the last module only)"}


@dataclass
class AlgoConfig:
    """The `algo` section common to every algorithm; each algorithm subclasses it with its own
    keys. The methods are what the family runners ask of an algorithm's options."""

    name: str
    replicas: int  # data-parallel replicas (gpus = modules x replicas)

    def weight_policy(self) -> str:
        """What a delayed stage keeps for a batch in flight: stash | live | replay."""
        return "stash"

    def shrink(self) -> float:
        """Factor on the error gradient at every module boundary (FDG's beta; 1 = none)."""
        return 1.0

    def lr_scale(self) -> float:
        """Multiplier of optim.lr (dp_fdg's linear scaling rule)."""
        return 1.0

    def check(self, cfg: Any) -> None:
        """Raise ConfigError for a bad value of this algorithm's own keys."""

    def accumulation(self) -> int:
        """Backward passes whose gradients a module sums before each update (ADL's M; 1 =
        an update after every backward)."""
        return 1

    def predicts_weights(self) -> bool:
        """Whether a delayed forward runs on weights extrapolated along the momentum to the
        update its gradient will be applied to (SpecTrain; keep.Predicted)."""
        return False


def check_weight_prediction(cfg: Any) -> None:
    """ConfigError where algo.weight_prediction=true cannot work."""
    if cfg.optim.momentum <= 0:
        raise ConfigError("algo.weight_prediction=true extrapolates along the momentum: it "
                          "needs optim.momentum > 0.")


@dataclass
class DelayedConfig(AlgoConfig):
    """Options of the algorithms that back-propagate through a stored, stale graph."""

    weights: str  # stash: the gradient at the weights the forward used | live: reference code
    weight_prediction: bool  # forward on weights extrapolated tau updates along the momentum

    def weight_policy(self) -> str:
        return self.weights

    def predicts_weights(self) -> bool:
        return self.weight_prediction

    def check(self, cfg: Any) -> None:
        if self.weights not in WEIGHT_POLICIES:
            raise ConfigError(f"algo.weights must be stash or live, not '{self.weights}'.")
        if self.weight_prediction:
            if self.weights == "live":
                raise ConfigError("algo.weight_prediction=true needs algo.weights=stash (the "
                                  "backward must use the extrapolated weights the forward used).")
            check_weight_prediction(cfg)


@dataclass
class ShrinkConfig(DelayedConfig):
    """Delayed options plus FDG's gradient shrinking."""

    beta: float  # error gradient x beta at every boundary (beta^(K-k) in module k)

    def shrink(self) -> float:
        return self.beta

    def check(self, cfg: Any) -> None:
        super().check(cfg)
        if not 0.0 < self.beta <= 1.0:
            raise ConfigError(f"algo.beta={self.beta} is outside (0, 1]; beta=1 turns "
                              "shrinking off.")


def no_delay(stage: int, num_stages: int) -> int:
    """Backward in the tick of the forward (plain backprop)."""
    return 0


def one_module_per_worker(workers: int) -> tuple[int, int] | None:
    """K = W modules in one pipeline."""
    return workers, 1


@dataclass(frozen=True)
class Algorithm:
    """One algorithm's record (see the module docstring for who reads which field)."""

    name: str
    title: str  # one line: the method and its paper
    family: str  # tick | threads | pipelining
    options: type[AlgoConfig]  # the dataclass of its algo.* keys
    delay: Callable[[int, int], int] = no_delay  # (stage s, K) -> ticks from forward to backward
    pipelined: bool = False  # stage s forwards what stage s-1 sent the tick before (FDG)
    keeps: str = "graph"  # per in-flight batch: graph (stored autograd graph) | input (replay)
    data_parallel: str | None = None  # replicas combine by: gradients | torch_ddp | parameters
    replicas: str = "one"  # one | option (algo.replicas) | workers (= gpus, one model each)
    min_workers: int = 1
    local: bool = True  # can run every module in one process (executor=local)
    reference: bool = False  # the exact-gradient baseline that speedups are measured against
    resume: str = "exact"  # exact | weights: what a resumed run guarantees (see RESUME)
    # how simulate.py models it: tick (its schedule) | allreduce (whole model per device, one
    # all-reduce per step) | microbatches (a flushed microbatch pipeline) | None (not modelled)
    simulate: str | None = "tick"
    layout: Callable[[int], tuple[int, int] | None] = one_module_per_worker  # W -> (K, R)
    # what crosses a module boundary downwards (schedule.py): gradient (the error gradient
    # drives module k's backward) | none (module k < K trains on a local loss, DGL) |
    # synthetic (module k steps on a predicted gradient; the one sent down a tick later trains
    # the predictor, DNI)
    boundary: str = "gradient"
    # builds the local model of module k < K (companion.py): (algo options, output shape,
    # classes, device, make_optimizer, run's lr) -> Companion; None: the modules have none
    companion: Callable[..., Any] | None = None
    # the tasks it applies to: one that needs image augmentation or a classifier head per
    # module (local losses) would leave out "lm"
    tasks: tuple[str, ...] = tuple(TASKS)

    RESUME: ClassVar[dict[str, str]] = {
        "exact": "bit for bit: the same weights, optimizer state and metrics as a run that was "
                 "never stopped",
        "weights": "from the checkpoint's weights, optimizer state and batch; thread timing "
                   "decides the numbers after it, as it does between two uninterrupted runs",
    }

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"algorithm {self.name}: family must be one of {FAMILIES}")
        if self.keeps not in ("graph", "input") or self.resume not in self.RESUME:
            raise ValueError(f"algorithm {self.name}: bad keeps or resume")
        if self.boundary not in BOUNDARIES or (self.boundary != "gradient"
                                               and self.companion is None):
            raise ValueError(f"algorithm {self.name}: boundary must be one of {BOUNDARIES}; "
                             "none and synthetic need a companion")
        if not set(self.tasks) <= set(TASKS):
            raise ValueError(f"algorithm {self.name}: tasks must be among {tuple(TASKS)}")

    def delays(self, num_stages: int) -> list[int]:
        """The delay of every stage of a K-stage pipeline."""
        return [self.delay(s, num_stages) for s in range(num_stages)]
