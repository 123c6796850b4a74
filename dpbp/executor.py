"""Run the schedule's instructions on stages: the interpreter and the in-process executor.

`run_program` maps each instruction to a Stage method. It is a generator: when a message it needs
has not arrived it yields, and whoever drives it retries later. The local executor drives all
stages' generators round-robin in one process (deterministic, used by tests and single-device
runs); in a distributed run each process drives its own stage's generator over dist.P2P, whose
receives block instead (grid.Executor).
The same code therefore computes the same numbers under both.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from dpbp.schedule import (
    BACKWARD,
    FORWARD,
    LEARN,
    RECV_ACT,
    RECV_GRAD,
    SEND_ACT,
    SEND_GRAD,
    STEP,
    Instr,
)
from dpbp.stage import Stage, full_precision


class Transport(Protocol):
    """How a stage's messages move: (kind, batch) -> tensor, kind is "act" or "grad".

    `last_sent[kind]` is the (batch, tensor) of the latest send of that kind: a checkpoint
    between two ticks saves the ones still in flight (schedule.carried) and a resumed run sends
    them again before its first tick.
    """

    last_sent: dict[str, tuple[int, torch.Tensor]]

    def send(self, kind: str, batch: int, tensor: torch.Tensor) -> None: ...

    def recv(self, kind: str, batch: int) -> torch.Tensor | None: ...


class BatchSource(Protocol):
    """The data ends of the pipeline: inputs for the first stage, labels for the last."""

    def inputs(self, batch: int) -> torch.Tensor: ...

    def labels(self, batch: int) -> torch.Tensor: ...


def run_program(
    stage: Stage, program: Sequence[Instr], io: Transport, feed: BatchSource
) -> Generator[None, None, None]:
    """Execute `program` on `stage`; yields whenever a needed message is not there yet."""
    acts: dict[int, torch.Tensor] = {}  # received inputs
    outs: dict[int, torch.Tensor] = {}  # outputs waiting to be sent up
    grads: dict[int, torch.Tensor] = {}  # received error gradients
    dgrads: dict[int, torch.Tensor] = {}  # input gradients waiting to be sent down
    for ins in program:
        op, b = ins.op, ins.batch
        if op == RECV_ACT or op == RECV_GRAD:
            kind = "act" if op == RECV_ACT else "grad"
            while (msg := io.recv(kind, b)) is None:
                yield
            (acts if op == RECV_ACT else grads)[b] = msg
        elif op == FORWARD:
            x = acts.pop(b) if stage.index > 0 else feed.inputs(b)
            outs[b] = stage.forward(b, x)
        elif op == SEND_ACT:
            io.send("act", b, outs.pop(b))
        elif op == BACKWARD:
            outs.pop(b, None)  # the last stage's logits are not sent anywhere
            given = stage.backward_input
            g = (feed.labels(b) if given == "labels" else grads.pop(b) if given == "gradient"
                 else None)
            d = stage.backward(b, g)
            if d is not None:
                dgrads[b] = d
        elif op == SEND_GRAD:
            io.send("grad", b, dgrads.pop(b))
        elif op == STEP:
            stage.step(b)
        elif op == LEARN:
            stage.learn(b, grads.pop(b))
        else:  # pragma: no cover - the schedule only emits the ops above
            raise ValueError(f"unknown instruction {ins}")
    outs.clear()


class Mailbox:
    """In-process transport: messages are copies (as over a wire), keyed by (kind, batch)."""

    def __init__(self) -> None:
        self.box: dict[tuple[str, int, int], torch.Tensor] = {}  # (kind, receiver, batch)
        self.moves = 0  # sends + receives so far: how the local executor sees progress

    def endpoint(self, index: int) -> _MailboxEnd:
        return _MailboxEnd(self, index)


class _MailboxEnd:
    def __init__(self, mailbox: Mailbox, index: int) -> None:
        self.mailbox, self.index = mailbox, index
        self.last_sent: dict[str, tuple[int, torch.Tensor]] = {}

    def send(self, kind: str, batch: int, tensor: torch.Tensor) -> None:
        dst = self.index + 1 if kind == "act" else self.index - 1
        self.mailbox.box[(kind, dst, batch)] = tensor.clone()
        self.mailbox.moves += 1
        self.last_sent[kind] = (batch, tensor)

    def recv(self, kind: str, batch: int) -> torch.Tensor | None:
        msg = self.mailbox.box.pop((kind, self.index, batch), None)
        self.mailbox.moves += msg is not None
        return msg


class LocalExecutor:
    """All stages in one process; ticks in order; deterministic."""

    def __init__(self, stages: Sequence[Stage], feed: BatchSource) -> None:
        self.stages = stages
        self.feed = feed
        self.mailbox = Mailbox()
        self.ends = [self.mailbox.endpoint(s.index) for s in stages]
        self.seconds = [0.0] * len(stages)  # time spent running each stage

    def run(self, programs: Sequence[Sequence[Instr]]) -> None:
        """Run one program per stage to completion (messages left over stay for the next call)."""
        gens = [
            run_program(s, p, self.ends[s.index], self.feed)
            for s, p in zip(self.stages, programs)
        ]
        active = dict(enumerate(gens))
        while active:
            progressed = False
            for i, g in list(active.items()):
                before = self.mailbox.moves
                t0 = time.perf_counter()
                try:
                    next(g)
                except StopIteration:
                    del active[i]
                    progressed = True
                self.seconds[i] += time.perf_counter() - t0
                progressed = progressed or self.mailbox.moves != before
            if not progressed and active:
                raise RuntimeError("schedule deadlock: every stage waits for a message")

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
        """Test loss and accuracy over `batches` of (x, y), through all stages in order."""
        total = Totals()
        for x, y in batches:
            for s in self.stages:
                x = s.evaluate(x)
            total.add(x, y)
        return total.result()


def in_flight(io: Transport, sends: Sequence[Instr]) -> list[tuple[str, int, torch.Tensor]]:
    """The messages of `sends` (schedule.carried) as (kind, batch, tensor), from `io.last_sent`."""
    out = []
    for ins in sends:
        kind = "act" if ins.op == SEND_ACT else "grad"
        batch, tensor = io.last_sent.get(kind, (None, None))
        if batch != ins.batch:  # the schedule says it was the last one sent: a bug if not
            raise RuntimeError(f"the {kind} message of batch {ins.batch} is not the last one sent")
        out.append((kind, batch, tensor))
    return out


class Totals:
    """Summed test loss and correct count, kept on the device until `result` (one sync)."""

    def __init__(self) -> None:
        self.loss: torch.Tensor | None = None
        self.correct: torch.Tensor | None = None
        self.n = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        loss = F.cross_entropy(full_precision(logits), labels, reduction="sum").double()
        correct = (logits.argmax(1) == labels).sum()
        self.loss = loss if self.loss is None else self.loss + loss
        self.correct = correct if self.correct is None else self.correct + correct
        self.n += labels.numel()

    def result(self) -> tuple[float, float]:
        """(mean loss, accuracy)."""
        if not self.n:
            return float("nan"), float("nan")
        return self.loss.item() / self.n, self.correct.item() / self.n

