"""`python -m dpbp.paper_predict OUT`: the papers' speed tables next to dpbp's prediction.

    python -m dpbp.paper_predict device-out                       # on a GPU: ~30 s
    python -m dpbp.paper_predict /tmp/p --device cpu --batch 4 --repeats 1 --models resnet20

Profiles each model block by block on one device at the papers' setting (CIFAR shapes 3x32x32,
batch 128; dpbp/profile.py), cuts it into K = 2..4 modules as dpbp's runs cut it (balanced
counted flops), and simulates bp, ddg, fr and fdg on K such devices (dpbp/simulate.py's
predict_speedup, 200 batches). Two transfer models: none (NVLink-class links, the lower bound of
communication) and each boundary's activation copied device -> pinned host -> device on this GPU
(a PCIe transfer without peer-to-peer, as the 2018-2019 reference code moved tensors). Beside
them: the papers' speedups over BP (`PAPERS`), from shared/reference/algorithms.md.

Writes OUT/device_papers.md and OUT/device_papers.json. Without CUDA it skips (one line, exit 0)
unless `--device cpu` is given; on the CPU use a small --batch: the numbers then test this
module, not the papers' setting.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from dpbp import algos

KS = (2, 3, 4)
CIFAR_TRAIN = 50_000

_DDG_FIG = ("DDG (Huo et al., ICML 2018), README figure results/result.jpg: whole 300-epoch "
            "runs on CIFAR-10, DDG on 1-4 GPUs, read off the plot (±3%); "
            "shared/reference/algorithms.md §2.7")
_FDG_T6 = ("FDG (Zhuang et al., TNNLS 2021), README 'Table 6' (table_time.png): computation "
           "time in s/epoch on CIFAR-10; shared/reference/algorithms.md §4.6")

# The papers' speed tables. Seconds per epoch where the paper gives them (FDG's Table 6; BP's
# time is the same at every K there), else the speedup read off a figure (DDG's).
PAPERS: dict[str, dict[str, Any]] = {
    "resnet110": {"source": _DDG_FIG, "speedup": {("ddg", 2): 1.40, ("ddg", 3): 1.69,
                                                  ("ddg", 4): 1.87}},
    "wrn28_10": {"source": _FDG_T6, "bp_seconds": 219.1, "seconds": {
        ("ddg", 2): 160.3, ("ddg", 3): 139.3, ("ddg", 4): 133.9,
        ("fr", 2): 208.2, ("fr", 3): 173.4, ("fr", 4): 151.9,
        ("fdg", 2): 118.3, ("fdg", 3): 89.6, ("fdg", 4): 74.1}},
    "resnet56": {"source": _FDG_T6, "bp_seconds": 30.2, "seconds": {
        ("ddg", 2): 30.0, ("ddg", 3): 28.9, ("ddg", 4): 27.7,
        ("fr", 2): 39.3, ("fr", 3): 36.4, ("fr", 4): 36.5,
        ("fdg", 2): 29.6, ("fdg", 3): 27.0, ("fdg", 4): 27.3}},
}
# BP and the algorithms the papers' speed tables compare (the simulator models each)
ALGOS = tuple(dict.fromkeys([algos.reference().name] + sorted(
    {a for e in PAPERS.values() for a, _ in (*e.get("seconds", {}), *e.get("speedup", {}))})))


def paper_speedup(model: str, algo: str, k: int) -> tuple[float | None, float | None]:
    """(speedup over BP, seconds per epoch) in the paper for this model, algo and K; BP is 1."""
    entry = PAPERS.get(model, {})
    if algos.get(algo).reference:
        return (1.0, entry.get("bp_seconds")) if entry else (None, None)
    if (algo, k) in entry.get("seconds", {}):
        t = entry["seconds"][(algo, k)]
        return entry["bp_seconds"] / t, t
    return entry.get("speedup", {}).get((algo, k)), None


def profile_model(model: str, batch: int, device: Any, repeats: int) -> dict[str, Any]:
    """Per-block forward, backward and step seconds of `model` at `batch` CIFAR-10 images,
    each boundary's staged copy time, and the flop-balanced block counts for every K."""
    import torch

    from dpbp.models import build_blocks
    from dpbp.profile import profile_blocks, profile_staged_copies
    from dpbp.split import balanced_counts, block_flops

    torch.manual_seed(0)
    blocks = build_blocks(model, 3, 10)
    flops = block_flops(blocks, torch.zeros(1, 3, 32, 32))
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    p = profile_blocks(blocks, x, y, repeats=repeats)
    copies = profile_staged_copies(p.out_numel[:-1], device, repeats)
    for b in blocks:  # free the device before the next model
        b.cpu()
    return {"model": model, "blocks": len(blocks), "forward": p.forward, "backward": p.backward,
            "step": p.step, "staged_copy": copies, "out_numel": p.out_numel,
            "counts": {k: balanced_counts(flops, k) for k in KS if k <= len(blocks)}}


