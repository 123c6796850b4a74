"""`dpbp report DIR...`: the accuracy/speed table of a sweep, from its summary.json files.

    dpbp report multirun/2026-11-21/10-00-00                 # markdown on stdout
    dpbp report multirun/... --out results/digits_parity     # also writes .md and .csv
    dpbp report multirun/... --tensorboard                   # also the speedups in TensorBoard

Runs are grouped by their whole resolved config except the seed (and keys that do not change the
numbers: executor, logging, paths), with the device the run actually used; identical runs (same
settings and seed) are merged, then seeds averaged (mean ± sample std). Settings that differ
between groups besides algo and gpus (a beta sweep, stash vs live, ...) are named in the row.

Every row is compared with its baseline: the one-worker run of the reference algorithm (BP,
`algos.reference()`) on the same device, model, data and batch size (of several, the one that
shares the most other settings). Against it: the gap in final accuracy, the speedup in images/s,
and time to accuracy (time_to_acc.py): the training seconds to reach the baseline's final
accuracy minus one point, and the speedup in that time, the fair one. A row without a baseline
gets a line saying how to add one. On CIFAR, the papers' accuracy for the same model, algo and K
sits in the last column (dpbp/paper.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpbp import algos
from dpbp.config import flatten
from dpbp.errors import ConfigError
from dpbp.paper import paper_accuracy
from dpbp.time_to_acc import MARGIN, seconds_to

# keys that do not change a run's numbers (local == dist is tested), that the launcher derives,
# or (device) that the summary holds resolved
IGNORED = ("seed", "resume", "executor", "trainer.progress", "trainer.check_every",
           "trainer.checkpoint", "trainer.threads", "data.root", "data.download", "dist.",
           "split.balance", "device")
# what a baseline must share with a row besides the device and the model
MATCH = ("data.", "trainer.batch_size")

COLUMNS = ["data", "model", "algo", "modules", "replicas", "epochs", "seeds", "settings",
           "final_acc", "best_acc", "gap_to_bp", "images_per_second", "speedup", "train_seconds",
           "seconds_to_target", "time_speedup", "peak_memory_mib", "paper_acc"]


def load_summaries(dirs: list[str]) -> list[dict[str, Any]]:
    """Every completed summary.json below the given directories; each gets a `run_dir` key."""
    out = []
    for d in dirs:
        root = Path(d)
        if not root.exists():
            raise ConfigError(f"{root} does not exist; give run or sweep directories.")
        files = [root] if root.name == "summary.json" else sorted(root.rglob("summary.json"))
        for f in files:
            try:
                s = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read {f} ({e}); remove it or the run.") from None
            if s.get("status") == "completed":
                out.append({**s, "run_dir": str(f.parent)})
    if not out:
        raise ConfigError(f"no completed summary.json under {', '.join(dirs)}.")
    return out


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def device(s: dict[str, Any]) -> str:
    """The device a run used (resolved: `device=auto` ran on cpu or cuda)."""
    return str(s.get("device") or s.get("config", {}).get("device", "?"))


def settings(s: dict[str, Any]) -> tuple:
    """What makes a run a different experiment than another: its config minus IGNORED."""
    flat = flatten(s.get("config", {}))
    return tuple(sorted((k, str(v)) for k, v in flat.items() if not k.startswith(IGNORED)))


@dataclass
class Group:
    """One experiment: runs with the same settings; `seeds` maps a seed to its runs."""

    data: str
    model: str
    algo: str
    modules: int
    replicas: int
    epochs: int
    device: str
    settings: tuple
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_seeds(self) -> int:
        """Distinct seeds (identical runs count once)."""
        return len({r.get("seed") for r in self.runs})

    @property
    def reference(self) -> bool:
        """Whether this is a baseline: the reference algorithm on one worker."""
        return self.algo == algos.reference().name and self.modules * self.replicas == 1

    def match_key(self) -> tuple:
        """What its baseline must share: device, model and MATCH settings."""
        return (self.device, self.model, tuple(kv for kv in self.settings
                                               if kv[0].startswith(MATCH)))

    def per_seed(self, value) -> list[float | None]:
        """value(run) averaged over identical runs (same seed): one number per seed."""
        seeds: dict[Any, list] = defaultdict(list)
        for r in self.runs:
            seeds[r.get("seed")].append(value(r))
        out = []
        for vs in seeds.values():
            out.append(None if any(v is None for v in vs) else statistics.fmean(vs))
        return out

    def shared_with(self, other: Group) -> int:
        """How many settings (other than the algorithm's and the workers) the two share."""
        mine = {kv for kv in self.settings if not kv[0].startswith(("algo.", "gpus"))}
        return len(mine & set(other.settings)) + (self.epochs == other.epochs)


def group_runs(summaries: list[dict[str, Any]]) -> list[Group]:
    """Summaries grouped into experiments."""
    groups: dict[tuple, Group] = {}
    for s in summaries:
        key = (s["data"], s["model"], s["algo"], s["modules"], s["replicas"], s["epochs"],
               device(s), settings(s))
        groups.setdefault(key, Group(*key)).runs.append(s)
    return list(groups.values())


def baselines(groups: list[Group]) -> dict[int, Group | None]:
    """id(group) -> its baseline group (None: no matching reference run)."""
    refs: dict[tuple, list[Group]] = defaultdict(list)
    for g in groups:
        if g.reference:
            refs[g.match_key()].append(g)
    out: dict[int, Group | None] = {}
    for g in groups:
        candidates = refs.get(g.match_key(), [])
        out[id(g)] = (g if g.reference else
                      max(candidates, key=g.shared_with, default=None))
    return out


@dataclass
class Baseline:
    """A baseline's numbers: median images/s, mean final accuracy, the target and its time."""

    group: Group
    images_per_second: float
    final_acc: float
    target: float
    seconds: float | None  # mean over seeds of its own time to the target

    @classmethod
    def of(cls, g: Group) -> Baseline:
        final = statistics.fmean(v for v in g.per_seed(lambda r: r["final_test_acc"]))
        target = final - MARGIN
        times = g.per_seed(lambda r: time_to(r, target))
        return cls(g, statistics.median(r["images_per_second"] for r in g.runs), final, target,
                   None if None in times or not times else statistics.fmean(times))


def time_to(run: dict[str, Any], target: float) -> float | None:
    """A run's training seconds to reach `target` (None: never, or no history)."""
    if not run.get("history"):
        return None
    return seconds_to(run["history"], target, run.get("initial_test_acc"))


def row(g: Group, base: Baseline | None) -> dict[str, Any]:
    """The table row of one experiment."""
    final = _mean_std(g.per_seed(lambda r: r["final_test_acc"]))
    ips = statistics.median(r["images_per_second"] for r in g.runs)
    times = g.per_seed(lambda r: time_to(r, base.target)) if base else []
    reached = [t for t in times if t is not None]
    seconds = statistics.fmean(reached) if reached else None
    first = g.runs[0]
    return {
        "data": g.data, "model": g.model, "algo": g.algo, "modules": g.modules,
        "replicas": g.replicas, "epochs": g.epochs, "seeds": g.num_seeds,
        "settings": "", "final_acc": final,
        "best_acc": _mean_std(g.per_seed(lambda r: r["best_test_acc"])),
        "gap_to_bp": None if base is None else final[0] - base.final_acc,
        "images_per_second": ips,
        "speedup": None if base is None else ips / base.images_per_second,
        "train_seconds": statistics.median(r["train_seconds"] for r in g.runs),
        "seconds_to_target": seconds, "reached": f"{len(reached)}/{len(times)}",
        "time_speedup": (base.seconds / seconds if base and base.seconds and seconds
                         and len(reached) == len(times) else None),
        "peak_memory_mib": [None if b is None else b / 2**20
                            for b in first.get("peak_memory_bytes") or []],
        "paper_acc": paper_accuracy(g.data, g.model, g.algo, g.modules,
                                    first.get("config", {}).get("algo", {}).get("beta")),
        "aux_parameters": first.get("aux_parameters"),
        "aux_flops": first.get("aux_flops"),
        # language models (data=text): exp of the mean test token loss, mean over seeds
        "final_perplexity": (_mean_std(g.per_seed(lambda r: r["final_test_perplexity"]))
                             if first.get("final_test_perplexity") is not None else None),
    }


def varying_settings(groups: list[Group]) -> set[str]:
    """Settings that vary between groups, apart from those with columns of their own; an algo.*
    key counts only where it varies between runs of the same algorithm."""
    values: dict[tuple[str, str], set[str]] = defaultdict(set)
    for g in groups:
        for k, v in g.settings:
            values[(g.algo if k.startswith("algo.") else "", k)].add(v)
    return {k for (_, k), vs in values.items() if len(vs) > 1 and not k.startswith(
            ("algo.name", "gpus", "model", "data.name", "trainer.epochs"))}


def table(summaries: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per experiment (seeds averaged, each against its baseline), and the notes on the
    baselines: which one each row used, or how to add a missing one."""
    groups = group_runs(summaries)
    base_of = baselines(groups)
    computed = {id(b): Baseline.of(b) for b in base_of.values() if b is not None}
    varying = varying_settings(groups)
    ref = algos.reference().name
    rows = []
    for g in sorted(groups, key=lambda g: (g.data, g.model, g.device, g.epochs,
                                           g.algo != ref, g.algo, g.modules, g.settings)):
        b = base_of[id(g)]
        r = row(g, computed[id(b)] if b is not None else None)
        r["settings"] = " ".join(f"{k}={v}" for k, v in g.settings if k in varying)
        r["device"], r["_group"], r["_base"] = g.device, g, b
        rows.append(r)
    return rows, notes(rows, computed) + aux_notes(rows)


def aux_notes(rows: list[dict[str, Any]]) -> list[str]:
    """One line per row whose modules train companions (DGL's auxiliary heads, DNI's gradient
    predictors): their parameters and multiply-adds, which the network's count leaves out."""
    out = []
    for r in rows:
        if r.get("aux_parameters"):
            params = " / ".join(f"{n:,}" for n in r["aux_parameters"])
            flops = " / ".join(f"{f / 1e6:.2f}" for f in r["aux_flops"])
            out.append(f"Auxiliary models of {r['algo']} K={r['modules']} {r['settings']}"
                       .rstrip() + f" (not in the network's parameters): {params} parameters "
                       f"and {flops} MFLOPs per sample, per module.")
    return out


def describe(g: Group) -> str:
    """device, model, data and batch of a group, in words."""
    batch = dict(g.settings).get("trainer.batch_size", "?")
    return f"{g.device} {g.model} {g.data} batch {batch}"


def notes(rows: list[dict[str, Any]], computed: dict[int, Baseline]) -> list[str]:
    """One line per baseline (what it is, its target), one per set of rows without one."""
    out = []
    for b in computed.values():
        g = b.group
        when = "never" if b.seconds is None else f"in {b.seconds:.1f} s"
        users = [r["_group"] for r in rows if r["_base"] is g and r["_group"] is not g]
        differ = sorted({k for u in users for k, v in set(u.settings) ^ set(g.settings)
                         if not k.startswith(("algo.", "gpus"))}
                        | ({"trainer.epochs"} if any(u.epochs != g.epochs for u in users)
                           else set()))
        out.append(f"Baseline for {describe(g)}: {g.algo} on 1 worker, {g.num_seeds} seed(s), "
                   f"{b.images_per_second:.0f} images/s, final test acc "
                   f"{100 * b.final_acc:.2f}%; target {100 * b.target:.2f}% (final - 1 point), "
                   f"reached {when}." + (f" It differs from rows it serves in "
                                        f"{', '.join(differ)}." if differ else ""))
    missing: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["_base"] is None:
            missing[r["_group"].match_key()].append(r)
    for rs in missing.values():
        names = ", ".join(f"{r['algo']} K={r['modules']}" for r in rs)
        out.append(f"No baseline for {describe(rs[0]['_group'])} ({names}): speedup and time "
                   f"to accuracy need a one-worker {algos.reference().name} run on the same "
                   f"device, model, data and batch; add one with `{baseline_command(rs)}` and "
                   "give its directory to dpbp report too.")
    return out


def baseline_command(rows: list[dict[str, Any]]) -> str:
    """The command that runs the missing baseline of these rows: their first run's overrides
    (.hydra/overrides.yaml) with the reference algorithm on one worker, over their seeds."""
    from omegaconf import OmegaConf

    runs = [run for r in rows for run in r["_group"].runs]
    hydra = [run for run in runs if (Path(run["run_dir"]) / ".hydra/overrides.yaml").is_file()]
    first = (hydra or runs)[0]
    dropped = ("algo", "gpus", "seed", "resume", "executor", "hydra.")
    path = Path(first["run_dir"]) / ".hydra" / "overrides.yaml"
    if path.is_file():
        given = [str(o) for o in OmegaConf.load(path)]
        kept = [o for o in given if not o.lstrip("+~").split("=")[0].startswith(dropped)]
    else:
        cfg = first.get("config", {})
        kept = [f"device={first.get('device', 'auto')}", f"model={first['model']}",
                f"data={first['data']}",
                f"trainer.batch_size={cfg.get('trainer', {}).get('batch_size', '?')}",
                f"trainer.epochs={first['epochs']}"]
    seeds = sorted({run.get("seed", 0) for run in runs})
    sweep = ["-m"] if len(seeds) > 1 else []
    return " ".join(["dpbp", "train", *sweep, f"algo={algos.reference().name}", "gpus=1", *kept,
                     f"seed={','.join(map(str, seeds))}"])


def _num(x: float | None, fmt: str, none: str = "–") -> str:
    return none if x is None else format(x, fmt)


def _perplexity(value: tuple[float, float] | None) -> str:
    return "–" if value is None else f"{value[0]:.3f} ± {value[1]:.3f}"


def _to_target(r: dict[str, Any]) -> str:
    if r["_base"] is None:
        return "–"
    if r["seconds_to_target"] is None:
        return "never"
    done, total = r["reached"].split("/")
    return f"{r['seconds_to_target']:.1f}" + ("" if done == total else f" ({r['reached']})")


def markdown(rows: list[dict[str, Any]], lines_after: list[str]) -> str:
    """The table as markdown, then the notes on the baselines (one paragraph each)."""
    head = ("| data | model | device | algo | K | settings | epochs | seeds | final test acc % "
            "| best test acc % | final − BP (points) | images/s (median) | speedup × "
            "| train s (median) | s to BP final − 1 pt | speedup to BP final − 1 pt × "
            "| peak memory per module (MiB) | paper test acc % | final test perplexity |")
    lines = [head, "|" + "---|" * 19]
    for r in rows:
        gap = _num(None if r["gap_to_bp"] is None else 100 * r["gap_to_bp"], "+.2f")
        mem = " / ".join("–" if m is None else f"{m:.1f}" for m in r["peak_memory_mib"])
        lines.append(
            f"| {r['data']} | {r['model']} | {r['device']} | {r['algo']} | {r['modules']} "
            f"| {r['settings']} | {r['epochs']} | {r['seeds']} "
            f"| {100 * r['final_acc'][0]:.2f} ± {100 * r['final_acc'][1]:.2f} "
            f"| {100 * r['best_acc'][0]:.2f} ± {100 * r['best_acc'][1]:.2f} | {gap} "
            f"| {r['images_per_second']:.0f} | {_num(r['speedup'], '.2f')} "
            f"| {r['train_seconds']:.1f} | {_to_target(r)} | {_num(r['time_speedup'], '.2f')} "
            f"| {mem} | {_num(r['paper_acc'], '.2f')} | {_perplexity(r['final_perplexity'])} |")
    notes_text = "".join(f"\n{line}\n" for line in lines_after)
    return "\n".join(lines) + "\n" + notes_text


CSV_COLUMNS = ["data", "model", "device", "algo", "modules", "replicas", "epochs", "seeds",
               "settings", "final_acc_mean", "final_acc_std", "best_acc_mean", "best_acc_std",
               "gap_to_bp", "images_per_second", "speedup", "train_seconds",
               "seconds_to_target", "time_speedup", "peak_memory_mib", "paper_acc",
               "final_perplexity_mean"]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """The table as CSV (CSV_COLUMNS; accuracies as fractions, mean and std apart)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            flat = {**r, "final_acc_mean": r["final_acc"][0], "final_acc_std": r["final_acc"][1],
                    "best_acc_mean": r["best_acc"][0], "best_acc_std": r["best_acc"][1],
                    "final_perplexity_mean": (None if r["final_perplexity"] is None
                                              else r["final_perplexity"][0])}
            w.writerow([flat[c] for c in CSV_COLUMNS])


def write_tensorboard(rows: list[dict[str, Any]]) -> int:
    """Each run's speedup and time to accuracy against its baseline, as the vs_bp/* scalars of
    its TensorBoard run (the HParams tab's metrics, hparams.py); a rerun replaces them. Returns
    how many runs got them."""
    from torch.utils.tensorboard import SummaryWriter

    written = 0
    for r in rows:
        if r["_base"] is None:
            continue
        base = Baseline.of(r["_base"])
        for run in r["_group"].runs:
            run_dir = Path(run["run_dir"])
            for old in run_dir.glob("events.out.tfevents.*.report"):
                old.unlink()
            seconds = time_to(run, base.target)
            values = {"vs_bp/speedup": run["images_per_second"] / base.images_per_second,
                      "vs_bp/seconds_to_target": seconds,
                      "vs_bp/time_speedup": base.seconds / seconds if base.seconds and seconds
                      else None}
            with SummaryWriter(str(run_dir), filename_suffix=".report") as w:
                for tag, v in values.items():
                    if v is not None:
                        w.add_scalar(tag, v, global_step=run.get("steps", 0))
            written += 1
    return written


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dpbp report", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="run or sweep directories holding summary.json")
    p.add_argument("--out", help="also write OUT.md and OUT.csv")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write each run's speedup and time to accuracy against its "
                        "baseline into its TensorBoard events (the HParams tab's vs_bp/*)")
    args = p.parse_args(argv)
    try:
        rows, lines = table(load_summaries(args.dirs))
    except ConfigError as e:
        print(f"dpbp: {e}", file=sys.stderr)
        return 2
    text = markdown(rows, lines)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        write_csv(rows, out.with_suffix(".csv"))
    if args.tensorboard:
        n = write_tensorboard(rows)
        print(f"vs_bp/* scalars written to {n} run(s) with a baseline.", file=sys.stderr)
    return 0
