"""Checkpoints: every process writes its own parts, then one file commits them; resume.

The files and their consistency are this module's; what a part holds is its family runner's
(tick.py: a stage with its batches in flight; asgd.py: a device's shared model and momentum;
pipelining.py: a stage's module and optimizer). The tick family's parts, in detail:

Where: at every epoch end, and at the tick where a SIGINT/SIGTERM stops the run (train.py). Ticks
are global across epochs and the pipeline is not flushed, so a checkpoint of a decoupled run
(ddg, fr, fdg, dp_fdg with K > 1) is taken with batches in flight. It holds everything the next
tick needs, and `resume=true` continues bit for bit as if the run had not stopped:

- `stage{k}.pt` (replica r > 0: `stage{k}.replica{r}.pt`), one per stage, written by the process
  that runs it: the module's weights and buffers (BatchNorm statistics), the optimizer state
  (momentum), the update count, and its in-flight state (Stage.inflight): for every batch it has
  forwarded but not yet back-propagated the input it received and, under weights=stash, the weight
  copy the forward used (weights=live: a copy of the weights that forward read, kept from the
  ticks before the checkpoint on); the training-loss sums of the epoch so far (last stage), memory
  counters; and the messages it sent in the last tick that its neighbours take in the next one
  (schedule.carried: the error gradients of ddg/fr/fdg, and the activations of fdg).
- `run.pt`, written last by the process of the last stage, commits them: the tick and epoch
  reached, the metrics history, the config (a resume with settings that change the numbers is
  refused).

How the in-flight state comes back: the module, its optimizer and counters are loaded; each
pending batch's autograd graph is rebuilt by running its forward again from the saved input and
weights on copies of the buffers (the same graph bit for bit, BatchNorm statistics not advanced a
second time; see stage.py for `live`); then every process sends the saved messages again before
its first tick, so each neighbour receives exactly what it would have. The data order needs no
state: batches are drawn by global batch number (train.Feed).

Consistency. Each file is written to a temporary name, fsynced and renamed, so a crash mid-write
never leaves a half file. The previous stage file is kept as `*.prev.pt` until `run.pt` names the
new tick; every process writes its stage files before a barrier, and only then is `run.pt`
replaced. A run killed between the two (or while writing) therefore still has, for every stage,
a file of the tick `run.pt` names: loading picks it (checking the tick recorded inside each
file), so a resume never mixes checkpoints of different ticks. Files are loaded with
`weights_only=True`; a truncated, foreign or damaged file is refused with one sentence.

Every algorithm resumes; what a resume guarantees is its record's `resume` (exact for the tick
and pipelining families; for pdasgd/hogwild the weights, momentum and batch position, after which
thread timing decides the numbers as it does in any run of theirs). A checkpoint that ends a
finished decoupled run (the last epoch drains the pipeline and drops the late gradients) cannot
be extended to more epochs exactly, and is refused for that.
"""

from __future__ import annotations

import errno
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dpbp import algos, schedule
from dpbp.config import flatten
from dpbp.errors import CheckpointError, ConfigError

FORMAT = "dpbp-checkpoint-3"
# settings a resumed run must share with its checkpoint, or it trains other numbers than the run it
# continues; the rest (epochs, max_steps, logging, device, executor, dist, data.root) may change
SAME_SETTINGS = ("seed", "model", "algo.", "data.", "optim.", "sched.", "trainer.batch_size")
# where the data comes from, not which: the streaming path gives the in-memory path's batches
MAY_DIFFER = ("data.root", "data.download", "data.stream", "data.stream_budget_mb",
              "data.loader_workers")
Message = tuple[str, int, torch.Tensor]  # (kind, batch, tensor) in flight at the checkpoint


def stage_file(directory: Path, stage: int, replica: int = 0, prev: bool = False) -> Path:
    """The file of one stage of one replica (`prev`: the one kept until the next commit)."""
    name = f"stage{stage}" + (f".replica{replica}" if replica else "")
    return directory / (name + (".prev.pt" if prev else ".pt"))


