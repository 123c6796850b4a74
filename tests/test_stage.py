"""The algorithms' update rules, checked exactly against hand-written references.

A two-module network (module 1: Linear-Tanh-Linear-Tanh, module 2: Linear + cross-entropy) in
float64 with plain SGD, driven by the local executor, must produce the same weights as a direct
transcription of each paper's rule:

- DDG, stash: module 1 at tick t applies the gradient of batch t-1, taken at the weights that
  batch's forward used (w^{t-K+k}), with the error gradient module 2 computed at tick t-1.
- DDG, live: the same stored activations, but the current weights on the input-gradient path (what
  the 2018 reference code computed).
- FR: the stored input of batch t-1 is replayed with the current weights.
- FDG: module 2 trains on batch t-1 at tick t; module 1 applies, at tick t, the gradient of batch
  t-2 (2(K-k) = 2 ticks after its forward) scaled by beta.
"""

import pytest
import torch
from torch import nn

from dpbp import schedule
from dpbp.executor import LocalExecutor
from dpbp.stage import Stage

LR, NB, B = 0.1, 7, 5


class Feed:
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(NB, B, 4, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, 3, (NB, B), generator=g)

    def inputs(self, b):
        return self.x[b]

    def labels(self, b):
        return self.y[b]


def modules():
    torch.manual_seed(0)
    m1 = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh())
    m2 = nn.Sequential(nn.Linear(5, 3))
    return m1.double(), m2.double()  # float64: the comparisons below are exact to 1e-12


def run(algo, weights="stash", beta=1.0):
    m1, m2 = modules()
    stages = [
        Stage(m, k, 2, algo, torch.optim.SGD(m.parameters(), lr=LR), weights=weights, beta=beta)
        for k, m in enumerate((m1, m2))
    ]
    end = schedule.num_ticks(algo, 2, NB)
    programs = [schedule.program(algo, s, 2, range(end), NB, end) for s in range(2)]
    LocalExecutor(stages, Feed()).run(programs)
    return [p.detach() for p in (*m1.parameters(), *m2.parameters())]


# -- the reference: explicit tensors, explicit formulas ----------------------------------------


def f1(x, w):
    A, a, Bw, c = w
    ha = torch.tanh(x @ A.T + a)
    return ha, torch.tanh(ha @ Bw.T + c)


def g1(x, acts, w_path, delta):
    """Module 1's weight gradients, from stored activations and the weights on the backward path."""
    ha, h = acts
    _, _, Bw, _ = w_path
    u = delta * (1 - h**2)
    v = (u @ Bw) * (1 - ha**2)
    return [v.T @ x, v.sum(0), u.T @ ha, u.sum(0)]


def f2_grads(h1, y, w2):
    """Module 2: weight gradients and the error gradient at its input."""
    W, b = (t.clone().requires_grad_(True) for t in w2)
    h = h1.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(h @ W.T + b, y)
    gW, gb, gh = torch.autograd.grad(loss, (W, b, h))
    return [gW, gb], gh


def reference(algo, weights="stash", beta=1.0):
    m1, m2 = modules()
    w1 = [p.detach().clone() for p in m1.parameters()]
    w2 = [p.detach().clone() for p in m2.parameters()]
    feed = Feed()
    versions, acts, delta = {}, {}, {}
    ticks = NB + (1 if algo == "fdg" else 0)
    for t in range(ticks):
        b1 = t  # module 1 forwards batch t
        b2 = t - 1 if algo == "fdg" else t  # module 2 trains on this batch
        if b1 < NB:
            versions[b1] = [w.clone() for w in w1]
            acts[b1] = f1(feed.x[b1], w1)
        if 0 <= b2 < NB:
            g2, delta[b2] = f2_grads(acts[b2][1], feed.y[b2], w2)
            w2 = [w - LR * g for w, g in zip(w2, g2)]
        d = 1 if algo in ("ddg", "fr") else 2
        g = b1 - d  # module 1's delayed batch
        if 0 <= g < NB and (algo != "fdg" or g + d < ticks):
            x = feed.x[g]
            if algo == "fr":
                grads = g1(x, f1(x, w1), w1, delta[g])  # replay at the current weights
            elif weights == "live":
                grads = g1(x, acts[g], w1, delta[g])
            else:
                grads = g1(x, acts[g], versions[g], delta[g] * beta)
            w1 = [w - LR * gr for w, gr in zip(w1, grads)]
    return w1 + w2


@pytest.mark.parametrize(
    "algo,weights,beta",
    [("ddg", "stash", 1.0), ("ddg", "live", 1.0), ("fr", "stash", 1.0), ("fdg", "stash", 1.0),
     ("fdg", "stash", 0.5)],
)
def test_update_rule_matches_the_paper(algo, weights, beta):
    got, want = run(algo, weights, beta), reference(algo, weights, beta)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_policies_and_shrinking_change_the_result():
    """The references above really distinguish the variants (so the test above can fail)."""
    stash, live = reference("ddg", "stash"), reference("ddg", "live")
    assert not torch.allclose(stash[0], live[0])
    assert not torch.allclose(reference("fdg", beta=1.0)[0], reference("fdg", beta=0.5)[0])
    assert not torch.allclose(stash[0], reference("fr")[0])


def test_bp_split_equals_the_whole_model():
    """Transparency: BP over 2 modules gives exactly the parameters of BP on one."""
    m1, m2 = modules()
    whole = nn.Sequential(*m1, *m2)
    s = Stage(whole, 0, 1, "bp", torch.optim.SGD(whole.parameters(), lr=LR, momentum=0.9))
    p = [schedule.program("bp", 0, 1, range(NB), NB, NB)]
    LocalExecutor([s], Feed()).run(p)
    split = run_bp_split()
    for a, b in zip(whole.parameters(), split):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-15)


def run_bp_split():
    m1, m2 = modules()
    stages = [Stage(m, k, 2, "bp", torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9))
              for k, m in enumerate((m1, m2))]
    programs = [schedule.program("bp", s, 2, range(NB), NB, NB) for s in range(2)]
    LocalExecutor(stages, Feed()).run(programs)
    return [p.detach() for p in (*m1.parameters(), *m2.parameters())]


def test_stale_graph_is_not_silently_mixed():
    """Without stashing, PyTorch refuses the stale graph; the stash makes it legal and exact."""
    m1, _ = modules()
    opt = torch.optim.SGD(m1.parameters(), lr=LR)
    x = Feed().x[0]
    out = m1(x)
    out.sum().backward(retain_graph=True)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
