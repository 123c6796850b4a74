"""What cutting ResNet-20 into two modules costs in one process: the whole model's training step
against module 1's and module 2's forward + backward, timed in turn (no processes, no transport).

    .venv/bin/python scripts/split_cost.py                 # the bench's 4+7 split, batch 128
    .venv/bin/python scripts/split_cost.py --cut 5 --rounds 7

One thread, malloc tuned as runs tune it (dpbp/allocator.py); each figure is the median of 15
calls after 3 untimed ones, and a round times all three in turn, so drift hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dpbp.allocator import keep_freed_memory
from dpbp.models import build_blocks


def median_ms(fn: Callable[[], None], calls: int = 15) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cut", type=int, default=4, help="blocks in module 1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    blocks = build_blocks("resnet20")
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    whole, m1, m2 = (nn.Sequential(*blocks), nn.Sequential(*blocks[:args.cut]),
                     nn.Sequential(*blocks[args.cut:]))
    opt = torch.optim.SGD(whole.parameters(), lr=0.01, momentum=0.9)
    h = m1(x).detach()
    grad = torch.randn_like(h)

    def bp() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(whole(x), y).backward()
        opt.step()

    def module1() -> None:
        m1(x).backward(grad)

    def module2() -> None:
        F.cross_entropy(m2(h.clone().requires_grad_()), y).backward()

    got: dict[str, list[float]] = {"bp": [], "module 1": [], "module 2": []}
    for r in range(args.rounds):
        for name, fn in (("bp", bp), ("module 1", module1), ("module 2", module2)):
            got[name].append(median_ms(fn))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} ms" for k, v in got.items()),
              flush=True)
    med = {k: statistics.median(v) for k, v in got.items()}
    print(f"medians: bp {med['bp']:.1f} ms, modules {med['module 1']:.1f} + "
          f"{med['module 2']:.1f} = {med['module 1'] + med['module 2']:.1f} ms "
          f"({(med['module 1'] + med['module 2']) / med['bp'] - 1:+.1%})")


if __name__ == "__main__":
    main()