def _atomic_save(obj: Any, path: Path, keep: Path | None = None) -> None:
    """Write `obj` to `path` through a temporary file; with `keep`, the file `path` held so far
    is renamed to `keep` once the new one is complete on disk."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep is not None and path.exists():
            os.replace(path, keep)
        os.replace(tmp, path)
    except BaseException:  # disk full, Ctrl-C: keep the previous file, leave no half-written one
        tmp.unlink(missing_ok=True)
        raise


def last_good(directory: Path) -> str:
    """Which committed checkpoint `directory` holds, in words ("no checkpoint ..." if none)."""
    try:
        run = torch.load(directory / "run.pt", map_location="cpu", weights_only=True)
        where = (f"at tick {run['tick']} (inside epoch {run['epoch'] + 1})"
                 if run.get("epoch_seconds") else f"of epoch {run['epoch']} (tick {run['tick']})")
        return f"the checkpoint {where} is kept in {directory}"
    except FileNotFoundError:
        return f"no checkpoint was written in {directory} before"
    except Exception:  # noqa: BLE001 - a damaged run.pt: resume says what is wrong with it
        return f"the last checkpoint in {directory} is kept"


def _write_error(path: Path, e: OSError, directory: Path) -> CheckpointError:
    why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else \
        (e.strerror or type(e).__name__).lower()
    fix = "free space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix the directory"
    return CheckpointError(f"{why}: cannot write checkpoint file {path.name}; "
                           f"{last_good(directory)}; {fix}, then resume.")


def save_part(directory: Path, stage: int, replica: int, part: dict[str, Any]) -> None:
    """Write one stage's part of the checkpoint (what its family runner saves; it must hold
    "tick"), keeping the previous file as *.prev.pt until `commit` names the new tick."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(directory, e, directory) from None
    path = stage_file(directory, stage, replica)
    try:
        _atomic_save({"format": FORMAT, **part}, path,
                     keep=stage_file(directory, stage, replica, prev=True))
    except OSError as e:
        raise _write_error(path, e, directory) from None


def commit(directory: Path, state, cfg) -> None:
    """Name the stage files just written (every process's: call after a barrier) as the
    checkpoint: write run.pt, then drop the previous stage files."""
    path = directory / "run.pt"
    try:
        _atomic_save({"format": FORMAT, **asdict(state), "config": cfg.to_dict()}, path)
    except OSError as e:
        raise _write_error(path, e, directory) from None
    for old in directory.glob("stage*.prev.pt"):
        old.unlink(missing_ok=True)


def find(resume: bool | str, run_dir: Path) -> Path:
    """The checkpoint directory that `resume=...` names (true: this run directory's own)."""
    if resume is True:
        path = run_dir / "checkpoints"
    else:
        path = Path(str(resume)).expanduser()
        if (path / "checkpoints").is_dir():
            path = path / "checkpoints"
    if not (path / "run.pt").is_file():
        raise ConfigError(f"no checkpoint to resume from in {path}; start without resume=... "
                          "or point resume= at a run directory that has checkpoints/.")
    return path


def check_resume(cfg, run_dir: Path) -> dict[str, Any]:
    """Refuse a resume that `load` would refuse, in the parent (a worker's error exits with 1);
    return the run state saved in run.pt."""
    directory = find(cfg.resume, run_dir)
    run = _load(directory / "run.pt")
    _check_same_settings(run, cfg, directory)
    for r in range(cfg.algo.replicas):
        for k in range(cfg.modules):
            if not (stage_file(directory, k, r).is_file()
                    or stage_file(directory, k, r, prev=True).is_file()):
                raise ConfigError(f"checkpoint {stage_file(directory, k, r)} is missing; "
                                  "resume from a complete checkpoints/ directory, or start "
                                  "without resume.")
    return run


def check_extend(run: dict[str, Any], total_epochs: int, cfg) -> None:
    """Refuse to train a finished decoupled run for more epochs: its last epoch drained the
    pipeline and dropped the late gradients, which a longer run would have applied."""
    rec = algos.get(cfg.algo.name)
    # a drained pipelined forward, or DNI's dropped last targets, would differ the same way
    if run.get("drained") and run["epoch"] < total_epochs and cfg.modules > 1 \
            and (any(rec.delays(cfg.modules)) or rec.pipelined or rec.boundary != "gradient"):
        raise ConfigError(
            f"the checkpoint is the end of a finished {run['epoch']}-epoch algo={cfg.algo.name} "
            "run (its pipeline was drained), so more epochs would not equal a longer run; start "
            f"a new run with trainer.epochs={total_epochs}.")


