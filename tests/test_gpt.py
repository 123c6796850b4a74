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
    lg = logits.double()
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