def predictions(prof: dict[str, Any]) -> list[dict[str, Any]]:
    """Simulated speedups over BP on one device of bp, ddg, fr, fdg at each K, with no transfer
    cost and with staged copies, beside the paper's figure where there is one."""
    from dpbp.simulate import Profile, bp_one_device, predict_speedup

    whole = Profile.from_blocks(prof["forward"], prof["backward"], [prof["blocks"]],
                                prof["step"])
    out = []
    for k, counts in prof["counts"].items():
        for algo in ALGOS:
            free = Profile.from_blocks(prof["forward"], prof["backward"], counts, prof["step"])
            staged = Profile.from_blocks(prof["forward"], prof["backward"], counts, prof["step"],
                                         prof["staged_copy"])
            paper, paper_seconds = paper_speedup(prof["model"], algo, k)
            out.append({"model": prof["model"], "algo": algo, "modules": k,
                        "counts": counts,
                        "predicted": predict_speedup(algo, free),
                        "predicted_staged": predict_speedup(algo, staged),
                        "paper_speedup": paper, "paper_seconds_per_epoch": paper_seconds,
                        "bp_seconds_per_batch": bp_one_device(whole)})
    return out


def _f(v: float | None, spec: str, suffix: str = "") -> str:
    return "–" if v is None else format(v, spec) + suffix


