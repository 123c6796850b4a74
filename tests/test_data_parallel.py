"""Data parallelism on a replicas x modules grid of real gloo processes: dp_fdg and ddp."""

import pytest
import torch

from dpbp.config import RunConfig, validate
from dpbp.data import DataConfig
from dpbp.launch import launch
from dpbp.train import train


def config(algo, gpus, replicas, batch, model="resnet20", augment="auto", executor="dist"):
    cfg = RunConfig(model=model, data=DataConfig(name="digits", augment=augment), gpus=gpus,
                    device="cpu", executor=executor, seed=2)
    cfg.algo.name, cfg.algo.replicas, cfg.algo.beta = algo, replicas, 0.5
    cfg.sched.milestones = [100]
    cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.max_steps = 2, batch, 30
    cfg.trainer.progress, cfg.trainer.log_every = False, 7
    validate(cfg)
    return cfg


def params(run_dir, k):
    return [torch.load(run_dir / "checkpoints" / f"stage{s}.pt", weights_only=True)["module"]
            for s in range(k)]


def test_one_replica_is_fdg(tmp_path):
    dp = launch(config("dp_fdg", 2, 1, 64), tmp_path / "dp")
    fdg = train(config("fdg", 2, 1, 64, executor="local"), tmp_path / "fdg")
    strip = [[{k: v for k, v in e.items() if k != "train_seconds"} for e in s["history"]]
             for s in (dp, fdg)]
    assert strip[0] == strip[1] and dp["replicas"] == 1 and dp["updates"] == fdg["updates"]
    for a, b in zip(params(tmp_path / "dp", 2), params(tmp_path / "fdg", 2)):
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_two_replicas_of_batch_b_equal_fdg_with_batch_2b(tmp_path):
    """Without BatchNorm, averaging the replicas' gradients is the gradient of the whole batch."""
    dp = launch(config("dp_fdg", 4, 2, 32, model="mlp", augment="none"), tmp_path / "dp")
    fdg = train(config("fdg", 2, 1, 64, model="mlp", augment="none", executor="local"),
                tmp_path / "fdg")
    assert (dp["modules"], dp["replicas"], dp["gpus"]) == (2, 2, 4)
    assert dp["steps"] == fdg["steps"] == 30 and dp["updates"] == fdg["updates"]
    for a, b in zip(params(tmp_path / "dp", 2), params(tmp_path / "fdg", 2)):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6)
    assert dp["final_test_acc"] == fdg["final_test_acc"]
    # training metrics cover every replica's share of the global batch
    for a, b in zip(dp["history"], fdg["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_acc"] == pytest.approx(b["train_acc"], abs=1e-9)
        assert a["images"] == b["images"]


def test_ddp_of_batch_b_equals_bp_with_batch_2b(tmp_path):
    """torch's DistributedDataParallel on 2 workers: the gradient of the whole global batch."""
    cfg = config("ddp", 2, 2, 32, model="mlp", augment="none")
    ddp = launch(cfg, tmp_path / "ddp")
    bp = train(config("bp", 1, 1, 64, model="mlp", augment="none", executor="local"),
               tmp_path / "bp")
    assert (ddp["modules"], ddp["replicas"]) == (1, 2) and ddp["steps"] == bp["steps"]
    (a,), (b,) = params(tmp_path / "ddp", 1), params(tmp_path / "bp", 1)
    assert {n.removeprefix("module.") for n in a} == set(b)
    for n in a:
        torch.testing.assert_close(a[n], b[n.removeprefix("module.")], rtol=1e-5, atol=1e-6)
