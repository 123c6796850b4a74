"""Time to accuracy: the training seconds a run needed to first reach a test accuracy.

This is the fair speedup (the one the decoupled-backprop papers argue about): a faster algorithm
that loses accuracy reaches a demanding target late or never. Seconds are `train_seconds` (the
run loop's clock: evaluation and checkpoints excluded) at the end of the first epoch whose
evaluation reached the target, so the figure has the resolution of one epoch.

A run's summary records the seconds to a few fixed levels and to its own final accuracy minus
one point; `dpbp report` computes the comparison across runs from the histories, with one target
for a whole sweep: the baseline's (one-worker BP's) final accuracy minus one point.
"""

from __future__ import annotations

from typing import Any

LEVELS = (0.5, 0.8, 0.9, 0.95, 0.99)  # fixed test accuracies (fractions) a summary reports
MARGIN = 0.01  # "final accuracy minus one point"
_EPS = 1e-9  # an accuracy equal to the target up to float rounding reached it


def seconds_to(history: list[dict[str, Any]], target: float,
               initial_acc: float | None = None) -> float | None:
    """Training seconds at the first evaluation with test accuracy >= target; 0 when the
    untrained model (`initial_acc`, the evaluation at step 0) already had it; None if never."""
    if initial_acc is not None and initial_acc >= target - _EPS:
        return 0.0
    for entry in history:
        if entry["test_acc"] >= target - _EPS:
            return float(entry["train_seconds"])
    return None


def level_name(level: float) -> str:
    """The summary key of a fixed level: 0.9 -> "0.9"."""
    return f"{level:g}"


def summary_keys(history: list[dict[str, Any]],
                 initial_acc: float | None = None) -> dict[str, Any]:
    """What a run's summary.json says about its own time to accuracy."""
    if not history:
        return {"seconds_to_acc": {}, "seconds_to_final_minus_1pt": None}
    final = history[-1]["test_acc"]
    return {
        "seconds_to_acc": {level_name(lv): seconds_to(history, lv, initial_acc)
                           for lv in LEVELS},
        "seconds_to_final_minus_1pt": seconds_to(history, final - MARGIN, initial_acc),
    }
