"""The algorithm registry: every module in this package that defines `ALGORITHM`, plus those
other packages declare under the entry-point group `dpbp.algorithms` (a plug-in outside dpbp).

    from dpbp import algos
    algos.get("fdg").pipelined          # True
    algos.names()                       # every algorithm, in a stable order
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from importlib.metadata import entry_points

from dpbp.algorithm import Algorithm
from dpbp.errors import ConfigError

ENTRY_POINTS = "dpbp.algorithms"


@cache
def _registry() -> dict[str, Algorithm]:
    found: dict[str, Algorithm] = {}
    modules = [importlib.import_module(f"{__name__}.{m.name}")
               for m in pkgutil.iter_modules(__path__)]
    modules += [ep.load() for ep in entry_points(group=ENTRY_POINTS)]
    for mod in modules:
        rec = getattr(mod, "ALGORITHM", None)
        if isinstance(rec, Algorithm):
            if rec.name in found:
                raise ValueError(f"two algorithms are named {rec.name}")
            found[rec.name] = rec
    # the reference first, then the rest by name: listings and sweeps read in a stable order
    return dict(sorted(found.items(), key=lambda kv: (not kv[1].reference, kv[0])))


def names() -> list[str]:
    """Every registered algorithm's name."""
    return list(_registry())


def get(name: str) -> Algorithm:
    """The record of `name`; ConfigError (one sentence) for an unknown name."""
    try:
        return _registry()[name]
    except KeyError:
        raise ConfigError(f"unknown algo '{name}'; choose one of {', '.join(names())}.") from None


def reference() -> Algorithm:
    """The exact-gradient baseline (plain backprop) that every speedup is measured against."""
    return next(a for a in _registry().values() if a.reference)
