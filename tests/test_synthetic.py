"""DNI (synthetic.py, algos/dni.py): the update rule against a hand-written float64 reference.

Three modules (Linear-Tanh 4->6, Linear-Tanh 6->5, Linear 5->3 + cross-entropy), plain SGD,
linear gradient predictors M_1 (6->6) and M_2 (5->5) with random (not zero) weights so that
every term of the rule shows, driven by the local executor. The rule at tick t, module k < K:
first M_k takes one step on 0.5 ||M_k(h_k^{t-1}) - delta_k^{t-1}||^2 / B, where delta_k^{t-1}
is what module k+1 sent down at tick t-1 (module K: the loss gradient; module k+1 < K: its
synthetic gradient back-propagated through module k+1: bootstrapping); then module k forwards
batch t and steps on delta_hat = M_k(h_k^t).
"""

import pytest
import torch
import torch.nn.functional as F
from test_stage import LR, NB, Feed
from torch import nn

from dpbp import schedule, synthetic
from dpbp.executor import LocalExecutor
from dpbp.stage import Stage

SIZES = [4, 6, 5, 3]


def networks():
    torch.manual_seed(0)
    mods = [nn.Sequential(nn.Linear(4, 6), nn.Tanh()), nn.Sequential(nn.Linear(6, 5), nn.Tanh()),
            nn.Sequential(nn.Linear(5, 3))]
    preds = [nn.Linear(6, 6), nn.Linear(5, 5)]
    return [m.double() for m in mods], [p.double() for p in preds]


def run_dni():
    mods, preds = networks()
    stages = []
    for k, m in enumerate(mods):
        comp = (synthetic.SyntheticGradient(preds[k], torch.optim.SGD(preds[k].parameters(),
                                                                       lr=LR), (SIZES[k + 1],))
                if k < 2 else None)
        stages.append(Stage(m, k, 3, "dni", torch.optim.SGD(m.parameters(), lr=LR),
                            companion=comp))
    end = schedule.num_ticks("dni", 3, NB)
    LocalExecutor(stages, Feed()).run(
        [schedule.program("dni", s, 3, range(end), NB, end) for s in range(3)])
    return [p.detach() for m in (*mods, *preds) for p in m.parameters()]


def reference(bootstrap=True, learn_first=True):
    """DNI written out (tanh layers' derivatives by hand); `bootstrap=False` (module 2 sends
    down nothing useful: M_1 regresses to zero) and `learn_first=False` (the predictor's step
    after the module's backward) are wrong rules, for the test that the check can fail."""
    mods, preds = networks()
    W = [[p.detach().clone() for p in m.parameters()] for m in mods]
    P = [[p.detach().clone() for p in m.parameters()] for m in preds]
    feed = Feed()
    sent = {}  # (k, batch) -> (h_k, delta_k) waiting for module k's predictor step

    def learn(k, t):
        if (k, t - 1) in sent:
            h, delta = sent.pop((k, t - 1))
            e = (h @ P[k][0].T + P[k][1] - delta) / h.shape[0]
            P[k] = [P[k][0] - LR * e.T @ h, P[k][1] - LR * e.sum(0)]

    for t in range(NB):
        x = feed.x[t]
        for k in range(3):
            A, a = W[k]
            z = x @ A.T + a
            if k == 2:
                p = torch.softmax(z, 1)
                d = (p - F.one_hot(feed.y[t], 3).double()) / x.shape[0]
                down = d @ A
            else:
                if learn_first:
                    learn(k, t)
                h = torch.tanh(z)
                dhat = h @ P[k][0].T + P[k][1]
                d = dhat * (1 - h**2)
                down = d @ A
                if not learn_first:
                    learn(k, t)
            if k > 0:  # what module k sends to module k-1 for this batch
                sent[(k - 1, t)] = (x, down if (bootstrap or k == 2) else torch.zeros_like(down))
            W[k] = [A - LR * d.T @ x, a - LR * d.sum(0)]
            if k < 2:
                x = h
    return [w for ws in (*W, *P) for w in ws]


def test_dni_update_rule_matches_the_paper():
    for got, want in zip(run_dni(), reference(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("wrong", [{"bootstrap": False}, {"learn_first": False}])
def test_the_reference_check_detects_a_wrong_rule(wrong):
    """The comparison above can fail: a rule that differs in one respect does not match."""
    got, bad = run_dni(), reference(**wrong)
    assert any(not torch.allclose(g, w, rtol=1e-9, atol=1e-12) for g, w in zip(got, bad))


def test_dni_schedule_learns_from_the_gradient_of_the_tick_before():
    """Module k steps on its prediction in the tick of its forward; the gradient module k+1
    sends down in that tick trains M_k in the next one, before the next backward."""
    assert [str(i) for i in schedule.tick_program("dni", 0, 3, 4, 8, 8)] == \
        ["F4", ">A4", "<G3", "L3", "B4", "S"]
    assert [str(i) for i in schedule.tick_program("dni", 1, 3, 4, 8, 8)] == \
        ["<A4", "F4", ">A4", "<G3", "L3", "B4", ">G4", "S"]
    assert [str(i) for i in schedule.tick_program("dni", 2, 3, 4, 8, 8)] == \
        ["<A4", "F4", "B4", ">G4", "S"]
    # the last batch's gradient would arrive after the end: not sent
    assert ">G7" not in [str(i) for i in schedule.tick_program("dni", 2, 3, 7, 8, 8)]
    # a checkpoint between ticks 3 and 4 holds the gradients of batch 3 in flight
    assert [str(i) for i in schedule.carried("dni", 2, 3, 4, 8, 8)] == [">G3"]


def test_predictor_starts_at_zero_and_follows_the_paper_design():
    """The paper's CIFAR model: two 5x5 conv + BN + ReLU layers, a zero 5x5 conv output."""
    m = synthetic.gradient_model((16, 8, 8), hidden=32, kernel=5)
    convs = [c for c in m if isinstance(c, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == \
        [(16, 32, (5, 5)), (32, 32, (5, 5)), (32, 16, (5, 5))]
    x = torch.randn(4, 16, 8, 8)
    assert torch.equal(m(x), torch.zeros_like(x))
    v = synthetic.gradient_model((20,), hidden=8, kernel=5)
    assert torch.equal(v(torch.randn(4, 20)), torch.zeros(4, 20))
