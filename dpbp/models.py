"""CIFAR-style ResNets built as an ordered list of blocks (stem, residual blocks..., head).

Decoupled methods cut a network into K consecutive modules, so every model here is returned as a
flat list whose ``nn.Sequential(*blocks)`` is the whole network. Each residual block is one list
element; the stem and the head are one element each.

Models:

* ``resnet{D}`` for any depth D = 6n+2: He et al. 2015 CIFAR ResNet (16/32/64 channels, n basic
  blocks per stage, option-A parameter-free shortcut). ``resnet164`` is the basic-block version.
* ``wrn28_10``: Wide ResNet 28-10 (Zagoruyko & Komodakis 2016), pre-activation, no dropout.
* ``resnet18``: the CIFAR variant of ResNet-18 (kuangliu style: 3x3 stem, no max-pool,
  option-B 1x1-conv shortcut).

All heads end in ``AdaptiveAvgPool2d(1)``, so any input size works (e.g. 1x8x8 digits).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from dpbp import gpt
from dpbp.errors import ConfigError

_NAMED_MODELS = [
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet164",
    "resnet1202",
    "wrn28_10",
    "resnet18",
    "mlp",
    "gpt",
]
# models of next-token prediction (data=text); every other model classifies images
_LANGUAGE_MODELS = ("gpt",)

_RESNET_RE = re.compile(r"resnet(\d+)")


def model_names() -> list[str]:
    """Named models with a config file: resnet20, resnet32, resnet44, resnet56, resnet110,
    resnet164, resnet1202, wrn28_10, resnet18, mlp (a small BatchNorm-free net for tests), gpt
    (a small transformer for data=text)."""
    return list(_NAMED_MODELS)


def task(name: str) -> str:
    """What model `name` is trained for: "lm" (next-token prediction) or "classify"."""
    return "lm" if name in _LANGUAGE_MODELS else "classify"


def options(name: str) -> tuple[str, ...]:
    """The model's own keys besides model.name (their values live in conf/model/<name>.yaml)."""
    return gpt.OPTIONS if name in _LANGUAGE_MODELS else ()


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BN always follows or precedes it)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class DownsampleA(nn.Module):
    """Option-A shortcut of He et al. 2015: identity, or subsample + zero-pad channels.

    Parameter-free. A module (not a lambda) so that the network pickles.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_planes - self.in_planes
        if extra > 0:
            # F.pad pads from the last dim backwards: (W_l, W_r, H_t, H_b, C_front, C_back).
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.out_planes}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Post-activation basic block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)).

    ``option="A"`` uses the parameter-free :class:`DownsampleA` shortcut (CIFAR ResNets);
    ``option="B"`` uses a 1x1 conv + BN projection when the shape changes (ResNet-18).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "A") -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if option == "A":
            self.shortcut = DownsampleA(in_planes, planes, stride)
        elif stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation wide block (WRN): conv(relu(bn(conv(relu(bn(x)))))) + shortcut.

    When the shape changes the shortcut is a 1x1 conv applied to the pre-activated input, as in
    the reference WRN code; otherwise it is the identity on the raw input.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + residual


def _init_weights(blocks: list[nn.Module]) -> None:
    """He et al./akamaster init: kaiming_normal_ (fan_in, ReLU gain) for Conv2d and Linear
    weights, BN weight 1 and bias 0; Linear bias keeps PyTorch's default."""
    for block in blocks:
        for m in block.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def _layout(name: str) -> tuple[str, list[int]]:
    """Return (family, blocks per stage) for a model name, or raise ConfigError."""
    if name == "resnet18":
        return "resnet18", [2, 2, 2, 2]
    if name == "wrn28_10":
        return "wrn", [4, 4, 4]  # depth 28 = 6*4 + 4
    if name == "mlp":
        return "mlp", [4]
    match = _RESNET_RE.fullmatch(name)
    if match:
        depth = int(match.group(1))
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ConfigError(
                f"ResNet depth {depth} is not of the form 6n+2 (n>=1); "
                "use e.g. model=resnet20, resnet56 or resnet110."
            )
        n = (depth - 2) // 6
        return "cifar_resnet", [n, n, n]
    raise ConfigError(
        f"Unknown model {name!r}; use one of {', '.join(_NAMED_MODELS)} "
        "(or resnet{6n+2} for any n>=1)."
    )


