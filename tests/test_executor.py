"""Executors: the same schedule gives the same numbers in one process and over real gloo P2P.

The distributed runs here start real worker processes through the same launcher `dpbp train`
uses (torchelastic, gloo on CPU), so they cost a few seconds each.
"""

import json

import pytest
import torch
from conftest import make_cfg

from dpbp.config import RunConfig
from dpbp.errors import ConfigError
from dpbp.launch import launch
from dpbp.train import train


def config(algo: str, gpus: int, executor: str, **trainer) -> RunConfig:
    # 22 batches per epoch and max_steps=30: the pipeline runs across the epoch end
    return make_cfg(f"algo={algo}", f"gpus={gpus}", f"executor={executor}", "seed=1",
                    "sched.milestones=[100]", "trainer.epochs=2", "trainer.max_steps=30",
                    "trainer.check_every=7", *(f"trainer.{k}={v}" for k, v in trainer.items()))


def stage_params(run_dir, k):
    return [torch.load(run_dir / "checkpoints" / f"stage{s}.pt", weights_only=True)["module"]
            for s in range(k)]


@pytest.mark.parametrize("algo,k", [("bp", 2), ("ddg", 2), ("fr", 2), ("fdg", 2), ("ddg", 3),
                                    ("fdg", 3)])
@pytest.mark.slow
def test_local_and_dist_give_identical_results(tmp_path, algo, k):
    local_dir, dist_dir = tmp_path / "local", tmp_path / "dist"
    local = train(config(algo, k, "local"), local_dir)
    dist = launch(config(algo, k, "dist"), dist_dir)
    assert dist is not None and dist["executor"] == "dist" and local["executor"] == "local"
    on_disk = json.loads((dist_dir / "summary.json").read_text())
    assert on_disk["status"] == "completed"
    for key in ("final_test_acc", "final_test_loss", "updates", "split", "history_memory_bytes"):
        assert local[key] == dist[key] == on_disk[key], key
    untimed = [[{k: v for k, v in e.items() if k != "train_seconds"} for e in s["history"]]
               for s in (local, dist, on_disk)]
    assert untimed[0] == untimed[1] == untimed[2]
    for a, b in zip(stage_params(local_dir, k), stage_params(dist_dir, k), strict=True):
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_pipeline_fill_skips_the_first_updates(tmp_path):
    k, steps = 3, 30
    for algo, delays in (("ddg", [2, 1, 0]), ("fr", [2, 1, 0]), ("fdg", [4, 2, 0])):
        s = train(config(algo, k, "local"), tmp_path / algo)
        if algo == "fdg":  # K-1 drain ticks let the last stage see every batch
            assert s["updates"] == [steps + k - 1 - st - d for st, d in enumerate(delays)]
        else:
            assert s["updates"] == [steps - d for d in delays]


def test_memory_ordering_fr_below_ddg_below_fdg(tmp_path):
    mem = {}
    for algo in ("fr", "ddg", "fdg"):
        s = train(config(algo, 3, "local", max_steps=8, epochs=1), tmp_path / algo)
        mem[algo] = s["history_memory_bytes"]
    for stage in range(2):  # the last stage keeps one graph under every algorithm
        assert mem["fr"][stage] < mem["ddg"][stage] < mem["fdg"][stage], mem
    assert sum(mem["fr"]) < sum(mem["ddg"]) < sum(mem["fdg"])


def test_bp_over_modules_equals_bp_on_one(tmp_path):
    one = train(config("bp", 1, "local"), tmp_path / "one")
    two = train(config("bp", 2, "local"), tmp_path / "two")
    assert one["history"][-1]["train_loss"] == pytest.approx(two["history"][-1]["train_loss"],
                                                             rel=1e-5)
    whole = stage_params(tmp_path / "one", 1)[0]
    parts = stage_params(tmp_path / "two", 2)
    split = two["split"][0]
    offset = 0
    merged = {}
    for part, first in ((parts[0], 0), (parts[1], split)):
        for name, v in part.items():
            idx, rest = name.split(".", 1)
            merged[f"{int(idx) + first}.{rest}"] = v
        offset += 1
    assert merged.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(merged[name], whole[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("balance,msg", [([5, 5], "sums to 10"), ([11, 0], "at least one block")])
def test_bad_balance(tmp_path, balance, msg):
    cfg = config("ddg", 2, "local")
    cfg.split.balance = balance
    with pytest.raises(ConfigError, match=msg):
        train(cfg, tmp_path)


def test_more_modules_than_blocks(tmp_path):
    cfg = config("fdg", 12, "local")
    with pytest.raises(ConfigError, match="cannot cut 11 blocks into 12 modules"):
        train(cfg, tmp_path)


@pytest.mark.slow
def test_joining_under_torchrun_gives_the_same_run(tmp_path):
    """`torchrun ... -m dpbp.cli train`: every process joins instead of spawning workers."""
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    overrides = ["algo=fdg", "gpus=2", "device=cpu", "seed=1", "trainer.epochs=2",
                 "trainer.batch_size=64", "trainer.max_steps=30", "trainer.check_every=7",
                 "trainer.progress=false", "sched.milestones=[100]", "algo.beta=0.5"]
    run = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m",
                          "dpbp.cli", "train", *overrides, f"hydra.run.dir={tmp_path / 'tr'}"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    joined = json.loads((tmp_path / "tr" / "summary.json").read_text())
    local = train(config("fdg", 2, "local"), tmp_path / "local")
    assert joined["executor"] == "dist" and joined["status"] == "completed"
    untimed = [[{k: v for k, v in e.items() if k != "train_seconds"} for e in s["history"]]
               for s in (joined, local)]
    assert untimed[0] == untimed[1]
