"""The tables of `scripts/device_check.sh`, and what every one of them states first.

Each part of the device check writes `<name>.md` and `<name>.json` to the check's output folder,
both opening with the exact command, the machine (CPU count, GPU name), the torch version and the
date (`write_part`). This module also turns a `dpbp bench` result into the CPU-scaling table
(measured speedup, spread, ceiling, the simulator's prediction and its error) and prints the
check's closing summary:

    python -m dpbp.device_report cpu-scaling BENCH_DIR OUT --command "dpbp bench ..."
    python -m dpbp.device_report summary OUT PARTS_TSV
    python -m dpbp.device_report skipped OUT NAME REASON COMMAND
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    """Where a table was measured: host, CPUs, GPUs, Python, torch (with its CUDA and cuDNN)."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda else [],
    }


def header(title: str, command: str, machine: dict[str, Any], date: str) -> list[str]:
    """The opening lines of a part's markdown: title, command, machine, torch, date."""
    gpus = ", ".join(machine.get("gpus") or []) or "none"
    cuda = (f" (CUDA {machine['torch_cuda']}, cuDNN {machine['cudnn']})"
            if machine.get("cudnn") else "")
    return [f"# {title}", "",
            f"- Command: `{command}`",
            f"- Machine: {machine['host']}, {machine['cpus']} CPUs, GPU: {gpus} "
            f"({machine['platform']})",
            f"- torch {machine['torch']}{cuda}, Python {machine['python']}",
            f"- Date: {date}", ""]


def write_part(out: Path, name: str, title: str, command: str, lines: list[str],
               data: dict[str, Any]) -> None:
    """Write `<name>.md` (header, then `lines`) and `<name>.json` (header facts, then `data`)."""
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    md = [*header(title, command, machine, date), *lines]
    (out / f"{name}.md").write_text("\n".join(md).rstrip("\n") + "\n")
    doc = {"command": command, "machine": machine, "date": date, **data}
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "–" if v is None else format(v, spec) + suffix


