"""What each module does at each tick, as data.

A schedule is a list of instructions per stage (module) per tick, e.g. for DDG with K=2 at tick 3:

    stage 0:  F3 >A3 <G2 B2 S      forward batch 3, send its output up; receive the error
                                   gradient of batch 2, back-propagate batch 2, step
    stage 1:  <A3 F3 B3 >G3 S      receive batch 3's input, forward, loss and backward,
                                   send its input gradient down, step

Both executors run exactly these lists, so the delays are properties of this file alone and
`format_table` prints them. Messages are named by (kind, batch): activations flow up
(`>A`/`<A`), error gradients flow down (`>G`/`<G`).

Delays (stage s = 0..K-1, the papers' module k = s+1; each algorithm's record in dpbp/algos/
gives its delay and whether its forward is pipelined, and this file turns them into ticks):

- bp:  every stage forwards and back-propagates batch t at tick t (backward waits for stage s+1
       inside the tick, so nothing runs concurrently unless K = 1).
- ddg, fr: forward of batch t passes through all stages at tick t; stage s back-propagates batch
       t-(K-1-s) with the gradient stage s+1 sent at tick t-1. The last stage has no delay.
- fdg: stage s forwards batch t-s (stage s-1's output of tick t-1) and back-propagates batch
       t-s-2(K-1-s), i.e. 2(K-1-s) ticks after that batch's forward here.

Within a tick every stage forwards first, then back-propagates and steps, so the forward of a
batch reads the weights before this tick's update (DDG's w^{t-K+k} of the analysis). The FDG
reference code runs the delayed backward and step before the forward instead; with this order an
FDG module holds 2(K-k)+1 batches at its peak (the code: 2(K-k)) and a gradient is applied
2(K-k) updates after the forward that produced it (the code: 2(K-k)-1).

Algorithms whose record says `boundary="none"` (DGL) send no error gradient: every stage steps
on its own loss in the tick of its forward. With `boundary="synthetic"` (DNI) a stage steps on a
predicted gradient in that tick too, and the input gradient it sends down reaches stage s-1 a
tick later, where `L` (learn) trains stage s-1's predictor on it, before that tick's backward.

Pipeline fill: a stage makes no update until its first delayed gradient arrives. End of training:
forwards are drained (fdg runs K-1 extra ticks so the last stage sees every batch); error
gradients that would arrive after the last tick are dropped, and so are the sends that carry them.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpbp import algos

FORWARD, BACKWARD, STEP, LEARN = "F", "B", "S", "L"
SEND_ACT, RECV_ACT, SEND_GRAD, RECV_GRAD = ">A", "<A", ">G", "<G"


@dataclass(frozen=True)
class Instr:
    op: str
    batch: int = -1

    def __str__(self) -> str:
        return self.op if self.op == STEP else f"{self.op}{self.batch}"


def pipelined(algo: str) -> bool:
    """Whether the forward is pipelined too (the record's `pipelined`: FDG, dp_fdg)."""
    return algos.get(algo).pipelined


def delay(algo: str, stage: int, num_stages: int) -> int:
    """Ticks between the forward of a batch on `stage` and its backward there (the record's)."""
    return algos.get(algo).delay(stage, num_stages)


def forward_batch(algo: str, stage: int, tick: int) -> int:
    """The batch `stage` forwards at `tick` (may be < 0 during fill or >= batches in the drain)."""
    return tick - stage if pipelined(algo) else tick


def num_ticks(algo: str, num_stages: int, num_batches: int) -> int:
    """Ticks needed for every batch to reach the last stage."""
    return num_batches + (num_stages - 1 if pipelined(algo) else 0)


def _backward_tick(algo: str, stage: int, num_stages: int, batch: int) -> int:
    return batch + delay(algo, stage, num_stages) + (stage if pipelined(algo) else 0)


def backward_tick(algo: str, stage: int, num_stages: int, batch: int) -> int:
    """The tick at which `stage` back-propagates (and steps on) `batch`."""
    return _backward_tick(algo, stage, num_stages, batch)


def boundary(algo: str) -> str:
    """What crosses a boundary downwards: gradient | none | synthetic (the record's)."""
    return algos.get(algo).boundary


def _receive_tick(algo: str, stage: int, num_stages: int, op: str, batch: int) -> int:
    """The tick at which `stage` takes the message of `op` (RECV_ACT or RECV_GRAD) for `batch`."""
    if op == RECV_ACT:
        return batch + (stage if pipelined(algo) else 0)
    if boundary(algo) == "synthetic":  # the tick after stage+1 sent it: it trains a predictor
        return _backward_tick(algo, stage + 1, num_stages, batch) + 1
    return _backward_tick(algo, stage, num_stages, batch)


def _learn_batch(algo: str, stage: int, num_stages: int, tick: int) -> int:
    """synthetic: the batch whose gradient from stage+1 trains `stage`'s predictor at `tick`."""
    return forward_batch(algo, stage + 1, tick - 1) - delay(algo, stage + 1, num_stages)


def carried(
    algo: str, stage: int, num_stages: int, tick: int, num_batches: int, end_tick: int
) -> list[Instr]:
    """The sends of `stage` before `tick` whose message is taken at `tick` or later: what is in
    flight between ticks `tick - 1` and `tick` (a checkpoint there must hold these messages).

    With this schedule every such message was sent at `tick - 1`: the error gradients of
    ddg/fr/fdg and the activations of fdg (none for bp); the window below is wider on purpose so
    that the answer follows from `tick_program` alone.
    """
    out = []
    for t in range(max(0, tick - 2 * num_stages - 1), tick):
        for ins in tick_program(algo, stage, num_stages, t, num_batches, end_tick):
            if ins.op == SEND_ACT:
                peer, recv = stage + 1, RECV_ACT
            elif ins.op == SEND_GRAD:
                peer, recv = stage - 1, RECV_GRAD
            else:
                continue
            if _receive_tick(algo, peer, num_stages, recv, ins.batch) >= tick:
                out.append(ins)
    return out


def carried_to(
    algo: str, stage: int, num_stages: int, tick: int, num_batches: int, end_tick: int
) -> list[Instr]:
    """The receives of `stage` that take the messages its neighbours have in flight at `tick`
    (`carried`): what a stage that stops there must take off the wire before it shuts down."""
    out = []
    if stage > 0:
        out += [Instr(RECV_ACT, i.batch)
                for i in carried(algo, stage - 1, num_stages, tick, num_batches, end_tick)
                if i.op == SEND_ACT]
    if stage < num_stages - 1:
        out += [Instr(RECV_GRAD, i.batch)
                for i in carried(algo, stage + 1, num_stages, tick, num_batches, end_tick)
                if i.op == SEND_GRAD]
    return out


def tick_program(
    algo: str, stage: int, num_stages: int, tick: int, num_batches: int, end_tick: int,
    accumulate: int = 1,
) -> list[Instr]:
    """Instructions of `stage` at `tick`; batches outside [0, num_batches) and gradients that
    would be used at or after `end_tick` are left out. With `accumulate` = M > 1 (ADL) a stage
    steps only after every M-th backward (batch g with (g + 1) % M == 0): the backwards between
    add their gradients up."""
    last = stage == num_stages - 1
    out: list[Instr] = []
    b = forward_batch(algo, stage, tick)
    if 0 <= b < num_batches:
        if stage > 0:
            out.append(Instr(RECV_ACT, b))
        out.append(Instr(FORWARD, b))
        if not last:
            out.append(Instr(SEND_ACT, b))
    crossing = boundary(algo)
    if crossing == "synthetic" and not last:
        c = _learn_batch(algo, stage, num_stages, tick)
        if 0 <= c < num_batches:
            out += [Instr(RECV_GRAD, c), Instr(LEARN, c)]
    # which batch this stage back-propagates now
    g = b - delay(algo, stage, num_stages)
    if 0 <= g < num_batches:
        if not last and crossing == "gradient":
            out.append(Instr(RECV_GRAD, g))
        out.append(Instr(BACKWARD, g))
        # send the input gradient down only if stage-1 will still use it before the end
        if stage > 0 and crossing != "none" and \
                _receive_tick(algo, stage - 1, num_stages, RECV_GRAD, g) < end_tick:
            out.append(Instr(SEND_GRAD, g))
        if (g + 1) % accumulate == 0:
            out.append(Instr(STEP, g))
    return out


def program(
    algo: str, stage: int, num_stages: int, ticks: range, num_batches: int, end_tick: int,
    accumulate: int = 1,
) -> list[Instr]:
    """The instructions of `stage` over a range of ticks, in order."""
    return [
        ins
        for t in ticks
        for ins in tick_program(algo, stage, num_stages, t, num_batches, end_tick, accumulate)
    ]


def format_table(algo: str, num_stages: int, num_batches: int, ticks: int | None = None,
                 width: int = 100, accumulate: int = 1) -> str:
    """A stage x tick table of the schedule, for debugging and the docs; ticks that do not fit
    in `width` columns continue in another block below (a blank line between blocks)."""
    end = num_ticks(algo, num_stages, num_batches)
    ticks = end if ticks is None else ticks
    cells = [
        [" ".join(map(str, tick_program(algo, s, num_stages, t, num_batches, end, accumulate)))
         for t in range(ticks)]
        for s in range(num_stages)
    ]
    col = max(4, *(len(c) for row in cells for c in row))
    per_block = max(1, (width - len("stage | ") + 3) // (col + 3))  # the last cell has no " | "
    blocks = []
    for first in range(0, ticks, per_block):
        span = range(first, min(first + per_block, ticks))
        head = "stage | " + " | ".join(f"t={t}".ljust(col) for t in span)
        rows = [f"{s:5d} | " + " | ".join(row[t].ljust(col) for t in span)
                for s, row in enumerate(cells)]
        blocks.append("\n".join(line.rstrip() for line in (head, *rows)))
    return "\n\n".join(blocks)
