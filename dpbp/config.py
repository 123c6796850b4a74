"""Plain dataclasses for a run, built from the resolved Hydra config, and their validation.

Hydra composes YAML; everything past the CLI sees only these dataclasses (no global state). Every
check that can fail on bad input lives in `validate`, so errors surface before any worker starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from dpbp.data import DataConfig
from dpbp.errors import ConfigError

ALGOS = ("bp", "ddg", "fr", "fdg", "dp_fdg", "ddp", "gpipe", "pdasgd", "hogwild")
ASYNC = ("pdasgd", "hogwild")  # one whole model per device, threads inside (asgd.py)


@dataclass
class AlgoConfig:
    name: str = "bp"
    weights: str = "stash"  # ddg/fdg: stash | live (which weights a delayed gradient is taken at)
    beta: float = 1.0  # fdg: gradient shrinking per module boundary
    replicas: int = 1  # data-parallel replicas (dp_fdg); 1 everywhere else
    scale_lr: bool = False  # dp_fdg: multiply optim.lr by replicas (the linear scaling rule)
    forward_threads: int = 1  # pdasgd/hogwild: threads per device
    backward_threads: int = 2
    average_every: int = 10  # pdasgd/hogwild, gpus > 1: local steps between parameter averages
    microbatches: int = 4  # gpipe: microbatches per batch
    pipeline: str = "gpipe"  # gpipe: gpipe | 1f1b (torch.distributed.pipelining's schedules)


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False


@dataclass
class SchedConfig:
    name: str = "multistep"  # multistep | cosine | constant
    milestones: list[int] = field(default_factory=lambda: [150, 225, 275])
    gamma: float = 0.1
    warmup_epochs: int = 0


@dataclass
class TrainerConfig:
    epochs: int = 30
    batch_size: int = 128
    max_steps: int | None = None
    eval_batch_size: int = 500
    threads: int | None = 1
    amp: bool = False
    channels_last: bool = False
    checkpoint: bool = True
    log_every: int = 10
    progress: bool = True
    on_nonfinite: str = "stop"  # stop: end the run naming tick/module/batch | skip: skip the step


@dataclass
class SplitConfig:
    balance: list[int] | None = None
    by: str = "flops"  # flops | time


@dataclass
class DistConfig:
    timeout_s: float = 60.0
    backend: str = "auto"


@dataclass
class RunConfig:
    """Everything a run needs, as plain values."""

    algo: AlgoConfig = field(default_factory=AlgoConfig)
    model: str = "resnet20"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    gpus: int = 1
    device: str = "auto"
    executor: str = "dist"
    seed: int = 0
    resume: bool | str = False

    @property
    def modules(self) -> int:
        """K: the number of modules the model is cut into."""
        return self.gpus // self.algo.replicas

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data"]["shape"] = list(d["data"]["shape"])
        return d


def _fits(value: Any, tp: Any) -> bool:
    """Whether `value` has type `tp`: int, float, bool, str, None, unions, lists/tuples of them."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp in (int, float):  # bool is an int to Python but never a count or a rate here
        allowed = (int, float) if tp is float else int
        return isinstance(value, allowed) and not isinstance(value, bool)
    if origin in (list, tuple):
        item = typing.get_args(tp)[0]
        return isinstance(value, (list, tuple)) and all(_fits(v, item) for v in value)
    return isinstance(value, origin or tp)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"dotted.key": value}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass `cls` from a dict; name an unknown key or a wrong type in one sentence.

    Types are checked here because Hydra passes `trainer.epochs=abc` through as a string, which
    would otherwise fail deep inside the run with a TypeError and a traceback.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting {where}.{unknown[0]}; valid keys of {where} are "
                          f"{', '.join(sorted(fields))}.")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if not _fits(value, hints[name]):
            key = name if where == "config" else f"{where}.{name}"
            raise ConfigError(f"{key}={value!r} has the wrong type; it must be "
                              f"{fields[name].type}.")
    return cls(**values)


def from_dict(d: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from the resolved config dict (Hydra's, minus the `hydra` node)."""
    d = dict(d)
    d.pop("hydra", None)
    model = d.pop("model", "resnet20")
    if isinstance(model, dict):  # Hydra's model group: {name: ...}; other keys would be ignored
        if set(model) != {"name"}:
            raise ConfigError(f"model takes only model.name; got the keys {sorted(model)}.")
        model = model["name"]
    data = dict(d.pop("data", {}))
    if isinstance(data.get("shape"), list):  # YAML has no tuples; anything else fails the check
        data["shape"] = tuple(data["shape"])
    nested = {
        "algo": _build(AlgoConfig, dict(d.pop("algo", {})), "algo"),
        "data": _build(DataConfig, data, "data"),
        "optim": _build(OptimConfig, dict(d.pop("optim", {})), "optim"),
        "sched": _build(SchedConfig, dict(d.pop("sched", {})), "sched"),
        "trainer": _build(TrainerConfig, dict(d.pop("trainer", {})), "trainer"),
        "split": _build(SplitConfig, dict(d.pop("split", {})), "split"),
        "dist": _build(DistConfig, dict(d.pop("dist", {})), "dist"),
    }
    return _build(RunConfig, {**d, **nested, "model": model}, "config")


def _check_gpipe(cfg: RunConfig) -> None:
    a = cfg.algo
    if a.pipeline not in ("gpipe", "1f1b"):
        raise ConfigError(f"algo.pipeline must be gpipe or 1f1b, not '{a.pipeline}'.")
    if cfg.gpus < 2 or cfg.executor == "local":
        raise ConfigError("algo=gpipe runs one pipeline stage per process: use gpus >= 2 with "
                          "executor=dist (algo=bp is the one-device equivalent).")
    if a.microbatches < 1 or cfg.trainer.batch_size % a.microbatches:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} is not divisible by "
                          f"algo.microbatches={a.microbatches}; change one of them.")
    if cfg.resume:
        raise ConfigError("algo=gpipe writes no checkpoints to resume from; start anew.")


