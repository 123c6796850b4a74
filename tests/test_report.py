"""dpbp report: grouping over seeds, the baseline (matching, missing), speedup and time to
accuracy, merged duplicates, and its files."""

import json

import pytest
from conftest import STEPS_PER_EPOCH

from dpbp.cli import main
from dpbp.report import load_summaries, table


def write(run_dir, algo, modules, seed, final, best, ips, beta=1.0, device="cpu",
          config_device=None, batch=64, epochs=30, history=None, overrides=None):
    """A completed summary.json (and, given `overrides`, the .hydra/overrides.yaml Hydra
    writes); `history`: [(train_seconds, test_acc), ...] per epoch."""
    run_dir.mkdir(parents=True)
    config = {"algo": {"name": algo, "beta": beta}, "gpus": modules, "seed": seed,
              "executor": "dist", "optim": {"lr": 0.1}, "device": config_device or device,
              "trainer": {"batch_size": batch, "epochs": epochs}}
    hist = [{"epoch": i + 1, "train_seconds": t, "test_acc": a}
            for i, (t, a) in enumerate(history or [])]
    (run_dir / "summary.json").write_text(json.dumps({
        "status": "completed", "algo": algo, "model": "resnet20", "data": "digits",
        "modules": modules, "replicas": 1, "epochs": epochs, "seed": seed, "device": device,
        "final_test_acc": final, "best_test_acc": best, "images_per_second": ips,
        "train_seconds": 10.0, "steps": epochs * STEPS_PER_EPOCH, "history": hist,
        "initial_test_acc": 0.1, "config": config}))
    if overrides is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "overrides.yaml").write_text(
            "".join(f"- {o}\n" for o in overrides))


def line_of(lines, *words):
    return next(line for line in lines if all(w in line for w in words))


def test_report_averages_seeds_and_measures_the_gap(tmp_path, capsys):
    write(tmp_path / "a", "bp", 1, 0, 0.98, 0.99, 100.0)
    write(tmp_path / "b", "bp", 1, 1, 0.96, 0.97, 110.0)
    write(tmp_path / "c", "fdg", 2, 0, 0.95, 0.95, 200.0)
    write(tmp_path / "d", "fdg", 2, 1, 0.93, 0.94, 180.0)
    write(tmp_path / "f", "fdg", 2, 0, 0.99, 0.99, 190.0, beta=0.5)  # another experiment
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "summary.json").write_text(json.dumps({"status": "failed"}))
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out" / "t")]) == 0
    lines = capsys.readouterr().out.splitlines()
    bp = line_of(lines, "| bp |")
    fdg = line_of(lines, "| fdg |", "algo.beta=1.0")
    half = line_of(lines, "| fdg |", "algo.beta=0.5")
    assert "97.00 ± 1.41" in bp and "| 2 |" in bp  # mean ± sample std of 98 and 96
    assert "94.00 ± 1.41" in fdg and "-3.00" in fdg and "| 190 |" in fdg
    assert "| 1.81 |" in fdg  # speedup: median 190 images/s over BP's median 105
    assert "99.00 ± 0.00" in half and "+2.00" in half and "| 1 |" in half
    assert (tmp_path / "out" / "t.md").read_text().count("\n") == len(lines)
    csv = (tmp_path / "out" / "t.csv").read_text().splitlines()
    assert csv[0].startswith("data,model,device,algo") and len(csv) == 4
    header = csv[0].split(",")
    beta1 = next(ln.split(",") for ln in csv if ",fdg," in ln and "algo.beta=1.0" in ln)
    assert float(beta1[header.index("final_acc_mean")]) == pytest.approx(0.94)
    assert float(beta1[header.index("speedup")]) == pytest.approx(190 / 105)


