"""The `dpbp` command: bad input (exit 2, one line, no traceback), help, config printing, real runs.

Most cases call `dpbp.cli.main` in-process (Hydra and all); a handful run the installed entry point
in a subprocess, to check what a user's shell sees.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from dpbp import algos, cli
from dpbp.config import from_dict, validate
from dpbp.models import build_blocks

SUMMARY_KEYS = {"status", "algo", "model", "data", "gpus", "modules", "replicas", "seed", "epochs",
                "num_parameters", "final_test_acc", "best_test_acc", "final_test_loss",
                "train_seconds", "images_per_second", "peak_memory_bytes", "config"}


def call_main(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """`dpbp ARGS` in this process.

    main() rewrites sys.argv for Hydra, and Hydra points the root logger at this test's captured
    stdout and run directory: restore both, or later tests log into closed streams.
    """
    monkeypatch.setattr(sys, "argv", ["dpbp"])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return cli.main(args)
    finally:
        for h in root.handlers:
            if h not in handlers:
                h.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def assert_one_line_error(rc: int, out: str, err: str) -> str:
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("dpbp: "), err
    assert "Traceback" not in out + err
    return lines[0]


# (overrides, words the one line must contain); {tmp} becomes a fresh empty directory
BAD_INPUT = [
    (["model=vgg16"], "vgg16"),
    (["model=resnet40"], "6n+2"),
    (["algo=foo"], "foo"),
    (["experiment=foo"], "experiment"),
    (["model=resnet26"], "model.name=resnet26"),  # a valid depth without a YAML file: the hint
    (["data=cifar10", "data.root={tmp}", "data.download=false"], "CIFAR-10"),
    (["gpus=0"], "gpus=0"),
    (["algo=fdg", "algo.beta=1.5"], "algo.beta=1.5"),
    (["gpus=20", "executor=local"], "11 blocks"),
    (["gpus=2", "executor=local", "split.balance=[5,5]"], "split.balance"),
    (["trainer.epochs=abc"], "trainer.epochs"),
    (["gpus=two"], "gpus"),
    (["trainer.max_steps=1.5"], "trainer.max_steps"),
    (["+model.width=2"], "model"),
    (["resume=true"], "no checkpoint"),
    # refused in the parent: a worker's error would exit 1 with a traceback
    (["algo=ddg", "gpus=2", "resume=true"], "no checkpoint"),
    (["resume={tmp}"], "no checkpoint"),
    # the reliability checklist: every one before a worker starts
    (["data=foo"], "unknown data 'foo'"),
    (["algo=dp_fdg", "gpus=3"], "gpus=3 is not divisible by algo.replicas=2"),
    (["gpus=-1"], "gpus=-1"),
    (["algo=fdg", "algo.beta=0"], "algo.beta=0"),
    (["optim.lr=-0.1"], "optim.lr must be positive"),
    (["trainer.epochs=-1"], "trainer.epochs=-1"),
    (["trainer.batch_size=5000"], "trainer.batch_size=5000 is larger than the 1437"),
    (["gpus=2", "executor=local", "split.balance=[5,7]"], "sums to 12"),
    (["trainer.on_nonfinite=ignore"], "trainer.on_nonfinite"),
    (["hydra.run.dir={file}/run"], "is not a directory"),
    # dpbp's sentence, not Hydra's advice to append the key
    (["trainer.epoch=2"], "unknown setting trainer.epoch (did you mean trainer.epochs?)"),
    (["epochs=2"], "unknown setting epochs; valid keys of config are algo, data"),
    (["algo=bp", "algo.beta=0.5"], "valid keys of algo are name, replicas (with algo=bp)"),
]


@pytest.mark.parametrize("overrides, words", BAD_INPUT,
                         ids=[" ".join(o) for o, _ in BAD_INPUT])
def test_bad_input_exits_2_with_one_line(overrides, words, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "file").write_text("a file where a directory should be")
    run_dir = tmp_path / "run"
    args = [o.replace("{tmp}", str(empty)).replace("{file}", str(tmp_path / "file"))
            for o in overrides]
    rc = call_main(["train", "device=cpu", "trainer.epochs=1", f"hydra.run.dir={run_dir}",
                    *args], monkeypatch)
    out, err = capsys.readouterr()
    line = assert_one_line_error(rc, out, err)
    assert words in line
    assert not run_dir.exists()  # a rejected command leaves nothing behind


def test_unknown_key_is_hydras_error_mapped_to_2(tmp_path, monkeypatch, capsys):
    rc = call_main(["train", "trainer.foo=1", f"hydra.run.dir={tmp_path}"], monkeypatch)
    assert rc == 2
    assert "trainer.foo" in capsys.readouterr().err


def test_an_earlier_failure_does_not_turn_hydra_errors_into_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_job_failed", True)  # as left by a failed run in this process
    rc = call_main(["train", "+trainer.epochs=1", f"hydra.run.dir={tmp_path}"], monkeypatch)
    assert rc == 2
    assert "trainer.epochs" in capsys.readouterr().err  # Hydra's own message: the key exists


def test_a_misspelled_key_in_a_sweep_names_the_choice_without_it(tmp_path, monkeypatch, capsys):
    rc = call_main(["train", "-m", "algo=fdg,ddg", "algo.beta=0.5",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], monkeypatch)
    line = assert_one_line_error(rc, *capsys.readouterr())
    assert line == ("dpbp: unknown setting algo.beta; valid keys of algo are name, replicas, "
                    "weight_prediction, weights (with algo=ddg).")
    assert not (tmp_path / "sweep").exists()


def test_unknown_command(monkeypatch, capsys):
    rc = call_main(["nosuchcommand"], monkeypatch)
    line = assert_one_line_error(rc, *capsys.readouterr())
    assert "nosuchcommand" in line


@pytest.mark.slow
def test_real_cli_bad_input(tmp_path):
    """The installed command: exit statuses as a shell sees them."""
    r = run_cli("train", "model=vgg16", cwd=tmp_path)
    assert "vgg16" in assert_one_line_error(r.returncode, r.stdout, r.stderr)
    r = run_cli("train", "trainer.foo=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    r = run_cli("nosuchcommand", cwd=tmp_path)
    assert "nosuchcommand" in assert_one_line_error(r.returncode, r.stdout, r.stderr)
    assert not (tmp_path / "outputs").exists()  # bad input leaves no run directory behind


@pytest.mark.slow
def test_real_cli_unwritable_run_directory(tmp_path):
    """Hydra would fail to make it with a traceback: dpbp says it first."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = run_cli("train", "device=cpu", f"hydra.run.dir={blocker / 'run'}", cwd=tmp_path,
                timeout=120)
    assert "is not a directory" in assert_one_line_error(r.returncode, r.stdout, r.stderr)


