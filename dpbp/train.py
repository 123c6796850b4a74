"""The run loop, written once for every algorithm family.

`train(cfg, run_dir, ctx)` is called once per process: by the only process of a single-worker or
`executor=local` run, or by each worker of a distributed run (ctx says which). It owns what every
run does alike: data order (global batch numbers), the learning-rate schedule, epoch timing,
history, TensorBoard and progress (through the logger), summary.json, stop requests and
checkpoints. A family runner (tick.py, asgd.py, pipelining.py; chosen by the algorithm's record)
supplies what differs: how it spends a span of positions, evaluates, and saves and restores its
state.

Positions: the tick family counts ticks, global across epochs (its pipeline is not flushed
between epochs, and FDG's last epoch runs K-1 drain ticks); the others count batches. Epoch e
covers positions [e * steps, (e+1) * steps), the last epoch up to the runner's end. The loop
checks every `trainer.check_every` positions (one device sync): progress, a non-finite value,
and a stop request agreed by every process (interrupt.py). `train_seconds` excludes evaluation
and checkpoints, so accuracy-versus-time curves of different runs compare directly.

Checkpoints are written at every epoch end and at the position where a SIGINT/SIGTERM (or a STOP
file) stops the run; each process writes its parts, then the reporting process commits them
(checkpoint.py). What a resume guarantees depends on the family (the record's `resume`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from dpbp import algos, checkpoint, time_to_acc
from dpbp.allocator import keep_freed_memory
from dpbp.build import WorkerContext
from dpbp.config import RunConfig
from dpbp.data import Dataset
from dpbp.errors import Interrupted
from dpbp.interrupt import STOP_FILE, Agreement, StopRequest
from dpbp.lifecycle import Phase
from dpbp.logs import write_summary
from dpbp.lr import lr_at


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    lr: float
    train_seconds: float
    images: int
    # language models (data=text): exp of the mean token loss; None for classification
    train_perplexity: float | None = None
    test_perplexity: float | None = None


def perplexity(loss: float) -> float:
    """exp(mean token loss): the language model's perplexity (inf past float range)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


@dataclass
class RunState:
    """What the reporting process knows about the run so far (checkpointed with it)."""

    epoch: int = 0  # epochs completed
    tick: int = 0  # the next position to run (a checkpoint lies between tick-1 and tick)
    drained: bool = False  # the last epoch ran: the pipeline was drained, late gradients dropped
    epoch_seconds: float = 0.0  # training seconds of the unfinished epoch (checkpoint inside it)
    train_seconds: float = 0.0
    images: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_test_acc: float = 0.0
    wall_start: float = 0.0  # time.time() when the run first started: origin of the time axis
    initial: dict[str, float] | None = None  # the evaluation at step 0: {train,test}_{loss,acc}
    best_test_perplexity: float | None = None  # language models: the lowest test perplexity


class Runner(Protocol):
    """What a family runner supplies to the run loop (tick.TickRunner is the reference)."""

    steps: int  # batches per epoch
    reports: bool  # this process logs and writes the summary
    data: Dataset  # its task (classify | lm) and whether it is streamed
    control_group: Any  # a gloo group over every process (None: one process)

    def end(self, num_batches: int) -> int: ...  # the position after the last one
    def restore(self, directory: Path, tick: int) -> None: ...
    def set_lr(self, lr: float) -> None: ...
    def begin_epoch(self, stop: int, checkpoint_due: bool) -> None: ...
    def run(self, start: int, stop: int) -> None: ...
    def check(self, kept: str) -> None: ...  # raise Divergence for a non-finite value
    def running_loss(self) -> float | None: ...
    def before_stop(self, tick: int, stop: int) -> int: ...  # where a stop at `tick` lands
    def end_epoch(self, final: bool) -> None: ...
    def evaluate(self, split: str = "test") -> tuple[float, float]: ...  # (loss, accuracy)
    def train_sums(self) -> torch.Tensor | None: ...  # [loss sum, correct, seen], all replicas
    def stats(self) -> list[dict[str, Any]] | None: ...
    def save(self, directory: Path, state: RunState) -> None: ...
    def sync(self) -> None: ...
    def drain(self, tick: int) -> None: ...
    def finish(self) -> None: ...
    def summary(self, stats: list[dict[str, Any]] | None) -> dict[str, Any]: ...


