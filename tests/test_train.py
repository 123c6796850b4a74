"""In-process runs of dpbp.train.train: determinism, max_steps, exact resume after an interrupt."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import STEPS_PER_EPOCH, make_cfg, module_state

from dpbp.logs import RunLogger
from dpbp.train import train

# what must be equal between two runs of the same numbers (train_seconds is wall time)
METRICS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "images")


def metrics(summary: dict) -> list[tuple]:
    return [tuple(h[k] for k in METRICS) for h in summary["history"]]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def seeded_runs(tmp_path_factory):
    """Two runs with seed 5 and one with seed 6: 30 steps, so 2 epochs (22 + 8 steps)."""
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        run_dir = tmp_path_factory.mktemp(f"seed{name}")
        cfg = make_cfg("trainer.epochs=5", "trainer.max_steps=30", f"seed={seed}")
        runs[name] = (run_dir, train(cfg, run_dir))
    return runs


def test_same_seed_gives_identical_parameters_and_metrics(seeded_runs):
    (dir_a, a), (dir_b, b) = seeded_runs["a"], seeded_runs["b"]
    assert metrics(a) == metrics(b)
    assert (a["final_test_acc"], a["final_test_loss"]) == (b["final_test_acc"],
                                                           b["final_test_loss"])
    assert_same_state(module_state(dir_a), module_state(dir_b))


def test_other_seed_gives_other_parameters_and_metrics(seeded_runs):
    (dir_a, a), (dir_c, c) = seeded_runs["a"], seeded_runs["c"]
    assert [h["train_loss"] for h in a["history"]] != [h["train_loss"] for h in c["history"]]
    sa, sc = module_state(dir_a), module_state(dir_c)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


def test_max_steps_caps_the_run(seeded_runs):
    _, s = seeded_runs["a"]
    # 30 steps of a 22-step epoch: two epochs, the second one partial, then stop
    assert s["steps"] == 30 and s["updates"] == [30] and s["epochs"] == 2
    assert [h["images"] for h in s["history"]] == [STEPS_PER_EPOCH * 64,
                                                   (30 - STEPS_PER_EPOCH) * 64]
    assert s["status"] == "completed" and len(s["history"]) == 2
    assert all(math.isfinite(h["train_loss"]) for h in s["history"])


class InterruptInSecondEpoch(RunLogger):
    """Ctrl-C in the middle of epoch 2: after epoch 1's checkpoint, before epoch 2's."""

    def advance(self, batches_done: int, images_per_second: float, loss: float | None) -> None:
        super().advance(batches_done, images_per_second, loss)
        if batches_done > STEPS_PER_EPOCH:
            raise KeyboardInterrupt


def test_resume_after_an_interrupt_equals_an_uninterrupted_run(tmp_path):
    settings = ("trainer.epochs=3", "seed=1", "trainer.log_every=4")
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    a = train(make_cfg(*settings), dir_a, logger_factory=RunLogger)

    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(*settings), dir_b, logger_factory=InterruptInSecondEpoch)
    run = torch.load(dir_b / "checkpoints" / "run.pt", weights_only=True)
    assert run["epoch"] == 1 and len(run["history"]) == 1
    assert not (dir_b / "summary.json").exists()

    b = train(make_cfg(*settings, "resume=true"), dir_b, logger_factory=RunLogger)
    assert b["epochs"] == 3 and [h["epoch"] for h in b["history"]] == [1, 2, 3]
    assert metrics(b) == metrics(a)
    assert (b["final_test_acc"], b["best_test_acc"], b["final_test_loss"]) == \
        (a["final_test_acc"], a["best_test_acc"], a["final_test_loss"])
    assert b["updates"] == a["updates"] == [3 * STEPS_PER_EPOCH]
    ck_a = torch.load(dir_a / "checkpoints" / "stage0.pt", weights_only=True)
    ck_b = torch.load(dir_b / "checkpoints" / "stage0.pt", weights_only=True)
    assert_same_state(ck_a["module"], ck_b["module"])  # weights and BatchNorm statistics
    momenta_a = [s["momentum_buffer"] for s in ck_a["optimizer"]["state"].values()]
    momenta_b = [s["momentum_buffer"] for s in ck_b["optimizer"]["state"].values()]
    assert len(momenta_a) == len(momenta_b) > 0
    assert all(torch.equal(x, y) for x, y in zip(momenta_a, momenta_b, strict=True))


def test_divergence_stops_the_run_naming_the_batch_and_keeps_the_good_checkpoint(tmp_path):
    from dpbp.errors import Divergence

    # epoch 1 trains normally; at epoch 2 the lr jumps by 1e12 and the loss blows up
    cfg = make_cfg("trainer.epochs=3", "sched.milestones=[1]", "sched.gamma=1e12")
    with pytest.raises(Divergence, match=r"non-finite training loss at batch (\d+) \(epoch 2") as e:
        train(cfg, tmp_path)
    bad = int(e.value.args[0].split("batch ")[1].split(" ")[0])
    assert bad >= STEPS_PER_EPOCH  # in epoch 2, not before
    assert "checkpoint of epoch 1" in str(e.value)
    ck = torch.load(tmp_path / "checkpoints" / "stage0.pt", weights_only=True)
    assert ck["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["module"].values() if v.is_floating_point())
