"""What a run shows: a rich progress bar and summary table, TensorBoard scalars and hparams,
and train.log.

Only the process holding the last stage logs (it sees the loss). Scalars go against the epoch's
last step *and* against training wall time: every point's `walltime` is the run's start plus the
cumulative training seconds (evaluation and checkpoints excluded), and the evaluation at step 0
(the untrained model on the test and the training set) sits at the start itself, so every
curve's first point is time 0 on TensorBoard's RELATIVE axis (it counts from a series' first
point): accuracy versus pure training time, and runs of different algorithms overlay directly.
After step 0, train/* points are averages over each epoch's batches.

Tags are grouped so that what a user compares comes first (TensorBoard sorts groups by name):
`accuracy/{test,train}`, `loss/{test,train}`, then `lr`, `moduleK/*`, `summary/*` (the run's
totals, for the HParams tab: hparams.py), `throughput/*`, `time/*`. A language model (data=text)
logs `perplexity/{test,train}` (exp of the mean token loss) instead of `accuracy/*`. Console
lines also go to the run directory's train.log, uncoloured and never wrapped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from dpbp import hparams

_PLAIN = {"highlight": False, "markup": False, "emoji": False}  # print text as it is


class RunLogger:
    """Progress, TensorBoard and the final table for one run."""

    def __init__(self, cfg, run_dir: Path, steps_per_epoch: int, epochs: int,
                 num_batches: int, start: float) -> None:
        """`start`: time.time() of the run's first start; a resumed run keeps its time axis."""
        from torch.utils.tensorboard import SummaryWriter

        self.cfg, self.run_dir = cfg, run_dir
        self.steps, self.batch = steps_per_epoch, cfg.trainer.batch_size
        self.start_time = start
        self.wall: float | None = None  # the last epoch's point on the training-time axis
        self.writer = SummaryWriter(str(run_dir), flush_secs=30)
        self.console = Console(stderr=True)
        self.bar: Progress | None = None
        self.epochs = epochs
        self.ticks = 0  # ticks run so far, for per-tick averages
        if cfg.trainer.progress:
            self.bar = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[ips]:>8.0f} img/s  loss {task.fields[loss]}"),
                TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=False, disable=not self.console.is_terminal,
            )
            self.task = self.bar.add_task("train", total=num_batches, epoch=1, epochs=epochs,
                                          ips=0.0, loss="-")
            self.bar.start()

    def advance(self, batches_done: int, images_per_second: float, loss: float | None) -> None:
        """Move the bar to `batches_done` batches (of the whole run)."""
        if self.bar is not None:
            self.bar.update(self.task, completed=batches_done, ips=images_per_second,
                            loss="-" if loss is None else f"{loss:.4f}")

    def close_progress(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def start(self, initial: dict[str, float]) -> None:
        """Log the evaluation at step 0 (the untrained model, on the training and the test set:
        {train,test}_{loss,acc}) at the start of the time axis."""
        w, wall = self.writer, self.start_time
        metric, key = _metric(initial.get("test_perplexity"))
        for split in ("train", "test"):
            w.add_scalar(f"loss/{split}", initial[f"{split}_loss"], global_step=0, walltime=wall)
            w.add_scalar(f"{metric}/{split}", initial[f"{split}_{key}"], global_step=0,
                         walltime=wall)
        w.add_scalar("time/train_seconds", 0.0, global_step=0, walltime=wall)
        short = _SHORT[metric]
        self.echo(f"epoch {0:3d}  train loss {initial['train_loss']:.4f} {short} "
                  f"{initial[f'train_{key}']:.4f}  test loss {initial['test_loss']:.4f} {short} "
                  f"{initial[f'test_{key}']:.4f}  (untrained)")

    def epoch(self, e, seconds: float) -> None:
        """Log one epoch's numbers (an EpochLog) to TensorBoard, the console and train.log."""
        step = e.epoch * self.steps
        wall = self.wall = self.start_time + e.train_seconds
        w = self.writer
        metric, key = _metric(e.test_perplexity)
        train_m, test_m = getattr(e, f"train_{key}"), getattr(e, f"test_{key}")
        for tag, v in (("loss/train", e.train_loss), (f"{metric}/train", train_m),
                       ("loss/test", e.test_loss), (f"{metric}/test", test_m), ("lr", e.lr),
                       ("time/train_seconds", e.train_seconds),
                       ("throughput/images_per_second", e.images / max(seconds, 1e-9))):
            w.add_scalar(tag, v, global_step=step, walltime=wall)
        short = _SHORT[metric]
        self.echo(f"epoch {e.epoch:3d}  train loss {e.train_loss:.4f} {short} {train_m:.4f}  "
                  f"test loss {e.test_loss:.4f} {short} {test_m:.4f}  lr {e.lr:.4g}  "
                  f"{e.images / max(seconds, 1e-9):.0f} img/s")
        if self.bar is not None:
            self.bar.update(self.task, epoch=min(e.epoch + 1, self.epochs))

    def echo(self, line: str) -> None:
        """One line to the console (above the progress bar) and to train.log."""
        echo(self.run_dir, line, console=self.console)

    def stages(self, epoch: int, stats: list[dict[str, Any]], ticks: int) -> None:
        """Per-module compute and idle time per tick (cumulative to this epoch) and memory."""
        step = epoch * self.steps
        self.ticks += ticks
        done = self.ticks
        wall = self.wall  # module scalars share their epoch's training-time walltime
        for m in stats:
            k = m["stage"] + 1
            if m["compute_seconds"] is not None:  # host times: CPU runs only
                self.writer.add_scalar(f"module{k}/compute_ms_per_tick",
                                       1e3 * m["compute_seconds"] / done, step, walltime=wall)
                self.writer.add_scalar(f"module{k}/idle_ms_per_tick",
                                       1e3 * m["idle_seconds"] / done, step, walltime=wall)
            if m["peak_memory_bytes"] is not None:
                self.writer.add_scalar(f"module{k}/peak_memory_bytes", m["peak_memory_bytes"],
                                       step, walltime=wall)

    def finish(self, summary: dict[str, Any]) -> None:
        """The run's HParams row and totals (hparams.py), at its last step; close the files."""
        hparams.write(self.writer, summary, self.steps * summary["epochs"], self.wall)
        self.writer.close()


_SHORT = {"accuracy": "acc", "perplexity": "ppl"}


def _metric(perplexity: float | None) -> tuple[str, str]:
    """(tag group, key suffix) of the quality metric: perplexity for a language model (its
    value is not None), else accuracy."""
    return ("accuracy", "acc") if perplexity is None else ("perplexity", "perplexity")


def echo(run_dir: Path | None, *objects: Any, console: Console | None = None) -> None:
    """Print rich objects (plain lines, tables) to stderr, and append them to RUN_DIR/train.log:
    the log holds what the console showed."""
    (console or Console(stderr=True)).print(*objects, soft_wrap=True, **_PLAIN)
    if run_dir is not None:
        append_log(run_dir, *objects)


def append_log(run_dir: Path, *objects: Any) -> None:
    """Append rich objects to RUN_DIR/train.log, uncoloured and never wrapped."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a") as f:
        Console(file=f, width=200, color_system=None).print(*objects, soft_wrap=True, **_PLAIN)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """summary.json in the run directory, written atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)  # a resumed, finished run writes nothing before
    path = run_dir / "summary.json"
    tmp = path.with_name("summary.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def summary_table(summary: dict[str, Any]) -> Table:
    t = Table(title=f"dpbp {summary['algo']} {summary['model']} on {summary['data']}",
              show_header=False)
    mib = ", ".join("n/a" if b is None else f"{b / 2**20:.1f}"
                    for b in summary["peak_memory_bytes"])
    rows = [
        ("status", summary["status"]),
        ("modules x replicas", f"{summary['modules']} x {summary['replicas']}"
                               f" (split {summary.get('split')})"),
        ("parameters", f"{summary['num_parameters']:,}"),
        ("epochs", str(summary["epochs"])),
        ("final / best test acc", f"{summary['final_test_acc']:.4f} / "
                                  f"{summary['best_test_acc']:.4f}"),
        *([("final / best test perplexity", f"{summary['final_test_perplexity']:.4f} / "
                                            f"{summary['best_test_perplexity']:.4f}")]
          if summary.get("final_test_perplexity") is not None else []),
        ("training data", summary.get("data_loading", "device")),
        ("final test loss", f"{summary['final_test_loss']:.4f}"),
        ("train seconds", f"{summary['train_seconds']:.1f}"),
        ("seconds to final acc - 1 point", _seconds(summary.get("seconds_to_final_minus_1pt"))),
        ("images/s", f"{summary['images_per_second']:.0f}"),
        ("peak memory per module (MiB)", mib),
    ]
    if summary.get("aux_parameters"):  # DGL's heads, DNI's predictors: cost, not model
        rows.append(("auxiliary parameters per module",
                     ", ".join(f"{n:,}" for n in summary["aux_parameters"])))
        rows.append(("auxiliary MFLOPs per sample",
                     ", ".join(f"{f / 1e6:.2f}" for f in summary["aux_flops"])))
    for k, v in rows:
        t.add_row(k, v)
    return t


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"