def validate(cfg: RunConfig) -> None:
    """Raise ConfigError, with one sentence that says what to change, for any bad setting."""
    a, t, o = cfg.algo, cfg.trainer, cfg.optim
    if a.name not in ALGOS:
        raise ConfigError(f"unknown algo '{a.name}'; choose one of {', '.join(ALGOS)}.")
    if a.weights not in ("stash", "live"):
        raise ConfigError(f"algo.weights must be stash or live, not '{a.weights}'.")
    if not 0.0 < a.beta <= 1.0:
        raise ConfigError(f"algo.beta={a.beta} is outside (0, 1]; beta=1 turns shrinking off.")
    if cfg.gpus < 1:
        raise ConfigError(f"gpus={cfg.gpus}: need at least one worker "
                          "(gpus=1 trains on one device).")
    if a.replicas < 1 or cfg.gpus % a.replicas:
        raise ConfigError(f"gpus={cfg.gpus} is not divisible by algo.replicas={a.replicas}.")
    if a.name in ("ddp", *ASYNC) and a.replicas != cfg.gpus:
        raise ConfigError(f"algo={a.name} trains one model on each of gpus={cfg.gpus} workers; "
                          "leave algo.replicas unset (it follows gpus).")
    if min(a.forward_threads, a.backward_threads, a.average_every) < 1:
        raise ConfigError("algo.forward_threads, algo.backward_threads and algo.average_every "
                          "must be at least 1.")
    if a.name in ASYNC and cfg.resume:
        raise ConfigError(f"algo={a.name} writes no checkpoints to resume from yet; start anew.")
    if a.name == "gpipe":
        _check_gpipe(cfg)
    if a.replicas > 1 and a.name not in ("dp_fdg", "ddp", *ASYNC):
        raise ConfigError(f"algo={a.name} has one pipeline; use algo=dp_fdg for "
                          f"algo.replicas={a.replicas} data-parallel replicas of FDG.")
    if a.replicas > 1 and cfg.executor == "local":
        raise ConfigError(f"algo={a.name} runs its replicas as processes: use executor=dist.")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, not '{cfg.device}'.")
    if cfg.executor not in ("dist", "local"):
        raise ConfigError(f"executor must be dist or local, not '{cfg.executor}'.")
    if t.epochs < 1:
        raise ConfigError(f"trainer.epochs={t.epochs}: train for at least one epoch.")
    if t.batch_size < 1 or t.eval_batch_size < 1:
        raise ConfigError("trainer.batch_size and trainer.eval_batch_size must be at least 1.")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"trainer.max_steps={t.max_steps}: use null for no cap, or at least 1.")
    if t.threads is not None and t.threads < 1:
        raise ConfigError(f"trainer.threads={t.threads}: use null for torch's default or >= 1.")
    if t.log_every < 1:
        raise ConfigError("trainer.log_every must be at least 1.")
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"trainer.on_nonfinite must be stop or skip, not '{t.on_nonfinite}'.")
    if o.name != "sgd":
        raise ConfigError(f"unknown optimizer '{o.name}'; dpbp's algorithms use optim=sgd.")
    if o.lr <= 0 or o.momentum < 0 or o.weight_decay < 0:
        raise ConfigError("optim.lr must be positive and optim.momentum, optim.weight_decay >= 0.")
    if cfg.sched.name not in ("multistep", "cosine", "constant"):
        raise ConfigError(f"unknown sched '{cfg.sched.name}'; use multistep, cosine or constant.")
    if cfg.sched.warmup_epochs < 0:
        raise ConfigError("sched.warmup_epochs must be >= 0.")
    if cfg.split.by not in ("flops", "time"):
        raise ConfigError(f"split.by must be flops or time, not '{cfg.split.by}'.")
    if cfg.split.balance is not None and len(cfg.split.balance) != cfg.modules:
        raise ConfigError(
            f"split.balance has {len(cfg.split.balance)} entries but the run has {cfg.modules} "
            f"modules (gpus={cfg.gpus}); give one block count per module."
        )
    if cfg.dist.backend == "gloo" and cfg.device == "cuda":
        raise ConfigError("gloo cannot send CUDA tensors between processes; use "
                          "dist.backend=auto (nccl on CUDA) or device=cpu.")
    if cfg.dist.backend not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"dist.backend must be auto, gloo or nccl, not '{cfg.dist.backend}'.")
    if cfg.dist.timeout_s <= 0:
        raise ConfigError("dist.timeout_s must be positive.")
