"""Models from the user's own code: `dpbp train model=custom model._target_=pkg.nets.build ...`.

The callable named by `_target_` (a function or a class) is called through Hydra's
`instantiate`; every other key of the `model` section is passed to it as a keyword argument, and
`in_channels` and `num_classes` (from the data) too when it takes parameters of those names that
the config does not set. It must return an `nn.Sequential` or a list of `nn.Module` blocks: the
run cuts that sequence into K consecutive modules exactly as it cuts a built-in model.

Every process of a run imports the user's module itself (the dist executor's workers are fresh
interpreters, and under torchrun so is every process): the directory `dpbp` was started from is
put on `sys.path`, as `python -m` does, so a module next to where the command ran is found by the
parent, its workers and torchrun's processes alike.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dpbp.errors import ConfigError
from dpbp.models import build_blocks, options

TARGET = "_target_"
MISSING = "???"  # OmegaConf's mandatory value: conf/model/custom.yaml leaves _target_ to the user
FROM_DATA = ("in_channels", "num_classes")  # passed when the callable takes them


def first_line(e: BaseException) -> str:
    """An exception's first line, for a one-sentence error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def is_custom(section: Any) -> bool:
    """Whether a config section names a callable of the user's (has a `_target_` key)."""
    return isinstance(section, dict) and TARGET in section


def split_section(section: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """`{"_target_": path, **args}` -> (path, args); the path must be set."""
    args = {k: v for k, v in section.items() if k != TARGET}
    path = section[TARGET]
    if not isinstance(path, str) or not path.strip() or path == MISSING:
        raise ConfigError("model=custom needs the function that builds the network: add "
                          "model._target_=my_module.build (a dotted path to a callable that "
                          "returns an nn.Sequential or a list of blocks).")
    return path, args


def own_options(section: dict[str, Any]) -> dict[str, Any]:
    """A built-in model section's own keys (`{name, layers, ...}` -> `{layers: ...}`), as its
    builder takes them (models.options)."""
    return {k: section[k] for k in options(str(section.get("name"))) if k in section}


def locate(path: str, key: str) -> Callable[..., Any]:
    """The object at dotted `path`, imported with the working directory on sys.path; `key` is
    the setting that named it (for the error)."""
    from hydra.utils import get_object

    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # what `python -m` gives a script; spawned workers inherit it
    hydra_log = logging.getLogger("hydra.utils")  # it logs the failure before raising it:
    quiet, hydra_log.disabled = hydra_log.disabled, True  # ours is the one line the user sees
    try:
        obj = get_object(path)
    except Exception as e:
        cause = e.__cause__ or e
        raise ConfigError(f"cannot import {key}={path} ({type(cause).__name__}: "
                          f"{first_line(cause)}); put its module "
                          f"in the directory you run dpbp from or on PYTHONPATH.") from None
    finally:
        hydra_log.disabled = quiet
    if not callable(obj):
        raise ConfigError(f"{key}={path} is a {type(obj).__name__}, not a function or class; "
                          "name the callable that builds it.")
    return obj


def _from_data(fn: Callable[..., Any], args: dict[str, Any], given: dict[str, int]
               ) -> dict[str, int]:
    """The data-given arguments that `fn` accepts by name and `args` does not already set."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature: pass nothing extra
        return {}
    return {k: v for k, v in given.items() if k in params and k not in args}


def as_blocks(result: Any, what: str) -> list[nn.Module]:
    """An nn.Sequential or a list/tuple of modules -> the list of its blocks, or ConfigError."""
    if isinstance(result, (nn.Sequential, nn.ModuleList)):
        blocks = list(result)
    elif isinstance(result, (list, tuple)) and all(isinstance(b, nn.Module) for b in result):
        blocks = list(result)
    else:
        kind = type(result).__name__
        if isinstance(result, (list, tuple)):
            odd = next(b for b in result if not isinstance(b, nn.Module))
            kind = f"{kind} holding a {type(odd).__name__}"
        raise ConfigError(f"{what} returned a {kind}; it must return an nn.Sequential or a list "
                          "of nn.Module blocks (the units the run cuts into modules).")
    if not blocks:
        raise ConfigError(f"{what} returned no blocks; return at least one nn.Module.")
    return blocks


def build(path: str, args: dict[str, Any], in_channels: int, num_classes: int
          ) -> list[nn.Module]:
    """Call the user's model builder at `path` with `args` (and the data's in_channels /
    num_classes where it takes them); its blocks, or ConfigError in one sentence."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    fn = locate(path, "model._target_")
    extra = _from_data(fn, args, {"in_channels": in_channels, "num_classes": num_classes})
    what = f"model._target_={path}"
    try:
        result = instantiate({TARGET: path, "_convert_": "all", **args, **extra})
    except InstantiationException as e:  # Hydra wraps what the call raised
        cause = e.__cause__ or e
        raise ConfigError(f"{what} failed with {args} ({type(cause).__name__}: "
                          f"{first_line(cause)}); fix the "
                          "model.* settings or the function.") from None
    return as_blocks(result, what)


