"""What one boundary message costs over gloo on this machine: wall time and CPU time per side.

    .venv/bin/python scripts/gloo_message_cost.py            # ResNet-20's 4+7 boundary, batch 128
    .venv/bin/python scripts/gloo_message_cost.py 128 32 16 16 --messages 100

Two processes, one thread each (as `dpbp bench` runs them); rank 0 sends the same float32 tensor
`--messages` times, rank 1 receives each into a new buffer (as dpbp/p2p.py does). CPU time is
each process's user and system time over the loop, from getrusage, so gloo's own threads count.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, port: int, shape: list[int], messages: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    t = torch.randn(*shape)
    for _ in range(3):  # connection set-up and first-touch of the buffers, not timed
        dist.send(t, 1) if rank == 0 else dist.recv(torch.empty_like(t), 0)
    dist.barrier()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(messages):
        dist.send(t, 1) if rank == 0 else dist.recv(torch.empty_like(t), 0)
    dist.barrier()
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    side = "sender  " if rank == 0 else "receiver"
    print(f"{side} {t.numel() * 4 / 2**20:.1f} MiB: {1e3 * wall / messages:.2f} ms wall, "
          f"user {1e3 * (r1.ru_utime - r0.ru_utime) / messages:.2f} ms, "
          f"system {1e3 * (r1.ru_stime - r0.ru_stime) / messages:.2f} ms per message",
          flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", nargs="*", type=int, default=[128, 16, 32, 32])
    parser.add_argument("--messages", type=int, default=50)
    args = parser.parse_args()
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, args.shape, args.messages), nprocs=2)


if __name__ == "__main__":
    main()
