"""The distributed transport: one process per stage, point-to-point over torch.distributed.

Activations and error gradients travel on two process groups of their own, so that the two
directions never queue behind each other (NCCL ignores tags and matches messages by order within
a communicator), and evaluation has a third. Within a group each pair of neighbours sends and
receives in batch order on both sides, which is what NCCL needs.

Overlap: a receive is posted ahead (`irecv`) as soon as the previous message of that kind was
taken, so it lands while the stage computes; a send is `isend` and is waited on only when the
next send of that kind goes out (or at shutdown). Boundary shapes are fixed once from the model;
a message buffer is allocated from the caching allocator when its receive is posted. Every handle
is waited on. Time spent blocked in a wait is counted as the stage's idle time.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

import torch
import torch.distributed as dist

from dpbp.schedule import RECV_ACT, RECV_GRAD, Instr


class P2P:
    """A stage's link to its neighbours (ranks rank-1 and rank+1 of the same pipeline)."""

    def __init__(
        self,
        index: int,
        ranks: Sequence[int],
        act_shape: Sequence[Sequence[int]],
        device: torch.device,
        dtype: torch.dtype,
        groups: dict[str, dist.ProcessGroup],
    ) -> None:
        """`ranks[k]` is the global rank of stage k; `act_shape[k]` the shape of stage k's output
        (batch dimension included)."""
        self.index, self.ranks, self.device, self.dtype = index, list(ranks), device, dtype
        self.act_shape = [tuple(s) for s in act_shape]
        self.groups = groups
        self.expected: dict[str, deque[int]] = {"act": deque(), "grad": deque()}
        self.posted: dict[str, tuple[int, torch.Tensor, dist.Work] | None] = {
            "act": None, "grad": None}
        self.sending: dict[str, tuple[torch.Tensor, dist.Work] | None] = {"act": None, "grad": None}
        self.idle_seconds = 0.0

    def expect(self, program: Sequence[Instr]) -> None:
        """Learn which messages `program` will receive, in order, and post the first receives."""
        for ins in program:
            if ins.op == RECV_ACT:
                self.expected["act"].append(ins.batch)
            elif ins.op == RECV_GRAD:
                self.expected["grad"].append(ins.batch)
        for kind in ("act", "grad"):
            if self.posted[kind] is None:
                self._post(kind)

    def _peer(self, kind: str, sending: bool) -> int:
        up = (kind == "act") == sending  # activations go up, gradients come down
        return self.ranks[self.index + 1] if up else self.ranks[self.index - 1]

    def _post(self, kind: str) -> None:
        if not self.expected[kind]:
            return
        batch = self.expected[kind].popleft()
        # the input activation of this stage has the previous stage's output shape; the error
        # gradient has this stage's output shape
        shape = self.act_shape[self.index - 1] if kind == "act" else self.act_shape[self.index]
        buf = torch.empty(shape, device=self.device, dtype=self.dtype)
        work = dist.irecv(buf, src=self._peer(kind, sending=False), group=self.groups[kind])
        self.posted[kind] = (batch, buf, work)

    def recv(self, kind: str, batch: int) -> torch.Tensor:
        posted = self.posted[kind]
        if posted is None or posted[0] != batch:
            raise RuntimeError(f"stage {self.index} expected {kind} of batch {batch}, not {posted}")
        _, buf, work = posted
        t0 = time.perf_counter()
        work.wait()
        self.idle_seconds += time.perf_counter() - t0
        self.posted[kind] = None
        self._post(kind)
        return buf

    def send(self, kind: str, batch: int, tensor: torch.Tensor) -> None:
        self._wait_send(kind)
        tensor = tensor.contiguous()
        work = dist.isend(tensor, dst=self._peer(kind, sending=True), group=self.groups[kind])
        self.sending[kind] = (tensor, work)  # keep the tensor alive until the send completes

    def _wait_send(self, kind: str) -> None:
        pending = self.sending[kind]
        if pending is not None:
            t0 = time.perf_counter()
            pending[1].wait()
            self.idle_seconds += time.perf_counter() - t0
            self.sending[kind] = None

    def flush(self) -> None:
        """Wait for every outstanding send (before shutdown)."""
        for kind in ("act", "grad"):
            self._wait_send(kind)
        if any(self.posted.values()) or any(self.expected.values()):
            raise RuntimeError(f"stage {self.index}: receives left unmatched at shutdown")


def make_groups(ranks: Sequence[int]) -> dict[str, dist.ProcessGroup]:
    """One group per message direction plus one for evaluation (every rank must call this)."""
    return {name: dist.new_group(list(ranks)) for name in ("act", "grad", "eval")}


def evaluate_pipeline(
    stage, index: int, num_stages: int, ranks: Sequence[int], batches, shapes: Sequence,
    group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype, totals,
) -> None:
    """Forward the test set through the pipeline; the last stage adds each batch to `totals`.

    `batches` yields (x, y) on every rank (only the first stage uses x, only the last uses y);
    `shapes[k]` is the per-sample output shape of stage k.
    """
    pending, in_flight = None, None
    for x, y in batches:
        n = y.shape[0]
        if index > 0:
            x = torch.empty((n, *shapes[index - 1]), device=device, dtype=dtype)
            dist.recv(x, src=ranks[index - 1], group=group)
        out = stage.evaluate(x)
        if index < num_stages - 1:
            if pending is not None:
                pending.wait()
            out = out.to(dtype).contiguous()
            pending = dist.isend(out, dst=ranks[index + 1], group=group)
            in_flight = out  # noqa: F841 - keeps the tensor alive until the send completes
        else:
            totals.add(out, y)
    if pending is not None:
        pending.wait()
