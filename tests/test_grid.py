"""grid.GradSync: dp_fdg's gradient all-reduce runs during the backward, with unchanged numbers.

The process group is replaced by a stand-in for R identical replicas (their sum is R times this
replica's gradient), so that the test runs in one process and the mean must equal the gradient
itself exactly.
"""

from __future__ import annotations

import pytest
import torch
from test_stage import Feed, modules

from dpbp import grid, schedule
from dpbp.executor import LocalExecutor
from dpbp.stage import Stage

R = 2


class Done:
    def wait(self) -> None:
        pass


@pytest.fixture
def events(monkeypatch):
    """Record every all-reduce and every layer's backward, in order."""
    log: list[str] = []

    def all_reduce(t, group=None, async_op=False):
        log.append(f"all_reduce {tuple(t.shape)}")
        t.mul_(R)  # R identical replicas
        return Done()

    monkeypatch.setattr(grid.dist, "all_reduce", all_reduce)
    return log


def run(algo: str, weights: str, sync: bool, log: list[str] | None = None):
    m1, m2 = modules()
    if log is not None:  # mark when the backward reaches module 1's first layer (Linear(4, 6))
        m1[1].register_full_backward_hook(lambda *a: log.append("first layer backward"))
    stages = [Stage(m, k, 2, algo, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                    weights=weights, beta=0.5,
                    grad_sync=grid.GradSync(None, R) if sync else None)
              for k, m in enumerate((m1, m2))]
    end = schedule.num_ticks(algo, 2, 5)
    programs = [schedule.program(algo, s, 2, range(end), 5, end) for s in range(2)]
    LocalExecutor(stages, Feed()).run(programs)
    return [p.detach().clone() for p in (*m1.parameters(), *m2.parameters())]


@pytest.mark.parametrize("weights", ["stash", "live"])
def test_the_mean_over_identical_replicas_leaves_the_run_unchanged(events, weights):
    synced = run("dp_fdg", weights, sync=True)
    alone = run("fdg", weights, sync=False)
    assert all(torch.equal(a, b) for a, b in zip(synced, alone))
    assert any(e.startswith("all_reduce") for e in events)


def test_all_reduces_start_before_the_backward_is_done(events):
    run("dp_fdg", "stash", sync=True, log=events)
    # in module 1's first backward, the gradients of its last layers are being reduced before
    # the backward has reached its first layer
    first = events.index("first layer backward")
    # module 1's last layer is Linear(6, 5): its weight (5, 6) is already being reduced
    assert "all_reduce (5, 6)" in events[:first]
    assert "all_reduce (6, 4)" in events[first + 1:]  # the first layer's, after its backward
