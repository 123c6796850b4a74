"""`dpbp bench predict=true`: profile the model per block on this machine, then simulate each
algorithm's real schedule (simulate.py) on 1..W devices, including W beyond what the machine has.

The profile is taken in the bench's own process on one device with the bench's thread count, at
the bench's batch size: forward, backward and optimizer step per block (to balance splits), then
of each module of each split as one unit, and of the whole model for BP's baseline, as the runs
execute them; the transfer of each boundary's activation and the all-reduce of the gradients are
timed between two real processes (gloo on CPU, nccl on CUDA). Modules are cut as the bench's
runs are cut (`split_counts`).

Two predictions per case: `speedup`, a long run (200 batches: fill and drain amortised), and,
for synthetic data (whose epoch the bench sizes), `speedup_run`, a run as long as the bench's:
`epochs` epochs of `steps_per_epoch` batches, timed from the moment every device has finished
the first epoch's ticks to the end of the drain, as the bench times it. That one is what the
measured speedup is compared with (the simulator's error).
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any

import torch
from torch import nn

from dpbp import algos, custom, schedule
from dpbp.allocator import keep_freed_memory
from dpbp.data import DataConfig, load_dataset, train_batch
from dpbp.profile import BlockProfile, profile_blocks, profile_links
from dpbp.simulate import Profile, bp_one_device, predict_speedup, simulate
from dpbp.split import balanced_counts, block_flops


def run_speedup(algo: str, profile: Profile, steps: int, epochs: int, replicas: int = 1,
                microbatches: int = 4, baseline: float | None = None) -> float:
    """Simulated speedup over BP on one device of a bench run: `epochs` epochs of `steps`
    batches per replica; the first epoch is not timed (the bench's warm-up), the last includes
    the drain. The window starts when the last device has finished the first epoch's work (the
    run's epoch boundary); a device that ran ahead into the second epoch keeps that head start,
    so this is at most one tick optimistic. `baseline` as in `simulate.predict_speedup`."""
    if epochs < 2:
        raise ValueError("a bench run has at least 2 epochs: the first is not timed")
    n = steps * epochs
    result = simulate(algo, profile, n, replicas, microbatches)
    if algos.get(algo).simulate == "tick":
        k, end = profile.modules, schedule.num_ticks(algo, profile.modules, n)
        ends = []
        for d, spans in enumerate(result.spans):  # devices: replica-major, d = r * K + stage
            first = schedule.program(algo, d % k, k, range(steps), n, end)
            runs = sum(i.op in (schedule.FORWARD, schedule.BACKWARD, schedule.STEP)
                       for i in first)
            if runs:
                ends.append(spans[runs - 1][2])
    else:  # the microbatch pipelines and the all-reduce model label each batch's step S<batch>
        ends = [e for spans in result.spans for label, _, e in spans if label == f"S{steps - 1}"]
    window = result.makespan - max(ends, default=0.0)
    base = bp_one_device(profile) if baseline is None else baseline
    return (epochs - 1) * steps * replicas / window * base


def module_profile(prof: dict[str, list[float]], counts: list[int]) -> Profile:
    """The per-module Profile of a split from per-block times (`measure`'s dict)."""
    return Profile.from_blocks(prof["forward"], prof["backward"], counts, prof["step"],
                               prof["transfer"][:-1], prof["allreduce"])


def bench_blocks(cfg: dict[str, Any]) -> tuple[list[Any], torch.Tensor, torch.Tensor, Any]:
    """The bench's model blocks on its device (seeded as a run seeds them), one batch of its
    data (inputs, labels) and the dataset, with the bench's thread count set and malloc tuned
    as every run tunes it (allocator.py: with glibc's defaults ResNet-20 on this repo's CPU
    profiled 10-15% slower than it trains, module 1 with its large activations most)."""
    keep_freed_memory()
    data = {**cfg["data"], "train_size": cfg["batch_size"], "test_size": cfg["batch_size"]}
    if isinstance(data.get("shape"), list):
        data["shape"] = tuple(data["shape"])
    cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    if device.type == "cpu" and cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    ds = load_dataset(DataConfig(**data), device, seed=cfg["seed"])
    torch.manual_seed(cfg["seed"])
    blocks = custom.section_blocks(cfg["model"], ds.in_channels, ds.num_classes, ds.context)
    idx = torch.arange(cfg["batch_size"], device=device) % ds.train_x.shape[0]
    x, y = train_batch(ds, idx, torch.Generator(device=device).manual_seed(0))
    return blocks, x, y, ds


def split_costs(cfg: dict[str, Any], blocks: list[Any], ds: Any, profile: Any = None
                ) -> list[float]:
    """Each block's cost for balancing the split: counted flops (`split=flops`, what `dpbp
    train` does by default) or the forward+backward+step seconds of `profile` (`split=time`: on a
    CPU the early blocks, with wide feature maps and few channels, cost several times more per
    flop than the late ones, so a flops split leaves module 1 the bottleneck)."""
    if cfg.get("split", "flops") == "time":
        return [f + b + s for f, b, s in zip(profile.forward, profile.backward, profile.step)]
    return block_flops([b.cpu() for b in blocks], ds.example(1))


def split_counts(cfg: dict[str, Any], modules: list[int]
                 ) -> tuple[dict[int, list[int]], BlockProfile | None]:
    """Block counts per module for each K in `modules`: the one split that every run of the
    bench uses (profiled once, here, when `split=time`), and that block profile (None with
    `split=flops`), which the prediction reuses."""
    blocks, x, y, ds = bench_blocks(cfg)
    p = profile_blocks(blocks, x, y, repeats=5) if cfg.get("split") == "time" else None
    costs = split_costs(cfg, blocks, ds, p)
    return {k: balanced_counts(costs, k) for k in sorted(set(modules)) if k <= len(blocks)}, p


def profile_modules(blocks: list[Any], counts: list[int], x: torch.Tensor, y: torch.Tensor
                    ) -> BlockProfile:
    """Time each module of a split as one unit (its blocks chained), as a run executes it,
    rather than as a sum of blocks each timed alone (each with its own autograd call)."""
    ends = list(accumulate(counts))
    return profile_blocks([nn.Sequential(*blocks[a:b]) for a, b in zip([0, *ends[:-1]], ends)],
                          x, y, repeats=5)


class Profiler:
    """The bench's model on its device: per-block times (for splits the bench did not run) and,
    for each K asked, the per-module simulator Profile, each module timed as a unit."""

    def __init__(self, cfg: dict[str, Any], splits: dict[int, list[int]] | None = None,
                 blocks_profile: BlockProfile | None = None) -> None:
        self.blocks, self.x, self.y, ds = bench_blocks(cfg)
        p = blocks_profile or profile_blocks(self.blocks, self.x, self.y, repeats=5)
        transfer, allreduce = profile_links([*p.out_numel, *p.grad_numel], self.x.device)
        n = len(self.blocks)
        self.blocks_prof = {"forward": p.forward, "backward": p.backward, "step": p.step,
                            "transfer": transfer[:n], "allreduce": allreduce[n:]}
        self.costs = split_costs(cfg, self.blocks, ds, p)
        self.splits = dict(splits or {})
        self.modules: dict[int, tuple[list[int], Profile]] = {}

    def counts(self, k: int) -> list[int]:
        """The block counts of the runs' split into K modules (the bench's `splits`; another K
        is balanced like them)."""
        return self.splits.get(k) or balanced_counts(self.costs, k)

    def profile(self, k: int) -> Profile:
        """The simulator's Profile of K modules: forward, backward and step of each module
        timed as a unit; transfers and all-reduces from the per-block link profile."""
        if k not in self.modules:
            counts = self.counts(k)
            m = profile_modules(self.blocks, counts, self.x, self.y)
            links = module_profile(self.blocks_prof, counts)
            self.modules[k] = counts, Profile(tuple(m.forward), tuple(m.backward), tuple(m.step),
                                              links.transfer, links.allreduce)
        return self.modules[k][1]

    def record(self) -> dict[str, Any]:
        """What bench.json keeps: per-block times and each profiled split's module times."""
        return {**self.blocks_prof, "modules": {
            str(k): {"counts": counts, "forward": list(p.forward), "backward": list(p.backward),
                     "step": list(p.step)} for k, (counts, p) in sorted(self.modules.items())}}


def predict_rows(cfg: dict[str, Any], rows: list[dict[str, Any]], console=None,
                 splits: dict[int, list[int]] | None = None,
                 blocks_profile: BlockProfile | None = None
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Predicted speedups over BP on one worker for every (algo, W) measured or in
    `predict_gpus`; returns them and the profile they come from (`Profiler.record`).
    `blocks_profile`: the per-block profile the bench's split was balanced by, reused."""
    prof = Profiler(cfg, splits, blocks_profile)
    n = len(prof.blocks)
    names = [a for a in dict.fromkeys([r["algo"] for r in rows] + list(cfg["algos"]))
             if a in algos.names() and algos.get(a).simulate is not None]
    workers = sorted({r["workers"] for r in rows} | set(cfg["predict_gpus"]))
    whole = prof.profile(1)
    base = bp_one_device(whole)
    # the bench sizes a synthetic epoch to steps_per_epoch; a real data set keeps its own size
    steps = cfg["steps_per_epoch"] if cfg["data"]["name"] == "synthetic" else None
    out = []
    for algo in names:
        rec = algos.get(algo)
        for w in workers:
            layout = rec.layout(w)
            if layout is None or w < rec.min_workers:
                continue
            if rec.simulate == "allreduce":
                # the all-reduce of the whole model's gradients, as one bucket after the backward
                p = Profile(whole.forward, whole.backward, whole.step,
                            allreduce=(sum(prof.blocks_prof["allreduce"]),))
                replicas = w
            else:
                k, replicas = layout
                if k > n:
                    continue
                p = prof.profile(k)
            speedup = predict_speedup(algo, p, replicas=replicas,
                                      microbatches=cfg["microbatches"], baseline=base)
            run = (run_speedup(algo, p, steps, cfg["epochs"], replicas, cfg["microbatches"],
                               baseline=base) if steps else None)
            out.append({"algo": algo, "workers": w, "speedup": speedup, "speedup_run": run})
    if console is not None:
        console.print(f"profile: BP on one worker {1e3 * base:.1f} ms per batch; "
                      + module_balance(prof.record()["modules"]), highlight=False)
    return out, prof.record()


def module_balance(modules: dict[str, dict[str, Any]]) -> str:
    """One line per profiled split: each module's forward + backward + step per batch, and the
    balance (mean over max): the share of a K-device pipeline's time its slowest module leaves
    the others, the bound of any pipelined algorithm on that split."""
    parts = []
    for k, m in modules.items():
        if int(k) < 2:
            continue
        t = [f + b + s for f, b, s in zip(m["forward"], m["backward"], m["step"])]
        parts.append(f"K={k} ({'+'.join(map(str, m['counts']))} blocks): "
                     + " / ".join(f"{1e3 * v:.0f}" for v in t)
                     + f" ms, balance {sum(t) / len(t) / max(t):.0%}")
    return "; ".join(parts)
