"""`dpbp report DIR...`: the accuracy/speed table of a sweep, from its summary.json files.

    dpbp report multirun/2026-11-21/10-00-00                 # markdown on stdout
    dpbp report multirun/... --out results/digits_parity     # also writes .md and .csv

Runs are grouped by their whole resolved config except the seed (and keys that do not change the
numbers: executor, logging, paths); seeds are averaged (mean ± sample std). Settings that differ
between groups besides algo and gpus (a beta sweep, stash vs live, ...) are named in the row. The
gap is measured against BP on one module with the same data, model and epochs. On CIFAR, the
papers' accuracy for the same model, algo and K sits in the last column (dpbp/paper.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from dpbp import algos
from dpbp.config import flatten
from dpbp.errors import ConfigError
from dpbp.paper import paper_accuracy

# keys that do not change a run's numbers (local == dist is tested), or that the launcher derives
IGNORED = ("seed", "resume", "executor", "trainer.progress", "trainer.check_every",
           "trainer.checkpoint", "trainer.threads", "data.root", "data.download", "dist.",
           "split.balance")

COLUMNS = ["data", "model", "algo", "modules", "replicas", "epochs", "seeds", "settings",
           "final_acc",
           "best_acc", "gap_to_bp", "images_per_second", "train_seconds", "peak_memory_mib",
           "paper_acc"]


def load_summaries(dirs: list[str]) -> list[dict[str, Any]]:
    """Every completed summary.json below the given directories."""
    out = []
    for d in dirs:
        root = Path(d)
        if not root.exists():
            raise ConfigError(f"{root} does not exist; give run or sweep directories.")
        files = [root] if root.name == "summary.json" else sorted(root.rglob("summary.json"))
        for f in files:
            s = json.loads(f.read_text())
            if s.get("status") == "completed":
                out.append(s)
    if not out:
        raise ConfigError(f"no completed summary.json under {', '.join(dirs)}.")
    return out


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def settings(s: dict[str, Any]) -> tuple:
    """What makes a run a different experiment than another: its config minus IGNORED."""
    flat = flatten(s.get("config", {}))
    return tuple(sorted((k, str(v)) for k, v in flat.items() if not k.startswith(IGNORED)))


def table(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per experiment (all settings but the seed), seeds averaged."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for s in summaries:
        key = (s["data"], s["model"], s["algo"], s["modules"], s["replicas"], s["epochs"],
               settings(s))
        groups[key].append(s)
    # settings that vary between groups, apart from the ones with columns of their own; an
    # algo.* key counts only where it varies between runs of the same algorithm
    values: dict[tuple[str, str], set[str]] = defaultdict(set)
    for key in groups:
        for k, v in key[6]:
            values[(key[2] if k.startswith("algo.") else "", k)].add(v)
    varying = {k for (_, k), vs in values.items() if len(vs) > 1 and not k.startswith(
               ("algo.name", "gpus", "model", "data.name", "trainer.epochs"))}
    def baseline_key(k: tuple) -> tuple:  # the same experiment with algo=bp gpus=1
        return (k[0], k[1], k[5], tuple(kv for kv in k[6] if not kv[0].startswith(("algo.",
                                                                                     "gpus"))))

    ref = algos.reference().name
    bp = {baseline_key(k): _mean_std([s["final_test_acc"] for s in v])[0]
          for k, v in groups.items() if k[2] == ref and k[3] == 1}
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[5], k[2] != ref, k[2], k[3])):
        runs = groups[key]
        final = _mean_std([s["final_test_acc"] for s in runs])
        best = _mean_std([s["best_test_acc"] for s in runs])
        base = bp.get(baseline_key(key))
        rows.append({
            "data": key[0], "model": key[1], "algo": key[2], "modules": key[3],
            "replicas": key[4], "epochs": key[5], "seeds": len({s["seed"] for s in runs}),
            "settings": " ".join(f"{k}={v}" for k, v in key[6] if k in varying),
            "final_acc": final, "best_acc": best,
            "gap_to_bp": None if base is None else final[0] - base,
            "images_per_second": statistics.median(s["images_per_second"] for s in runs),
            "train_seconds": statistics.median(s["train_seconds"] for s in runs),
            "peak_memory_mib": [None if b is None else b / 2**20
                                for b in runs[0].get("peak_memory_bytes") or []],
            "paper_acc": paper_accuracy(key[0], key[1], key[2], key[3],
                                        runs[0].get("config", {}).get("algo", {}).get("beta")),
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| data | model | algo | K | settings | epochs | seeds | final test acc % "
            "| best test acc % | final − BP (points) | images/s (median) | train s (median) "
            "| peak memory per module (MiB) | paper test acc % |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        gap = "–" if r["gap_to_bp"] is None else f"{100 * r['gap_to_bp']:+.2f}"
        lines.append(
            f"| {r['data']} | {r['model']} | {r['algo']} | {r['modules']} | {r['settings']} "
            f"| {r['epochs']} "
            f"| {r['seeds']} | {100 * r['final_acc'][0]:.2f} ± {100 * r['final_acc'][1]:.2f} "
            f"| {100 * r['best_acc'][0]:.2f} ± {100 * r['best_acc'][1]:.2f} | {gap} "
            f"| {r['images_per_second']:.0f} | {r['train_seconds']:.1f} "
            f"| {' / '.join('–' if m is None else f'{m:.1f}' for m in r['peak_memory_mib'])} "
            f"| {'–' if r['paper_acc'] is None else format(r['paper_acc'], '.2f')} |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*COLUMNS[:8], "final_acc_mean", "final_acc_std", "best_acc_mean",
                    "best_acc_std", *COLUMNS[10:]])
        for r in rows:
            w.writerow([r[c] for c in COLUMNS[:8]] + [*r["final_acc"], *r["best_acc"]]
                       + [r[c] for c in COLUMNS[10:]])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dpbp report", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="run or sweep directories holding summary.json")
    p.add_argument("--out", help="also write OUT.md and OUT.csv")
    args = p.parse_args(argv)
    try:
        rows = table(load_summaries(args.dirs))
    except ConfigError as e:
        print(f"dpbp: {e}", file=sys.stderr)
        return 2
    text = markdown(rows)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        write_csv(rows, out.with_suffix(".csv"))
    return 0
