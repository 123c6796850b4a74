"""The dist transport under NCCL's ordering rules, without a GPU.

NCCL ignores tags: within a communicator a rank's point-to-point ops run one after another, and a
send completes only together with the peer's receive at the head of *its* queue. `SimComm` models
exactly that for K ranks run as threads, and the real P2P class and interpreter run every
algorithm's schedule on it (with chunked tick ranges and evaluation in between, as train does).
A deadlock shows as a wait that never completes. The same simulation with one group per
direction shared by all stages deadlocks, which shows that the check can fail.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque

import pytest
import torch
from torch import nn

from dpbp import dist as p2p
from dpbp import schedule
from dpbp.executor import Totals, run_program
from dpbp.stage import Stage

TIMEOUT = 5.0


class Deadlock(RuntimeError):
    pass


class Op:
    def __init__(self, send: bool, me: int, peer: int, tensor: torch.Tensor) -> None:
        self.send, self.me, self.peer, self.tensor = send, me, peer, tensor
        self.done = False


class SimComm:
    """Shared state: one FIFO per (communicator, rank)."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.queues: dict[tuple, deque[Op]] = defaultdict(deque)
        self.count = 0

    def new_group(self, ranks):
        self.count += 1
        return ("group", self.count, tuple(ranks))

    def rank(self, r: int) -> RankComm:
        return RankComm(self, r)

    def post(self, group, op: Op) -> Work:
        with self.cv:
            self.queues[(group, op.me)].append(op)
            self._match(group)
            self.cv.notify_all()
        return Work(self, op)

    def _match(self, group) -> None:
        """Complete head ops that are each other's counterpart, until none are."""
        progress = True
        while progress:
            progress = False
            for r in group[2]:
                q = self.queues[(group, r)]
                if not q:
                    continue
                x = q[0]
                peer_q = self.queues[(group, x.peer)]
                y = peer_q[0] if peer_q else None
                if y is None or y.peer != r or y.send == x.send:
                    continue  # not (yet) matched: an op behind a head waits, as on one stream
                send, recv = (x, y) if x.send else (y, x)
                recv.tensor.copy_(send.tensor)
                x.done = y.done = True
                q.popleft()
                peer_q.popleft()
                progress = True


class Work:
    def __init__(self, sim: SimComm, op: Op) -> None:
        self.sim, self.op = sim, op

    def wait(self) -> None:
        with self.sim.cv:
            if not self.sim.cv.wait_for(lambda: self.op.done, timeout=TIMEOUT):
                what = "send" if self.op.send else "receive"
                raise Deadlock(f"rank {self.op.me} waits forever on a {what}")


class RankComm:
    def __init__(self, sim: SimComm, me: int) -> None:
        self.sim, self.me = sim, me

    def isend(self, tensor, dst, group):
        return self.sim.post(group, Op(True, self.me, dst, tensor))

    def irecv(self, tensor, src, group):
        return self.sim.post(group, Op(False, self.me, src, tensor))

    def recv(self, tensor, src, group):
        self.irecv(tensor, src, group).wait()


class Feed:
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 4, 3, generator=g)
        self.y = torch.randint(0, 3, (64, 4), generator=g)

    def inputs(self, b):
        return self.x[b]

    def labels(self, b):
        return self.y[b]


def run_ranks(algo: str, k: int, num_batches: int, chunk: int, groups_for) -> None:
    """Train k stages as threads over SimComm, in tick chunks with an evaluation after each."""
    sim = SimComm()
    groups = groups_for(list(range(k)), sim)
    end = schedule.num_ticks(algo, k, num_batches)
    feed, errors = Feed(), []

    def rank(s: int) -> None:
        try:
            torch.manual_seed(s)
            m = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
            stage = Stage(m, s, k, algo, torch.optim.SGD(m.parameters(), lr=0.1))
            link = p2p.P2P(s, range(k), [(3,)] * k, 4, torch.device("cpu"), groups,
                           comm=sim.rank(s))
            for t in range(0, end, chunk):
                prog = schedule.program(algo, s, k, range(t, min(t + chunk, end)), num_batches,
                                        end)
                link.expect(prog)
                for _ in run_program(stage, prog, link, feed):
                    raise AssertionError("a blocking receive returned nothing")
                link.evaluate(stage, [(feed.x[i], feed.y[i]) for i in range(2)], Totals())
            link.flush()
        except Exception as e:  # surfaced in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(s,)) for s in range(k)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    if errors:
        raise errors[0]


@pytest.mark.parametrize("algo", ["bp", "ddg", "fr", "fdg"])
@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("chunk", [1, 3, 10])
def test_schedules_never_deadlock_under_nccl_ordering(algo, k, chunk):
    run_ranks(algo, k, num_batches=12, chunk=chunk, groups_for=p2p.make_groups)


def shared_groups(ranks, sim):
    """The naive layout: one communicator per kind shared by all stages."""
    return {kind: [sim.new_group(ranks)] * (len(ranks) - 1) for kind in p2p.KINDS}


def test_one_group_per_direction_for_all_stages_would_deadlock(monkeypatch):
    monkeypatch.setattr(f"{__name__}.TIMEOUT", 1.0)
    with pytest.raises(Deadlock):
        run_ranks("bp", 3, num_batches=12, chunk=10, groups_for=shared_groups)