def scaling_rows(bench: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per measured (algo, W) of a bench result: median speedup and images/s with their
    min–max over the repeats, the ceiling at W, and the simulator's predictions and error."""
    out = []
    for r in bench["rows"]:
        out.append({k: r.get(k) for k in (
            "algo", "workers", "modules", "replicas", "repeats", "failed", "images_per_second",
            "images_per_second_min", "images_per_second_max", "speedup", "ceiling_speedup",
            "efficiency_vs_ceiling", "predicted_run_speedup", "prediction_error",
            "predicted_speedup")})
    return out


def error_by_workers(rows: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per W > 1: the mean and the largest absolute simulator error over the algos predicted."""
    by_w: dict[int, list[float]] = {}
    for r in rows:
        if r["prediction_error"] is not None and r["workers"] > 1:
            by_w.setdefault(r["workers"], []).append(abs(r["prediction_error"]))
    return {w: {"mean_abs": statistics.mean(v), "max_abs": max(v), "algos": len(v)}
            for w, v in sorted(by_w.items())}


def scaling_markdown(bench: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The CPU-scaling table: one line per (algo, W), then the simulator's error per W."""
    cfg = bench["config"]
    lines = [
        f"`dpbp bench` on the CPU: {cfg['model']['name']}, {cfg['data']['name']} "
        f"{'×'.join(map(str, cfg['data'].get('shape', [])))}, batch {cfg['batch_size']} per "
        f"worker, {cfg['threads']} thread per process, {cfg['epochs']} epochs of "
        f"{cfg['steps_per_epoch']} steps per run (the first untimed), "
        f"{bench.get('repeats_done', cfg['repeats'])} interleaved repeat(s). Speedup: median "
        "images/s over BP on one worker; min–max: the spread of images/s over the repeats; "
        "ceiling: W independent one-worker BP processes side by side. Predicted: the simulator "
        "(dpbp/simulate.py) on this machine's per-block profile, for a run of this length "
        "(error = predicted / measured − 1) and for a long run (fill and drain amortised).",
        "",
        "| algo | W | modules x replicas | images/s | min–max | speedup | ceiling at W "
        "| vs ceiling | predicted (this run) | error | predicted (long run) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = (f"{r['images_per_second_min']:.0f}–{r['images_per_second_max']:.0f}"
                  if r["images_per_second_min"] is not None and (r["repeats"] or 0) > 1
                  else "–")
        failed = f" ({r['failed']} failed)" if r.get("failed") else ""
        lines.append(
            f"| {r['algo']}{failed} | {r['workers']} | {r['modules']} x {r['replicas']} "
            f"| {_fmt(r['images_per_second'], '.0f')} | {spread} "
            f"| {_fmt(r['speedup'], '.2f', '×')} | {_fmt(r['ceiling_speedup'], '.2f', '×')} "
            f"| {_fmt(r['efficiency_vs_ceiling'], '.0%')} "
            f"| {_fmt(r['predicted_run_speedup'], '.2f', '×')} "
            f"| {_fmt(r['prediction_error'], '+.0%')} "
            f"| {_fmt(r['predicted_speedup'], '.2f', '×')} |")
    errors = error_by_workers(rows)
    if errors:
        lines += ["", "The simulator's error per worker count (|predicted / measured − 1| over "
                  "the algos it models):", "", "| W | algos | mean | largest |",
                  "|---|---|---|---|"]
        lines += [f"| {w} | {e['algos']} | {e['mean_abs']:.0%} | {e['max_abs']:.0%} |"
                  for w, e in errors.items()]
    return lines


def cpu_scaling(bench_dir: Path, out: Path, command: str) -> dict[str, Any]:
    """device_cpu_scaling.md/json from the bench's bench.json (as far as the bench got)."""
    bench = json.loads((bench_dir / "bench.json").read_text())
    rows = scaling_rows(bench)
    errors = error_by_workers(rows)
    data = {"bench_dir": str(bench_dir), "config": bench["config"],
            "repeats_done": bench.get("repeats_done"), "rows": rows,
            "error_by_workers": {str(w): e for w, e in errors.items()},
            "profile": bench.get("profile"), "predictions": bench.get("predictions"),
            "measurements": bench.get("measurements")}  # the bench's folder may not be kept
    write_part(out, "device_cpu_scaling", "Device check 1: CPU scaling, measured and predicted",
               command, scaling_markdown(bench, rows), data)
    return data


def headline(out: Path, part: str) -> str:
    """One short line of a part's result, from its json (or why there is none)."""
    files = {"cpu": "device_cpu_scaling.json", "cuda": "device_cuda.json",
             "papers": "device_papers.json"}
    path = out / files.get(part, f"{part}.json")
    if not path.exists():
        return f"no {path.name}"
    d = json.loads(path.read_text())
    if d.get("skipped"):
        return f"skipped: {d['skipped']}"
    if part == "cpu":
        errs = d.get("error_by_workers") or {}
        err = ", ".join(f"W={w}: {e['mean_abs']:.0%}" for w, e in errs.items())
        done = sum(1 for r in d["rows"] if r["images_per_second"])
        return f"{done}/{len(d['rows'])} rows measured; simulator |error| {err or '–'}"
    if part == "cuda":
        checks = d.get("checks", [])
        passed = sum(c["verdict"] == "pass" for c in checks)
        over = (d.get("overhead") or {}).get("overhead")
        return (f"{passed}/{len(checks)} CUDA checks pass; harness overhead "
                f"{_fmt(None if over is None else 100 * over, '.1f', '%')}")
    if part == "papers":
        return f"{len(d.get('predictions', []))} predictions next to the papers' speedups"
    return ""


def summary(out: Path, parts_tsv: Path) -> str:
    """The closing table: part, exit status, seconds, headline (parts_tsv: name status seconds)."""
    lines = [f"{'part':<8} {'status':<10} {'seconds':>7}  result"]
    for line in parts_tsv.read_text().splitlines():
        name, status, seconds = line.split("\t")[:3]
        word = {"0": "ok", "124": "timed out", "skipped": "skipped"}.get(status,
                                                                        f"exit {status}")
        try:
            what = headline(out, name)
        except Exception as e:  # noqa: BLE001 - a summary line must not stop the summary
            what = f"unreadable result ({type(e).__name__}: {e})"
        lines.append(f"{name:<8} {word:<10} {seconds:>7}  {what}")
    return "\n".join(lines)


def skipped(out: Path, name: str, why: str, command: str) -> None:
    """`<name>.md/json` for a part that was not run, saying why."""
    write_part(out, name, f"Device check: {name} skipped", command, [f"Skipped: {why}."],
               {"skipped": why})


def main(argv: list[str] | None = None) -> int:
    """`cpu-scaling BENCH_DIR OUT --command CMD`, `summary OUT PARTS_TSV` or
    `skipped OUT NAME REASON COMMAND`."""
    p = argparse.ArgumentParser(prog="python -m dpbp.device_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cpu-scaling", help="device_cpu_scaling.md/json from a bench directory")
    c.add_argument("bench_dir", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--command", required=True, help="the bench command, as run")
    s = sub.add_parser("summary", help="the check's closing table")
    s.add_argument("out", type=Path)
    s.add_argument("parts", type=Path, help="lines of: part<TAB>exit status<TAB>seconds")
    k = sub.add_parser("skipped", help="the table of a part that was not run")
    k.add_argument("out", type=Path)
    k.add_argument("name")
    k.add_argument("reason")
    k.add_argument("command")
    args = p.parse_args(argv)
    if args.what == "skipped":
        skipped(args.out, args.name, args.reason, args.command)
    elif args.what == "cpu-scaling":
        if not (args.bench_dir / "bench.json").exists():
            print(f"device_report: no bench.json in {args.bench_dir}: the bench wrote nothing.",
                  file=sys.stderr)
            return 1
        cpu_scaling(args.bench_dir, args.out, args.command)
    else:
        print(summary(args.out, args.parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