def check_runs(blocks: list[nn.Module], sample: tuple[int, ...], path: str, data: str) -> None:
    """Run two zero samples of the data's shape through the blocks: a network that does not fit
    the data is bad input (one sentence), not a traceback from inside a worker."""
    x = torch.zeros(2, *sample)
    modes = [b.training for b in blocks]
    for i, b in enumerate(blocks):
        b.eval()
        try:
            with torch.no_grad():
                x = b(x)
        except Exception as e:
            raise ConfigError(
                f"model._target_={path} fails on data={data}'s samples of shape {list(sample)} "
                f"at block {i} ({type(b).__name__}: {first_line(e)}); make the blocks take "
                "that shape.") from None
        finally:
            b.train(modes[i])
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ConfigError(f"model._target_={path} gives outputs of shape "
                          f"{list(getattr(x, 'shape', []))} per batch; the last block must "
                          "give (batch, classes) logits.")


def describe(blocks: list[nn.Module]) -> list[str]:
    """A label per block: its position and class (`0:Conv2d`, `1:ResBlock`, ...)."""
    return [f"{i}:{type(b).__name__}" for i, b in enumerate(blocks)]


def load_saved(path: str) -> list[nn.Module]:
    """The blocks `dpbp.fit` saved for its run, as every process of the run loads them (the
    saved weights are the starting point, the same in each)."""
    try:
        blocks = torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ImportError) as e:  # a class the saving process had, this one not
        raise ConfigError(f"the model saved in {path} uses a class this process cannot import "
                          f"({first_line(e)}); define your layers in a module (a file you "
                          "import), not in a notebook cell.") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise ConfigError(f"cannot read the saved model {path} ({first_line(e)}).") from None
    return as_blocks(blocks, f"the model saved in {path}")


def section_blocks(section: dict[str, Any], in_channels: int, num_classes: int,
                   context: int | None = None) -> list[nn.Module]:
    """The blocks of a `model` config section, built-in ({name, its own keys}) or the user's
    ({_target_}); `context`: tokens per sample, for a language model."""
    if is_custom(section):
        return build(*split_section(section), in_channels, num_classes)
    return build_blocks(section["name"], in_channels, num_classes, context=context,
                        **own_options(section))


def section_overrides(section: dict[str, Any]) -> list[str]:
    """The `dpbp train` overrides that select a `model` config section (e.g. for dpbp bench),
    with a built-in model's own keys as the section has them."""
    if not is_custom(section):
        return [f"model={section['name']}",
                *(f"model.{k}={json.dumps(v)}" for k, v in own_options(section).items())]
    path, args = split_section(section)
    return ["model=custom", f"model._target_={path}",
            *(f"++model.{k}={json.dumps(v)}" for k, v in args.items())]


def section_title(section: dict[str, Any]) -> str:
    """How a `model` config section is named in tables: its name, or the builder's path."""
    return str(section[TARGET] if is_custom(section) else section["name"])