def check_position(run: dict[str, Any], cfg, steps: int) -> None:
    """Refuse to resume from a checkpoint past where this run would end (trainer.epochs or
    trainer.max_steps below it): the run would have nothing to do, or would train backwards."""
    full = cfg.trainer.epochs * steps
    batches = full if cfg.trainer.max_steps is None else min(full, cfg.trainer.max_steps)
    epochs = math.ceil(batches / steps)
    end = schedule.num_ticks(cfg.algo.name, cfg.modules, batches)
    if run["epoch"] <= epochs and run["tick"] <= end:
        return
    at_end = run.get("drained") or run["tick"] == run["epoch"] * steps
    where = (f"epoch {run['epoch']}" if at_end
             else f"tick {run['tick']} (inside epoch {run['epoch'] + 1})")
    if batches < full:
        limit, fix = f"trainer.max_steps={cfg.trainer.max_steps}", "a larger trainer.max_steps"
    else:
        need = run["epoch"] + (0 if at_end else 1)
        limit, fix = f"trainer.epochs={cfg.trainer.epochs}", f"trainer.epochs={need} or more"
    raise ConfigError(f"the checkpoint is at {where}, past {limit}; resume with {fix}, or "
                      "start a new run without resume.")


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} is missing; resume from a complete checkpoints/ "
                          "directory, or start without resume.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or corrupt file
        raise ConfigError(f"checkpoint {path} cannot be read ({type(e).__name__}); "
                          "it is truncated or not a dpbp checkpoint.") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        older = isinstance(obj, dict) and str(obj.get("format", "")).startswith("dpbp-checkpoint")
        raise ConfigError(f"{path} was written by another version of dpbp; rerun without resume."
                          if older else f"{path} is not a dpbp checkpoint.")
    return obj


def _stage_checkpoint(directory: Path, stage: int, replica: int, tick: int) -> dict[str, Any]:
    """The file of `stage` at `tick`: the current one, or the previous one if the run stopped
    between writing the stage files and run.pt (then it becomes the current one again, so that
    the next checkpoint keeps it as *.prev.pt until it commits)."""
    path, prev = stage_file(directory, stage, replica), stage_file(directory, stage, replica, True)
    found = None
    for p in (path, prev):
        if p.is_file():
            ck = _load(p)
            if ck.get("tick") == tick:
                found = (p, ck)
                break
    if found is None:
        ticks = [_load(p).get("tick") for p in (path, prev) if p.is_file()]
        raise ConfigError(
            f"{path} holds tick {ticks} but {directory / 'run.pt'} tick {tick} (files of "
            "different checkpoints); resume from a complete checkpoints/ directory, or start "
            "without resume.")
    p, ck = found
    if p == prev:
        os.replace(prev, path)
    return ck


def load_run(directory: Path, cfg) -> dict[str, Any]:
    """The run state that run.pt commits (its settings checked against this run's)."""
    run = _load(directory / "run.pt")
    run.pop("format")
    _check_same_settings(run, cfg, directory)
    run.pop("config", None)
    return run


def load_part(directory: Path, stage: int, replica: int, tick: int) -> dict[str, Any]:
    """One stage's part of the checkpoint at `tick` (see `_stage_checkpoint`)."""
    return _stage_checkpoint(directory, stage, replica, tick)


def _check_same_settings(run: dict[str, Any], cfg, directory: Path) -> None:
    """Refuse to continue a run with settings that change the numbers (seed, data, optim, ...)."""
    if "config" not in run:  # written before checkpoints carried their config
        return
    saved, now = flatten(run["config"]), flatten(cfg.to_dict())
    for key in sorted(set(saved) | set(now)):
        if key.startswith(SAME_SETTINGS) and key not in MAY_DIFFER \
                and saved.get(key) != now.get(key):
            raise ConfigError(
                f"the checkpoint in {directory} was trained with {key}={saved.get(key)} but this "
                f"run has {key}={now.get(key)}; resume with the same setting.")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (load_state_dict lists every key)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
