"""Tests for dpbp.models: exact sizes, block counts, shapes, pickling, bad names, determinism."""

import pickle

import pytest
import torch
from torch import nn

from dpbp.errors import ConfigError
from dpbp.models import (
    BasicBlock,
    DownsampleA,
    PreActBlock,
    build_blocks,
    describe_blocks,
    model_names,
)


def n_params(blocks: list[nn.Module]) -> int:
    return sum(p.numel() for p in nn.Sequential(*blocks).parameters())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet20", 269_722),
        ("resnet32", 464_154),
        ("resnet44", 658_586),
        ("resnet56", 853_018),
        ("resnet110", 1_727_962),
        ("resnet1202", 19_421_274),
        ("wrn28_10", 36_479_194),
        ("resnet18", 11_173_962),
    ],
)
def test_parameter_counts(name: str, expected: int) -> None:
    assert n_params(build_blocks(name, in_channels=3, num_classes=10)) == expected


def test_parameter_count_100_classes() -> None:
    assert n_params(build_blocks("resnet20", num_classes=100)) == 275_572


@pytest.mark.parametrize(
    ("name", "expected"), [("resnet20", 11), ("resnet110", 56), ("wrn28_10", 14), ("resnet18", 10)]
)
def test_number_of_blocks(name: str, expected: int) -> None:
    assert len(build_blocks(name)) == expected


def test_block_types() -> None:
    resnet = build_blocks("resnet20")
    assert all(isinstance(b, BasicBlock) for b in resnet[1:-1])
    # Option A: the parameter-free shortcut is used everywhere, and it really downsamples.
    assert all(isinstance(b.shortcut, DownsampleA) for b in resnet[1:-1])
    assert sum(b.shortcut.stride == 2 for b in resnet[1:-1]) == 2
    assert all(isinstance(b, PreActBlock) for b in build_blocks("wrn28_10")[1:-1])
    r18 = build_blocks("resnet18")
    # Option B: 1x1 projections only where the shape changes (stages 2, 3, 4).
    assert sum(isinstance(b.shortcut, nn.Sequential) for b in r18[1:-1]) == 3


def test_model_names() -> None:
    names = model_names()
    assert names == [
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
    names.append("mutated")  # callers get a copy
    assert "mutated" not in model_names()


def test_resnet164_is_basic_block_version() -> None:
    blocks = build_blocks("resnet164")
    assert len(blocks) == 1 + 3 * 27 + 1
    assert all(isinstance(b, BasicBlock) for b in blocks[1:-1])


def test_any_6n_plus_2_depth() -> None:
    assert len(build_blocks("resnet38")) == 1 + 3 * 6 + 1  # 38 = 6*6 + 2 is a valid depth
    blocks = build_blocks("resnet8")  # n = 1
    assert len(blocks) == 5
    out = nn.Sequential(*blocks).eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "wrn28_10"])
@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 8)])
def test_output_shape(name: str, channels: int, size: int) -> None:
    if name == "wrn28_10" and size == 32:
        size = 16  # keep the wide net quick on CPU; still exercises both stride-2 stages
    model = nn.Sequential(*build_blocks(name, in_channels=channels, num_classes=10))
    x = torch.randn(2, channels, size, size)
    out = model(x)  # train mode: BN uses batch statistics
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_resnet20_32x32_stage_shapes() -> None:
    blocks = build_blocks("resnet20")
    x = torch.randn(2, 3, 32, 32)
    shapes = []
    for block in blocks[:-1]:
        x = block(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes[0] == (16, 32, 32)
    assert shapes[3] == (16, 32, 32)
    assert shapes[4] == (32, 16, 16)
    assert shapes[7] == (64, 8, 8)
    assert shapes[-1] == (64, 8, 8)


def test_downsample_a_pads_with_zeros() -> None:
    x = torch.randn(2, 16, 4, 4)
    y = DownsampleA(16, 32, 2)(x)
    assert y.shape == (2, 32, 2, 2)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0
    assert torch.equal(DownsampleA(16, 16, 1)(x), x)


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_blocks_pickle(name: str) -> None:
    model = nn.Sequential(*build_blocks(name))
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    clone.eval()
    assert torch.equal(model(x), clone(x))


def test_bad_depth_raises() -> None:
    with pytest.raises(ConfigError, match=r"6n\+2") as info:
        build_blocks("resnet40")
    assert "40" in str(info.value)
    with pytest.raises(ConfigError, match=r"6n\+2"):
        build_blocks("resnet21")
    with pytest.raises(ConfigError, match=r"6n\+2"):
        build_blocks("resnet2")  # n = 0


@pytest.mark.parametrize("name", ["vgg16", "", "ResNet20x", "wrn16_4"])
def test_unknown_name_raises(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_blocks(name)
    message = str(info.value)
    assert "resnet20" in message and "wrn28_10" in message and "resnet18" in message


@pytest.mark.parametrize(("in_channels", "num_classes"), [(0, 10), (3, 0), (3, 2.5)])
def test_bad_sizes_raise(in_channels, num_classes) -> None:
    with pytest.raises(ConfigError):
        build_blocks("resnet20", in_channels=in_channels, num_classes=num_classes)


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_same_seed_same_parameters(name: str) -> None:
    torch.manual_seed(123)
    first = nn.Sequential(*build_blocks(name)).state_dict()
    torch.manual_seed(123)
    second = nn.Sequential(*build_blocks(name)).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(124)
    third = nn.Sequential(*build_blocks(name)).state_dict()
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_init() -> None:
    blocks = build_blocks("resnet56")
    bn = blocks[1].bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    # kaiming_normal_ with fan_in and ReLU gain: std = sqrt(2 / fan_in).
    conv = blocks[-2].conv2  # 64 -> 64 3x3 conv, fan_in = 576, 36,864 weights
    expected = (2 / 576) ** 0.5
    assert abs(conv.weight.std().item() - expected) < 0.05 * expected


def test_describe_blocks() -> None:
    labels = describe_blocks("resnet110", build_blocks("resnet110"))
    assert labels[:3] == ["stem", "s1b1", "s1b2"]
    assert labels[18:21] == ["s1b18", "s2b1", "s2b2"]
    assert labels[-2:] == ["s3b18", "head"]
    assert len(labels) == 56
    assert describe_blocks("wrn28_10", [nn.Identity()] * 14)[-2:] == ["s3b4", "head"]
    assert describe_blocks("resnet18", build_blocks("resnet18")) == [
        "stem",
        "s1b1",
        "s1b2",
        "s2b1",
        "s2b2",
        "s3b1",
        "s3b2",
        "s4b1",
        "s4b2",
        "head",
    ]
    with pytest.raises(ConfigError):
        describe_blocks("resnet20", build_blocks("resnet32"))
