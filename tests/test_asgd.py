"""PD-ASGD and Hogwild!: staleness accounting, layer-wise updates, clean thread shutdown."""

import threading

import pytest
import torch
from torch import nn

from dpbp.asgd import AsyncSGD, Staleness, run_epoch


def test_staleness_counts_updates_between_read_and_use():
    m = Staleness(["a", "b"])
    r0 = m.read()  # forward 1 reads a=0, b=0
    r1 = m.read()  # forward 2 reads the same versions
    m.update("a", r0["a"])  # forward 1's gradient: no update in between
    m.update("a", r1["a"])  # forward 2's gradient: a was updated once since it read
    m.update("b", r1["b"])
    r2 = m.read()
    assert r2 == {"a": 2, "b": 1}
    m.update("a", r0["a"])  # a very late gradient: 2 updates since its read
    s = m.summary()
    assert s["a"] == {"mean": 1.0, "max": 2} and s["b"] == {"mean": 0.0, "max": 0}


class Feed:
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(40, 8, 5, generator=g), torch.randint(0, 3, (40, 8),
                                                                           generator=g)

    def inputs(self, b):
        return self.x[b]

    def labels(self, b):
        return self.y[b]


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def test_layerwise_update_happens_during_the_backward():
    """pdasgd updates the last layer before the backward reaches the first one."""
    sgd = AsyncSGD(model(), lr=0.1, momentum=0.0, weight_decay=0.0, layerwise=True)
    first = sgd.params["0.weight"]
    seen: list[str] = []
    original = sgd.apply

    def spy(name, grad, read_version):
        seen.append(name)
        if name == "0.weight":  # by now the later layers must already be updated
            assert sgd.meter.version["2.weight"] == 1 and sgd.meter.version["2.bias"] == 1
        original(name, grad, read_version)

    sgd.apply = spy
    before = first.detach().clone()
    sgd.backward(sgd.forward(sgd.shell(), Feed().x[0], Feed().y[0]))
    assert seen.index("2.weight") < seen.index("0.weight") and len(seen) == 4
    assert not torch.equal(before, first.detach())


def test_staleness_is_bounded_by_the_queue():
    """One forward and one backward thread: a forward runs at most two batches ahead (one
    waiting in the queue of size 1, one being computed), so no gradient is more than 2 stale."""
    sgd = AsyncSGD(model(), lr=0.1, momentum=0.9, weight_decay=1e-3, layerwise=False)
    run_epoch(sgd, Feed(), range(40), forward_threads=1, backward_threads=1,
              average_after=lambda m: m % 10 == 0, world=1)
    stale = sgd.meter.summary()
    assert sgd.steps == 40 and all(s["max"] <= 2 for s in stale.values())
    assert all(torch.isfinite(p).all() for p in sgd.model.parameters())


@pytest.mark.parametrize("layerwise", [True, False])
def test_threads_finish_and_errors_surface(layerwise):
    before = threading.active_count()
    sgd = AsyncSGD(model(), lr=0.05, momentum=0.9, weight_decay=0.0, layerwise=layerwise)
    run_epoch(sgd, Feed(), range(40), forward_threads=2, backward_threads=2,
              average_after=lambda m: m % 10 == 0, world=1)
    assert sgd.steps == 40 and sgd.seen == 40 * 8
    assert threading.active_count() == before  # every thread joined

    class Broken(Feed):
        def inputs(self, b):
            if b == 7:
                raise ValueError("bad batch 7")
            return super().inputs(b)

    with pytest.raises(ValueError, match="bad batch 7"):
        run_epoch(sgd, Broken(), range(40), forward_threads=2, backward_threads=2,
                  average_after=lambda m: m % 10 == 0, world=1)
    assert threading.active_count() == before


@pytest.mark.slow
def test_two_devices_average_and_report_staleness(tmp_path):
    """gpus=2: two processes with threads, parameters averaged every 5 steps over gloo."""
    from conftest import make_cfg

    from dpbp.launch import launch

    cfg = make_cfg("algo=pdasgd", "gpus=2", "algo.average_every=5", "trainer.epochs=4",
                   "trainer.batch_size=128")
    s = launch(cfg, tmp_path)
    assert s["status"] == "completed" and (s["replicas"], s["modules"]) == (2, 1)
    assert s["steps"] == 20 and s["updates"] == [20]  # 1437 // (128 x 2) = 5 per epoch
    # every parameter tensor is metered; 1 forward + 2 backward threads keep staleness small
    assert len(s["staleness"]) > 10
    assert 0 < s["staleness_max"] <= 4
    assert s["final_test_acc"] > 0.3  # the averaged model learned (chance is 0.1)
