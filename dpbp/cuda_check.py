"""`python -m dpbp.cuda_check OUT`: dpbp's algorithms on one CUDA GPU, checked against the CPU.

    python -m dpbp.cuda_check device-out                      # a machine with a GPU: ~2 minutes
    python -m dpbp.cuda_check /tmp/c --device cpu --only bp-k2 --overhead-steps 3
                                                              # the harness itself, on a CPU

Writes OUT/device_cuda.md and OUT/device_cuda.json with three parts:

1. Runs on the GPU (`executor=local`: all K modules in one process on the one GPU): bp, ddg, fr
   and fdg at K = 2 and 4, bp at K = 1, pdasgd and hogwild with gpus=1, and bf16 autocast
   (`trainer.amp=true`) and `trainer.channels_last=true` runs of bp and fdg. Each is compared with
   the same command on the CPU (same seed, same batches): status, finite losses, and the relative
   difference of the first epoch's mean training loss, within a tolerance (`TOLERANCE`, below).
2. What needs one process per GPU (ddp, gpipe, dp_fdg, pdasgd/hogwild with gpus > 1, any algo
   with executor=dist): dpbp is asked to run it, and its answer is recorded (on one GPU: the
   one-sentence refusal, exit status 2) with the reason.
3. The harness overhead: BP's images/s through `dpbp train` (K = 1, synthetic 3x32x32, the
   bench's settings) against a plain PyTorch loop (the same blocks from dpbp.models, batch, SGD,
   uint8 data held on the GPU, normalised per batch), interleaved, on the same GPU.

Correctness runs use `data=digits` (scikit-learn's bundled handwritten digits, no download), not
synthetic data: synthetic labels are random, so the loss stays near ln 10 = 2.30 whatever the
gradients are, and a GPU run with wrong gradients would pass. On digits the loss falls from 2.3
to about 0.8 within two epochs, and a run that learns wrongly shows.

Without CUDA it prints one line saying the CUDA parts are skipped and why, writes that to
device_cuda.md/json, and exits 0. `--device cpu` runs the whole harness with the CPU in the
GPU's place (the comparisons then test the harness, not CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dpbp import algos

# Allowed relative difference |GPU - CPU| / CPU of the first epoch's mean training loss
# (ResNet-20 on digits, batch 64, lr 0.1, 22 steps per epoch). Why these numbers: the two runs
# differ only in rounding (cuDNN's convolution algorithms and summation order; TF32 in
# convolutions, torch's default on Ampere and later: 10-bit mantissa), and SGD at lr 0.1 with
# BatchNorm amplifies rounding differences step by step. `NOISE_SCALES` shows how far on the CPU:
# a mere change of the summation order moves the first epoch's mean loss by up to 1.4%, a change
# of seed by 6-8%, and a run whose learning is broken by 60%. 5% for fp32 sits above the
# rounding noise and below a change of seed. bf16 autocast rounds every matrix product to an
# 8-bit mantissa (2^-9 relative, 4x TF32's 2^-11), so it starts the drift earlier: 10%. pdasgd
# and hogwild interleave their threads differently in every run (4.7% between identical CPU
# runs of hogwild): 10%.
TOLERANCE = {"fp32": 0.05, "amp": 0.10, "async": 0.10}

# Relative differences of the first epoch's mean training loss (last epoch in brackets) between
# two CPU runs, measured on the project's 2-core CPU machine on 2026-11-27 (torch 2.14.1, dpbp
# commit 9ece2a7; `dpbp train data=digits model=resnet20 trainer.batch_size=64 trainer.epochs=2`).
NOISE_SCALES = [
    ("summation order: trainer.threads=1 vs 2, bp K=1", 0.014, 0.087),
    ("summation order: trainer.threads=1 vs 2, ddg/fr/fdg K=2, fdg K=4", 0.0016, 0.015),
    ("two identical runs of hogwild (threads interleave differently)", 0.047, 1.18),
    ("two identical runs of pdasgd", 0.004, 0.032),
    ("seed 0 vs seed 1 and 2, bp K=1", 0.081, 0.075),
    ("a run that barely learns (optim.lr=1e-4) vs lr 0.1, bp K=1", 0.59, 2.94),
]

# Settings of every correctness run (on both devices).
COMMON = ["data=digits", "model=resnet20", "trainer.batch_size=64", "trainer.epochs=2",
          "trainer.progress=false", "trainer.checkpoint=false", "seed=0"]


@dataclass(frozen=True)
class Check:
    """A GPU run, the CPU run it is compared with, and the tolerance of that comparison."""

    name: str
    overrides: tuple[str, ...]
    reference: str  # the name of the CPU run (amp/channels_last runs share the plain one's)
    tolerance: str  # a key of TOLERANCE


@dataclass(frozen=True)
class Refused:
    """A command that needs one process per GPU, and why that cannot work on one GPU."""

    name: str
    overrides: tuple[str, ...]
    why: str


def one_gpu_algos() -> tuple[list[str], list[str]]:
    """(algorithms whose K modules all run in one process: executor=local; algorithms that run
    on one device with threads), from the registry."""
    pipelines = [n for n in algos.names() if algos.get(n).family == "tick"
                 and algos.get(n).local and algos.get(n).replicas == "one"]
    threads = [n for n in algos.names() if algos.get(n).family == "threads"]
    return pipelines, threads


def plan_checks() -> list[Check]:
    """The GPU runs: BP at K = 1; every single-pipeline tick algorithm (bp, ddg, fr, fdg) at
    K = 2, 4 (local executor); the threads algorithms (pdasgd, hogwild) with gpus=1; amp and
    channels_last runs of BP (K = 1) and of the most delayed pipeline at K = 2."""
    ref = algos.reference().name
    pipelines, threads = one_gpu_algos()
    checks = [Check(f"{ref}-k1", (f"algo={ref}", "gpus=1"), f"{ref}-k1", "fp32")]
    for algo in pipelines:
        for k in (2, 4):
            name = f"{algo}-k{k}"
            checks.append(Check(name, (f"algo={algo}", f"gpus={k}", "executor=local"), name,
                                "fp32"))
    for algo in threads:
        checks.append(Check(f"{algo}-k1", (f"algo={algo}", "gpus=1"), f"{algo}-k1", "async"))
    delayed = max(pipelines, key=lambda n: (algos.get(n).delay(0, 2), algos.get(n).pipelined))
    for base in (f"{ref}-k1", f"{delayed}-k2"):
        plain = next(c for c in checks if c.name == base)
        checks.append(Check(f"{base}-amp", (*plain.overrides, "trainer.amp=true"), base, "amp"))
        checks.append(Check(f"{base}-channels_last",
                            (*plain.overrides, "trainer.channels_last=true"), base, "fp32"))
    return checks


NCCL = "NCCL puts one rank on one GPU"


def refused_runs() -> list[Refused]:
    """What needs one process per GPU: each algorithm's smallest multi-process run."""
    out = []
    pipelines, threads = one_gpu_algos()
    for name in algos.names():
        rec = algos.get(name)
        workers = next(w for w in range(2, 9) if rec.layout(w) and w >= rec.min_workers)
        if name in pipelines:
            if name != pipelines[-1]:
                continue  # one of them shows executor=dist: the same launcher for all
            why, label = "executor=dist runs one process per module", f"{name}-k2-dist"
        elif not rec.local:
            why, label = "torch.distributed.pipelining runs one stage per process", None
        elif rec.replicas == "workers":
            why, label = "one model replica per process, combined across them", None
        else:
            why, label = "replicas x modules processes, gradients all-reduced", None
        out.append(Refused(label or f"{name}-k{workers}", (f"algo={name}", f"gpus={workers}"),
                           f"{why}; {NCCL}"))
    return out


