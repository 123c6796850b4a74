"""The GPT-style transformer as a list of blocks: shapes, causality, the loss convention (logits
(B, V, T): cross_entropy is the mean next-token loss, checked against a float64 reference), and
bad sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpbp import gpt
from dpbp.errors import ConfigError
from dpbp.models import build_blocks, describe_blocks, task

V, T = 11, 8


def tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*build_blocks("gpt", num_classes=V, context=T, layers=2, dim=16,
                                       heads=2))


def test_blocks_are_embed_layers_head():
    blocks = build_blocks("gpt", num_classes=V, context=T, layers=3, dim=16, heads=4)
    assert len(blocks) == 5
    assert isinstance(blocks[0], gpt.Embed) and isinstance(blocks[-1], gpt.Head)
    assert all(isinstance(b, gpt.Block) for b in blocks[1:-1])
    assert describe_blocks("gpt", blocks) == ["embed", "b1", "b2", "b3", "head"]
    assert task("gpt") == "lm" and task("resnet20") == "classify"


def test_logits_are_batch_vocab_time_and_causal():
    model = tiny().eval()
    x = torch.randint(V, (3, T))
    out = model(x)
    assert out.shape == (3, V, T)
    changed = x.clone()
    changed[:, 5] = (changed[:, 5] + 1) % V
    out2 = model(changed)
    # positions before 5 cannot see the change; position 5 and later do
    assert torch.equal(out[:, :, :5], out2[:, :, :5])
    assert not torch.allclose(out[:, :, 5:], out2[:, :, 5:])


def reference_loss(logits: torch.Tensor, targets: torch.Tensor, last_only: bool = False) -> float:
    """Mean over every (sequence, position) of -log p(next token), in float64 by hand."""
    lg = logits.detach().double()
    total, n = 0.0, 0
    for b in range(lg.shape[0]):
        for t in range(lg.shape[2]) if not last_only else [lg.shape[2] - 1]:
            col = lg[b, :, t]
            total += float(torch.logsumexp(col, 0) - col[targets[b, t]])
            n += 1
    return total / n


def test_cross_entropy_of_the_logits_is_the_mean_next_token_loss():
    model = tiny()
    x, y = torch.randint(V, (4, T)), torch.randint(V, (4, T))
    logits = model(x)
    loss = float(F.cross_entropy(logits, y).detach())
    assert loss == pytest.approx(reference_loss(logits, y), rel=1e-5)
    # the check can fail: the loss of the last position alone is another number
    assert loss != pytest.approx(reference_loss(logits, y, last_only=True), rel=1e-3)
    # token accuracy: argmax over the vocabulary, per position
    acc = (logits.argmax(1) == y).float().mean()
    assert acc.shape == () and math.isfinite(float(acc))


def test_one_sgd_step_matches_a_float64_reference():
    """The update every algorithm's last module makes on a language model: w - lr * dL/dw with
    L the mean next-token loss, against the same step computed in float64 by hand."""
    model, lr = tiny(), 0.1
    x, y = torch.randint(V, (4, T)), torch.randint(V, (4, T))
    ref = {n: p.detach().double().clone().requires_grad_(True)
           for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    F.cross_entropy(model(x), y).backward()
    opt.step()

    def step(rule_lr: float) -> dict[str, torch.Tensor]:
        logits = torch.func.functional_call(model.double(), ref, (x,))
        model.float()
        logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        loss = -logp.gather(1, y[:, None, :]).mean()
        grads = torch.autograd.grad(loss, list(ref.values()))
        return {n: (w - rule_lr * g).detach() for (n, w), g in zip(ref.items(), grads)}

    good = step(lr)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), good[n], rtol=1e-4, atol=1e-6)
    bad = step(2 * lr)  # a perturbed rule is detected
    assert any(not torch.allclose(p.detach().double(), bad[n], rtol=1e-4, atol=1e-6)
               for n, p in model.named_parameters())


@pytest.mark.parametrize("kwargs,match", [
    ({"layers": 0, "dim": 16, "heads": 2}, "model.layers must be a positive integer"),
    ({"layers": 2, "dim": 18, "heads": 4}, "not divisible by model.heads"),
])
def test_bad_sizes_are_one_sentence(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_blocks("gpt", num_classes=V, context=T, **kwargs)


def test_a_language_model_needs_text():
    with pytest.raises(ConfigError, match="train it on data=text"):
        build_blocks("gpt", 1, 10, layers=1, dim=8, heads=2)


class TokenFeed:
    """NB batches of B token sequences and their next tokens."""

    def __init__(self, nb: int, b: int) -> None:
        g = torch.Generator().manual_seed(2)
        self.x = torch.randint(V, (nb, b, T), generator=g)
        self.y = torch.randint(V, (nb, b, T), generator=g)

    def inputs(self, n):
        return self.x[n]

    def labels(self, n):
        return self.y[n]


def ddg_reference(m1: nn.Module, m2: nn.Module, feed: TokenFeed, nb: int, lr: float,
                  stale: bool = True) -> list[torch.Tensor]:
    """DDG at K = 2 written out with explicit weight dicts: at tick t module 2 steps on batch t;
    module 1 steps on batch t-1, through the weights that batch's forward used (stale=False:
    the current ones, a wrong rule) and module 2's error gradient of tick t-1."""
    call = torch.func.functional_call
    w1 = {n: p.detach().clone() for n, p in m1.named_parameters()}
    w2 = {n: p.detach().clone() for n, p in m2.named_parameters()}
    versions, delta = {}, {}
    for t in range(nb):
        versions[t] = {n: w.clone() for n, w in w1.items()}
        h = call(m1, w1, (feed.x[t],)).detach().requires_grad_(True)
        p2 = {n: w.clone().requires_grad_(True) for n, w in w2.items()}
        loss = F.cross_entropy(call(m2, p2, (h,)), feed.y[t])
        *g2, delta[t] = torch.autograd.grad(loss, [*p2.values(), h])
        w2 = {n: w - lr * g for (n, w), g in zip(w2.items(), g2)}
        if t >= 1:
            src = versions[t - 1] if stale else w1
            p1 = {n: w.clone().requires_grad_(True) for n, w in src.items()}
            g1 = torch.autograd.grad(call(m1, p1, (feed.x[t - 1],)), list(p1.values()),
                                     delta[t - 1])
            w1 = {n: w - lr * g for (n, w), g in zip(w1.items(), g1)}
    return [*w1.values(), *w2.values()]


