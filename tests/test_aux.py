"""DGL (aux.py, algos/dgl.py): the update rule against a hand-written float64 reference.

Two modules (module 1: Linear-Tanh-Linear-Tanh with a linear auxiliary head, module 2: Linear +
cross-entropy), plain SGD, driven by the local executor. DGL's rule: at tick t module 1
forwards batch t and steps, with its head, on the head's cross-entropy of batch t; module 2
forwards batch t-1 (module 1's output of tick t-1, pipelined) and steps on the network's loss.
No gradient goes from module 2 to module 1.
"""

import pytest
import torch
import torch.nn.functional as F
from test_stage import LR, NB, B, Feed, f1, g1, modules
from torch import nn

from dpbp import aux, schedule
from dpbp.executor import LocalExecutor
from dpbp.stage import Stage


def head():
    torch.manual_seed(3)
    return nn.Linear(5, 3).double()


def run_dgl():
    m1, m2 = modules()
    h = head()
    local = aux.LocalLoss(h, torch.optim.SGD(h.parameters(), lr=LR), (5,))
    stages = [Stage(m1, 0, 2, "dgl", torch.optim.SGD(m1.parameters(), lr=LR), companion=local),
              Stage(m2, 1, 2, "dgl", torch.optim.SGD(m2.parameters(), lr=LR))]
    end = schedule.num_ticks("dgl", 2, NB)
    programs = [schedule.program("dgl", s, 2, range(end), NB, end) for s in range(2)]
    LocalExecutor(stages, Feed()).run(programs)
    return [p.detach() for p in (*m1.parameters(), *m2.parameters(), *h.parameters())]


def ce_grads(z, W, b, y):
    """Gradients of mean cross-entropy(z W^T + b, y): (dW, db, dz), written out."""
    p = torch.softmax(z @ W.T + b, dim=1)
    d = (p - F.one_hot(y, W.shape[0]).double()) / y.shape[0]
    return d.T @ z, d.sum(0), d @ W


def reference(sent_after_step=False, train_head=True):
    """DGL written out; `sent_after_step` (module 1 sends its output recomputed after its
    update) and `train_head=False` (a fixed head) are wrong rules, for the test that the check
    can fail. (Pipelining does not change the numbers: module 2 trains on module 1's output of
    batch t whenever it runs.)"""
    m1, m2 = modules()
    h = head()
    w1 = [p.detach().clone() for p in m1.parameters()]
    W2, c2 = (p.detach().clone() for p in m2.parameters())
    Wh, ch = (p.detach().clone() for p in h.parameters())
    feed = Feed()
    out1 = {}
    for t in range(NB + 1):
        if t < NB:  # module 1: batch t, its head's loss, at once
            acts = f1(feed.x[t], w1)
            out1[t] = acts[1]
            gW, gc, delta = ce_grads(acts[1], Wh, ch, feed.y[t])
            w1 = [w - LR * g for w, g in zip(w1, g1(feed.x[t], acts, w1, delta))]
            if train_head:
                Wh, ch = Wh - LR * gW, ch - LR * gc
            if sent_after_step:
                out1[t] = f1(feed.x[t], w1)[1]
        b = t - 1  # module 2: module 1's output of the tick before
        if 0 <= b < NB:
            gW2, gc2, _ = ce_grads(out1[b], W2, c2, feed.y[b])
            W2, c2 = W2 - LR * gW2, c2 - LR * gc2
    return [*w1, W2, c2, Wh, ch]


def test_dgl_update_rule_matches_the_paper():
    for got, want in zip(run_dgl(), reference(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("wrong", [{"sent_after_step": True}, {"train_head": False}])
def test_the_reference_check_detects_a_wrong_rule(wrong):
    """The comparison above can fail: a rule that differs in one respect does not match."""
    got, bad = run_dgl(), reference(**wrong)
    assert any(not torch.allclose(g, w, rtol=1e-9, atol=1e-12) for g, w in zip(got, bad))


def test_dgl_schedule_sends_no_gradient_and_steps_in_the_forward_tick():
    for s in range(3):
        prog = schedule.program("dgl", s, 3, range(schedule.num_ticks("dgl", 3, 5)), 5, 7)
        ops = [i.op for i in prog]
        assert schedule.SEND_GRAD not in ops and schedule.RECV_GRAD not in ops
        # forward and backward of a batch in the same tick, batch t-s at tick t (pipelined)
        assert [str(i) for i in schedule.tick_program("dgl", s, 3, 4, 5, 7)] == \
            [*([f"<A{4 - s}"] if s else []), f"F{4 - s}", *([f">A{4 - s}"] if s < 2 else []),
             f"B{4 - s}", "S"]


def test_auxiliary_head_follows_the_reference_design():
    """eugenium/DGL's auxillary_classifier2(n_lin=3, mlp_layers=3) on a 16x8x8 output."""
    h = aux.AuxClassifier((16, 8, 8), 10, n_lin=3, mlp_layers=3)
    convs = [m for m in h.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in h.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == \
        [(16, 16, (1, 1), None)] * 3
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 64)] * 3 + [(64, 10)]
    assert h(torch.randn(B, 16, 8, 8)).shape == (B, 10)
    flat = aux.AuxClassifier((20,), 10, n_lin=3, mlp_layers=1)
    assert flat(torch.randn(B, 20)).shape == (B, 10)
