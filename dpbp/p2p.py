"""The distributed transport: one process per stage, point-to-point over torch.distributed.

Process groups. Every boundary between stage i and i+1 gets three 2-rank groups of its own: one
for activations (up), one for error gradients (down), one for evaluation. NCCL ignores tags,
matches point-to-point messages by order within a communicator and, with eagerly initialised
groups, runs all unbatched P2P ops of a communicator one after another on one stream. If two
directions or two neighbours shared a communicator, a middle stage's receive posted ahead for a
later batch would sit in front of a send its neighbour is waiting for, and bp (K >= 3) or ddg/fr
(K >= 4) would deadlock. With one group per boundary and direction each stream carries messages
of one kind between one pair, in batch order on both sides; tests/test_dist.py checks every
algorithm's schedule against an NCCL-ordered simulation of exactly this code.

Overlap: a receive is posted ahead (`irecv`) as soon as the previous message of that kind was
taken, so it lands while the stage computes; a send is `isend` and is waited on only when the
next send of that kind goes out (or at shutdown). Boundary shapes are fixed once from the model;
a message buffer is allocated (caching allocator on CUDA) when its receive is posted, because the
receiving stage may keep it as the stored input of a delayed backward. Every handle is waited on.

Idle time: on CPU (gloo) `wait()` blocks the process, so time spent in it is time the stage had
nothing to compute. On CUDA (NCCL) `wait()` only orders streams and returns at once, so the
per-module idle/compute split is reported on CPU only.

Timeouts: gloo applies the process group's timeout to collectives but waits for a point-to-point
message forever, so a hung (not dead) neighbour would hang this stage too. With `timeout_s` every
wait gives up after that long and raises PeerTimeout naming the silent rank (dist.timeout_s;
gloo only: on NCCL a timed wait would block the host, and NCCL's watchdog enforces the timeout).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dpbp.schedule import RECV_ACT, RECV_GRAD, Instr

KINDS = ("act", "grad", "eval")


class PeerTimeout(RuntimeError):
    """A neighbour sent or took nothing for dist.timeout_s: it hangs, or is stopped."""

    def __init__(self, message: str, peer: int) -> None:
        super().__init__(message)
        self.peer = peer


def make_groups(ranks: Sequence[int], comm: Any = dist) -> dict[str, list[Any]]:
    """{kind: [group of boundary 0, group of boundary 1, ...]}: every rank must call this, with
    the same ranks, because creating a group is collective."""
    pairs = [[ranks[i], ranks[i + 1]] for i in range(len(ranks) - 1)]
    return {kind: [comm.new_group(p) for p in pairs] for kind in KINDS}


class P2P:
    """A stage's link to its neighbours: the transport that `executor.run_program` drives."""

    def __init__(
        self,
        index: int,
        ranks: Sequence[int],
        shapes: Sequence[Sequence[int]],
        batch_size: int,
        device: torch.device,
        groups: dict[str, list[Any]],
        comm: Any = dist,
        dtype: torch.dtype = torch.float32,
        timeout_s: float | None = None,
    ) -> None:
        """`ranks[k]` is the global rank of stage k, `shapes[k]` the per-sample shape of stage k's
        output; `comm` is torch.distributed (tests pass a simulation of it); `timeout_s`: give up
        on a message after that long (gloo), None: wait as long as it takes."""
        self.index, self.ranks, self.device, self.dtype = index, list(ranks), device, dtype
        self.timeout_s = timeout_s
        self.shapes = [tuple(s) for s in shapes]
        self.batch_size = batch_size
        self.groups, self.comm = groups, comm
        self.expected: dict[str, deque[int]] = {"act": deque(), "grad": deque()}
        self.posted: dict[str, tuple[int, torch.Tensor, Any] | None] = {"act": None, "grad": None}
        self.sending: dict[str, tuple[torch.Tensor, Any] | None] = {"act": None, "grad": None}
        self.last_sent: dict[str, tuple[int, torch.Tensor]] = {}  # for checkpoints
        self.idle_seconds = 0.0

    # boundary b joins stage b and b+1: activations come in over b = index-1 and leave over
    # b = index; gradients come in over b = index and leave over b = index-1
    def _route(self, kind: str, sending: bool) -> tuple[int, Any]:
        up = (kind != "grad") == sending  # activations and evaluation go up
        b = self.index if up else self.index - 1
        peer = self.ranks[self.index + 1] if up else self.ranks[self.index - 1]
        return peer, self.groups[kind][b]

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

    def _post(self, kind: str) -> None:
        if not self.expected[kind]:
            return
        batch = self.expected[kind].popleft()
        # an input activation has the previous stage's output shape, an error gradient this one's
        shape = self.shapes[self.index - 1] if kind == "act" else self.shapes[self.index]
        buf = torch.empty((self.batch_size, *shape), device=self.device, dtype=self.dtype)
        src, group = self._route(kind, sending=False)
        self.posted[kind] = (batch, buf, self.comm.irecv(buf, src=src, group=group))

    def _wait(self, work: Any, kind: str, sending: bool) -> None:
        if self.timeout_s is None:
            work.wait()
            return
        try:
            work.wait(timeout=timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            if "timed out" not in str(e).lower():
                raise
            peer, _ = self._route(kind, sending)
            what = "took no" if sending else "sent no"
            raise PeerTimeout(f"rank {peer} {what} {kind} message for {self.timeout_s:g} s "
                              "(dist.timeout_s): it hangs or was stopped", peer) from None

    def recv(self, kind: str, batch: int) -> torch.Tensor:
        posted = self.posted[kind]
        if posted is None or posted[0] != batch:
            raise RuntimeError(f"stage {self.index} expected {kind} of batch {batch}, not {posted}")
        _, buf, work = posted
        t0 = time.perf_counter()
        self._wait(work, kind, sending=False)
        self.idle_seconds += time.perf_counter() - t0
        self.posted[kind] = None
        self._post(kind)
        return buf

    def send(self, kind: str, batch: int, tensor: torch.Tensor) -> None:
        self._wait_send(kind)
        tensor = tensor.to(self.dtype).contiguous()
        dst, group = self._route(kind, sending=True)
        # keep the tensor referenced until the send has completed
        self.sending[kind] = (tensor, self.comm.isend(tensor, dst=dst, group=group))
        self.last_sent[kind] = (batch, tensor)

    def _wait_send(self, kind: str) -> None:
        pending = self.sending[kind]
        if pending is not None:
            t0 = time.perf_counter()
            self._wait(pending[1], kind, sending=True)
            self.idle_seconds += time.perf_counter() - t0
            self.sending[kind] = None

    def flush(self) -> None:
        """Wait for every outstanding send (before shutdown)."""
        for kind in ("act", "grad"):
            self._wait_send(kind)
        if any(self.posted.values()) or any(self.expected.values()):
            raise RuntimeError(f"stage {self.index}: receives left unmatched at shutdown")

    def evaluate(self, stage, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 totals) -> None:
        """Forward the test set through the pipeline; the last stage adds each batch to `totals`.

        `batches` yields (x, y) on every rank: the first stage uses x, the last uses y; the
        others only read the batch size.
        """
        last = self.index == len(self.ranks) - 1
        in_flight: tuple[torch.Tensor, Any] | None = None
        for x, y in batches:
            if self.index > 0:
                x = torch.empty((y.shape[0], *self.shapes[self.index - 1]), device=self.device,
                                dtype=self.dtype)
                src, group = self._route("eval", sending=False)
                self._wait(self.comm.irecv(x, src=src, group=group), "eval", sending=False)
            out = stage.evaluate(x)
            if last:
                totals.add(out, y)
                continue
            if in_flight is not None:
                self._wait(in_flight[1], "eval", sending=True)
            out = out.to(self.dtype).contiguous()
            dst, group = self._route("eval", sending=True)
            in_flight = (out, self.comm.isend(out, dst=dst, group=group))
        if in_flight is not None:
            self._wait(in_flight[1], "eval", sending=True)
