"""Data parallelism on a replicas x modules grid of real gloo processes: dp_fdg and ddp."""

import signal
import threading
import time

import pytest
import torch
from conftest import make_cfg

from dpbp.errors import Interrupted
from dpbp.launch import launch
from dpbp.train import train

pytestmark = pytest.mark.slow


def config(algo, gpus, replicas, batch, model="resnet20", augment="auto", executor="dist"):
    own = {"dp_fdg": [f"algo.replicas={replicas}", "algo.beta=0.5"],
           "fdg": ["algo.beta=0.5"]}.get(algo, [])
    return make_cfg(f"algo={algo}", f"gpus={gpus}", f"model.name={model}",
                    f"data.augment={augment}", f"executor={executor}", "seed=2", *own,
                    "sched.milestones=[100]", "trainer.epochs=2", f"trainer.batch_size={batch}",
                    "trainer.max_steps=30", "trainer.check_every=7")


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


@pytest.fixture(scope="module")
def dp_fdg_run(tmp_path_factory):
    """dp_fdg, 2 replicas x 2 modules (4 processes), never stopped: (run dir, summary)."""
    run_dir = tmp_path_factory.mktemp("dp_fdg") / "dp"
    return run_dir, launch(config("dp_fdg", 4, 2, 32, model="mlp", augment="none"), run_dir)


def test_two_replicas_of_batch_b_equal_fdg_with_batch_2b(tmp_path, dp_fdg_run):
    """Without BatchNorm, averaging the replicas' gradients is the gradient of the whole batch."""
    dp_dir, dp = dp_fdg_run
    fdg = train(config("fdg", 2, 1, 64, model="mlp", augment="none", executor="local"),
                tmp_path / "fdg")
    assert (dp["modules"], dp["replicas"], dp["gpus"]) == (2, 2, 4)
    assert dp["steps"] == fdg["steps"] == 30 and dp["updates"] == fdg["updates"]
    for a, b in zip(params(dp_dir, 2), params(tmp_path / "fdg", 2)):
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


def test_dp_fdg_stopped_mid_run_resumes_exactly(tmp_path, dp_fdg_run):
    """A STOP file (what the parent leaves on SIGTERM) stops all 4 processes at one tick with a
    checkpoint: every replica's in-flight batches and messages. The resumed run equals the run
    that was never stopped, bit for bit."""
    ref_dir, ref = dp_fdg_run
    run_dir = tmp_path / "dp"
    cfg = config("dp_fdg", 4, 2, 32, model="mlp", augment="none")
    run_dir.mkdir()
    # launch() removes a STOP file left from an earlier run: make it appear once it started
    threading.Thread(target=touch_when_started, args=(run_dir,), daemon=True).start()
    with pytest.raises(Interrupted, match=r"STOP exists at tick \d+ \(epoch 1,") as e:
        launch(cfg, run_dir)
    assert e.value.signum == signal.SIGTERM
    ck_dir = run_dir / "checkpoints"
    tick = torch.load(ck_dir / "run.pt", weights_only=True)["tick"]
    assert 0 < tick < 22 and f"at tick {tick} " in str(e.value)  # inside epoch 1
    files = sorted(p.name for p in ck_dir.glob("stage*.pt"))
    assert files == ["stage0.pt", "stage0.replica1.pt", "stage1.pt", "stage1.replica1.pt"]
    assert not (run_dir / "STOP").exists()
    cfg.resume = True
    resumed = launch(cfg, run_dir)
    strip = [[{k: v for k, v in e.items() if k != "train_seconds"} for e in s["history"]]
             for s in (ref, resumed)]
    assert strip[0] == strip[1] and ref["updates"] == resumed["updates"]
    for a, b in zip(params(ref_dir, 2), params(run_dir, 2), strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)


def touch_when_started(run_dir):
    deadline = time.monotonic() + 300
    while not list((run_dir / ".workers").glob("rank*.json")) and time.monotonic() < deadline:
        time.sleep(0.02)
    (run_dir / "STOP").touch()
