"""The README's fresh-machine commands are what CI runs, with the pinned versions."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Fresh machine: the two commands")[1].split("\n## ")[0]
    return [ln.strip() for ln in section.splitlines() if ln.startswith("    python3 -m venv")]


def test_ci_runs_the_readmes_test_command():
    demo, tests = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()[-1].strip()
    assert ci == tests
    assert demo.endswith("dpbp train")


def test_both_commands_install_the_pinned_versions():
    pins = dict(re.findall(r"^([\w.-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M))
    assert {"torch", "torchvision", "hydra-core", "omegaconf", "pytest", "ruff"} <= set(pins)
    for command in readme_commands():
        assert "-c constraints.txt" in command
