"""The papers' CIFAR test accuracies, for `dpbp report`'s adjacent column.

Source: the FDG README's tables (test error %, converted to accuracy = 100 - error), as collected
in shared/reference/algorithms.md, section 8 (DGL: the FDG authors' reruns, §4.6). DNI has
no published numbers in these tables (the DDG and FR papers' DNI columns were not seen).
BP, DDG and FR there are reruns by the FDG authors
(marked * in that table); "DDG reported" numbers are not used. FDG has two entries: beta = 1 and
the best beta of the paper's sweep (only a run with that very beta gets the paper's number).
ResNet-1202's row is left out: the README labels it ambiguously ("WRN-28-10 19.4M").
"""

from __future__ import annotations

from dpbp import algos

# (data, model, K) -> {algo: accuracy %}; "fdg" is beta = 1, "fdg@<beta>" the paper's best beta
_ERRORS: dict[tuple[str, str, int], dict[str, float]] = {
    ("cifar10", "resnet20", 2): {"bp": 7.78, "fdg": 7.92, "fdg@0.2": 7.23},
    ("cifar10", "resnet56", 2): {"bp": 6.19, "ddg": 6.63, "fr": 6.07, "fdg": 6.20,
                                 "fdg@0.5": 5.90, "dgl": 6.77},
    ("cifar10", "resnet110", 2): {"bp": 5.79, "ddg": 6.26, "fr": 5.76, "fdg": 5.79,
                                  "fdg@0.5": 5.73, "dgl": 6.26},
    ("cifar10", "resnet18", 2): {"bp": 4.87, "ddg": 5.00, "fr": 4.80, "fdg": 4.82,
                                 "fdg@0.8": 4.79, "dgl": 5.21},
    ("cifar10", "wrn28_10", 2): {"bp": 4.01, "fdg": 4.13, "fdg@0.7": 3.85},
    ("cifar10", "resnet56", 3): {"bp": 6.19, "ddg": 6.50, "fr": 6.33, "fdg": 6.20,
                                 "fdg@0.5": 6.08, "dgl": 8.88},
    ("cifar10", "resnet56", 4): {"bp": 6.19, "ddg": 6.61, "fr": 6.48, "fdg": 6.83,
                                 "fdg@0.5": 6.14, "dgl": 9.65},
    ("cifar100", "resnet56", 2): {"bp": 27.68, "ddg": 28.44, "fr": 28.39, "fdg": 27.87,
                                  "fdg@0.4": 27.49, "dgl": 29.51},
    ("cifar100", "resnet110", 2): {"bp": 25.82, "ddg": 27.16, "fr": 26.31, "fdg": 25.73,
                                   "fdg@0.5": 25.43, "dgl": 26.80},
    ("cifar100", "resnet18", 2): {"bp": 22.35, "ddg": 22.74, "fr": 22.88, "fdg": 22.78,
                                  "fdg@0.5": 22.18, "dgl": 22.24},
    ("cifar100", "wrn28_10", 2): {"bp": 19.6, "fdg": 20.28, "fdg@0.6": 19.08},
}


def paper_accuracy(data: str, model: str, algo: str, modules: int,
                   beta: float | None = None) -> float | None:
    """The paper's test accuracy (%) for this experiment, or None where the papers have none.

    BP is one module; its paper number is looked up under K = 2 (the papers' BP baseline)."""
    if algo not in algos.names():  # a plug-in this installation does not have
        return None
    entry = _ERRORS.get((data, model, 2 if algos.get(algo).reference else modules))
    if entry is None:
        return None
    if beta is not None and beta != 1.0:
        error = entry.get(f"{algo}@{beta:g}")
    else:
        error = entry.get(algo)
    return None if error is None else round(100.0 - error, 2)
