"""Per-block time profile of a model on one device, for the bench's predictions (simulate.py).

`profile_blocks` times each block's forward, backward and optimizer step at the bench's batch
size (median of repeats after a warm-up; the last block's forward includes the loss).
`profile_links` times moving one boundary activation between two processes (gloo on CPU, nccl
on CUDA: a ping-pong, half the round trip) and all-reducing gradients of a given size, which the
simulator uses as transfer and all-reduce times.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BlockProfile:
    forward: list[float]  # seconds per batch, per block
    backward: list[float]
    step: list[float]
    out_numel: list[int]  # elements of each block's output per batch (what crosses a boundary)
    grad_numel: list[int]  # parameters per block (what an all-reduce moves)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, labels: torch.Tensor,
                   lr: float = 0.0, repeats: int = 5) -> BlockProfile:
    """Time every block on `x`'s device; the blocks train (BatchNorm statistics move)."""
    device = x.device
    prof = BlockProfile([], [], [], [], [])
    for i, block in enumerate(blocks):
        block.to(device).train()
        last = i == len(blocks) - 1
        params = list(block.parameters())
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9) if params else None
        inp = x.detach().requires_grad_(i > 0)

        def forward(block=block, inp=inp, last=last):
            out = block(inp)
            return F.cross_entropy(out, labels) if last else out

        out = forward()
        grad = None if last else torch.randn_like(out)

        def backward(block=block, forward=forward, grad=grad):
            out = forward()
            out.backward(grad)

        f = _timed(forward, device, repeats)
        fb = _timed(backward, device, repeats)
        prof.forward.append(f)
        prof.backward.append(max(fb - f, 0.0))
        prof.step.append(_timed(opt.step, device, repeats) if opt else 0.0)
        prof.out_numel.append(0 if last else out.numel())
        prof.grad_numel.append(sum(p.numel() for p in params))
        with torch.no_grad():
            x = block(x)
    return prof


def _link_worker(rank: int, init: str, backend: str, device_type: str, sizes: list[int],
                 repeats: int, path: str) -> None:
    """One of the two processes of `profile_links`; rank 0 saves the medians to `path`."""
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=init, rank=rank, world_size=2)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    result: dict[str, list[float]] = {"transfer": [], "allreduce": []}
    for kind in ("transfer", "allreduce"):
        for n in sizes:
            t = torch.zeros(max(n, 1), device=device)
            times = []
            for r in range(repeats + 1):
                dist.barrier()
                t0 = time.perf_counter()
                if kind == "allreduce":
                    dist.all_reduce(t)
                elif rank == 0:
                    dist.send(t, 1)
                    dist.recv(t, 1)
                else:
                    dist.recv(t, 0)
                    dist.send(t, 0)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - t0
                if r:  # the first is a warm-up (connection set-up)
                    times.append(seconds / 2 if kind == "transfer" else seconds)
            result[kind].append(statistics.median(times))
    if rank == 0:
        torch.save(result, path)
    dist.destroy_process_group()


def profile_links(sizes: Sequence[int], device: torch.device,
                  repeats: int = 5) -> tuple[list[float], list[float]]:
    """(transfer seconds, all-reduce seconds) for float32 tensors of each size, measured
    between two real processes on this machine."""
    import torch.multiprocessing as mp

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        raise RuntimeError("profiling CUDA links needs two GPUs")
    with tempfile.TemporaryDirectory() as tmp:
        init, path = f"file://{tmp}/store", f"{tmp}/result.pt"
        mp.start_processes(_link_worker, args=(init, backend, device.type, list(sizes), repeats,
                                           path), nprocs=2, start_method="spawn")
        result = torch.load(path, weights_only=True)
    return result["transfer"], result["allreduce"]


def profile_staged_copies(sizes: Sequence[int], device: torch.device,
                          repeats: int = 5) -> list[float]:
    """Seconds to move a float32 tensor of each size from one GPU to another through host
    memory (device -> pinned host -> device, no peer-to-peer): what a boundary transfer costs
    without NVLink, estimated on a machine with a single GPU. Zeros on the CPU (nothing moves)."""
    if device.type != "cuda":
        return [0.0] * len(sizes)
    out = []
    for n in sizes:
        src = torch.zeros(max(n, 1), device=device)
        host = torch.empty(src.shape, pin_memory=True)
        dst = torch.empty_like(src)

        def copy(src=src, host=host, dst=dst):
            host.copy_(src, non_blocking=True)
            dst.copy_(host, non_blocking=True)

        out.append(_timed(copy, device, repeats))
    return out
