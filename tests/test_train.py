"""In-process runs of dpbp.train.train: determinism, max_steps, exact resume after an interrupt."""

from __future__ import annotations

import math
import re

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
    settings = ("trainer.epochs=3", "seed=1", "trainer.check_every=4")
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


def test_divergence_names_tick_module_and_batch_in_a_pipeline(tmp_path):
    from dpbp.errors import Divergence

    cfg = make_cfg("algo=ddg", "gpus=2", "executor=local", "trainer.epochs=2",
                   "sched.milestones=[1]", "sched.gamma=1e12")
    with pytest.raises(Divergence) as e:
        train(cfg, tmp_path)
    line = str(e.value)
    m = re.fullmatch(r"non-finite (training loss|gradient) at batch (\d+) \(epoch 2, tick (\d+)\)"
                     r" in module ([12]); the checkpoint of epoch 1 \(tick 22\) in .* is the last"
                     r" good one; lower optim.lr, or skip such steps with "
                     r"trainer.on_nonfinite=skip", line)
    assert m, line
    batch, tick, module = int(m[2]), int(m[3]), int(m[4])
    assert batch >= STEPS_PER_EPOCH and tick == batch + (2 - module)  # ddg: module 1 lags 1


def test_a_non_finite_gradient_with_a_finite_loss_is_caught():
    """sqrt at 0: the forward is finite, its gradient is not. Module 1's gradient is named."""
    from torch import nn

    from dpbp import schedule
    from dpbp.errors import Divergence
    from dpbp.executor import LocalExecutor
    from dpbp.stage import Stage
    from dpbp.tick import check_finite

    class SqrtOfRelu(nn.Module):
        def forward(self, x):
            return torch.sqrt(torch.relu(x) * 0)

    class Feed:
        def inputs(self, b):
            return torch.ones(4, 3)

        def labels(self, b):
            return torch.zeros(4, dtype=torch.long)

    torch.manual_seed(0)
    mods = [nn.Sequential(nn.Linear(3, 3), SqrtOfRelu()), nn.Linear(3, 2)]
    stages = [Stage(m, k, 2, "ddg", torch.optim.SGD(m.parameters(), lr=0.1))
              for k, m in enumerate(mods)]
    nb = 2  # module 1 steps once (batch 0, at tick 1), after both losses were computed
    end = schedule.num_ticks("ddg", 2, nb)
    LocalExecutor(stages, Feed()).run([schedule.program("ddg", s, 2, range(end), nb, end)
                                       for s in range(2)])
    assert stages[1].first_nonfinite_batch() is None  # the loss stayed finite
    with pytest.raises(Divergence, match=r"non-finite gradient at batch 0 \(epoch 1, tick 1\) "
                                         r"in module 1; kept"):
        check_finite(stages, "ddg", 2, 4, "kept")


class SqrtOfSquare(torch.nn.Module):
    """|x| with a finite forward; at x = 0 its gradient is NaN (sqrt'(0) = inf, times 2x = 0)."""

    def forward(self, x):
        return torch.sqrt(x * x)


class ZeroFeed:
    """Batch 2 is all zeros: the only batch whose gradient in module 1 is not finite."""

    def inputs(self, b):
        return torch.full((4, 3), 0.0 if b == 2 else 1.0)

    def labels(self, b):
        return torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_one_bad_batch_stops_or_is_skipped(mode):
    from torch import nn

    from dpbp import schedule
    from dpbp.errors import Divergence
    from dpbp.executor import LocalExecutor
    from dpbp.stage import Stage
    from dpbp.tick import check_finite

    torch.manual_seed(0)
    first = nn.Linear(3, 3, bias=False)  # zeros in, zeros out, whatever the weights
    mods = [nn.Sequential(first, SqrtOfSquare()), nn.Linear(3, 2)]
    stages = [Stage(m, k, 2, "ddg", torch.optim.SGD(m.parameters(), lr=0.01),
                    on_nonfinite=mode) for k, m in enumerate(mods)]
    nb = 6
    end = schedule.num_ticks("ddg", 2, nb)
    LocalExecutor(stages, ZeroFeed()).run([schedule.program("ddg", s, 2, range(end), nb, end)
                                           for s in range(2)])
    if mode == "stop":
        with pytest.raises(Divergence, match=r"non-finite gradient at batch 2 \(epoch 1, tick 3\)"
                                             r" in module 1"):
            check_finite(stages, "ddg", 2, nb, "kept")
        return
    check_finite(stages, "ddg", 2, nb, "kept", streak=3)  # one bad step is no divergence
    assert [s.stats.skipped for s in stages] == [1, 0]
    assert [s.stats.updates for s in stages] == [nb - 2, nb]  # module 1: one fill tick, one skip
    assert all(torch.isfinite(p).all() for m in mods for p in m.parameters())


def test_on_nonfinite_skip_stops_a_run_that_does_not_recover(tmp_path):
    """An absurd learning rate overflows the weights: every later gradient is non-finite, so
    skipping cannot help; the run stops after a chunk of skipped steps in a row."""
    from dpbp.errors import Divergence

    cfg = make_cfg("algo=ddg", "gpus=2", "executor=local", "trainer.epochs=2",
                   "sched.milestones=[1]", "sched.gamma=1e12", "trainer.on_nonfinite=skip",
                   "trainer.check_every=4")
    with pytest.raises(Divergence, match=r"module [12] skipped its last \d+ steps .* the "
                                         r"checkpoint of epoch 1"):
        train(cfg, tmp_path)
