"""Plain dataclasses for a run, built from the resolved Hydra config, and their validation.

One source of defaults: the YAML files under conf/ (what `dpbp train --help` and `--cfg job`
show). These dataclasses declare the keys and their types only, so a key missing from the
composed config is an error, not a silently different value. The `algo` section is the chosen
algorithm's own options dataclass (algorithm.py), so a run's config holds the keys that apply to
it and nothing else.

Hydra composes YAML; everything past the CLI sees only these dataclasses (no global state). Every
check that can fail on bad input lives in `validate`, so errors surface before any worker starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any

from dpbp import algos, custom, models
from dpbp.algorithm import TASKS, AlgoConfig
from dpbp.data import DataConfig
from dpbp.errors import ConfigError


@dataclass
class OptimConfig:
    name: str  # sgd
    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool


@dataclass
class SchedConfig:
    name: str  # multistep | cosine | constant
    warmup_epochs: int
    milestones: list[int] | None = None  # multistep: epochs; None: at `milestones_at`
    milestones_at: list[float] | None = None  # multistep: fractions of trainer.epochs
    gamma: float | None = None  # multistep: lr factor at each milestone


@dataclass
class TrainerConfig:
    epochs: int
    batch_size: int
    max_steps: int | None
    eval_batch_size: int
    threads: int | None
    amp: bool
    channels_last: bool
    checkpoint: bool
    check_every: int  # ticks between checks: progress, stop requests, non-finite values
    skip_limit: int  # on_nonfinite=skip: stop after this many skipped steps in a row
    progress: bool
    on_nonfinite: str  # stop: end the run naming tick/module/batch | skip: skip the step


@dataclass
class SplitConfig:
    balance: list[int] | None
    by: str  # flops | time


@dataclass
class DistConfig:
    timeout_s: float
    backend: str  # auto | gloo | nccl


@dataclass
class RunConfig:
    """Everything a run needs, as plain values."""

    algo: AlgoConfig
    model: str
    data: DataConfig
    optim: OptimConfig
    sched: SchedConfig
    trainer: TrainerConfig
    split: SplitConfig
    dist: DistConfig
    gpus: int
    device: str
    executor: str
    seed: int
    resume: bool | str
    # model=custom: `model` is the builder's dotted path (model._target_), these its arguments
    model_args: dict[str, Any] | None = None
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # model's own keys

    @property
    def modules(self) -> int:
        """K: the number of modules the model is cut into."""
        return self.gpus // self.algo.replicas

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        args = d.pop("model_args")
        if args is not None:  # the section as the user wrote it
            d["model"] = {custom.TARGET: self.model, **args}
        d["data"] = self.data.applicable()
        d["sched"] = {k: v for k, v in d["sched"].items() if v is not None}
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


def unknown_key(where: str, key: str, valid: list[str]) -> ConfigError:
    """The one sentence for a misspelled setting: `where` is its section ("config": top level),
    `valid` the section's keys; names the closest one when there is one."""
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {where}.{close[0]}?)" if close and where != "config" else \
        (f" (did you mean {close[0]}?)" if close else "")
    name = key if where == "config" else f"{where}.{key}"
    return ConfigError(f"unknown setting {name}{hint}; valid keys of {where} are "
                       f"{', '.join(sorted(valid))}.")


def _check_known(cls: type, values: dict[str, Any], where: str) -> None:
    """Name the first key of `values` that `cls` does not have (a misspelled setting)."""
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise unknown_key(where, unknown[0], fields)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass `cls` from a dict; name an unknown, missing or mistyped key in one
    sentence.

    Types are checked here because Hydra passes `trainer.epochs=abc` through as a string, which
    would otherwise fail deep inside the run with a TypeError and a traceback.
    """
    _check_known(cls, values, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and n not in values]
    if required:
        key = required[0] if where == "config" else f"{where}.{required[0]}"
        raise ConfigError(f"the config has no {key}; set it (e.g. {key}=...) or restore the "
                          "YAML file that defines it.")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if not _fits(value, hints[name]):
            key = name if where == "config" else f"{where}.{name}"
            raise ConfigError(f"{key}={value!r} has the wrong type; it must be "
                              f"{fields[name].type}.")
    return cls(**values)


def build_algo(values: dict[str, Any]) -> AlgoConfig:
    """The `algo` section as its algorithm's options dataclass (one sentence for a bad key)."""
    return _build(algos.get(str(values.get("name", ""))).options, values, "algo")