def make_runner(cfg: RunConfig, run_dir: Path, ctx: WorkerContext) -> Runner:
    """The family runner of cfg.algo (the record's `family`)."""
    family = algos.get(cfg.algo.name).family
    if family == "threads":
        from dpbp.asgd import ThreadsRunner as cls
    elif family == "pipelining":
        from dpbp.pipelining import PipeliningRunner as cls
    else:
        from dpbp.tick import TickRunner as cls
    return cls(cfg, run_dir, ctx)


@dataclass
class Plan:
    """How many batches, epochs and positions the run has."""

    steps: int
    num_batches: int
    epochs: int
    end: int
    images_per_batch: int

    @classmethod
    def of(cls, cfg: RunConfig, runner: Runner) -> Plan:
        num_batches, epochs = cfg.trainer.epochs * runner.steps, cfg.trainer.epochs
        if cfg.trainer.max_steps is not None:
            num_batches = min(num_batches, cfg.trainer.max_steps)
            epochs = math.ceil(num_batches / runner.steps)
        return cls(runner.steps, num_batches, epochs, runner.end(num_batches),
                   cfg.trainer.batch_size * cfg.algo.replicas)


def train(cfg: RunConfig, run_dir: Path, ctx: WorkerContext | None = None,
          logger_factory=None, stop: StopRequest | None = None) -> dict[str, Any] | None:
    """Train as configured; return the summary on the process that reports for the run.

    `stop`: set by a signal handler (interrupt.install); the run then stops at a position that
    every process agrees on, writes a checkpoint there and raises Interrupted.
    """
    ctx = ctx or WorkerContext()
    keep_freed_memory()
    runner = make_runner(cfg, run_dir, ctx)
    plan = Plan.of(cfg, runner)
    state = RunState()
    if cfg.resume:
        src = checkpoint.find(cfg.resume, run_dir)
        state = RunState(**checkpoint.load_run(src, cfg))
        runner.restore(src, state.tick)
        checkpoint.check_position(asdict(state), cfg, plan.steps)
        checkpoint.check_extend(asdict(state), plan.epochs, cfg)
    control = Agreement(stop or StopRequest(), runner.control_group, run_dir / STOP_FILE)
    state.wall_start = state.wall_start or time.time()
    log = (logger_factory(cfg, run_dir, plan.steps, plan.epochs, plan.num_batches,
                          state.wall_start) if logger_factory and runner.reports else None)
    loop = _Loop(cfg, run_dir, runner, plan, state, control, log)
    try:
        if state.epoch == 0 and state.tick == 0:
            loop.evaluate_start()
        for epoch in range(state.epoch, plan.epochs):
            loop.epoch(epoch)
        control.request.enter(Phase.SHUTDOWN)
        stats = runner.stats()
        control.close()
        runner.finish()
    finally:
        if log is not None:
            log.close_progress()
    if not runner.reports:
        return None
    return finish_run(cfg, run_dir, log, state, ctx, runner, plan, stats)


