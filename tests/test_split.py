"""Cutting the block list into K modules."""

import pytest
import torch

from dpbp.errors import ConfigError
from dpbp.models import build_blocks
from dpbp.split import balanced_counts, block_flops, block_times, boundaries, check_balance


def test_balanced_counts_minimises_the_largest_module():
    assert balanced_counts([1, 1, 1, 1], 2) == [2, 2]
    assert balanced_counts([3, 1, 1, 1], 2) == [1, 3]
    assert balanced_counts([1, 1, 1, 1, 4], 2) == [4, 1]
    assert balanced_counts([5, 1, 1, 1, 1, 1], 3) == [1, 4, 1]  # max 5 either way; last lighter
    assert balanced_counts([2.0] * 7, 7) == [1] * 7


def brute_force_best(costs, k):
    import itertools

    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = (0, *cuts, n)
        worst = max(sum(costs[a:b]) for a, b in zip(edges, edges[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_balanced_counts_is_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    costs = (torch.rand(9, generator=g) * 10).tolist()
    for k in (2, 3, 4):
        counts = balanced_counts(costs, k)
        assert sum(counts) == 9 and all(c >= 1 for c in counts)
        worst = max(sum(costs[a:b]) for a, b in boundaries(counts))
        assert worst == pytest.approx(brute_force_best(costs, k))


def test_too_many_modules_is_a_clear_error():
    with pytest.raises(ConfigError, match="cannot cut 3 blocks into 4 modules"):
        balanced_counts([1, 1, 1], 4)


def test_check_balance():
    assert check_balance([2, 3], 5) == [2, 3]
    with pytest.raises(ConfigError, match="sums to 4"):
        check_balance([2, 2], 5)
    with pytest.raises(ConfigError, match="at least one block"):
        check_balance([5, 0], 5)


def test_resnet_blocks_cost_the_same_within_and_across_stages():
    """He et al.'s CIFAR ResNet: channels double as the map halves, so basic blocks cost the
    same everywhere except the first block of stages 2 and 3 (stride 2, half the input work)."""
    blocks = build_blocks("resnet20")
    flops = block_flops(blocks, torch.zeros(1, 3, 32, 32))
    body = flops[1:-1]
    assert body[0] == body[1] == body[2] == body[4] == body[5] == body[7] == body[8]
    assert body[3] < body[0] and body[6] < body[0]
    assert flops[0] < body[0] and flops[-1] < body[0]
    assert balanced_counts(flops, 2) in ([5, 6], [6, 5])


def test_block_times_are_measured_per_block():
    blocks = build_blocks("resnet20", 1, 10)
    times = block_times(blocks, torch.randn(8, 1, 8, 8), repeats=1)
    assert len(times) == len(blocks) and all(t > 0 for t in times)


def test_one_module_is_the_whole_model_without_profiling(monkeypatch):
    """K = 1 (bp on one device, every threads-family run): all blocks in one module, and
    split.by=time measures nothing; a given split.balance is still checked."""
    from conftest import make_cfg

    from dpbp.build import resolve_balance
    from dpbp.data import load_dataset

    def no_profile(*args, **kwargs):
        raise AssertionError("profiled blocks for one module")

    monkeypatch.setattr("dpbp.build.block_times", no_profile)
    monkeypatch.setattr("dpbp.build.block_flops", no_profile)
    blocks = build_blocks("resnet20", 1, 10)
    for algo in ("bp", "hogwild"):
        cfg = make_cfg(f"algo={algo}", "gpus=1", "split.by=time")
        assert resolve_balance(cfg, blocks, load_dataset(cfg.data), torch.device("cpu")) == [11]
    with pytest.raises(ConfigError):
        resolve_balance(make_cfg("gpus=1", "split.balance=[5]"), blocks, None,
                        torch.device("cpu"))
