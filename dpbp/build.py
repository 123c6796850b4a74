"""What every process of a run builds alike: its place, device, data, model, split, optimizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dpbp import custom
from dpbp.config import RunConfig
from dpbp.data import Dataset, load_dataset
from dpbp.errors import ConfigError
from dpbp.models import build_blocks
from dpbp.split import balanced_counts, block_flops, block_times, boundaries, check_balance


@dataclass
class WorkerContext:
    """Where this process sits: all stages (local) or one stage of a distributed pipeline."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False


@dataclass
class Split:
    """The model cut into modules (on the CPU), as every process of a pipeline sees it."""

    device: torch.device
    data: Dataset
    modules: list[nn.Module]
    counts: list[int]  # blocks per module
    shapes: list[tuple[int, ...]]  # per-sample output shape of each module
    num_parameters: int


def pick_device(cfg: RunConfig, local_rank: int = 0) -> torch.device:
    """cpu, or the GPU of this local rank."""
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))


def build_model(cfg: RunConfig, ds: Dataset) -> list[nn.Module]:
    """The whole model's blocks, initialised from the seed: identical in every process."""
    torch.manual_seed(cfg.seed)
    if cfg.model_args is not None:  # model=custom: the user's builder, checked on the data
        blocks = custom.build(cfg.model, cfg.model_args, ds.in_channels, ds.num_classes)
        custom.check_runs(blocks, ds.sample_shape, cfg.model, cfg.data.name)
        return blocks
    if ds.task == "classify" and len(ds.sample_shape) != 3:
        raise ConfigError(f"model={cfg.model} takes images; data={cfg.data.name} has samples of "
                          f"shape {list(ds.sample_shape)}: train a network of your own on them "
                          "with model=custom model._target_=...")
    return build_blocks(cfg.model, ds.in_channels, ds.num_classes, context=ds.context,
                        **cfg.model_options)


def resolve_balance(cfg: RunConfig, blocks: list[nn.Module], ds: Dataset,
                    device: torch.device) -> list[int]:
    """Block counts per module: split.balance if given, else balanced by flops or measured time."""
    k = cfg.modules
    if cfg.split.balance is not None:
        return check_balance(cfg.split.balance, len(blocks))
    if k == 1:  # nothing to balance (and nothing to profile)
        return [len(blocks)]
    if k > len(blocks):
        balanced_counts([1.0] * len(blocks), k)  # raises the clear error
    if cfg.split.by == "time":
        x = ds.example(cfg.trainer.batch_size).to(device)
        if x.is_floating_point():
            x = torch.randn_like(x)
        return balanced_counts(block_times([b.to(device) for b in blocks], x), k)
    return balanced_counts(block_flops(blocks, ds.example(1)), k)


def output_shapes(modules: list[nn.Module], ds: Dataset) -> list[tuple[int, ...]]:
    """Per-sample output shape of each module (fixed once; the transport sizes buffers by it)."""
    x = ds.example(2)
    shapes = []
    with torch.no_grad():
        for m in modules:
            m.eval()
            x = m(x)
            m.train()
            shapes.append(tuple(x.shape[1:]))
    return shapes


def split_model(cfg: RunConfig, ctx: WorkerContext) -> Split:
    """This process's device (and CPU threads), the data on it, and the whole model cut into
    cfg.modules modules."""
    device = pick_device(cfg, ctx.local_rank)
    if device.type == "cpu" and cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    ds = load_dataset(cfg.data, device, seed=cfg.seed)
    blocks = build_model(cfg, ds)
    num_parameters = sum(p.numel() for b in blocks for p in b.parameters())
    counts = resolve_balance(cfg, blocks, ds, device)
    modules = [nn.Sequential(*blocks[a:b]) for a, b in boundaries(counts)]
    return Split(device, ds, modules, counts, output_shapes(modules, ds), num_parameters)


def make_optimizer(cfg: RunConfig, module: nn.Module) -> torch.optim.Optimizer:
    """SGD as configured (momentum, weight decay, Nesterov) over `module`'s parameters."""
    o = cfg.optim
    return torch.optim.SGD(module.parameters(), lr=o.lr, momentum=o.momentum,
                           weight_decay=o.weight_decay, nesterov=o.nesterov and o.momentum > 0)