def from_dict(d: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from the resolved config dict (Hydra's, minus the `hydra` node)."""
    d = dict(d)
    d.pop("hydra", None)
    model = d.pop("model", None)
    if custom.is_custom(model):  # model=custom: {_target_: ..., its arguments}
        model, d["model_args"] = custom.split_section(model)
    elif isinstance(model, dict):  # Hydra's model group: {name: ..., the model's own keys}
        model = dict(model)
        own = models.options(str(model.get("name")))
        if "name" not in model or set(model) - {"name", *own}:
            takes = ", ".join(f"model.{k}" for k in ("name", *own))
            raise ConfigError(f"model={model.get('name')} takes only {takes}; got the keys "
                              f"{sorted(model)} (model=custom passes its keys to a network of "
                              "your own).")
        d["model_options"] = custom.own_options(model)
        model = model["name"]
    data = dict(d.pop("data", {}))
    if isinstance(data.get("shape"), list):  # YAML has no tuples; anything else fails the check
        data["shape"] = tuple(data["shape"])
    algo = dict(d.pop("algo", {}))
    sections = {"data": (DataConfig, data), "optim": (OptimConfig, d.pop("optim", {})),
                "sched": (SchedConfig, d.pop("sched", {})),
                "trainer": (TrainerConfig, d.pop("trainer", {})),
                "split": (SplitConfig, d.pop("split", {})), "dist": (DistConfig, d.pop("dist", {}))}
    # a misspelled key first: it explains a missing one (trainer.epoch for trainer.epochs)
    _check_known(RunConfig, {**d, **dict.fromkeys(sections), "algo": 0, "model": 0}, "config")
    if "name" in algo:
        _check_known(algos.get(str(algo["name"])).options, algo, "algo")
    for where, (cls, values) in sections.items():
        _check_known(cls, dict(values), where)
    record = algos.get(str(algo.get("name", "")))
    nested = {
        "algo": _build(record.options, algo, "algo"),
        **{where: _build(cls, dict(values), where) for where, (cls, values) in sections.items()},
    }
    return _build(RunConfig, {**d, **nested, "model": model}, "config")


def _check_algorithm(cfg: RunConfig) -> None:
    """What the algorithm's record asks of the run: workers, replicas, executor, its keys."""
    a = cfg.algo
    rec = algos.get(a.name)
    if rec.replicas == "workers" and a.replicas != cfg.gpus:
        raise ConfigError(f"algo={a.name} trains one model on each of gpus={cfg.gpus} workers; "
                          "leave algo.replicas unset (it follows gpus).")
    if rec.replicas == "one" and a.replicas != 1:
        takes = " or ".join(f"algo={n}" for n in algos.names()
                            if algos.get(n).replicas == "option")
        raise ConfigError(f"algo={a.name} has one pipeline; use {takes} for "
                          f"algo.replicas={a.replicas} data-parallel replicas.")
    if cfg.gpus < rec.min_workers or (not rec.local and cfg.executor == "local"):
        raise ConfigError(f"algo={a.name} runs one pipeline stage per process: use gpus >= "
                          f"{rec.min_workers} with executor=dist ({algos.reference().name} is "
                          "the one-device equivalent).")
    a.check(cfg)
    _check_task(cfg)


def _check_task(cfg: RunConfig) -> None:
    """The model and the data serve the same task, and the algorithm applies to it (the
    record's `tasks`: e.g. one that needs image augmentation or a classifier per module)."""
    model_task, data_task = models.task(cfg.model), cfg.data.task()
    if model_task != data_task:
        raise ConfigError(f"model={cfg.model} does not fit data={cfg.data.name}: train the "
                          "language model (model=gpt) on data=text and the image models on "
                          "image data.")
    rec = algos.get(cfg.algo.name)
    if data_task not in rec.tasks:
        can = ", ".join(n for n in algos.names() if data_task in algos.get(n).tasks)
        raise ConfigError(f"algo={cfg.algo.name} does not apply to {TASKS[data_task]}; use one "
                          f"of {can}.")


def _check_trainer(cfg: RunConfig) -> None:
    t, o, s = cfg.trainer, cfg.optim, cfg.sched
    if t.epochs < 1:
        raise ConfigError(f"trainer.epochs={t.epochs}: train for at least one epoch.")
    if t.batch_size < 1 or t.eval_batch_size < 1:
        raise ConfigError("trainer.batch_size and trainer.eval_batch_size must be at least 1.")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"trainer.max_steps={t.max_steps}: use null for no cap, or at least 1.")
    if t.threads is not None and t.threads < 1:
        raise ConfigError(f"trainer.threads={t.threads}: use null for torch's default or >= 1.")
    if t.check_every < 1 or t.skip_limit < 1:
        raise ConfigError("trainer.check_every and trainer.skip_limit must be at least 1.")
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"trainer.on_nonfinite must be stop or skip, not '{t.on_nonfinite}'.")
    if o.name != "sgd":
        raise ConfigError(f"unknown optimizer '{o.name}'; dpbp's algorithms use optim=sgd.")
    if o.lr <= 0 or o.momentum < 0 or o.weight_decay < 0:
        raise ConfigError("optim.lr must be positive and optim.momentum, optim.weight_decay >= 0.")
    if s.name not in ("multistep", "cosine", "constant"):
        raise ConfigError(f"unknown sched '{s.name}'; use multistep, cosine or constant.")
    if s.warmup_epochs < 0:
        raise ConfigError("sched.warmup_epochs must be >= 0.")
    if s.name == "multistep" and (s.gamma is None or (s.milestones is None
                                                      and s.milestones_at is None)):
        raise ConfigError("sched=multistep needs sched.gamma and sched.milestones (epochs) or "
                          "sched.milestones_at (fractions of trainer.epochs).")
    if s.milestones is None and s.milestones_at and not all(0 < f < 1 for f in s.milestones_at):
        raise ConfigError(f"sched.milestones_at={s.milestones_at}: give fractions of "
                          "trainer.epochs between 0 and 1.")


def validate(cfg: RunConfig) -> None:
    """Raise ConfigError, with one sentence that says what to change, for any bad setting."""
    a = cfg.algo
    if cfg.gpus < 1:
        raise ConfigError(f"gpus={cfg.gpus}: need at least one worker "
                          "(gpus=1 trains on one device).")
    if a.replicas < 1 or cfg.gpus % a.replicas:
        raise ConfigError(f"gpus={cfg.gpus} is not divisible by algo.replicas={a.replicas}.")
    if a.replicas > 1 and cfg.executor == "local":
        raise ConfigError(f"algo={a.name} runs its replicas as processes: use executor=dist.")
    _check_algorithm(cfg)
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, not '{cfg.device}'.")
    if cfg.executor not in ("dist", "local"):
        raise ConfigError(f"executor must be dist or local, not '{cfg.executor}'.")
    _check_trainer(cfg)
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