@pytest.mark.slow
def test_real_cli_cifar_download_fails_fast_offline(tmp_path):
    # a proxy on a closed local port makes the download fail at once, with or without a network
    closed = "http://127.0.0.1:9"
    env = {k: closed for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    env |= {"no_proxy": "", "NO_PROXY": ""}
    t0 = time.monotonic()
    r = run_cli("train", "device=cpu", "data=cifar10", f"data.root={tmp_path / 'data'}",
                "data.download=true", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                env=env, timeout=120)
    line = assert_one_line_error(r.returncode, r.stdout, r.stderr)
    assert "could not download CIFAR-10" in line
    assert time.monotonic() - t0 < 120


def test_top_level_help(monkeypatch, capsys):
    for args in ([], ["--help"], ["-h"]):
        assert call_main(args, monkeypatch) == 0
        out = capsys.readouterr().out
        assert "train" in out and "usage: dpbp" in out


@pytest.mark.slow
def test_real_cli_help(tmp_path):
    r = run_cli("--help", cwd=tmp_path)
    assert r.returncode == 0 and "train" in r.stdout and "usage: dpbp" in r.stdout


def test_train_help_lists_the_config_groups(monkeypatch, capsys):
    assert call_main(["train", "--help"], monkeypatch) == 0
    out = capsys.readouterr().out
    groups = out.split("== Configuration groups ==")[1].split("== Config ==")[0]
    for group in cli.GROUPS:
        line = next(ln for ln in groups.splitlines() if ln.startswith(f"{group}: "))
        assert set(line.split(": ")[1].split(", ")) == set(cli.group_options(group))
    assert "algo: " + ", ".join(sorted(cli.group_options("algo"))) in groups  # sorted
    # train.yaml's keys with their comments, and every algorithm's own keys with theirs
    keys = out.split("== Config ==")[1].split("== Algorithms ==")[0]
    assert "  epochs: 30\n" in keys and "# cap on training batches (smoke runs)" in keys
    algo_text = out.split("== Algorithms ==")[1]
    for name in algos.names():
        section = algo_text.split(f"--- algo={name} ---")[1].split("--- algo=")[0]
        options = algos.get(name).options
        for f in dataclasses.fields(options):
            assert f"{f.name}:" in section, (name, f.name)
    assert "beta: 0.5" in algo_text and "# gpipe | 1f1b" in algo_text
    assert "replicas: ${gpus}" in algo_text  # Hydra's template left the interpolation as it is


def test_cfg_job_prints_the_whole_config(monkeypatch, capsys):
    assert call_main(["train", "--cfg", "job", "algo=fdg", "gpus=2"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "algo:" in out and "trainer:" in out
    printed = yaml.safe_load(out)
    assert "hydra" not in printed
    cfg = from_dict(printed)  # complete and valid as printed
    validate(cfg)
    assert (cfg.algo.name, cfg.algo.beta, cfg.gpus) == ("fdg", 0.5, 2)


def test_model_name_reaches_any_valid_depth(monkeypatch, capsys):
    # the escape hatch that the model=resnet26 error suggests
    args = ["train", "--cfg", "job", "model=resnet20", "model.name=resnet26"]
    assert call_main(args, monkeypatch) == 0
    assert from_dict(yaml.safe_load(capsys.readouterr().out)).model == "resnet26"


def test_sweep_gives_each_job_its_own_directory(tmp_path, monkeypatch, capsys):
    rc = call_main(["train", "-m", "seed=1,2", "device=cpu", "trainer.epochs=1",
                    "trainer.max_steps=2", "trainer.batch_size=64", "trainer.progress=false",
                    f"hydra.sweep.dir={tmp_path}"], monkeypatch)
    assert rc == 0, capsys.readouterr().err
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 2
    seeds = sorted(json.loads(p.read_text())["seed"] for p in summaries)
    assert seeds == [1, 2]


def read_scalars(run_dir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_real_cli_run_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.time()
    r = run_cli("train", "data=digits", "model=resnet20", "algo=bp", "device=cpu",
                "trainer.epochs=2", "seed=3", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    # not a terminal: each epoch still one line, on the console and in train.log
    epochs = [ln for ln in r.stderr.splitlines() if ln.startswith("epoch ")]
    assert len(epochs) == 3 and all(ln.endswith("img/s") for ln in epochs[1:]), r.stderr
    log = (run_dir / "train.log").read_text().splitlines()
    assert [ln for ln in log if ln.startswith("epoch ")] == epochs

    s = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(s), SUMMARY_KEYS - set(s)
    assert s["status"] == "completed"
    assert (s["algo"], s["model"], s["data"], s["seed"], s["epochs"]) == \
        ("bp", "resnet20", "digits", 3, 2)
    assert (s["gpus"], s["modules"], s["replicas"]) == (1, 1, 1)
    assert s["num_parameters"] == sum(p.numel() for b in build_blocks("resnet20", 1, 10)
                                      for p in b.parameters())
    assert s["final_test_acc"] == s["history"][-1]["test_acc"] > 0.5  # a fraction; it learned
    assert s["best_test_acc"] == max(h["test_acc"] for h in s["history"])
    assert math.isfinite(s["final_test_loss"]) and s["final_test_loss"] > 0
    assert s["train_seconds"] > 0 and s["images_per_second"] > 0
    assert len(s["peak_memory_bytes"]) == s["modules"]
    assert all(isinstance(b, int) and b > 0 for b in s["peak_memory_bytes"])
    cfg = from_dict(s["config"])  # the resolved config, complete
    assert (cfg.seed, cfg.trainer.epochs, cfg.data.name, cfg.device) == (3, 2, "digits", "cpu")
    history = s["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["test_acc"] == s["final_test_acc"]
    assert not list(run_dir.rglob("*.tmp"))

    scalars = read_scalars(run_dir)
    for tag in ("accuracy/test", "loss/train", "lr", "time/train_seconds"):
        assert tag in scalars, sorted(scalars)
    # the evaluation at step 0 starts the test curves at the start of the time axis
    assert [len(scalars[t]) for t in ("accuracy/test", "loss/test", "time/train_seconds",
                                      "loss/train", "lr")] == [3, 3, 3, 3, 2]
    assert scalars["accuracy/test"][0].value == pytest.approx(s["initial_test_acc"], rel=1e-6)
    # every point sits at start + cumulative training seconds (evaluation excluded)
    start, *walls = [e.wall_time for e in scalars["accuracy/test"]]
    seconds = [h["train_seconds"] for h in history]
    assert [w - start for w in walls] == pytest.approx(seconds, abs=1e-3)
    assert t0 - 1 <= start <= walls[0]
    module_tags = [t for t in scalars if t.startswith("module1/")]
    for tag in ("lr", *module_tags):
        assert [e.wall_time for e in scalars[tag]] == pytest.approx(walls, abs=1e-6), tag
    assert [e.wall_time for e in scalars["loss/train"]] == pytest.approx([start, *walls],
                                                                        abs=1e-6)
    assert [e.value for e in scalars["time/train_seconds"]] == \
        pytest.approx([0.0, *seconds], rel=1e-5)
    assert [e.value for e in scalars["accuracy/test"]][1:] == \
        pytest.approx([h["test_acc"] for h in history], rel=1e-6)
    steps = 1437 // 64  # digits images per epoch at the default batch size
    assert s["steps"] == 2 * steps
    assert [e.step for e in scalars["accuracy/test"]] == [0, steps, 2 * steps]
    assert set(s["seconds_to_acc"]) == {"0.5", "0.8", "0.9", "0.95", "0.99"}
    assert s["seconds_to_final_minus_1pt"] in seconds


@pytest.mark.slow
def test_real_cli_resnet110_parameter_count(tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli("train", "model=resnet110", "data=synthetic", "data.train_size=256",
                "data.test_size=64", "trainer.max_steps=2", "trainer.batch_size=32",
                "trainer.epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["num_parameters"] == 1727962  # He et al. 2016: 1.7M
    assert s["status"] == "completed" and s["steps"] == 2


def test_schedule_command_prints_the_table(capsys):
    assert cli.main(["schedule", "ddg", "2", "3"]) == 0
    out = capsys.readouterr().out
    assert "F1 >A1 <G0 B0 S" in out and "<A1 F1 B1 >G1 S" in out
    assert "<A2 F2 B2 S" in out  # the last gradient would arrive after the end: not sent
    assert cli.main(["schedule", "ddg", "zero"]) == 2
    assert "usage: dpbp schedule" in capsys.readouterr().err


def test_cuda_checks_exit_2(tmp_path, monkeypatch, capsys):
    """device=cuda without CUDA, and more GPUs than the machine has (faked: no GPU here)."""
    import torch

    if not torch.cuda.is_available():
        rc = call_main(["train", "device=cuda", f"hydra.run.dir={tmp_path / 'a'}"], monkeypatch)
        assert "CUDA is not available" in assert_one_line_error(rc, *capsys.readouterr())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    rc = call_main(["train", "device=auto", "algo=ddg", "gpus=2", f"hydra.run.dir={tmp_path}"],
                   monkeypatch)
    line = assert_one_line_error(rc, *capsys.readouterr())
    assert "gpus=2 but this machine has 1 GPUs" in line


def test_a_corrupt_dataset_file_exits_2_naming_it(tmp_path, monkeypatch, capsys):
    from test_data import write_cifar10

    write_cifar10(tmp_path / "data")
    (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x00garbage")
    rc = call_main(["train", "device=cpu", "data=cifar10", f"data.root={tmp_path / 'data'}",
                    "data.download=false", f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch)
    assert "data_batch_2" in assert_one_line_error(rc, *capsys.readouterr())


def test_a_failed_run_says_what_happened_and_how_to_go_on(tmp_path, monkeypatch, capsys):
    """Exit 1 and two lines: the cause, then what to do (here: resume from epoch 1)."""
    rc = call_main(["train", "device=cpu", "trainer.epochs=3", "sched.milestones=[1]",
                    "sched.gamma=1e12", "trainer.progress=false", f"hydra.run.dir={tmp_path}"],
                   monkeypatch)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("dpbp: ")]
    assert rc == 1 and len(lines) == 2 and "Traceback" not in err, err
    assert lines[0].startswith("dpbp: run failed: non-finite training loss at batch ")
    assert lines[1] == (f"dpbp: continue from the checkpoint (epoch 1, tick 22) with the same "
                        f"command plus resume={tmp_path}")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"] == lines[0].removeprefix("dpbp: run failed: ")
