"""Exact resume of decoupled runs (local executor, in-process): a run stopped mid-epoch by a
signal, or killed after an epoch's checkpoint, and resumed ends with the same parameters,
optimizer state and metrics as a run that was never stopped, bit for bit.

ResNet-8 (BatchNorm in every module) on digits, batch 128: 11 steps per epoch, 3 epochs, the
learning rate drops after epoch 2; ticks run in chunks of 4, so stops land inside epochs.
"""

from __future__ import annotations

import signal

import pytest
import torch
from conftest import make_cfg

from dpbp import checkpoint
from dpbp.errors import ConfigError, Interrupted
from dpbp.interrupt import StopRequest
from dpbp.logs import RunLogger
from dpbp.train import train

STEPS = 1437 // 128
BASE = ("executor=local", "model.name=resnet8", "trainer.batch_size=128", "trainer.epochs=3",
        "trainer.check_every=4", "sched.milestones=[2]", "seed=4")
UNTIMED = ("train_seconds",)


def settings(algo: str, k: int, weights: str = "stash") -> tuple[str, ...]:
    extra = (f"algo.weights={weights}",) if algo in ("ddg", "fdg") else ()
    return (*BASE, f"algo={algo}", f"gpus={k}", *extra)


def stage_files(run_dir, k):
    return [torch.load(run_dir / "checkpoints" / f"stage{s}.pt", weights_only=True)
            for s in range(k)]


def assert_same_run(dir_a, a: dict, dir_b, b: dict, k: int) -> None:
    """Same numbers: every epoch's metrics, counters, weights, buffers and momenta."""
    untimed = [[{key: v for key, v in e.items() if key not in UNTIMED} for e in s["history"]]
               for s in (a, b)]
    assert untimed[0] == untimed[1]
    for key in ("final_test_acc", "best_test_acc", "final_test_loss", "updates", "epochs",
                "history_memory_bytes", "skipped_steps"):
        assert a[key] == b[key], key
    for ca, cb in zip(stage_files(dir_a, k), stage_files(dir_b, k), strict=True):
        assert ca["module"].keys() == cb["module"].keys()
        for name in ca["module"]:
            assert torch.equal(ca["module"][name], cb["module"][name]), name
        sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
        assert sa.keys() == sb.keys() and len(sa) > 0
        for i in sa:
            assert torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"])


_reference: dict[tuple, tuple] = {}


def reference(tmp_path_factory, algo: str, k: int, weights: str):
    """The uninterrupted run of these settings (once per module)."""
    key = (algo, k, weights)
    if key not in _reference:
        run_dir = tmp_path_factory.mktemp(f"ref-{algo}-{k}-{weights}")
        _reference[key] = (run_dir, train(make_cfg(*settings(algo, k, weights)), run_dir))
    return _reference[key]


def signal_at(request: StopRequest, batches: int):
    """A logger that delivers SIGTERM once the run has trained `batches` batches."""

    class SignalAt(RunLogger):
        def advance(self, batches_done, images_per_second, loss):
            super().advance(batches_done, images_per_second, loss)
            if batches_done >= batches:
                request.set(signal.SIGTERM)

    return SignalAt


class CrashInEpoch2(RunLogger):
    """The process dies inside epoch 2: epoch 1's checkpoint is the last one."""

    def advance(self, batches_done, images_per_second, loss):
        super().advance(batches_done, images_per_second, loss)
        if batches_done > STEPS + 2:
            raise KeyboardInterrupt


