"""What a user compares: a real sweep's TensorBoard event files read back (time axis from zero,
the HParams row, short run names), its train.log files, and `dpbp report` with a baseline.

One module-scoped sweep serves every test: `dpbp train -m algo=bp,ddg,fdg gpus=2` on the small
MLP (all modules in one process, seconds), plus its one-worker BP baseline in a second sweep.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata
from test_cli import call_main

from dpbp import algos, hparams

COMMON = ["model=mlp", "device=cpu", "executor=local", "trainer.epochs=3",
          "trainer.progress=false"]
SPLIT = [a for a in algos.names() if algos.get(a).family == "tick"
         and not algos.get(a).data_parallel][:3]  # bp, ddg, fdg


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    mp = pytest.MonkeyPatch()
    try:
        rc = call_main(["train", "-m", f"algo={','.join(SPLIT)}", "gpus=2", *COMMON,
                        f"hydra.sweep.dir={root / 'split'}"], mp)
        assert rc == 0
        rc = call_main(["train", "-m", f"algo={algos.reference().name}", "gpus=1",
                        "seed=0,1", *COMMON, f"hydra.sweep.dir={root / 'baseline'}"], mp)
        assert rc == 0
    finally:
        mp.undo()
    return root


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_runs_are_named_by_what_varies_in_the_sweep(sweep):
    assert sorted(p.name for p in (sweep / "split").iterdir() if p.is_dir()) == \
        sorted(f"algo={a}" for a in SPLIT)
    assert sorted(p.name for p in (sweep / "baseline").iterdir() if p.is_dir()) == \
        ["seed=0", "seed=1"]
    # what every job shared stays in the run's own records
    run = sweep / "split" / f"algo={SPLIT[1]}"
    given = (run / ".hydra" / "overrides.yaml").read_text()
    assert "trainer.epochs=3" in given and "gpus=2" in given


@pytest.mark.parametrize("algo", SPLIT)
@pytest.mark.parametrize("tag", ["accuracy/test", "accuracy/train", "loss/test", "loss/train"])
def test_curves_against_training_time_start_at_zero(sweep, algo, tag):
    run = sweep / "split" / f"algo={algo}"
    summary = json.loads((run / "summary.json").read_text())
    points = events(run).Scalars(tag)
    assert [e.step for e in points][0] == 0 and len(points) == 4  # step 0, then 3 epochs
    if tag == "accuracy/test":
        assert points[0].value == pytest.approx(summary["initial_test_acc"], rel=1e-6)
    relative = points[-1].wall_time - points[0].wall_time  # TensorBoard's RELATIVE axis
    assert relative == pytest.approx(summary["train_seconds"], rel=0.01)
    epochs = [e.wall_time - points[0].wall_time for e in points[1:]]
    assert epochs == pytest.approx([h["train_seconds"] for h in summary["history"]], rel=0.01)


def test_accuracy_and_loss_come_first(sweep):
    tags = events(sweep / "split" / f"algo={SPLIT[0]}").Tags()["scalars"]
    groups = sorted({t.split("/")[0] for t in tags})  # TensorBoard's order
    assert groups[:2] == ["accuracy", "loss"]
    assert {"accuracy/test", "accuracy/train", "loss/test", "loss/train"} <= set(tags)


def hparams_of(run_dir: Path):
    content = events(run_dir).PluginTagToContent(metadata.PLUGIN_NAME)
    exp = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    start = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG])
    return exp, start


@pytest.mark.parametrize("algo", SPLIT)
def test_hparams_hold_the_distinguishing_settings(sweep, algo):
    run = sweep / "split" / f"algo={algo}"
    exp, start = hparams_of(run)
    own = {f"algo.{k}" for k in json.loads((run / "summary.json").read_text())["config"]["algo"]
           if k not in ("name", "replicas")}
    assert set(start.hparams) == {"algo", "gpus", "model", "data", "seed", "modules",
                                  "replicas", "device", "optim.lr", "trainer.batch_size",
                                  "trainer.epochs"} | own
    assert start.hparams["algo"].string_value == algo
    assert start.hparams["gpus"].number_value == 2
    assert start.hparams["device"].string_value == "cpu"
    # the columns TensorBoard shows by default: algo and gpus among them
    shown = [i.name for i in exp.hparam_infos if i.differs]
    assert shown[:2] == ["algo", "gpus"] and len(shown) == 5
    metrics = [m.name.tag for m in exp.metric_infos]
    assert metrics[:3] == ["accuracy/test", "summary/best_test_acc", "summary/images_per_second"]
    tags = set(events(run).Tags()["scalars"])
    assert {m for m in metrics if not m.startswith("vs_bp/")} <= tags  # each has its values


def test_every_run_describes_the_same_columns(sweep):
    """TensorBoard takes one run's description for the whole table: all must be equal."""
    exps = [hparams_of(sweep / "split" / f"algo={a}")[0] for a in SPLIT]
    assert all(e == exps[0] for e in exps)
    names = {i.name for i in exps[0].hparam_infos}
    assert set(hparams.option_kinds()) <= names  # every algorithm's own keys


@pytest.mark.parametrize("algo", SPLIT)
def test_train_log_holds_the_console_lines_unwrapped(sweep, algo):
    log = (sweep / "split" / f"algo={algo}" / "train.log").read_text().splitlines()
    epochs = [line for line in log if line.startswith("epoch ")]
    assert len(epochs) == 4 and all("img/s" in line for line in epochs[1:])
    assert any(line.startswith("run directory: ") for line in log)
    assert not any("\x1b[" in line for line in log)  # no colour codes


def test_report_prints_speedup_and_time_to_accuracy(sweep, monkeypatch, capsys):
    from dpbp.cli import main

    assert main(["report", str(sweep)]) == 0
    out = capsys.readouterr().out.splitlines()
    ref = algos.reference().name
    note = next(line for line in out if line.startswith("Baseline for cpu mlp digits batch 64"))
    assert f"{ref} on 1 worker, 2 seed(s)" in note
    for algo in SPLIT:
        row = next(line for line in out if f"| {algo} | 2 |" in line)
        cells = [c.strip() for c in row.split("|")]
        speedup, to_target = cells[13], cells[15]
        assert float(speedup) > 0
        assert to_target == "never" or float(to_target.split()[0]) > 0
    assert not any(line.startswith("No baseline") for line in out)


def test_short_names_only_where_they_cannot_collide(tmp_path):
    from dpbp.cmdline import run_name_overrides

    exclude = "hydra.job.config.override_dirname.exclude_keys="
    [named] = run_name_overrides(["-m", "algo=bp,ddg", "gpus=2", "device=cpu"])
    assert named.startswith(exclude) and named.endswith(",gpus,device]")
    assert run_name_overrides(["algo=bp", "gpus=2"]) == []  # one run: hydra.run.dir names it
    assert run_name_overrides(["-m", "algo=bp", "gpus=2"]) == []  # nothing varies
    assert run_name_overrides(["-m", "seed=0,1", "hydra.sweep.subdir=s${seed}"]) == []
    # a second sweep into a directory with runs: another sweep's "seed=0" may be there already
    (tmp_path / "bp1" / "seed=0" / ".hydra").mkdir(parents=True)  # a baseline's sweep: no runs
    assert run_name_overrides(["-m", "seed=0,1", f"hydra.sweep.dir={tmp_path}"]) != []
    (tmp_path / "seed=0" / ".hydra").mkdir(parents=True)
    assert run_name_overrides(["-m", "algo=ddg", "seed=0,1", f"hydra.sweep.dir={tmp_path}"]) == []