def test_ddg_on_the_transformer_matches_its_float64_reference():
    """The delayed rule on the transformer's own blocks (token ids in, LayerNorm, attention):
    dpbp's stages give the reference's weights; the reference with the current weights instead
    of the stashed ones is another result (the check can fail)."""
    from dpbp import schedule
    from dpbp.executor import LocalExecutor
    from dpbp.stage import Stage

    nb, lr = 5, 0.5
    torch.manual_seed(0)
    blocks = build_blocks("gpt", num_classes=V, context=T, layers=2, dim=16, heads=2)
    m1, m2 = nn.Sequential(*blocks[:2]).double(), nn.Sequential(*blocks[2:]).double()
    feed = TokenFeed(nb, 3)
    want = ddg_reference(m1, m2, feed, nb, lr)
    wrong = ddg_reference(m1, m2, feed, nb, lr, stale=False)
    stages = [Stage(m, k, 2, "ddg", torch.optim.SGD(m.parameters(), lr=lr))
              for k, m in enumerate((m1, m2))]
    end = schedule.num_ticks("ddg", 2, nb)
    LocalExecutor(stages, feed).run([schedule.program("ddg", s, 2, range(end), nb, end)
                                     for s in range(2)])
    got = [p.detach() for p in (*m1.parameters(), *m2.parameters())]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert any(not torch.allclose(g, w, rtol=1e-10, atol=1e-12) for g, w in zip(got, wrong))
