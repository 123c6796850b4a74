"""The `dpbp train` command line before Hydra runs it: misspelled keys, short run names for
sweeps, and the help text.

- A key that no config has (`trainer.epoch=2`) gets dpbp's one sentence, with a "did you mean",
  before Hydra can answer with its advice to append the key (`+trainer.epoch=2`).
- A sweep's run directories (TensorBoard's run names) are named by what varies within the sweep:
  `dpbp train -m algo=bp,ddg gpus=2 device=cpu` gives `algo=bp` and `algo=ddg`; the overrides
  every job shares stay in each run's .hydra/overrides.yaml, summary.json and hparams.
- `dpbp train --help` shows train.yaml and every algorithm's file with their comments (the
  `dpbp_help` resolver that conf/train.yaml's help template calls).
"""

from __future__ import annotations

import itertools
import re
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dpbp.config import unknown_key
from dpbp.errors import ConfigError

GROUPS = ("algo", "model", "data", "optim", "sched", "experiment")
MAX_COMBINATIONS = 16  # group choices of a sweep checked for unknown keys
_ABSENT = object()


def parse(args: list[str]) -> tuple[list[Any], bool]:
    """The overrides of a `dpbp train` command line (Hydra's parser) and whether it is a sweep;
    ([], False) when Hydra itself will reject the line (it then says why)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        ns, _ = get_args_parser().parse_known_args(args)
        return OverridesParser.create().parse_overrides(ns.overrides), bool(ns.multirun)
    except (SystemExit, Exception):
        return [], False


def model_arguments(args: list[str]) -> list[str]:
    """With a model whose file names a `_target_` (model=custom), `model.KEY=VALUE` is an
    argument of the user's builder that no YAML file can list: pass it as Hydra's forced
    addition `++model.KEY=VALUE` (Hydra would otherwise ask for a `+`)."""
    choices = [m.group(1) for a in args if (m := re.fullmatch(r"\+{0,2}model=([\w.-]+)", a))]
    if not choices:
        return args
    path = resources.files("dpbp.conf") / "model" / f"{choices[-1]}.yaml"
    if not path.is_file():
        return args
    own = set(OmegaConf.load(path).keys())  # keys(): `in` misses a "???" value
    if "_target_" not in own:
        return args
    key = re.compile(r"model\.([\w.]+)=")
    return [f"++{a}" if (m := key.match(a)) and m.group(1) not in own else a for a in args]


def _values(override) -> list[str]:
    """Every value a (sweep) override takes, as strings."""
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    return [override.get_value_element_as_str()]


def check_keys(args: list[str]) -> None:
    """Raise ConfigError naming the first override whose key no composed config has."""
    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.types import OverrideType

    overrides, _ = parse(args)
    keys = [o for o in overrides if o.type == OverrideType.CHANGE and not o.is_hydra_override()
            and o.key_or_group not in GROUPS and o.package is None]
    if not keys:
        return
    groups = [[f"{o.key_or_group}={v}" for v in _values(o)] for o in overrides
              if o.key_or_group in GROUPS and o.type == OverrideType.CHANGE]
    for choice in itertools.islice(itertools.product(*groups), MAX_COMBINATIONS):
        try:
            with initialize_config_module(config_module="dpbp.conf", version_base="1.3"):
                cfg = compose("train", overrides=list(choice))
        except Exception:  # a bad group value or interpolation: Hydra will say
            return
        for o in keys:
            error = _missing(cfg, o.key_or_group)
            if error is not None and o.key_or_group.startswith("model.") \
                    and "_target_" not in cfg.model.keys():
                error = (f"{error[:-1]}; a network of your own is model=custom "
                         "model._target_=module.function with its arguments as model.KEY=VALUE.")
            if error is not None and o.key_or_group == "data._target_":
                error = (f"{error[:-1]}; a dataset class of your own is data=custom "
                         "data._target_=module.Class.")
            if error is not None:
                where = " ".join(c for c in choice if not c.startswith("experiment=null"))
                raise ConfigError(f"{error[:-1]} (with {where})." if where else error)


def _missing(cfg: DictConfig, key: str) -> str | None:
    """The unknown-setting sentence for `key` if cfg has no such key, else None."""
    if OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT:
        return None
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig) or part not in node.keys():  # "???" values too
            where = ".".join(parts[:i]) or "config"
            valid = list(node.keys()) if isinstance(node, DictConfig) else []
            return str(unknown_key(where, part, [str(k) for k in valid]))
        node = node._get_node(part)  # not node[part]: that raises for a "???" value
    return None


def run_name_overrides(args: list[str]) -> list[str]:
    """For a sweep: the Hydra override that names each run directory by the keys that vary
    within the sweep only. None when nothing varies, when the user names the runs, or when the
    sweep goes into a directory that already holds runs (an earlier sweep's short names could
    be this one's: Hydra's full names keep them apart)."""
    overrides, multirun = parse(args)
    if not multirun or any(o.key_or_group.startswith(("hydra.job.config.override_dirname",
                                                      "hydra.sweep.subdir")) for o in overrides):
        return []
    given = [o for o in overrides if o.key_or_group == "hydra.sweep.dir"]
    if given and _holds_runs(Path(given[-1].get_value_element_as_str())):
        return []
    app = [o for o in overrides if not o.is_hydra_override()]
    if not any(o.is_sweep_override() for o in app):
        return []
    shared = [o.key_or_group for o in app if not o.is_sweep_override()]
    default = OmegaConf.load(resources.files("dpbp.conf") / "train.yaml")
    exclude = [*default.hydra.job.config.override_dirname.exclude_keys, *shared]
    return [f"hydra.job.config.override_dirname.exclude_keys=[{','.join(exclude)}]"]


def _holds_runs(folder: Path) -> bool:
    """Whether a sweep directory already has run directories (Hydra's .hydra/ in them)."""
    return folder.is_dir() and any((p / ".hydra").is_dir() for p in folder.iterdir())


def help_text(part: str) -> str:
    """The `dpbp_help` resolver: `train` (train.yaml's keys with their comments) or `algos`
    (every conf/algo file); '$' doubled for the help template."""
    conf = resources.files("dpbp.conf")
    if part == "train":
        text = (conf / "train.yaml").read_text().split("\nhydra:")[0].rstrip()
    else:
        files = sorted(p for p in (conf / "algo").iterdir() if p.name.endswith(".yaml"))
        text = "\n\n".join(f"--- algo={p.name[:-5]} ---\n{p.read_text().rstrip()}"
                           for p in files)
    return text.replace("$", "$$")


def register_help() -> None:
    """Make `${dpbp_help:...}` resolvable (idempotent)."""
    if not OmegaConf.has_resolver("dpbp_help"):
        OmegaConf.register_new_resolver("dpbp_help", help_text)