def _stages(
    make_block: Callable[[int, int, int], nn.Module],
    in_planes: int,
    widths: list[int],
    strides: list[int],
    counts: list[int],
) -> list[nn.Module]:
    """Residual blocks of all stages; only the first block of a stage strides/changes width."""
    blocks: list[nn.Module] = []
    for width, stride, count in zip(widths, strides, counts, strict=True):
        for i in range(count):
            blocks.append(make_block(in_planes, width, stride if i == 0 else 1))
            in_planes = width
    return blocks


def build_blocks(name: str, in_channels: int = 3, num_classes: int = 10,
                 context: int | None = None, **opts: int) -> list[nn.Module]:
    """Build model ``name`` as an ordered list of blocks [stem, residual blocks..., head].

    ``nn.Sequential(*blocks)`` is the whole network, mapping (N, in_channels, H, W) images to
    (N, num_classes) logits for any H, W >= 1. Names: see :func:`model_names`; any
    ``resnet{6n+2}`` also works. Raises :class:`ConfigError` for an unknown name, a ResNet depth
    that is not 6n+2, or a non-positive ``in_channels``/``num_classes``. A language model
    (``gpt``) takes ``num_classes`` as its vocabulary, ``context`` tokens per sample and its own
    ``opts`` (gpt.OPTIONS).
    """
    if name in _LANGUAGE_MODELS:
        if context is None:
            raise ConfigError(f"model={name} is a language model: train it on data=text.")
        return gpt.build_blocks(num_classes, context, **opts)
    family, counts = _layout(name)
    for arg, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{arg} must be a positive integer, got {value!r}.")

    if family == "mlp":  # no BatchNorm: batch statistics never couple the samples of a batch
        stem = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * in_channels, 64),
                             nn.Tanh())
        body = [nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(counts[0])]
        head = nn.Linear(64, num_classes)
    elif family == "cifar_resnet":
        stem = nn.Sequential(conv3x3(in_channels, 16), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        body = _stages(partial(BasicBlock, option="A"), 16, [16, 32, 64], [1, 2, 2], counts)
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
    elif family == "resnet18":
        stem = nn.Sequential(conv3x3(in_channels, 64), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        body = _stages(
            partial(BasicBlock, option="B"), 64, [64, 128, 256, 512], [1, 2, 2, 2], counts
        )
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))
    else:  # wrn28_10: widths 16*k with k=10; pre-activation, so the stem is a bare conv and the
        # head starts with the final BN + ReLU.
        stem = conv3x3(in_channels, 16)
        body = _stages(PreActBlock, 16, [160, 320, 640], [1, 2, 2], counts)
        head = nn.Sequential(
            nn.BatchNorm2d(640),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(640, num_classes),
        )

    blocks = [stem, *body, head]
    _init_weights(blocks)
    return blocks


def describe_blocks(name: str, blocks: list[nn.Module]) -> list[str]:
    """Short label per block of model ``name``: "stem", "s1b1", ..., "s3b18", "head".

    Raises :class:`ConfigError` if ``blocks`` does not have the length that ``name`` implies.
    """
    if name in _LANGUAGE_MODELS:
        return gpt.labels(len(blocks) - 2)
    _, counts = _layout(name)
    labels = ["stem"]
    for stage, count in enumerate(counts, start=1):
        labels += [f"s{stage}b{i}" for i in range(1, count + 1)]
    labels.append("head")
    if len(labels) != len(blocks):
        raise ConfigError(
            f"Model {name} has {len(labels)} blocks but {len(blocks)} were given; "
            f"pass the blocks returned by build_blocks({name!r})."
        )
    return labels
