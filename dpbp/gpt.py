"""A small GPT-style transformer as an ordered list of blocks, for character-level language
modelling (`model=gpt data=text`).

Blocks: [embed, N pre-norm transformer blocks, head], so `nn.Sequential(*blocks)` is the whole
network, as for the ResNets (models.py), and the split cuts it between blocks:

- embed: token embedding + learned positions, (B, T) token ids -> (B, T, C);
- block: x + attn(ln1(x)), then x + mlp(ln2(x)); causal multi-head self-attention, MLP 4C wide
  with GELU (Radford et al. 2019, as nanoGPT writes it);
- head: final LayerNorm + linear to the vocabulary. It returns (B, V, T) logits, class
  dimension second, so that `F.cross_entropy(logits, targets (B, T))` is the mean next-token loss
  and `logits.argmax(1) == targets` the token accuracy: every stage, evaluation and family runner
  computes the language-model loss with the code it uses for classification.

The token embedding and the head are not tied (nanoGPT ties them): they live in different
modules of the split, which keep separate weights. No dropout: runs are deterministic and the
split equals the whole bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dpbp.errors import ConfigError

# a model's own keys (`model.layers=...`): conf/model/gpt.yaml holds their values
OPTIONS = ("layers", "dim", "heads")


class Embed(nn.Module):
    """Token embedding plus a learned position embedding for each of `context` positions."""

    def __init__(self, vocab: int, context: int, dim: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(context, dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        return self.tokens(idx) + self.positions(pos)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t attends to positions <= t."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final LayerNorm and the linear map to vocabulary logits, returned as (B, V, T)."""

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x)).transpose(1, 2)


def _init(blocks: list[nn.Module], layers: int) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases, and the projections that add
    into the residual stream scaled by 1/sqrt(2 * layers)."""
    for block in blocks:
        for name, p in block.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight",
                                                                     "mlp.2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)


def build_blocks(vocab: int, context: int, layers: int, dim: int, heads: int) -> list[nn.Module]:
    """[embed, `layers` transformer blocks, head] for a vocabulary of `vocab` tokens and inputs of
    up to `context` tokens. Raises ConfigError for sizes that do not fit together."""
    for key, value in (("model.layers", layers), ("model.dim", dim), ("model.heads", heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}.")
    if dim % heads:
        raise ConfigError(f"model.dim={dim} is not divisible by model.heads={heads}; "
                          "choose a dim that is a multiple of heads.")
    blocks = [Embed(vocab, context, dim), *(Block(dim, heads) for _ in range(layers)),
              Head(dim, vocab)]
    _init(blocks, layers)
    return blocks


def labels(layers: int) -> list[str]:
    """Short label per block: "embed", "b1", ..., "bN", "head"."""
    return ["embed", *(f"b{i}" for i in range(1, layers + 1)), "head"]
