"""LPP-SGD (dpbp/algos/lpp_sgd.py): the partition of bapi/LPP-SGD's get_indices, the warm-up and
the alternation of full and partitioned updates, and the update itself checked in float64
against a hand-written transcription (per-thread momentum, SGD with weight decay)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_cfg
from torch import nn

from dpbp.algos.lpp_sgd import Partition, owners
from dpbp.asgd import AsyncSGD
from dpbp.errors import ConfigError
from dpbp.train import train

LR, MOM, WD = 0.1, 0.9, 1e-3


@pytest.mark.parametrize("sizes,threads,want", [
    ([10, 5, 20, 3, 7], 2, [0, 0, 0, 1, 1]),  # chunk 23; tensors start at 0, 10, 15, 35, 38
    ([10, 5, 20, 3, 7], 3, [0, 0, 1, 2, 2]),  # chunk 15
    ([30, 6, 18, 3], 2, [0, 1, 1, 1]),  # the model below: chunk 29
    ([100, 1, 1], 3, [0, 2, 2]),  # one tensor spans two chunks: thread 1 owns none
    ([4, 4], 1, [0, 0]),
])
def test_each_tensor_belongs_to_the_chunk_it_starts_in(sizes, threads, want):
    assert owners(sizes, threads) == want


def test_full_updates_during_the_warm_up_then_full_and_partitioned_in_turn():
    p = Partition([0, 1, 1], warmup_batches=4)
    assert [p.mask(0, b) for b in range(4)] == [None] * 4  # the warm-up counts no turns
    assert [p.mask(0, b) for b in (4, 5, 6, 7)] == [None, [True, False, False], None,
                                                    [True, False, False]]
    # each thread alternates on its own count
    assert [p.mask(1, b) for b in (8, 9, 10)] == [None, [False, True, True], None]


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batches():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(8, 4, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (8, 4), generator=g))


ORDER = [(0, 0), (1, 1), (0, 2), (1, 3), (0, 4), (1, 5), (0, 6), (1, 7)]  # (thread, batch)


def run(warmup: int = 2):
    m = model()
    sgd = AsyncSGD(m, LR, MOM, WD, layerwise=False,
                   partition=Partition(owners([p.numel() for p in m.parameters()], 2), warmup),
                   momenta=2)
    x, y = batches()
    trace = []
    for thread, b in ORDER:
        before = {n: p.detach().clone() for n, p in sgd.params.items()}
        sgd.backward(sgd.forward(sgd.shell(), x[b], y[b], b), thread)
        trace.append({n for n, p in sgd.params.items() if not torch.equal(p, before[n])})
    return [p.detach() for p in m.parameters()], trace


def reference(warmup: int = 2, owner=(0, 1, 1, 1), shared_momentum: bool = False):
    """The rule, transcribed: thread j's k-th update after the warm-up covers every tensor for
    even k and only its own tensors for odd k; d = g + wd w, v = mu v + d (v per thread),
    w -= lr v."""
    w = [p.detach().clone() for p in model().parameters()]
    v = {j: [torch.zeros_like(t) for t in w] for j in (0, 1)}
    turns = {0: 0, 1: 0}
    x, y = batches()
    for thread, b in ORDER:
        W1, b1, W2, b2 = (t.clone().requires_grad_(True) for t in w)
        loss = F.cross_entropy(torch.tanh(x[b] @ W1.T + b1) @ W2.T + b2, y[b])
        grads = torch.autograd.grad(loss, (W1, b1, W2, b2))
        own = [True] * 4
        if b >= warmup:
            if turns[thread] % 2:
                own = [o == thread for o in owner]
            turns[thread] += 1
        buf = v[0] if shared_momentum else v[thread]
        for i in range(4):
            if own[i]:
                buf[i] = MOM * buf[i] + grads[i] + WD * w[i]
                w[i] = w[i] - LR * buf[i]
    return w


def test_updates_match_the_reference_and_touch_only_the_threads_share():
    got, trace = run()
    for g, want in zip(got, reference(), strict=True):
        torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)
    everything = {"0.weight", "0.bias", "2.weight", "2.bias"}
    # batches 0-3: warm-up and each thread's first full turn; 4: thread 0's share, 5: thread 1's
    assert trace[:4] == [everything] * 4
    assert trace[4] == {"0.weight"} and trace[5] == {"0.bias", "2.weight", "2.bias"}
    assert trace[6:] == [everything] * 2


def test_the_reference_tells_the_rules_apart():
    """So that the check above can fail: another partition, a shared momentum, no warm-up and
    Hogwild! (no partition) each give other weights."""
    base = reference()
    for other in (reference(owner=(0, 0, 1, 1)), reference(shared_momentum=True),
                  reference(warmup=0), reference(warmup=99)):
        assert not all(torch.allclose(a, b, rtol=1e-12, atol=1e-12)
                       for a, b in zip(base, other))


def test_negative_warm_up_is_one_sentence():
    with pytest.raises(ConfigError, match=r"algo.partition_after=-1 must be >= 0"):
        make_cfg("algo=lpp_sgd", "algo.partition_after=-1")


def test_devices_average_after_every_step_in_the_first_dense_epochs():
    """The code's --pre_post_epochs: averaging frequency 1 while the progress in epochs is below
    it, then every average_every steps; pdasgd and hogwild never average densely. A span's
    averaging marks follow the rule from the global batch count."""
    from dpbp.asgd import _Span

    lpp = make_cfg("algo=lpp_sgd", "algo.dense_average_epochs=2", "algo.average_every=5").algo
    assert [m for m in range(1, 21) if lpp.averages_after(m, 4)] == [1, 2, 3, 4, 5, 6, 7, 8,
                                                                     10, 15, 20]
    assert make_cfg("algo=lpp_sgd").algo.dense_average_epochs == 0  # the code's default
    pd = make_cfg("algo=pdasgd", "algo.average_every=5").algo
    assert [m for m in range(1, 21) if pd.averages_after(m, 4)] == [5, 10, 15, 20]
    span = _Span(AsyncSGD(nn.Linear(2, 2), 0.1, 0.0, 0.0, layerwise=False), None, range(4, 12),
                 1, 1, lambda m: lpp.averages_after(m, 4), world=2)
    assert span.marks == [1, 2, 3, 4, 6]  # batches 5..8 (dense), then the 10th
    with pytest.raises(ConfigError, match=r"algo.dense_average_epochs=-1 must be >= 0"):
        make_cfg("algo=lpp_sgd", "algo.dense_average_epochs=-1")


def test_a_run_partitions_after_its_warm_up_and_checkpoints_every_threads_momentum(tmp_path):
    s = train(make_cfg("algo=lpp_sgd", "algo.partition_after=1", "trainer.epochs=2"), tmp_path)
    assert s["status"] == "completed" and s["updates"] == [s["steps"]]
    ck = torch.load(tmp_path / "checkpoints" / "stage0.pt", weights_only=True)
    assert len(ck["thread_momentum"]) == 1  # thread 1's; thread 0's is "momentum"
    assert any(not torch.equal(ck["momentum"][n], ck["thread_momentum"][0][n])
               for n in ck["momentum"])
