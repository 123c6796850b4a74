"""The README's fresh-machine commands are what CI runs, with the pinned versions; its examples
of a model and data of your own, and of dpbp.fit, run as written."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

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


def _own_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("### Your own model and data")[1].split("\n### ")[0]


def test_the_readmes_model_file_and_command_train(tmp_path, monkeypatch, capsys):
    """The README's my_nets.py and its `dpbp train model=custom ...` command, as written (one
    process and a few steps, so that it runs in the fast tier)."""
    from test_cli import call_main

    section = _own_section()
    (tmp_path / "my_nets.py").write_text(section.split("```python\n")[1].split("```")[0])
    command = next(ln.strip() for ln in section.splitlines()
                   if ln.strip().startswith("dpbp train model=custom"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "my_nets", raising=False)
    rc = call_main([*shlex.split(command)[1:], "executor=local", "trainer.epochs=1",
                    "trainer.max_steps=4", "trainer.progress=false",
                    f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch)
    assert rc == 0, capsys.readouterr().err
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (s["model"], s["algo"], s["modules"]) == ("my_nets.build", "fdg", 2)
    assert s["config"]["model"]["width"] == 16


@pytest.mark.slow
def test_the_readmes_fit_example_runs_as_a_script(tmp_path, monkeypatch):
    """The dpbp.fit example, saved as a script and run (its epochs cut to one): fdg in two
    spawned workers that receive the model and the data through the run directory, and compute
    what one process (executor=local) computes from the same files."""
    from test_cli import call_main

    code = _own_section().split("<!-- fit-example -->\n```python\n")[1].split("```")[0]
    assert 'trainer={"epochs": 10}' in code
    (tmp_path / "example.py").write_text(code.replace('trainer={"epochs": 10}',
                                                      'trainer={"epochs": 1}'))
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("test accuracy ")
    (summary,) = tmp_path.glob("outputs/fit/*/*/summary.json")
    s = json.loads(summary.read_text())
    assert (s["status"], s["executor"], s["modules"], s["epochs"]) == ("completed", "dist", 2, 1)
    assert f"{s['final_test_acc']:.3f}" in done.stdout
    inputs = summary.parent / "inputs"
    rc = call_main(["train", "model=custom", "model._target_=dpbp.custom.load_saved",
                    f"model.path={inputs / 'model.pt'}", "data=arrays",
                    f"data.path={inputs / 'data.npz'}", "algo=fdg", "gpus=2", "executor=local",
                    "device=cpu", "trainer.epochs=1", "trainer.progress=false",
                    f"hydra.run.dir={tmp_path / 'local'}"], monkeypatch)
    assert rc == 0
    local = json.loads((tmp_path / "local" / "summary.json").read_text())
    for key in ("final_test_acc", "final_test_loss", "final_train_loss", "updates", "split"):
        assert local[key] == s[key], key