@pytest.mark.parametrize("algo,k,weights", [
    ("bp", 2, "stash"), ("ddg", 2, "stash"), ("ddg", 2, "live"), ("fr", 2, "stash"),
    ("fdg", 2, "stash"), ("fdg", 3, "live"),
])
def test_a_signal_mid_epoch_checkpoints_there_and_resume_is_exact(tmp_path, tmp_path_factory,
                                                                   algo, k, weights):
    ref_dir, ref = reference(tmp_path_factory, algo, k, weights)
    stop = StopRequest()
    with pytest.raises(Interrupted, match=r"stopped by SIGTERM at tick (\d+)") as e:
        train(make_cfg(*settings(algo, k, weights)), tmp_path, logger_factory=signal_at(stop, 13),
              stop=stop)
    tick = int(e.value.args[0].split("tick ")[1].split(" ")[0])
    assert e.value.signum == signal.SIGTERM
    # the chunk [11, 15) of epoch 2 was running: it ends there (live: a few ticks later, once the
    # batches whose forward weights were not kept have left the pipeline)
    assert tick == 15 + (2 * (k - 1) if (algo, weights) == ("fdg", "live") else
                         (k - 1) if weights == "live" else 0)
    run = torch.load(tmp_path / "checkpoints" / "run.pt", weights_only=True)
    assert (run["epoch"], run["tick"]) == (1, tick)
    cks = stage_files(tmp_path, k)
    assert all(c["tick"] == tick for c in cks)
    # a decoupled pipeline has batches and messages in flight between two ticks, bp none
    assert (sum(len(c["inflight"]["pending"]) for c in cks) > 0) == (algo != "bp")
    assert (sum(len(c["messages"]) for c in cks) > 0) == (algo != "bp")
    resumed = train(make_cfg(*settings(algo, k, weights), "resume=true"), tmp_path)
    assert_same_run(ref_dir, ref, tmp_path, resumed, k)


@pytest.mark.parametrize("algo,k", [("fdg", 3)])
def test_a_crash_after_an_epoch_checkpoint_loses_nothing_else(tmp_path, tmp_path_factory, algo,
                                                               k):
    ref_dir, ref = reference(tmp_path_factory, algo, k, "stash")
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(*settings(algo, k)), tmp_path, logger_factory=CrashInEpoch2)
    run = torch.load(tmp_path / "checkpoints" / "run.pt", weights_only=True)
    assert (run["epoch"], run["tick"]) == (1, STEPS)
    resumed = train(make_cfg(*settings(algo, k), "resume=true"), tmp_path)
    assert_same_run(ref_dir, ref, tmp_path, resumed, k)


def test_a_crash_between_stage_files_and_run_pt_resumes_from_the_previous_tick(
        tmp_path, tmp_path_factory, monkeypatch):
    """Killed after the stage files of epoch 2 were written but before run.pt named them: the
    files of epoch 1 (kept as *.prev.pt) are used, not a mix of the two."""
    ref_dir, ref = reference(tmp_path_factory, "ddg", 2, "stash")
    commits = []

    def commit_then_die(directory, state, cfg):
        if commits:
            raise KeyboardInterrupt  # the second commit (epoch 2) never happens
        commits.append(state.tick)
        real_commit(directory, state, cfg)

    real_commit = checkpoint.commit
    monkeypatch.setattr(checkpoint, "commit", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(*settings("ddg", 2)), tmp_path)
    monkeypatch.setattr(checkpoint, "commit", real_commit)
    ck_dir = tmp_path / "checkpoints"
    assert torch.load(ck_dir / "run.pt", weights_only=True)["tick"] == STEPS
    assert torch.load(ck_dir / "stage0.pt", weights_only=True)["tick"] == 2 * STEPS
    assert torch.load(ck_dir / "stage0.prev.pt", weights_only=True)["tick"] == STEPS
    resumed = train(make_cfg(*settings("ddg", 2), "resume=true"), tmp_path)
    assert_same_run(ref_dir, ref, tmp_path, resumed, 2)
    assert not list(ck_dir.glob("*.prev.pt")) and not list(ck_dir.glob("*.tmp"))


def test_a_finished_decoupled_run_is_not_extended(tmp_path):
    cfg = make_cfg(*settings("ddg", 2), "trainer.epochs=1")
    train(cfg, tmp_path)
    with pytest.raises(ConfigError, match="drained"):
        train(make_cfg(*settings("ddg", 2), "trainer.epochs=2", "resume=true"), tmp_path)
    # the same number of epochs: nothing left to train, the same summary
    again = train(make_cfg(*settings("ddg", 2), "trainer.epochs=1", "resume=true"), tmp_path)
    assert again["epochs"] == 1