REFUSED = refused_runs()


@dataclass
class Run:
    """One `dpbp train` process: its command, exit status, summary and last error line."""

    name: str
    device: str
    args: list[str]
    run_dir: str
    returncode: int | None = None
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    message: str = ""  # dpbp's last "dpbp: ..." line on stderr, if any


def dpbp_command(args: list[str]) -> list[str]:
    """`dpbp train ARGS` with this interpreter (the installed package, as the bench runs it)."""
    return [sys.executable, "-m", "dpbp.cli", "train", *args]


def run_dpbp(run: Run, timeout: float) -> Run:
    """Run one `dpbp train`; never raises (a timeout or a crash is recorded in `run`). A run
    past `timeout` is stopped with its workers (its own process group): SIGTERM, then SIGKILL."""
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    p = subprocess.Popen(dpbp_command([*run.args, f"hydra.run.dir={run_dir}"]), cwd=run_dir,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        err = p.communicate(timeout=timeout)[1]
        run.returncode = p.returncode
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            try:
                err = p.communicate(timeout=wait)[1]
                break
            except subprocess.TimeoutExpired:
                continue
        run.returncode = 124
        err = (err or "") + f"\ndpbp: timed out after {timeout:.0f} s (stopped)"
    run.seconds = time.monotonic() - t0
    (run_dir / "stderr.txt").write_text(err)
    said = [line for line in err.splitlines() if line.startswith("dpbp:")]
    run.message = said[-1] if said else (err.strip().splitlines() or [""])[-1][-300:]
    path = run_dir / "summary.json"
    run.summary = json.loads(path.read_text()) if path.exists() else {}
    return run


def _losses(summary: dict[str, Any], key: str) -> list[float]:
    return [float(e[key]) for e in summary.get("history") or []]


def _rel(a: float | None, b: float | None) -> float | None:
    return abs(a - b) / abs(b) if a is not None and b else None


def compare(gpu: Run, cpu: Run | None, tolerance: float) -> dict[str, Any]:
    """The verdict on one GPU run: completed, every loss finite, and the first epoch's mean
    training loss within `tolerance` (relative) of the CPU run's."""
    train, test = _losses(gpu.summary, "train_loss"), _losses(gpu.summary, "test_loss")
    ref = _losses(cpu.summary, "train_loss") if cpu else []
    status = gpu.summary.get("status") or f"no summary (exit {gpu.returncode})"
    finite = bool(train) and all(math.isfinite(v) for v in train + test)
    first = _rel(train[0] if train else None, ref[0] if ref else None)
    last = _rel(train[-1] if train else None, ref[-1] if ref else None)
    if status != "completed":
        verdict = f"FAIL: {status}: {gpu.summary.get('error') or gpu.message}"
    elif not finite:
        verdict = "FAIL: a loss is not finite"
    elif not ref:
        why = (cpu.summary.get("error") or cpu.message) if cpu else "not run"
        verdict = f"FAIL: no CPU reference ({why})"
    elif first is None or not math.isfinite(first):
        verdict = "FAIL: no first-epoch loss to compare"
    elif first > tolerance:
        verdict = f"FAIL: first-epoch loss differs by {first:.1%} > {tolerance:.0%}"
    else:
        verdict = "pass"
    return {"status": status, "finite": finite, "train_loss": train, "test_loss": test,
            "cpu_train_loss": ref, "first_epoch_diff": first, "last_epoch_diff": last,
            "tolerance": tolerance, "verdict": verdict,
            "test_acc": gpu.summary.get("final_test_acc"), "seconds": round(gpu.seconds, 1)}


def plain_loop_ips(model: str, batch: int, steps: int, epochs: int, device: str,
                   seed: int = 0) -> float:
    """Images/s of a plain PyTorch training loop over epochs 2.. (the first is the warm-up):
    dpbp's blocks as one nn.Sequential, SGD (lr 0.1, momentum 0.9, weight decay 5e-4, dpbp's
    defaults), uint8 3x32x32 images held on the device, a fresh permutation per epoch, each batch
    gathered and normalised as dpbp does. No metrics, no logging: the least a loop can do."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from dpbp.models import build_blocks

    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(1)  # as trainer.threads=1, the bench's setting
    torch.manual_seed(seed)
    net = nn.Sequential(*build_blocks(model, 3, 10)).to(dev).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    n = steps * batch
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8).to(dev)
    labels = torch.randint(0, 10, (n,), generator=gen).to(dev)
    t0 = 0.0
    for epoch in range(epochs):
        if epoch == 1:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
        perm = torch.randperm(n, device=dev)
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            x = (images[idx].to(torch.float32) / 255.0 - 0.5) / 0.25
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return (epochs - 1) * n / (time.perf_counter() - t0)


def overhead_args(model: str, batch: int, steps: int, epochs: int, device: str) -> list[str]:
    """The `dpbp train` overrides of BP on one worker as `dpbp bench` runs it."""
    from dpbp.bench import Case, train_overrides

    cfg = {"data": {"name": "synthetic", "shape": [3, 32, 32], "num_classes": 10,
                    "augment": "none"},
           "steps_per_epoch": steps, "batch_size": batch, "model": {"name": model},
           "device": device, "seed": 0, "epochs": epochs, "threads": 1, "microbatches": 4,
           "train": []}
    return train_overrides(cfg, Case(algos.reference().name, 1))


def overhead_result(plain: list[float], harness: list[float | None]) -> dict[str, Any]:
    """Medians of the two loops' images/s and dpbp's overhead: 1 - dpbp / plain."""
    done = [v for v in harness if v]
    p = statistics.median(plain) if plain else None
    d = statistics.median(done) if done else None
    return {"plain_images_per_second": plain, "dpbp_images_per_second": harness,
            "plain_median": p, "dpbp_median": d,
            "overhead": 1 - d / p if p and d else None}


def measure_overhead(work: Path, device: str, steps: int, epochs: int, repeats: int,
                     timeout: float, model: str = "resnet20", batch: int = 128
                     ) -> dict[str, Any]:
    """Plain loop and dpbp, alternately, `repeats` times each, nothing else running."""
    from dpbp.bench import timed_throughput

    args = overhead_args(model, batch, steps, epochs, device)
    plain: list[float] = []
    harness: list[float | None] = []
    errors = []
    for r in range(repeats):
        plain.append(plain_loop_ips(model, batch, steps, epochs, device))
        run = run_dpbp(Run(f"overhead-{r}", device, args,
                           str(work / "overhead" / f"repeat{r}")), timeout)
        if run.summary.get("status") == "completed":
            harness.append(timed_throughput(run.summary["history"])[0])
        else:
            harness.append(None)
            errors.append(run.message)
    result = overhead_result(plain, harness)
    result.update({"model": model, "batch_size": batch, "steps_per_epoch": steps,
                   "epochs": epochs, "repeats": repeats, "dpbp_args": args, "errors": errors})
    return result


def run_all(work: Path, device: str, checks: list[Check], refused: list[Refused], jobs: int,
            timeout: float) -> tuple[dict[str, Run], dict[str, Run], dict[str, Run]]:
    """GPU runs (`jobs` at a time), their CPU references and the refused commands (one per
    CPU pair of cores at a time), all at once: no timing is taken from these runs."""
    runs = work
    refs = {c.reference for c in checks}
    ref_args = {c.name: c.overrides for c in plan_checks() if c.name in refs}
    cpu_jobs = max(1, min(8, (os.cpu_count() or 2) // 2))
    with ThreadPoolExecutor(jobs) as gpu_pool, ThreadPoolExecutor(cpu_jobs) as cpu_pool:
        gpu = {c.name: gpu_pool.submit(run_dpbp, Run(c.name, device, [
            *c.overrides, *COMMON, f"device={device}"], str(runs / "gpu" / c.name)), timeout)
            for c in checks}
        cpu = {n: cpu_pool.submit(run_dpbp, Run(n, "cpu", [*a, *COMMON, "device=cpu"],
                                                str(runs / "cpu" / n)), timeout)
               for n, a in ref_args.items()}
        ref = {r.name: cpu_pool.submit(run_dpbp, Run(r.name, device, [
            *r.overrides, *COMMON, f"device={device}"], str(runs / "refused" / r.name)),
            timeout) for r in refused}
        return ({k: f.result() for k, f in gpu.items()}, {k: f.result() for k, f in cpu.items()},
                {k: f.result() for k, f in ref.items()})


def refusal(r: Refused, run: Run) -> dict[str, Any]:
    """What dpbp answered to a command that needs one GPU per process."""
    refused = run.returncode == 2
    status = ("not runnable on one GPU" if refused else
              f"ran: {run.summary.get('status', 'no summary')} (exit {run.returncode})")
    return {"name": r.name, "command": shlex.join(["dpbp", "train", *run.args]),
            "status": status, "exit": run.returncode, "dpbp_said": run.message, "why": r.why}


def _f(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _pct(v: float | None) -> float | None:
    return None if v is None else 100 * v


def markdown(result: dict[str, Any]) -> list[str]:
    """The body of device_cuda.md (the header comes from device_report.write_part)."""
    dev = result["device"]
    lines = [f"Device under test: `{dev}`" + (" (harness test: the CPU stands in for the GPU)"
                                             if dev == "cpu" else ""), "",
             "## 1. Runs on one GPU, compared with the same run on the CPU", "",
             f"Every run: `dpbp train {' '.join(COMMON)}` plus the overrides shown, once with "
             f"`device={dev}` and once with `device=cpu` (same seed, same batches). diff: "
             "|GPU − CPU| / CPU of the mean training loss of an epoch; the first epoch's is "
             "checked against the tolerance, the last one's is shown.", "",
             "| check | overrides | status | finite | epoch-1 loss | CPU | diff | tolerance "
             "| last-epoch loss | CPU | diff | test acc | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["checks"]:
        tl, cl = c["train_loss"], c["cpu_train_loss"]
        lines.append(
            f"| {c['name']} | `{' '.join(c['overrides'])}` | {c['status']} "
            f"| {'yes' if c['finite'] else 'no'} | {_f(tl[0] if tl else None, '.4f')} "
            f"| {_f(cl[0] if cl else None, '.4f')} | {_f(c['first_epoch_diff'], '.2%')} "
            f"| {c['tolerance']:.0%} | {_f(tl[-1] if tl else None, '.4f')} "
            f"| {_f(cl[-1] if cl else None, '.4f')} | {_f(c['last_epoch_diff'], '.1%')} "
            f"| {_f(c['test_acc'], '.3f')} | {c['verdict']} |")
    lines += ["", "### Why these tolerances", "",
              "The GPU and CPU runs differ only in rounding: cuDNN picks other convolution "
              "algorithms and summation orders, and runs convolutions in TF32 by default on "
              "this GPU generation (10-bit mantissa). SGD at lr 0.1 with BatchNorm amplifies "
              "such differences step by step, so the curves drift apart even when both are "
              "right. How far, measured on the CPU (relative difference of the first epoch's "
              "mean training loss; the last epoch's in brackets):", ""]
    lines += [f"- {what}: {a:.1%} ({b:.1%})" for what, a, b in result["noise_scales"]]
    lines += ["", f"Tolerances: fp32 {TOLERANCE['fp32']:.0%} (above the rounding noise, below "
              f"a change of seed), bf16 autocast {TOLERANCE['amp']:.0%} (bf16 rounds each "
              f"product to 2^-9, 4x TF32's error), pdasgd/hogwild {TOLERANCE['async']:.0%} "
              "(their threads interleave differently in every run). The last epoch is shown, "
              "not checked: by then the drift of even a correct run reaches ~10%. What this "
              "catches: a CUDA run that fails, produces a non-finite loss, or learns "
              "differently from the CPU (a broken update moves the first epoch by tens of "
              "percent). What it cannot catch: differences smaller than the rounding drift; "
              "that the algorithms themselves are right is tested on the CPU, where local and "
              "dist runs agree bit for bit.", "",
              "## 2. Not runnable on one GPU", "",
              "dpbp was asked to run each command on this machine; its answer is shown."
              + (" (Not tried with --device cpu: on the CPU these run.)" if dev == "cpu"
                 else ""), "",
              "| check | command | status | dpbp said | why |", "|---|---|---|---|---|"]
    for r in result["not_runnable"]:
        lines.append(f"| {r['name']} | `{r['command']}` | {r['status']} | {r['dpbp_said']} "
                     f"| {r['why']} |")
    o = result.get("overhead") or {}
    lines += ["", "## 3. Harness overhead: BP through dpbp against a plain PyTorch loop", ""]
    if o:
        lines += [
            f"{o['model']}, synthetic 3×32×32, batch {o['batch_size']}, {o['epochs']} epochs "
            f"of {o['steps_per_epoch']} steps, the first untimed, on `{dev}`; the plain loop "
            "(dpbp.cuda_check.plain_loop_ips: the same blocks, SGD, uint8 data on the device) "
            f"and `{shlex.join(['dpbp', 'train', *o['dpbp_args']])}` alternately, "
            f"{o['repeats']} times each; overhead = 1 − dpbp / plain (medians).", "",
            "| | images/s (median) | each repeat |", "|---|---|---|",
            f"| plain PyTorch loop | {_f(o['plain_median'], '.0f')} | "
            + ", ".join(f"{v:.0f}" for v in o["plain_images_per_second"]) + " |",
            f"| dpbp train (bp, K = 1) | {_f(o['dpbp_median'], '.0f')} | "
            + ", ".join(_f(v, ".0f") for v in o["dpbp_images_per_second"]) + " |", "",
            f"Harness overhead: **{_f(_pct(o['overhead']), '.1f')}%**"
            + (f" (dpbp runs failed: {'; '.join(o['errors'])})" if o.get("errors") else "")]
    else:
        lines.append("Not measured: --overhead-steps 0, or the part was stopped before it.")
    return lines


def skip_reason(device: str) -> str | None:
    """Why the CUDA parts cannot run here, or None when they can."""
    import torch

    if device == "cpu":
        return None
    if not torch.cuda.is_available():
        return ("torch.cuda.is_available() is False on this machine (no NVIDIA GPU or driver "
                f"visible to torch {torch.__version__})")
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the checks; write OUT/device_cuda.md/json; 0 when every check passes (or skipped)."""
    from dpbp.device_report import write_part

    p = argparse.ArgumentParser(prog="python -m dpbp.cuda_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the CPU stands in for the GPU (tests the harness)")
    p.add_argument("--only", default="", help="comma-separated check names (default: all)")
    p.add_argument("--jobs", type=int, default=4, help="GPU runs at a time (default 4)")
    p.add_argument("--timeout", type=float, default=60, help="seconds per dpbp run")
    p.add_argument("--overhead-steps", type=int, default=100,
                   help="steps per epoch of the overhead runs (0: skip that part)")
    p.add_argument("--overhead-repeats", type=int, default=2)
    p.add_argument("--work", type=Path, default=None,
                   help="run directories of the dpbp runs (default: OUT/cuda_check_runs)")
    p.add_argument("--command", default=None, help="the command to state in the tables")
    args = p.parse_args(argv)
    command = args.command or shlex.join(["python", "-m", "dpbp.cuda_check",
                                          *(argv if argv is not None else sys.argv[1:])])
    title = "Device check 2: dpbp on CUDA against the CPU"
    why = skip_reason(args.device)
    if why:
        print(f"dpbp.cuda_check: CUDA parts skipped: {why}.")
        write_part(args.out, "device_cuda", title, command,
                   [f"Skipped: {why}. Nothing was run."], {"skipped": why})
        return 0
    only = {n for n in args.only.split(",") if n}
    checks = [c for c in plan_checks() if not only or c.name in only]
    refused = [r for r in REFUSED if (not only or r.name in only) and args.device == "cuda"]
    t0 = time.monotonic()
    work = args.work or args.out / "cuda_check_runs"
    gpu, cpu, ref = run_all(work, args.device, checks, refused, args.jobs, args.timeout)
    rows = [{"name": c.name, "overrides": list(c.overrides), "reference": c.reference,
             **compare(gpu[c.name], cpu.get(c.reference), TOLERANCE[c.tolerance])}
            for c in checks]
    result = {"device": args.device, "common": COMMON, "tolerance": TOLERANCE,
              "noise_scales": NOISE_SCALES, "checks": rows,
              "not_runnable": [refusal(r, ref[r.name]) for r in refused], "overhead": None,
              "runs": {k: asdict(v) for k, v in {**gpu, **{f"cpu/{n}": r for n, r in
                                                            cpu.items()}}.items()}}
    write_part(args.out, "device_cuda", title, command, markdown(result), result)  # kept if
    if args.overhead_steps > 0:  # the overhead part is stopped
        result["overhead"] = measure_overhead(work, args.device, args.overhead_steps, 3,
                                              args.overhead_repeats, args.timeout)
    result["seconds"] = round(time.monotonic() - t0, 1)
    write_part(args.out, "device_cuda", title, command, markdown(result), result)
    failed = [c["name"] for c in rows if c["verdict"] != "pass"]
    print(f"dpbp.cuda_check: {len(rows) - len(failed)}/{len(rows)} checks pass"
          + (f" (failed: {', '.join(failed)})" if failed else "") + f"; {args.out}/device_cuda.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