class _Loop:
    """One epoch at a time: run its positions in checked chunks, evaluate, checkpoint."""

    def __init__(self, cfg: RunConfig, run_dir: Path, runner: Runner, plan: Plan,
                 state: RunState, control: Agreement, log) -> None:
        self.cfg, self.run_dir, self.runner, self.plan = cfg, run_dir, runner, plan
        self.state, self.control, self.log = state, control, log
        self.ckpt_dir = run_dir / "checkpoints"

    def save(self, tick: int) -> None:
        """Checkpoint between positions tick-1 and tick, in every process, consistently."""
        self.control.request.enter(Phase.CHECKPOINT, self.control.request.epoch)
        self.state.tick = tick
        self.runner.save(self.ckpt_dir, self.state)
        self.runner.sync()  # every part is on disk before run.pt names their tick
        if self.runner.reports:
            checkpoint.commit(self.ckpt_dir, self.state, self.cfg)

    def evaluate_start(self) -> None:
        """Evaluate the untrained model on the test and the training set: the origin (time 0)
        of the loss and accuracy curves."""
        train_loss, train_acc = self.runner.evaluate("train")
        test_loss, test_acc = self.runner.evaluate()
        if self.runner.reports:
            self.state.initial = {"train_loss": train_loss, "train_acc": train_acc,
                                  "test_loss": test_loss, "test_acc": test_acc}
            if self.runner.data.task == "lm":
                self.state.initial |= {"train_perplexity": perplexity(train_loss),
                                       "test_perplexity": perplexity(test_loss)}
            if self.log is not None:
                self.log.start(self.state.initial)

    def kept(self) -> str:
        """Which checkpoint a run that stops now leaves."""
        if self.cfg.trainer.checkpoint and self.state.tick:
            return (f"the checkpoint of epoch {self.state.epoch} (tick {self.state.tick}) in "
                    f"{self.ckpt_dir} is the last good one")
        return "no checkpoint was written before it"

    def stop_here(self, tick: int, signum: int) -> None:
        """Checkpoint at `tick`, take the messages in flight off the wire, raise Interrupted."""
        if self.cfg.trainer.checkpoint:
            self.save(tick)
        self.runner.drain(tick)  # the checkpoint holds those messages
        self.control.close()
        self.runner.finish()
        if self.runner.reports:  # a resume must not stop again at once
            (self.run_dir / STOP_FILE).unlink(missing_ok=True)
        epoch, done = divmod(tick, self.plan.steps)
        saved = (f"checkpoint written to {self.ckpt_dir}" if self.cfg.trainer.checkpoint
                 else "nothing saved (trainer.checkpoint=false)")
        where = (f"the end of epoch {epoch}" if done == 0 else
                 f"epoch {epoch + 1}, after {done} of its {self.plan.steps} batches")
        raise Interrupted(f"stopped {self.control.reason(signum)} at tick {tick} ({where}); "
                          f"{saved}", signum)

    def span(self, start: int, stop: int, carried: float, t0: float) -> None:
        """Run positions [start, stop) in checked chunks (the epoch's clock started at t0)."""
        runner, plan, chunk = self.runner, self.plan, self.cfg.trainer.check_every
        t = start
        while t < stop:
            t_end = min(t + chunk, stop)
            runner.run(t, t_end)
            runner.check(self.kept())
            if self.log is not None:
                done = min(t_end, plan.num_batches)
                ips = (done - start) * plan.images_per_batch / (time.perf_counter() - t0)
                self.log.advance(done, ips, runner.running_loss())
            t = t_end
            if t < stop and (signum := self.control.poll()) is not None:
                t = runner.before_stop(t, stop)
                if t < stop:
                    self.state.epoch_seconds = carried + time.perf_counter() - t0
                    self.stop_here(t, signum)

    def epoch(self, epoch: int) -> None:
        cfg, runner, plan, state = self.cfg, self.runner, self.plan, self.state
        lr = lr_at(cfg, epoch)
        runner.set_lr(lr)
        first = epoch * plan.steps
        start = max(first, state.tick)  # a checkpoint may lie inside the epoch
        final = epoch == plan.epochs - 1
        stop = plan.end if final else (epoch + 1) * plan.steps
        self.control.request.enter(Phase.TRAINING, epoch + 1)
        runner.begin_epoch(stop, cfg.trainer.checkpoint and not final)
        carried, state.epoch_seconds = state.epoch_seconds, 0.0
        t0 = time.perf_counter()
        self.span(start, stop, carried, t0)
        runner.end_epoch(final)  # the epoch ends when every module has finished its work
        seconds = carried + time.perf_counter() - t0
        images = (min((epoch + 1) * plan.steps, plan.num_batches) - first) * plan.images_per_batch
        state.train_seconds += seconds
        state.images += images
        state.drained = state.drained or final
        self.control.request.enter(Phase.EVALUATION, epoch + 1)
        test_loss, test_acc = runner.evaluate()
        state.epoch = epoch + 1
        sums = runner.train_sums()
        if runner.reports:
            loss_sum, correct, seen = sums.tolist()
            train_loss, train_acc = ((loss_sum / seen, correct / seen) if seen
                                     else (float("nan"), float("nan")))
            state.best_test_acc = max(state.best_test_acc, test_acc)
            entry = EpochLog(epoch + 1, train_loss, train_acc, test_loss, test_acc, lr,
                             state.train_seconds, images)
            if runner.data.task == "lm":
                entry.train_perplexity = perplexity(train_loss)
                entry.test_perplexity = perplexity(test_loss)
                state.best_test_perplexity = min(state.best_test_perplexity or math.inf,
                                                 entry.test_perplexity)
            state.history.append(entry.__dict__)
            if self.log is not None:
                self.log.epoch(entry, seconds)
        stats = runner.stats()
        if self.log is not None and stats is not None:
            self.log.stages(epoch + 1, stats, stop - start)
        if not final and (signum := self.control.settle()) is not None:
            self.stop_here(stop, signum)  # every process is here: agreed at once
        if cfg.trainer.checkpoint:
            self.save(stop)


