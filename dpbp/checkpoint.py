"""Checkpoints: one file per stage plus the run's state, written atomically at epoch ends.

Each process writes the stages it owns (`stage{k}.pt`: module weights and buffers, optimizer state)
and the process of the last stage writes `run.pt` (epochs done, metrics so far, the config: a
resume with settings that change the numbers is refused). Files are written
to a temporary name and renamed, so a crash mid-write leaves the previous checkpoint intact; they
are loaded with `weights_only=True`.

What resumes exactly: anything whose in-flight state is empty at an epoch end, i.e. algo=bp (any
K). A decoupled run (ddg, fr, fdg with K > 1) holds in-flight batches, stashed weights and error
gradients across the epoch boundary that these files do not contain yet, so resuming one is
refused rather than silently continuing from a different state.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dpbp.config import flatten
from dpbp.errors import ConfigError

FORMAT = "dpbp-checkpoint-1"
# settings a resumed run must share with its checkpoint, or it trains other numbers than the run it
# continues; the rest (epochs, max_steps, logging, device, executor, dist, data.root) may change
SAME_SETTINGS = ("seed", "model", "algo.", "data.", "optim.", "sched.", "trainer.batch_size")
MAY_DIFFER = ("data.root", "data.download")


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, Ctrl-C: keep the previous file, leave no half-written one
        tmp.unlink(missing_ok=True)
        raise


def save(directory: Path, stages, state, cfg) -> None:
    """Write this process's stages (and the run state, if it holds the last stage)."""
    directory.mkdir(parents=True, exist_ok=True)
    for s in stages:
        _atomic_save({
            "format": FORMAT,
            "stage": s.index,
            "modules": s.num_stages,
            "algo": cfg.algo.name,
            "model": cfg.model,
            "epoch": state.epoch,
            "module": s.module.state_dict(),
            "optimizer": s.optimizer.state_dict(),
            "updates": s.stats.updates,
        }, directory / f"stage{s.index}.pt")
        if s.last:
            _atomic_save({"format": FORMAT, **asdict(state), "config": cfg.to_dict()},
                         directory / "run.pt")


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


def _check_exact(algo: str, modules: int) -> None:
    if algo != "bp" and modules > 1:
        raise ConfigError(
            f"resuming algo={algo} with {modules} modules is not exact yet "
            "(its in-flight batches are not checkpointed); rerun it without resume.")


def check_resume(cfg, run_dir: Path) -> Path:
    """Refuse a resume that `load` would refuse, in the parent: a worker's error exits with 1."""
    _check_exact(cfg.algo.name, cfg.modules)
    directory = find(cfg.resume, run_dir)
    _check_same_settings(_load(directory / "run.pt"), cfg, directory)
    for k in range(cfg.modules):
        if not (directory / f"stage{k}.pt").is_file():
            raise ConfigError(f"checkpoint {directory / f'stage{k}.pt'} is missing; resume from "
                              "a complete checkpoints/ directory, or start without resume.")
    return directory


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
        raise ConfigError(f"{path} is not a dpbp checkpoint.")
    return obj


def load(directory: Path, stages, cfg):
    """Restore this process's stages in place; return the run state."""
    from dpbp.train import RunState

    _check_exact(cfg.algo.name, stages[0].num_stages)
    run = _load(directory / "run.pt")
    run.pop("format")
    _check_same_settings(run, cfg, directory)
    run.pop("config", None)
    for s in stages:
        path = directory / f"stage{s.index}.pt"
        ck = _load(path)
        if (ck["modules"], ck["algo"], ck["model"]) != (s.num_stages, cfg.algo.name, cfg.model):
            raise ConfigError(
                f"checkpoint in {directory} is for algo={ck['algo']} model={ck['model']} with "
                f"{ck['modules']} modules, not this run's; resume with the same settings.")
        # each process writes its own files: a run stopped between two writes leaves stages of
        # different epochs, and resuming from that mix would silently train a different model
        if ck["epoch"] != run["epoch"]:
            raise ConfigError(
                f"{path} is from epoch {ck['epoch']} but {directory / 'run.pt'} from epoch "
                f"{run['epoch']} (the run stopped while writing them); rerun without resume.")
        try:
            s.module.load_state_dict(ck["module"])
            s.optimizer.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:  # other split.balance or data channels
            raise ConfigError(
                f"{path} does not fit module {s.index + 1} of this run ({_first_line(e)}); resume "
                "with the same split.balance and data.") from None
        s.stats.updates = ck["updates"]
    return RunState(**run)


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


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (load_state_dict lists every key)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