def test_speedup_and_time_to_accuracy_against_the_baseline(tmp_path, capsys):
    """BP ends at 95%: the target is 94%, which BP reaches after 6 s and FDG after 2 s."""
    write(tmp_path / "bp", "bp", 1, 0, 0.95, 0.95, 100.0,
          history=[(2.0, 0.5), (4.0, 0.9), (6.0, 0.95)])
    write(tmp_path / "fdg", "fdg", 2, 0, 0.95, 0.95, 180.0,
          history=[(1.0, 0.6), (2.0, 0.945), (3.0, 0.95)])
    write(tmp_path / "ddg", "ddg", 2, 0, 0.93, 0.93, 170.0,
          history=[(1.0, 0.6), (2.0, 0.9), (3.0, 0.93)])  # never reaches 94%
    assert main(["report", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    fdg = line_of(lines, "| fdg |")
    assert "| 1.80 | 10.0 | 2.0 | 3.00 |" in fdg  # speedup, train s, s to target, its speedup
    assert "| 1.70 | 10.0 | never | – |" in line_of(lines, "| ddg |")
    assert "| 1.00 | 10.0 | 6.0 | 1.00 |" in line_of(lines, "| bp |")
    note = line_of(lines, "Baseline for cpu resnet20 digits batch 64")
    assert "target 94.00%" in note and "reached in 6.0 s" in note


def test_the_baseline_is_matched_on_the_resolved_device_model_data_and_batch(tmp_path):
    # device=auto that ran on the CPU serves device=cpu runs; a GPU run or another batch does not
    write(tmp_path / "bp_auto", "bp", 1, 0, 0.97, 0.97, 100.0, config_device="auto")
    write(tmp_path / "bp_cuda", "bp", 1, 0, 0.99, 0.99, 900.0, device="cuda")
    write(tmp_path / "bp_batch", "bp", 1, 0, 0.90, 0.90, 400.0, batch=256)
    write(tmp_path / "bp_short", "bp", 1, 0, 0.50, 0.50, 100.0, epochs=3)
    write(tmp_path / "fdg", "fdg", 2, 0, 0.95, 0.95, 150.0, config_device="cpu")
    write(tmp_path / "fdg_short", "fdg", 2, 0, 0.45, 0.45, 150.0, epochs=3)
    rows, notes = table(load_summaries([str(tmp_path)]))
    fdg = next(r for r in rows if r["algo"] == "fdg" and r["epochs"] == 30)
    assert fdg["_base"].runs[0]["run_dir"].endswith("bp_auto")
    assert fdg["speedup"] == pytest.approx(1.5)
    assert fdg["gap_to_bp"] == pytest.approx(-0.02)
    short = next(r for r in rows if r["algo"] == "fdg" and r["epochs"] == 3)
    assert short["_base"].runs[0]["run_dir"].endswith("bp_short")  # the closest recipe
    cuda = next(r for r in rows if r["device"] == "cuda")
    assert cuda["_base"] is cuda["_group"] and cuda["speedup"] == 1.0
    assert not any(n.startswith("No baseline") for n in notes)


def test_identical_runs_are_one_experiment_and_one_seed(tmp_path, capsys):
    write(tmp_path / "a", "bp", 1, 0, 0.98, 0.98, 100.0, config_device="auto")
    write(tmp_path / "b", "bp", 1, 0, 0.98, 0.98, 120.0, config_device="cpu")  # a rerun
    write(tmp_path / "c", "bp", 1, 1, 0.96, 0.96, 110.0)
    rows, _ = table(load_summaries([str(tmp_path)]))
    assert len(rows) == 1
    assert rows[0]["seeds"] == 2
    assert rows[0]["final_acc"] == pytest.approx((0.97, 0.0141421), rel=1e-4)  # 98, 96


def test_no_baseline_says_how_to_add_one(tmp_path, capsys):
    given = ["algo=ddg", "gpus=2", "device=cpu", "trainer.epochs=3", "algo.weights=live"]
    write(tmp_path / "s0", "ddg", 2, 0, 0.9, 0.9, 100.0, overrides=[*given, "seed=0"])
    write(tmp_path / "s1", "ddg", 2, 1, 0.9, 0.9, 100.0, overrides=[*given, "seed=1"])
    write(tmp_path / "bp2", "bp", 2, 0, 0.9, 0.9, 50.0)  # two workers: not a baseline
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    note = line_of(out.splitlines(), "No baseline for cpu resnet20 digits batch 64")
    assert "(bp K=2, ddg K=2)" in note
    assert ("`dpbp train -m algo=bp gpus=1 device=cpu trainer.epochs=3 seed=0,1`" in note)
    assert "| – | – |" in line_of(out.splitlines(), "| ddg |")


def test_tensorboard_gets_the_speedups(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write(tmp_path / "bp", "bp", 1, 0, 0.95, 0.95, 100.0, history=[(2.0, 0.5), (6.0, 0.95)])
    write(tmp_path / "fdg", "fdg", 2, 0, 0.95, 0.95, 180.0, history=[(1.0, 0.6), (2.0, 0.95)])
    for _ in range(2):  # a second report replaces the first one's values
        assert main(["report", str(tmp_path), "--tensorboard"]) == 0
    assert len(list((tmp_path / "fdg").glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(tmp_path / "fdg"))
    acc.Reload()
    values = {t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"]}
    assert values == pytest.approx({"vs_bp/speedup": 1.8, "vs_bp/seconds_to_target": 2.0,
                                    "vs_bp/time_speedup": 3.0})


def test_report_without_runs_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no completed summary.json" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_paper_numbers_sit_next_to_cifar_runs(tmp_path, capsys):
    from dpbp.paper import paper_accuracy

    assert paper_accuracy("cifar10", "resnet56", "fdg", 2, 0.5) == 94.10
    assert paper_accuracy("cifar10", "resnet56", "fdg", 2, 1.0) == 93.80
    assert paper_accuracy("cifar10", "resnet56", "fdg", 2, 0.3) is None  # not the paper's beta
    assert paper_accuracy("cifar100", "resnet110", "bp", 1) == 74.18
    assert paper_accuracy("digits", "resnet20", "bp", 1) is None
    write(tmp_path / "a", "ddg", 3, 0, 0.93, 0.94, 100.0)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    summary.update(data="cifar10", model="resnet56", peak_memory_bytes=[2**20, 3 * 2**19, None])
    (tmp_path / "a" / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(tmp_path)]) == 0
    row = line_of(capsys.readouterr().out.splitlines(), "| ddg |")
    assert row.endswith("| 1.0 / 1.5 / – | 93.50 | – |")  # no perplexity: a classifier