# every summary.json has these keys; a family fills the ones that apply to it
FAMILY_KEYS = ("modules", "peak_memory_bytes", "memory_measure", "history_memory_bytes",
               "compute_seconds", "idle_seconds", "process_cpu_seconds", "updates",
               "skipped_steps", "staleness", "staleness_mean", "staleness_max")


def finish_run(cfg: RunConfig, run_dir: Path, log, state: RunState, ctx: WorkerContext,
               runner: Runner, plan: Plan, stats: list[dict[str, Any]] | None
               ) -> dict[str, Any]:
    """The run's summary (the contract's keys, the same for every algorithm): written to
    summary.json and handed to the logger; returned."""
    final = state.history[-1]
    rec = algos.get(cfg.algo.name)
    summary = {
        "status": "completed",
        "algo": cfg.algo.name,
        "family": rec.family,
        "model": cfg.model,
        "data": cfg.data.name,
        "gpus": cfg.gpus,
        "replicas": cfg.algo.replicas,
        "seed": cfg.seed,
        "epochs": state.epoch,
        "steps": plan.num_batches,
        "executor": "local" if not ctx.distributed else "dist",
        "device": runner.device.type,
        "num_parameters": runner.num_parameters,
        "split": runner.counts,
        "final_test_acc": final["test_acc"],
        "best_test_acc": state.best_test_acc,
        "final_test_loss": final["test_loss"],
        "final_train_loss": final["train_loss"],
        "final_test_perplexity": final.get("test_perplexity"),  # language models only
        "best_test_perplexity": state.best_test_perplexity,
        # where training batches came from: held on the device, or a DataLoader (stream.py)
        "data_loading": "stream" if runner.data.streamed else "device",
        "train_seconds": state.train_seconds,
        "images_per_second": state.images / max(state.train_seconds, 1e-9),
        "initial_test_acc": None if state.initial is None else state.initial["test_acc"],
        **time_to_acc.summary_keys(state.history, state.initial and state.initial["test_acc"]),
        "resume_guarantee": rec.RESUME[rec.resume],
        **dict.fromkeys(FAMILY_KEYS),
        **runner.summary(stats),
        "history": state.history,
        "config": cfg.to_dict(),
    }
    if log is not None:
        log.finish(summary)
    write_summary(run_dir, summary)
    return summary
