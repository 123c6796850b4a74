"""The dist transport under NCCL's ordering rules, without a GPU.

NCCL ignores tags: within a communicator a rank's point-to-point ops run one after another, and a
send completes only together with the peer's receive at the head of *its* queue. `SimComm` models
exactly that for K ranks run as threads, and the real P2P class and interpreter run every
algorithm's schedule on it (with chunked tick ranges and evaluation in between, as train does).
A deadlock shows as a wait that never completes. The same simulation with one group per
direction shared by all stages deadlocks, which shows that the check can fail.
"""

from __future__ import annotations

import io
import threading
from collections import defaultdict, deque

import pytest
import torch
from torch import nn

from dpbp import p2p, schedule
from dpbp.executor import Totals, in_flight, run_program
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


def run_threads(rank, k: int, errors: list[BaseException]) -> None:
    """`rank(s)` for every stage s in a thread of its own; the first error is raised here."""
    threads = [threading.Thread(target=rank, args=(s,)) for s in range(k)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    if errors:
        raise errors[0]


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

    run_threads(rank, k, errors)


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


def train_ranks(algo: str, k: int, weights: str, num_batches: int, stop: int | None = None
                ) -> list[dict[str, torch.Tensor]]:
    """Train k stages (BatchNorm, momentum) as threads over SimComm; with `stop`, checkpoint
    every rank between ticks stop-1 and stop (through torch.save and a weights-only load), then
    continue in fresh stages over a fresh communicator from that checkpoint alone."""
    end = schedule.num_ticks(algo, k, num_batches)
    feed, errors, init_lock = Feed(), [], threading.Lock()
    saved: dict[int, bytes] = {}
    final: dict[int, dict[str, torch.Tensor]] = {}

    def make(s: int, sim: SimComm, groups) -> tuple[Stage, p2p.P2P]:
        with init_lock:  # the global RNG is shared by the threads
            torch.manual_seed(s)
            m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Tanh())
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        stage = Stage(m, s, k, algo, opt, weights=weights, beta=0.5)
        link = p2p.P2P(s, range(k), [(3,)] * k, 4, torch.device("cpu"), groups, comm=sim.rank(s))
        return stage, link

    def run(stage, link, ticks: range) -> None:
        for t in range(ticks.start, ticks.stop, 3):
            prog = schedule.program(algo, stage.index, k, range(t, min(t + 3, ticks.stop)),
                                    num_batches, end)
            link.expect(prog)
            for _ in run_program(stage, prog, link, feed):
                raise AssertionError("a blocking receive returned nothing")

    def phases(sim1: SimComm, sim2: SimComm, g1, g2):
        def rank(s: int) -> None:
            try:
                stage, link = make(s, sim1, g1)
                if stop is None:
                    run(stage, link, range(end))
                else:
                    first = schedule.forward_batch(algo, s, stop - stage.delay)
                    stage.keep_weights_from = first  # live: keep what the checkpoint needs
                    run(stage, link, range(stop))
                    sends = schedule.carried(algo, s, k, stop, num_batches, end)
                    buf = io.BytesIO()
                    torch.save({"module": stage.module.state_dict(),
                                "optimizer": stage.optimizer.state_dict(),
                                "inflight": stage.inflight(),
                                "messages": in_flight(link, sends)}, buf)
                    # take the neighbours' in-flight messages off the wire, then shut down
                    drain = schedule.carried_to(algo, s, k, stop, num_batches, end)
                    link.expect(drain)
                    for ins in drain:
                        link.recv("act" if ins.op == schedule.RECV_ACT else "grad", ins.batch)
                    link.flush()
                    saved[s] = buf.getvalue()
                    # a new process: nothing but the checkpoint survives
                    ck = torch.load(io.BytesIO(saved[s]), weights_only=True)
                    stage, link = make(s, sim2, g2)
                    stage.module.load_state_dict(ck["module"])
                    stage.optimizer.load_state_dict(ck["optimizer"])
                    stage.restore_inflight(ck["inflight"], torch.device("cpu"))
                    for kind, b, tensor in ck["messages"]:
                        link.send(kind, b, tensor)
                    run(stage, link, range(stop, end))
                link.flush()
                final[s] = {n: v.clone() for n, v in stage.module.state_dict().items()}
            except Exception as e:  # surfaced in the main thread below
                errors.append(e)
        return rank

    sim1, sim2 = SimComm(), SimComm()
    rank = phases(sim1, sim2, p2p.make_groups(list(range(k)), sim1),
                  p2p.make_groups(list(range(k)), sim2))
    run_threads(rank, k, errors)
    return [final[s] for s in range(k)]


@pytest.mark.parametrize("algo,weights", [("ddg", "stash"), ("ddg", "live"), ("fr", "stash"),
                                          ("fdg", "stash"), ("fdg", "live"), ("bp", "stash")])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_a_checkpoint_between_two_ticks_resumes_exactly_under_nccl_ordering(algo, weights, k):
    """Pending graphs rebuilt from inputs and weights, in-flight messages sent again: the resumed
    pipeline ends with the same weights and BatchNorm statistics, bit for bit."""
    nb = 12
    whole = train_ranks(algo, k, weights, nb)
    for stop in (5, 7):
        resumed = train_ranks(algo, k, weights, nb, stop=stop)
        for a, b in zip(whole, resumed, strict=True):
            for n in a:
                assert torch.equal(a[n], b[n]), (stop, n)
