"""`dpbp bench`: timed short trainings of each algorithm on 1..W workers, side by side.

    dpbp bench                                     # ResNet-20, synthetic 32x32, CPU, 1-2 workers
    dpbp bench algos=[bp,ddg,fdg,ddp,gpipe] gpus=[1,2,4] device=cuda
    dpbp bench predict=true predict_gpus=[1,2,4,8] # plus the simulator's prediction

Every measurement is a real `dpbp train` run in its own process tree (the same code users train
with), on synthetic data sized so that an epoch is `steps_per_epoch` steps (a real dataset keeps
its size). Epoch 1 is the
warm-up and is not timed; images/s = images of the later epochs / their training seconds
(evaluation excluded). Repeats are interleaved (every row once, then every row again) so that
drift of a shared machine hits all rows alike; a row's figure is the median over its repeats,
with the spread (min-max) beside it. `time_budget_s` starts no repeat that would not end inside
the budget (judged by the repeats so far) and no case once it is spent.

Multi-module runs are cut by the bench's `split`: `time` (the default) profiles each block's
forward, backward and step once in the bench's process and gives every run with K modules the
same balanced counts (`split.balance`); on a CPU the early blocks, with wide feature maps and few
channels, cost several times more per flop than the late ones, and a flops split made module 1
of ResNet-20 the bottleneck of every 2-module pipeline. `flops` leaves each run to `dpbp train`'s
default split (counted flops).

Per row: images/s, speedup over BP on one worker, parallel efficiency (speedup / workers), the
machine's ceiling (W independent one-worker BP processes side by side, no communication: the
speedup the hardware allows) and efficiency against it (also per repeat, against that repeat's
ceiling, lowest–highest: a drift of the machine moves both alike), peak memory per module, and
the share of time each module computed rather than waited (CPU runs; from the run's
summary.json, warm-up included). With predict=true, each measured row also gets the
simulator's speedup for a run of the same length (fill, drain and the untimed first epoch as in
the run) and its error against the measurement. Output: a rich table, bench.json (every
measurement and the rows), bench.md and bench.png (speedup vs workers, ideal and ceiling lines)
in the bench's run directory; all of them are rewritten after every repeat, and bench.json after
every case, so a bench that is stopped keeps what it measured.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dpbp import algos as registry
from dpbp import custom

CEILING = "ceiling"  # the pseudo-algo of W independent BP processes


@dataclass(frozen=True)
class Case:
    """One row of the bench: an algorithm on `workers` processes (devices)."""

    algo: str
    workers: int
    replicas: int = 1  # data-parallel replicas (ddp: workers; dp_fdg: workers // 2)

    @property
    def name(self) -> str:
        return f"{self.algo}-w{self.workers}"

    @property
    def modules(self) -> int:
        return self.workers // self.replicas


def plan(algos: list[str], gpus: list[int], ceiling: bool) -> list[Case]:
    """The cases to measure, in a fixed order: BP on one worker first (every speedup's base).

    An algorithm's record says how it uses W workers (`layout`): ddg/fr/fdg on one module would
    be BP and skip W = 1; dp_fdg runs 2-module pipelines and needs an even W >= 4."""
    ref = registry.reference().name
    cases = [Case(ref, 1)]
    for w in sorted(set(gpus)):
        for a in algos:
            layout = registry.get(a).layout(w)
            if (a == ref and w == 1) or layout is None or w < registry.get(a).min_workers:
                continue
            cases.append(Case(a, w, layout[1]))
        if ceiling and w > 1:
            cases.append(Case(CEILING, w, w))
    return cases


def timed_throughput(history: list[dict[str, Any]]) -> tuple[float, int, float]:
    """(images/s, images, seconds) over every epoch but the first (the warm-up)."""
    if len(history) < 2:
        raise ValueError("a bench run needs at least 2 epochs: the first is the warm-up")
    seconds = history[-1]["train_seconds"] - history[0]["train_seconds"]
    images = sum(e["images"] for e in history[1:])
    return images / seconds, images, seconds


@dataclass
class Measurement:
    """One timed run (or one ceiling group of W runs) of a case, in one repeat."""

    algo: str
    workers: int
    repeat: int
    status: str
    images_per_second: float | None = None
    images: int | None = None
    seconds: float | None = None
    peak_memory_bytes: list[int | None] = field(default_factory=list)
    compute_share: list[float | None] = field(default_factory=list)
    split: list[int] = field(default_factory=list)  # blocks per module, as the run cut them
    run_dir: str = ""
    error: str | None = None


def measurement(case: Case, repeat: int, summaries: list[dict[str, Any]],
                run_dir: str) -> Measurement:
    """Bookkeeping of a case's summaries (one; W for the ceiling, whose throughputs add up)."""
    bad = [s for s in summaries if s.get("status") != "completed"]
    if bad:
        return Measurement(case.algo, case.workers, repeat, "failed", run_dir=run_dir,
                           error=bad[0].get("error", "no summary.json"))
    parts = [timed_throughput(s["history"]) for s in summaries]
    s = summaries[0]
    compute, idle = s.get("compute_seconds"), s.get("idle_seconds")
    share = ([c / (c + i) if c is not None and i is not None and c + i > 0 else None
              for c, i in zip(compute, idle)] if compute and idle else [])
    return Measurement(case.algo, case.workers, repeat, "completed",
                       images_per_second=sum(p[0] for p in parts),
                       images=sum(p[1] for p in parts), seconds=max(p[2] for p in parts),
                       peak_memory_bytes=list(s.get("peak_memory_bytes") or []),
                       compute_share=share, split=list(s.get("split") or []),
                       run_dir=run_dir)


def spread(values: list[float]) -> tuple[float | None, float | None, float | None]:
    """(min, max, (max - min) / median) of a row's repeats; Nones when there are none."""
    if not values:
        return None, None, None
    mid = statistics.median(values)
    return min(values), max(values), (max(values) - min(values)) / mid if mid else None


def rows(cases: list[Case], measurements: list[Measurement]) -> list[dict[str, Any]]:
    """Per case: median images/s over repeats and their spread (min-max), speedup over BP on
    one worker, efficiency, and the efficiency against the machine's ceiling at the same worker
    count."""
    def median_ips(c: Case) -> float | None:
        ips = [m.images_per_second for m in measurements
               if (m.algo, m.workers) == (c.algo, c.workers) and m.status == "completed"]
        return statistics.median(ips) if ips else None

    base = median_ips(Case(registry.reference().name, 1))
    ceiling = {c.workers: median_ips(c) for c in cases if c.algo == CEILING}
    # each repeat's ceiling, for the share of it measured minutes apart rather than runs apart
    ceiling_in = {(m.workers, m.repeat): m.images_per_second for m in measurements
                  if m.algo == CEILING and m.status == "completed"}
    out = []
    for c in cases:
        ips = median_ips(c)
        mine = [m for m in measurements if (m.algo, m.workers) == (c.algo, c.workers)]
        done = [m for m in mine if m.status == "completed"]
        speedup = ips / base if ips and base else None
        ceil = ceiling.get(c.workers) if c.workers > 1 else base
        ceil_speedup = ceil / base if ceil and base else None
        low, high, rel = spread([m.images_per_second for m in done])
        paired = [m.images_per_second / ceiling_in[(m.workers, m.repeat)] for m in done
                  if c.algo != CEILING and c.workers > 1 and (m.workers, m.repeat) in ceiling_in]
        share_low, share_high, _ = spread(paired)
        out.append({
            "algo": c.algo, "workers": c.workers, "modules": c.modules, "replicas": c.replicas,
            "repeats": len(done), "failed": len(mine) - len(done),
            "images_per_second": ips,
            "images_per_second_all": [m.images_per_second for m in done],
            "images_per_second_min": low, "images_per_second_max": high, "spread": rel,
            "speedup": speedup,
            "efficiency": speedup / c.workers if speedup else None,
            "ceiling_speedup": ceil_speedup,
            "efficiency_vs_ceiling": speedup / ceil_speedup if speedup and ceil_speedup
            else None,
            # images/s over the same repeat's ceiling, lowest and highest over the repeats
            "vs_ceiling_min": share_low, "vs_ceiling_max": share_high,
            "peak_memory_bytes": done[len(done) // 2].peak_memory_bytes if done else [],
            "compute_share": done[len(done) // 2].compute_share if done else [],
            "split": done[len(done) // 2].split if done else [],
        })
    return out


def attach_predictions(rows: list[dict[str, Any]], predictions: list[dict[str, Any]]) -> None:
    """Put the simulator's speedups beside each measured row, in place: `predicted_speedup` (a
    long run), `predicted_run_speedup` (a run as long as the bench's) and `prediction_error`, the
    relative error of the latter against the measured speedup ((predicted - measured) /
    measured); None where there is no prediction or no measurement."""
    by_case = {(p["algo"], p["workers"]): p for p in predictions}
    for r in rows:
        p = by_case.get((r["algo"], r["workers"]), {})
        run = p.get("speedup_run")
        r["predicted_speedup"] = p.get("speedup")
        r["predicted_run_speedup"] = run
        r["prediction_error"] = (run - r["speedup"]) / r["speedup"] if run and r["speedup"] \
            else None


def train_overrides(cfg: dict[str, Any], case: Case, balance: list[int] | None = None
                    ) -> list[str]:
    """The `dpbp train` command line of one case (minus the run directory); `balance`: the
    bench's split of a multi-module case (else the run splits by its own default)."""
    data = dict(cfg["data"])
    steps, batch = cfg["steps_per_epoch"], cfg["batch_size"]
    if data["name"] == "synthetic":  # real datasets keep their size: an epoch is all of it
        data["train_size"] = steps * batch * case.replicas
        data["test_size"] = batch
    algo = registry.reference().name if case.algo == CEILING else case.algo
    gpus = 1 if case.algo == CEILING else case.workers
    out = [f"algo={algo}", f"gpus={gpus}", *custom.section_overrides(cfg["model"]),
           f"data={data['name']}", f"device={cfg['device']}", f"seed={cfg['seed']}",
           f"trainer.batch_size={batch}", f"trainer.epochs={cfg['epochs']}",
           f"trainer.threads={cfg['threads']}", "trainer.checkpoint=false",
           "trainer.progress=false", f"trainer.check_every={steps}", "sched=constant"]
    if registry.get(algo).replicas == "option":
        out.append(f"algo.replicas={case.replicas}")
    if "microbatches" in {f.name for f in fields(registry.get(algo).options)}:
        out.append(f"algo.microbatches={cfg['microbatches']}")
    out += [f"data.{k}={json.dumps(v)}" for k, v in data.items() if k != "name"]
    if balance is not None:
        out.append(f"split.balance={json.dumps(balance)}")
    return out + list(cfg["train"])


def _summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.exists():
        return {"status": "failed", "error": f"no summary.json in {run_dir}"}
    return json.loads(path.read_text())


def run_case(cfg: dict[str, Any], case: Case, repeat: int, out: Path,
             balance: list[int] | None = None) -> Measurement:
    """Run one case once (W side-by-side BP processes for the ceiling); never raises."""
    base = out / "runs" / case.name / f"repeat{repeat}"
    copies = case.workers if case.algo == CEILING else 1
    procs = []
    for i in range(copies):
        run_dir = base / f"copy{i}" if copies > 1 else base
        run_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if case.algo == CEILING and cfg["device"] == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        cmd = [sys.executable, "-m", "dpbp.cli", "train", *train_overrides(cfg, case, balance),
               f"hydra.run.dir={run_dir}"]
        log = open(run_dir / "bench.log", "w")  # noqa: SIM115 - closed after the wait
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                      run_dir, log))
    summaries = []
    for p, run_dir, log in procs:
        p.wait()
        log.close()
        s = _summary(run_dir)
        if p.returncode and s.get("status") == "completed":
            s = {"status": "failed", "error": f"exit status {p.returncode}"}
        summaries.append(s)
    return measurement(case, repeat, summaries, str(base))


def bench_splits(cfg: dict[str, Any], cases: list[Case], console
                 ) -> tuple[dict[int, list[int]], Any]:
    """With `split=time`, the block counts per module of every multi-module case, balanced once
    by the blocks' profiled time on the bench's device (every run of that K gets the same
    split), and that block profile; with `split=flops`, none: each run splits by counted flops,
    `dpbp train`'s default."""
    modules = sorted({c.modules for c in cases if c.modules > 1})
    if cfg.get("split", "flops") != "time" or not modules:
        return {}, None
    from dpbp.predict import split_counts

    splits, profile = split_counts(cfg, modules)
    console.print("split by profiled time: " + ", ".join(
        f"K={k}: {'+'.join(map(str, v))} blocks" for k, v in splits.items()), highlight=False)
    return splits, profile


def machine() -> dict[str, Any]:
    """Where the bench ran: host, OS, Python, torch, CPUs and GPUs."""
    import torch

    info = {"host": platform.node(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def run_bench(cfg: dict[str, Any], out: Path, console) -> dict[str, Any]:
    """Measure every case `repeats` times, interleaved (fewer when `time_budget_s` runs out);
    write bench.json after every case and bench.json/md/png after every repeat; return the
    result."""
    cases = plan(list(cfg["algos"]), list(cfg["gpus"]), cfg["ceiling"])
    measurements: list[Measurement] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    splits, blocks_profile = bench_splits(cfg, cases, console)
    result = {"machine": machine(), "device": cfg["device"], "started": started, "config": cfg,
              "splits": splits, "rows": rows(cases, measurements), "measurements": []}
    budget = cfg.get("time_budget_s")
    t0 = time.monotonic()
    for r in range(cfg["repeats"]):
        elapsed = time.monotonic() - t0
        if r and budget is not None and elapsed + elapsed / r > budget:
            console.print(f"time_budget_s={budget}: {r} repeat(s) done in {elapsed:.0f} s; "
                          "another would not end inside the budget, so the bench stops here.",
                          highlight=False)
            break
        result["repeats_done"] = r  # whole repeats; the rows count what each case has
        for c in cases:
            if budget is not None and time.monotonic() - t0 > budget:
                console.print(f"time_budget_s={budget} spent: repeat {r + 1} stops before "
                              f"{c.name}.", highlight=False)
                break
            m = run_case(cfg, c, r, out, splits.get(c.modules))
            measurements.append(m)
            what = (f"{m.images_per_second:8.0f} {unit(cfg)}/s" if m.status == "completed"
                    else f"FAILED: {m.error}")
            console.print(f"repeat {r + 1}/{cfg['repeats']}  {c.name:<14} {what}",
                          highlight=False)
            # what is measured is safe if the bench is stopped later (bench.json per case)
            result["rows"] = rows(cases, measurements)
            result["measurements"] = [asdict(m) for m in measurements]
            write_json(result, out)
        else:
            result["repeats_done"] = r + 1
        write_outputs(result, out)
    if cfg["predict"]:
        from dpbp.predict import predict_rows

        try:
            result["predictions"], result["profile"] = predict_rows(
                cfg, result["rows"], console, splits, blocks_profile)
            attach_predictions(result["rows"], result["predictions"])
        except Exception as e:  # noqa: BLE001 - the measurements stand without it
            console.print(f"dpbp: the prediction failed ({type(e).__name__}: {e}); the "
                          "measurements are written without it.", highlight=False)
        write_outputs(result, out)
    return result


def unit(cfg: dict[str, Any]) -> str:
    """What a sample is, for the tables: sequences of tokens (data=text) or images."""
    return "sequences" if cfg.get("data", {}).get("name") == "text" else "images"


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _range(r: dict[str, Any]) -> str:
    """A row's spread over its repeats: "min–max" images/s ("–" with fewer than 2 repeats)."""
    low, high = r.get("images_per_second_min"), r.get("images_per_second_max")
    return f"{low:.0f}–{high:.0f}" if low is not None and r["repeats"] > 1 else "–"


def _share_of_ceiling(r: dict[str, Any]) -> str:
    """A row's images/s over the same repeat's ceiling, "min–max" over the repeats."""
    low, high = r.get("vs_ceiling_min"), r.get("vs_ceiling_max")
    return "–" if low is None else f"{low:.0%}–{high:.0%}"


def _share_range(r: dict[str, Any]) -> str:
    """The modules' compute shares as "lowest–highest%" (one module: its share)."""
    shares = [100 * s for s in r["compute_share"] if s is not None]
    if not shares:
        return "–"
    low, high = min(shares), max(shares)
    return f"{low:.0f}%" if round(low) == round(high) else f"{low:.0f}–{high:.0f}%"


def _error(r: dict[str, Any]) -> str:
    return _fmt(r.get("prediction_error"), "+.0%")


def markdown(result: dict[str, Any]) -> str:
    """bench.md: how it was run, then one line per case: the median images/s and its spread
    over the repeats (min–max), and, with predictions, the simulator's speedup for a run as long
    as this one, its error against the measurement, and its speedup for a long run."""
    cfg, m = result["config"], result["machine"]
    predicted = {(p["algo"], p["workers"]): p["speedup"] for p in result.get("predictions", [])}
    repeats = result.get("repeats_done", cfg["repeats"])
    done = f"{repeats} interleaved repeats" + (f" (of {cfg['repeats']} asked; time_budget_s="
                                               f"{cfg.get('time_budget_s')})"
                                               if repeats < cfg["repeats"] else "")
    lines = [
        f"# dpbp bench: {custom.section_title(cfg['model'])} on {cfg['data']['name']}, "
        f"batch {cfg['batch_size']} per worker, device {cfg['device']}",
        "",
        f"Machine: {m['host']} ({m['platform']}, {m['cpus']} CPUs"
        f"{', ' + ', '.join(m['gpus']) if m.get('gpus') else ''}), torch {m['torch']}; "
        f"started {result['started']}. {done}; per run "
        f"{cfg['epochs']} epochs of {cfg['steps_per_epoch']} steps, the first untimed; "
        f"{cfg['threads']} thread(s) per process on CPU. Median {unit(cfg)}/s over the repeats, "
        "min–max beside it; vs ceiling, per repeat: images/s over the ceiling measured in the "
        "same repeat, lowest–highest (a drift that slows a whole repeat moves both alike). "
        "Predicted: the simulator's speedup for a run of this length "
        "(error = predicted / measured − 1) and for a long run (200 batches). Modules: "
        + ("the bench's split by the blocks' profiled time (blocks per module in brackets)."
           if cfg.get("split") == "time" else "split by counted flops (blocks in brackets)."),
        "",
        f"| algo | workers | modules x replicas | {unit(cfg)}/s | min–max | speedup | efficiency "
        "| ceiling speedup | vs ceiling | vs ceiling, per repeat | predicted (this run) | error "
        "| predicted (long run) | compute share per module | peak memory per module (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        share = " / ".join("–" if s is None else f"{100 * s:.0f}%" for s in r["compute_share"])
        mem = " / ".join("–" if b is None else f"{b / 2**20:.1f}" for b in r["peak_memory_bytes"])
        cut = f" ({'+'.join(map(str, r['split']))})" if len(r.get("split") or []) > 1 else ""
        lines.append(
            f"| {r['algo']} | {r['workers']} | {r['modules']} x {r['replicas']}{cut} "
            f"| {_fmt(r['images_per_second'], '.0f')} | {_range(r)} "
            f"| {_fmt(r['speedup'], '.2f')}× "
            f"| {_fmt(r['efficiency'], '.0%')} | {_fmt(r['ceiling_speedup'], '.2f')}× "
            f"| {_fmt(r['efficiency_vs_ceiling'], '.0%')} | {_share_of_ceiling(r)} "
            f"| {_fmt(r.get('predicted_run_speedup'), '.2f')} | {_error(r)} "
            f"| {_fmt(predicted.get((r['algo'], r['workers'])), '.2f')} "
            f"| {share or '–'} | {mem or '–'} |")
    modules = (result.get("profile") or {}).get("modules") or {}
    if "1" in modules:
        from dpbp.predict import module_balance

        whole = modules["1"]
        ms = 1e3 * (whole["forward"][0] + whole["backward"][0] + whole["step"][0])
        lines += ["", f"Profile behind the predictions (forward + backward + step per batch, "
                  f"each module timed as a unit): BP on one worker {ms:.0f} ms; "
                  f"{module_balance(modules)}. Balance = mean / slowest module: the most a "
                  "pipeline on that split can reach of the ceiling."]
    extra = [p for p in result.get("predictions", [])
             if not any((r["algo"], r["workers"]) == (p["algo"], p["workers"])
                        for r in result["rows"])]
    if extra:
        lines += ["", "Predicted only (no measurement on this machine):", "",
                  "| algo | workers | predicted speedup |", "|---|---|---|"]
        lines += [f"| {p['algo']} | {p['workers']} | {p['speedup']:.2f}× |" for p in extra]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Speedup over BP on one worker vs workers, one line per algo, with the ideal W× and the
    machine's ceiling; measured points solid with o, predictions dotted with x (in the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    workers = sorted({r["workers"] for r in result["rows"]}
                     | {p["workers"] for p in result.get("predictions", [])})
    ax.plot(workers, workers, "k--", lw=1, label="ideal (W×)")
    for algo in dict.fromkeys(r["algo"] for r in result["rows"]):
        pts = [(r["workers"], r["speedup"]) for r in result["rows"]
               if r["algo"] == algo and r["speedup"] is not None]
        if algo != registry.reference().name and algo != CEILING:
            pts = [(1, 1.0), *pts] if pts and pts[0][0] > 1 else pts
        if not pts:
            continue
        style = {"color": "grey", "marker": "s", "ls": "-."} if algo == CEILING else {"marker": "o"}
        line = ax.plot(*zip(*pts), label=algo if algo != CEILING
                       else "ceiling: W independent BP", **style)[0]
        pred = [(p["workers"], p["speedup"]) for p in result.get("predictions", [])
                if p["algo"] == algo]
        if pred:
            ax.plot(*zip(*pred), ls=":", marker="x", color=line.get_color(), alpha=0.7)
    if result.get("predictions"):  # the two kinds of point, named once in the legend
        ax.plot([], [], "ko-", label="measured (o, solid)")
        ax.plot([], [], "kx:", alpha=0.7, label="predicted by the simulator (x, dotted)")
    ax.set_xlabel("workers (processes / devices)")
    ax.set_ylabel("speedup over BP on 1 worker")
    ax.set_xticks(workers)
    cfg = result["config"]
    ax.set_title(f"{custom.section_title(cfg['model'])}, {cfg['data']['name']}, "
                 f"batch {cfg['batch_size']}, {cfg['device']}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(result: dict[str, Any], out: Path) -> None:
    """bench.json: the configuration, every measurement, the rows (and predictions)."""
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")


def write_outputs(result: dict[str, Any], out: Path) -> None:
    """bench.json, bench.md and bench.png."""
    write_json(result, out)
    (out / "bench.md").write_text(markdown(result))
    plot(result, out / "bench.png")


def table(result: dict[str, Any]):
    """The rich table for the terminal, in 80 columns: the compute share of the modules as
    lowest–highest (bench.md has every column and each module's share)."""
    from rich import box
    from rich.table import Table

    t = Table(title="dpbp bench (median over repeats, min–max beside it)", box=box.SIMPLE_HEAD,
              pad_edge=False, collapse_padding=True)
    predicted = any(r.get("predicted_run_speedup") for r in result["rows"])
    cols = ["algo", "W", "seq/s" if unit(result["config"]) == "sequences" else "img/s",
            "min–max", "speedup", "vs ceil",
            *(["pred.", "error"] if predicted else [])]
    for col in cols:
        t.add_column(col, justify="left" if col == "algo" else "right", no_wrap=True)
    t.add_column("compute", justify="right", no_wrap=True)
    for r in result["rows"]:
        pred = [_fmt(r.get("predicted_run_speedup"), ".2f"), _error(r)] if predicted else []
        t.add_row(r["algo"], str(r["workers"]), _fmt(r["images_per_second"], ".0f"),
                  _range(r), _fmt(r["speedup"], ".2f") + "×",
                  _fmt(r["efficiency_vs_ceiling"], ".0%"), *pred, _share_range(r))
    return t
