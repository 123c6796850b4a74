"""dpbp: decoupled parallel backprop (BP, DDG, Features Replay, FDG) as an experiment runner."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`dpbp.fit` (api.py), imported on first use: the command line does not pay for it."""
    if name == "fit":
        from dpbp.api import fit

        return fit
    raise AttributeError(f"module 'dpbp' has no attribute {name!r}")