def markdown(result: dict[str, Any]) -> list[str]:
    """The body of device_papers.md: per model, BP's time and one line per (K, algo)."""
    dev, batch = result["device"], result["batch_size"]
    lines = []
    if dev == "cpu":
        lines += ["**On the CPU with a small batch: this tests the module; the prediction for "
                  "the papers' GPUs comes from a run on a GPU.**", ""]
    lines += [
        f"Each model profiled block by block on `{dev}` ({result['device_name']}), CIFAR "
        f"shapes 3×32×32, batch {batch}, median of {result['repeats']} timings per block "
        "(dpbp/profile.py), cut into K modules by balanced counted flops (as `dpbp train` cuts "
        "it), then each algorithm's schedule simulated on K such devices (dpbp/simulate.py, "
        "200 batches). Predicted: no transfer cost; staged: each boundary's activation moved "
        "device → pinned host → device, timed on this GPU (a PCIe transfer without "
        "peer-to-peer; zero on the CPU). Paper: speedup over BP from the paper's table "
        "(s/epoch in brackets).",
        "",
        "Not modelled, and in the papers' numbers: data loading and augmentation, evaluation "
        "(DDG's figure is whole-run time), the reference code's own communication (DDG: a "
        "shared-memory mailbox through the CPU; FDG: Python threads joined every iteration), "
        "the papers' GPUs (FDG's early README names Tesla K80s, Table 6 names none; DDG: "
        "not stated) and their hand-written splits (shared/reference/algorithms.md §2.5, "
        "§4.4).", ""]
    for model, prof in result["profiles"].items():
        rows = [p for p in result["predictions"] if p["model"] == model]
        bp = rows[0]["bp_seconds_per_batch"] if rows else math.nan
        src = PAPERS.get(model, {}).get("source", "no paper table")
        paper_bp = PAPERS.get(model, {}).get("bp_seconds")
        lines += [f"## {model} ({prof['blocks']} blocks)", "",
                  f"BP on one device here: {1e3 * bp:.1f} ms per batch, "
                  f"{bp * math.ceil(CIFAR_TRAIN / batch):.1f} s per CIFAR epoch of "
                  f"{math.ceil(CIFAR_TRAIN / batch)} batches"
                  + (f" (the paper's BP: {paper_bp} s/epoch)" if paper_bp else "") + ".",
                  f"Paper source: {src}.", "",
                  "| K | algo | blocks per module | predicted | staged | paper |",
                  "|---|---|---|---|---|---|"]
        for p in rows:
            paper = _f(p["paper_speedup"], ".2f", "×")
            if p["paper_seconds_per_epoch"] is not None:
                paper += f" ({p['paper_seconds_per_epoch']} s)"
            lines.append(f"| {p['modules']} | {p['algo']} | {'/'.join(map(str, p['counts']))} "
                         f"| {p['predicted']:.2f}× | {p['predicted_staged']:.2f}× | {paper} |")
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Profile, simulate, write OUT/device_papers.md/json; skip without CUDA unless --device."""
    import torch

    from dpbp.device_report import write_part

    p = argparse.ArgumentParser(prog="python -m dpbp.paper_predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: cuda if there is one, else skip")
    p.add_argument("--models", default="resnet110,wrn28_10,resnet56")
    p.add_argument("--batch", type=int, default=128, help="images per batch (the papers': 128)")
    p.add_argument("--repeats", type=int, default=5, help="timings per block (median)")
    p.add_argument("--command", default=None, help="the command to state in the tables")
    args = p.parse_args(argv)
    command = args.command or shlex.join(["python", "-m", "dpbp.paper_predict",
                                          *(argv if argv is not None else sys.argv[1:])])
    title = "Device check 3: the papers' settings, predicted"
    cuda = torch.cuda.is_available()
    if args.device != "cpu" and not cuda:
        why = ("no CUDA here (torch.cuda.is_available() is False); --device cpu --batch 4 runs "
               "it on the CPU as a test")
        print(f"dpbp.paper_predict: skipped: {why}.")
        write_part(args.out, "device_papers", title, command, [f"Skipped: {why}."],
                   {"skipped": why})
        return 0
    if args.batch < 1 or args.repeats < 1:
        print("dpbp.paper_predict: --batch and --repeats must be at least 1.", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device != "cpu" else "cpu")
    t0 = time.monotonic()
    profiles, preds = {}, []
    for model in [m for m in args.models.split(",") if m]:
        prof = profile_model(model, args.batch, device, args.repeats)
        profiles[model] = prof
        preds += predictions(prof)
        print(f"dpbp.paper_predict: {model} profiled ({time.monotonic() - t0:.0f} s)")
    result = {"device": device.type,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "CPU", "batch_size": args.batch, "repeats": args.repeats,
              "papers": {m: {"source": e["source"], "bp_seconds": e.get("bp_seconds"),
                             "seconds": {f"{a}-k{k}": v for (a, k), v in
                                         e.get("seconds", {}).items()},
                             "speedup": {f"{a}-k{k}": v for (a, k), v in
                                         e.get("speedup", {}).items()}}
                         for m, e in PAPERS.items()},
              "profiles": profiles, "predictions": preds,
              "seconds": round(time.monotonic() - t0, 1)}
    write_part(args.out, "device_papers", title, command, markdown(result), result)
    print(f"dpbp.paper_predict: {len(preds)} predictions; {args.out}/device_papers.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
