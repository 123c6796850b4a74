"""Shared helpers for the foundation tests: composed configs, quick runs, the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from dpbp.config import RunConfig, from_dict, validate

# A run that takes about a second on a 2-core CPU: digits has 1437 training images, so an epoch is
# 22 steps of 64 with resnet20 (11 blocks).
QUICK = ("data=digits", "model=resnet20", "device=cpu", "trainer.batch_size=64",
         "trainer.progress=false")
STEPS_PER_EPOCH = 1437 // 64


def compose_dict(*overrides: str) -> dict:
    """The resolved `dpbp train` config (without the hydra node) for these overrides."""
    with initialize_config_module(config_module="dpbp.conf", version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def make_cfg(*overrides: str) -> RunConfig:
    """A validated RunConfig for a quick CPU run, composed from the real YAML files."""
    cfg = from_dict(compose_dict(*QUICK, *overrides))
    validate(cfg)
    return cfg


def module_state(run_dir: Path, stage: int = 0) -> dict[str, torch.Tensor]:
    """Module weights and buffers that a run's last checkpoint holds for one stage."""
    ck = torch.load(run_dir / "checkpoints" / f"stage{stage}.pt", weights_only=True)
    return ck["module"]


def dpbp_exe() -> str:
    """The installed `dpbp` entry point of the interpreter running the tests."""
    exe = Path(sys.executable).with_name("dpbp")
    if exe.is_file():
        return str(exe)
    found = shutil.which("dpbp")
    if found is None:
        pytest.skip("the dpbp entry point is not installed")
    return found


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `dpbp` command; a hang fails the test instead of stalling the suite."""
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update(env or {})
    return subprocess.run([dpbp_exe(), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _short_hydra_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process Hydra calls must report like the real command (no full tracebacks)."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


@pytest.fixture(autouse=True)
def _restore_threads():
    """`train` sets torch's thread count for the process; do not leak it into other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
