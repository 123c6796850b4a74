"""Predict an algorithm's throughput on K (or R x K) devices from a per-module time profile.

The simulator runs the schedules the executors run: each stage of a tick algorithm (bp, ddg, fr,
fdg, dp_fdg) executes `schedule.program`, instruction by instruction, so the prediction includes
dpbp's fill, drain, dropped gradients and in-tick order (forward first, then the delayed backward).
The pipelines (`gpipe` with its GPipe or 1F1B order) and `ddp` are written as instruction lists
for the same engine.

Timing model (all times in seconds, deterministic: means measured by the bench):

- A device does one computation at a time, in its program's order: F takes forward[k], B takes
  backward[k] (Features Replay: forward[k] + backward[k] on every stage but the last, which does
  not replay), S takes step[k]. Time spent waiting is idle.
- Sends are asynchronous: the sender goes on at once and the message arrives transfer[k] seconds
  later (boundary k -> k+1; an error gradient going back down takes the same time). Transfers
  never contend with each other or with computation (a link per boundary and direction, as many
  messages on it at once as there are).
- A receive waits until its message has arrived.
- Data parallel (dp_fdg, ddp with R > 1): the all-reduce of module k's gradients is a barrier of
  module k over the replicas, then allreduce[k] seconds during which those devices compute
  nothing. With R = 1 there is nothing to reduce and the all-reduce is skipped.
- Companions (DGL's auxiliary heads, DNI's gradient predictors): `Profile.aux[k]` seconds per
  batch, added to module k's backward (DNI's predictor step, `L`, runs as part of it; its wait
  for the gradient from k+1 is modelled by the receive before it). The bench's block profile
  does not measure them, so `predict=true` leaves them out (aux = 0): an upper bound on
  DGL's and DNI's throughput, exact in their dependencies (DGL: none across modules; DNI: the
  forward within a tick and the predictor's target one tick later).
- Not modelled: data loading, evaluation, logging, checkpoints, memory limits, kernel launch
  latency, and any cost the profile does not measure (e.g. DDG's weight stash copies count only
  if the bench's forward includes them).
- Pipelines split a batch into M microbatches that each take 1/M of the batch's forward, backward
  and transfer times (perfect scaling: small microbatches are usually less efficient than that).

The engine (`execute`) is a dataflow computation over per-device lists of `Op`s: an op starts when
its device is free and, for a receive, when its message has arrived (for an all-reduce, when the
last participant has come), so its times do not depend on the order in which devices are visited.
Each device runs until it blocks and is woken by the send that unblocks it: no threads, no
sleeping, linear in the number of ops.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import NamedTuple

from dpbp import algos, schedule
from dpbp.schedule import BACKWARD, FORWARD, RECV_ACT, RECV_GRAD, SEND_ACT, SEND_GRAD, STEP

PIPELINES = ("gpipe", "1f1b")
RUN, SEND, RECV, SYNC = "run", "send", "recv", "sync"


def _floats(name: str, values: Sequence[float], length: int) -> tuple[float, ...]:
    """`values` as floats, zeros if empty; checks the length and the sign."""
    out = tuple(float(v) for v in values) if len(values) else (0.0,) * length
    if len(out) != length:
        raise ValueError(f"Profile.{name} has {len(out)} entries, expected {length}.")
    if any(v < 0 for v in out):
        raise ValueError(f"Profile.{name} has a negative time: {out}.")
    return out


@dataclass(frozen=True)
class Profile:
    """Measured times of K modules, in seconds per batch (one worker's batch)."""

    forward: tuple[float, ...]
    backward: tuple[float, ...]  # including weight gradients, excluding the step
    step: tuple[float, ...] = ()  # optimizer step per module (default 0)
    transfer: tuple[float, ...] = ()  # one activation (or gradient) across k -> k+1, K-1 entries
    allreduce: tuple[float, ...] = ()  # module k's gradients over the replicas (default 0)
    aux: tuple[float, ...] = ()  # module k's companion (DGL head, DNI predictor) per batch

    def __post_init__(self) -> None:
        k = len(self.forward)
        if k < 1 or len(self.backward) != k:
            raise ValueError(f"Profile needs one forward and one backward time per module; got "
                             f"{len(self.forward)} and {len(self.backward)}.")
        # frozen: normalise to float tuples and fill the defaults through object.__setattr__
        for name, n in (("forward", k), ("backward", k), ("step", k), ("transfer", k - 1),
                        ("allreduce", k), ("aux", k)):
            object.__setattr__(self, name, _floats(name, getattr(self, name), n))

    @property
    def modules(self) -> int:
        """K, the number of modules."""
        return len(self.forward)

    @classmethod
    def from_blocks(cls, block_forward: Sequence[float], block_backward: Sequence[float],
                    counts: Sequence[int], block_step: Sequence[float] = (),
                    block_transfer: Sequence[float] = (),
                    block_allreduce: Sequence[float] = ()) -> Profile:
        """Sum per-block times into modules of `counts[k]` consecutive blocks.

        `block_transfer[i]` is the time to move block i's output to block i+1 (one entry per
        block but the last); the boundary after module k moves the output of its last block.
        Summing per-block all-reduce times over-counts a real all-reduce's fixed latency."""
        n = len(block_forward)
        if any(c < 1 for c in counts) or sum(counts) != n:
            raise ValueError(f"block counts {list(counts)} must be >= 1 and add up to the "
                             f"{n} blocks profiled.")
        for name, values, length in (("block_backward", block_backward, n),
                                     ("block_step", block_step, n),
                                     ("block_transfer", block_transfer, n - 1),
                                     ("block_allreduce", block_allreduce, n)):
            if len(values) and len(values) != length:
                raise ValueError(f"{name} has {len(values)} entries, expected {length}.")
        ends = list(accumulate(counts))
        starts = [0, *ends[:-1]]

        def per_module(values: Sequence[float]) -> tuple[float, ...]:
            return tuple(sum(values[a:b]) for a, b in zip(starts, ends)) if len(values) else ()

        transfer = tuple(block_transfer[e - 1] for e in ends[:-1]) if len(block_transfer) else ()
        return cls(per_module(block_forward), per_module(block_backward), per_module(block_step),
                   transfer, per_module(block_allreduce))


def bp_one_device(profile: Profile) -> float:
    """Seconds per batch of plain backprop on one device: the baseline of every speedup."""
    return sum(profile.forward) + sum(profile.backward) + sum(profile.step)


class Op(NamedTuple):
    """One instruction of a device. `seconds`: compute time (RUN), time in flight (SEND), or
    duration after the last participant arrives (SYNC). `key` names a message (SEND/RECV) or a
    collective of `group` devices (SYNC)."""

    kind: str
    seconds: float = 0.0
    key: Hashable = None
    label: str = ""
    group: int = 1


@dataclass
class Timeline:
    """What `execute` computed: per device, when it finished, its compute seconds, and the
    (label, start, end) of each RUN op (a Gantt chart)."""

    end: list[float]
    busy: list[float]
    spans: list[list[tuple[str, float, float]]] = field(repr=False)


def execute(lanes: Sequence[Sequence[Op]], names: Sequence[str] | None = None) -> Timeline:
    """Start and end times of every op; raises ValueError when devices wait forever."""
    names = list(names) if names is not None else [f"device {i}" for i in range(len(lanes))]
    n = len(lanes)
    clock, busy, pc = [0.0] * n, [0.0] * n, [0] * n
    spans: list[list[tuple[str, float, float]]] = [[] for _ in range(n)]
    mail: dict[Hashable, float] = {}  # message -> arrival time
    arrivals: dict[Hashable, dict[int, float]] = {}  # collective -> {device: arrival time}
    released: dict[Hashable, float] = {}  # complete collective -> when it ends
    waiters: dict[Hashable, list[int]] = {}  # message or collective -> devices blocked on it
    ready = deque(range(n))
    while ready:  # run a device until it blocks; whatever unblocks it puts it back in `ready`
        i = ready.popleft()
        ops = lanes[i]
        while pc[i] < len(ops):
            op = ops[pc[i]]
            if op.kind == RUN:
                spans[i].append((op.label, clock[i], clock[i] + op.seconds))
                clock[i] += op.seconds
                busy[i] += op.seconds
            elif op.kind == SEND:
                if op.key in mail:
                    raise ValueError(f"{names[i]}: message {op.key!r} sent twice ({op.label})")
                mail[op.key] = clock[i] + op.seconds
                ready.extend(waiters.pop(op.key, ()))
            elif op.kind == RECV:
                if op.key not in mail:
                    waiters.setdefault(op.key, []).append(i)
                    break
                clock[i] = max(clock[i], mail.pop(op.key))
            elif op.kind == SYNC:
                if op.key not in released:
                    here = arrivals.setdefault(op.key, {})
                    here[i] = clock[i]
                    if len(here) < op.group:
                        waiters.setdefault(op.key, []).append(i)
                        break
                    released[op.key] = max(arrivals.pop(op.key).values()) + op.seconds
                    ready.extend(waiters.pop(op.key, ()))
                clock[i] = released[op.key]
            else:
                raise ValueError(f"{names[i]}: unknown op kind {op.kind!r}")
            pc[i] += 1
    stuck = [f"{names[i]} at {lanes[i][pc[i]].label or lanes[i][pc[i]].kind}"
             for i in range(n) if pc[i] < len(lanes[i])]
    if stuck:
        raise ValueError("deadlock: devices wait for a message or partner that never comes: "
                         + "; ".join(stuck))
    return Timeline(clock, busy, spans)


@dataclass(frozen=True)
class Result:
    """A simulated run. Devices are in rank order: replica-major, rank = replica * K + module."""

    algo: str
    makespan: float  # seconds from the first op to the last
    batches: int  # batches trained, all replicas together
    busy: tuple[float, ...]  # compute seconds per device
    spans: tuple[tuple[tuple[str, float, float], ...], ...] = field(repr=False, compare=False)

    @property
    def idle(self) -> tuple[float, ...]:
        """Seconds each device computes nothing (waiting, all-reducing, or finished early)."""
        return tuple(self.makespan - b for b in self.busy)

    @property
    def throughput(self) -> float:
        """Batches per second."""
        return self.batches / self.makespan

    def speedup(self, seconds_per_batch: float) -> float:
        """Throughput relative to a baseline taking `seconds_per_batch` (see `bp_one_device`)."""
        return self.throughput * seconds_per_batch


def _tick_lanes(algo: str, p: Profile, num_batches: int, replica: int,
                replicas: int) -> list[list[Op]]:
    """One replica's schedule.program per stage, as ops."""
    k = p.modules
    end = schedule.num_ticks(algo, k, num_batches)
    lanes = []
    for s in range(k):
        # keep.Replay: a stage that keeps inputs recomputes its forward before its backward
        replay = p.forward[s] if algos.get(algo).keeps == "input" and s < k - 1 else 0.0
        ops, steps = [], 0
        for ins in schedule.program(algo, s, k, range(end), num_batches, end):
            op, b, label = ins.op, ins.batch, str(ins)
            if op == FORWARD:
                ops.append(Op(RUN, p.forward[s], label=label))
            elif op == BACKWARD:  # a companion's forward, backward and step count here too
                ops.append(Op(RUN, replay + p.backward[s] + p.aux[s], label=label))
            elif op == STEP:
                if replicas > 1:  # Stage.step all-reduces the gradients before the update
                    ops.append(Op(SYNC, p.allreduce[s], ("ar", s, steps), "AR", replicas))
                ops.append(Op(RUN, p.step[s], label=label))
                steps += 1
            elif op == SEND_ACT:
                ops.append(Op(SEND, p.transfer[s], (replica, "act", s + 1, b), label))
            elif op == RECV_ACT:
                ops.append(Op(RECV, 0.0, (replica, "act", s, b), label))
            elif op == SEND_GRAD:
                ops.append(Op(SEND, p.transfer[s - 1], (replica, "grad", s - 1, b), label))
            elif op == RECV_GRAD:
                ops.append(Op(RECV, 0.0, (replica, "grad", s, b), label))
        lanes.append(ops)
    return lanes


def pipeline_order(pipeline: str, stage: int, num_stages: int, microbatches: int) -> list[str]:
    """Microbatch order of one stage in one batch, e.g. ["F0", "F1", "B0", "B1"].

    gpipe: every forward, then every backward, both in microbatch order (torch's ScheduleGPipe).
    1f1b: min(M, K - stage) forwards, then backward and forward alternately, then the remaining
    backwards (torch's Schedule1F1B)."""
    m = microbatches
    if pipeline == "gpipe":
        return [f"F{i}" for i in range(m)] + [f"B{i}" for i in range(m)]
    if pipeline != "1f1b":
        raise ValueError(f"unknown pipeline schedule '{pipeline}'; use one of {PIPELINES}.")
    warm = min(m, num_stages - stage)
    order = [f"F{i}" for i in range(warm)]
    for i in range(m):
        order.append(f"B{i}")
        if warm + i < m:
            order.append(f"F{warm + i}")
    return order


def _pipeline_lanes(p: Profile, num_batches: int, microbatches: int,
                    pipeline: str) -> list[list[Op]]:
    k, m = p.modules, microbatches
    lanes = []
    for s in range(k):
        ops = []
        for n in range(num_batches):  # the optimizer steps after the whole batch: a flush
            for item in pipeline_order(pipeline, s, k, m):
                i = int(item[1:])
                if item[0] == "F":
                    if s > 0:
                        ops.append(Op(RECV, 0.0, ("act", s, n, i), f"<A{n}.{i}"))
                    ops.append(Op(RUN, p.forward[s] / m, label=f"F{n}.{i}"))
                    if s < k - 1:
                        ops.append(Op(SEND, p.transfer[s] / m, ("act", s + 1, n, i)))
                else:
                    if s < k - 1:
                        ops.append(Op(RECV, 0.0, ("grad", s, n, i), f"<G{n}.{i}"))
                    ops.append(Op(RUN, p.backward[s] / m, label=f"B{n}.{i}"))
                    if s > 0:
                        ops.append(Op(SEND, p.transfer[s - 1] / m, ("grad", s - 1, n, i)))
            ops.append(Op(RUN, p.step[s], label=f"S{n}"))
        lanes.append(ops)
    return lanes


def _ddp_lanes(p: Profile, num_batches: int, replica: int, replicas: int,
               overlap: bool) -> list[list[Op]]:
    """One replica of the whole model on one device. Without overlap the all-reduce of all
    gradients runs after the backward; with overlap each module's gradients form a bucket that a
    network lane all-reduces as soon as that module's backward is done (torch DDP's buckets)."""
    k, r = p.modules, replica
    f, b, step, ar = sum(p.forward), sum(p.backward), sum(p.step), sum(p.allreduce)
    compute: list[Op] = []
    net: list[Op] = []
    for n in range(num_batches):
        compute.append(Op(RUN, f, label=f"F{n}"))
        if replicas == 1:
            compute.append(Op(RUN, b, label=f"B{n}"))
        elif not overlap:
            compute.append(Op(RUN, b, label=f"B{n}"))
            compute.append(Op(SYNC, ar, ("ar", n), "AR", replicas))
        else:
            for s in reversed(range(k)):  # the backward reaches the input side last
                compute.append(Op(RUN, p.backward[s], label=f"B{n}.{s}"))
                compute.append(Op(SEND, 0.0, (r, "ready", n, s)))
                net += [Op(RECV, 0.0, (r, "ready", n, s), f"<ready{n}.{s}"),
                        Op(SYNC, p.allreduce[s], ("ar", n, s), f"AR{n}.{s}", replicas),
                        Op(SEND, 0.0, (r, "reduced", n, s))]
            compute += [Op(RECV, 0.0, (r, "reduced", n, s), f"<reduced{n}.{s}")
                        for s in range(k)]
        compute.append(Op(RUN, step, label=f"S{n}"))
    return [compute, net] if net else [compute]


def simulate(algo: str, profile: Profile, num_batches: int, replicas: int = 1,
             microbatches: int = 4, pipeline: str = "gpipe", overlap: bool = False) -> Result:
    """Simulate `num_batches` batches per replica of `algo` on one device per module (R x K
    devices for dp_fdg, R for ddp, which puts the whole profiled model on each device).

    `microbatches` and `pipeline` ("gpipe" or "1f1b") apply to algo=gpipe; `overlap` to ddp
    (default: the all-reduce starts after the whole backward)."""
    known = [a for a in algos.names() if algos.get(a).simulate is not None]
    if algo not in known:
        raise ValueError(f"unknown algo '{algo}'; the simulator knows {', '.join(known)}.")
    if num_batches < 1 or replicas < 1 or microbatches < 1:
        raise ValueError("num_batches, replicas and microbatches must be at least 1.")
    model = algos.get(algo).simulate
    if replicas > 1 and algos.get(algo).replicas == "one":
        takes = [a for a in known if algos.get(a).replicas != "one"]
        raise ValueError(f"algo={algo} has one pipeline; only {' and '.join(takes)} take "
                         "replicas.")
    lanes: list[list[Op]] = []
    names: list[str] = []
    for r in range(replicas):
        if model == "tick":
            lanes += _tick_lanes(algo, profile, num_batches, r, replicas)
        elif model == "microbatches":
            lanes += _pipeline_lanes(profile, num_batches, microbatches, pipeline)
        else:
            lanes += _ddp_lanes(profile, num_batches, r, replicas, overlap)
        new = len(lanes) - len(names)
        names += ([f"replica {r}", f"replica {r} network"][:new] if model == "allreduce"
                  else [f"replica {r} stage {s}" for s in range(new)])
    t = execute(lanes, names)
    devices = [i for i, name in enumerate(names) if not name.endswith("network")]
    return Result(algo, max(t.end), num_batches * replicas, tuple(t.busy[i] for i in devices),
                  tuple(tuple(t.spans[i]) for i in devices))


def predict_speedup(algo: str, profile: Profile, replicas: int = 1, num_batches: int = 200,
                    microbatches: int = 4, pipeline: str = "gpipe", overlap: bool = False,
                    baseline: float | None = None) -> float:
    """Simulated throughput over plain BP's on one device, with len(profile.forward) x replicas
    devices (ddp: replicas devices); arguments as `simulate`. `baseline`: BP's seconds per batch
    on one device when measured apart (the whole model timed as a unit), else
    `bp_one_device(profile)`."""
    result = simulate(algo, profile, num_batches, replicas, microbatches, pipeline, overlap)
    return result.speedup(bp_one_device(profile) if baseline is None else baseline)
