"""dpbp report: grouping over seeds, the gap to BP, and its files."""

import json

import pytest

from dpbp.cli import main


def write(run_dir, algo, modules, seed, final, best, ips, beta=1.0):
    run_dir.mkdir(parents=True)
    config = {"algo": {"name": algo, "beta": beta}, "gpus": modules, "seed": seed,
              "executor": "dist", "optim": {"lr": 0.1}}
    (run_dir / "summary.json").write_text(json.dumps({
        "status": "completed", "algo": algo, "model": "resnet20", "data": "digits",
        "modules": modules, "replicas": 1, "epochs": 30, "seed": seed, "final_test_acc": final,
        "best_test_acc": best, "images_per_second": ips, "train_seconds": 10.0,
        "config": config}))


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
    bp = next(line for line in lines if "| bp |" in line)
    fdg = next(line for line in lines if "| fdg |" in line and "algo.beta=1.0" in line)
    half = next(line for line in lines if "| fdg |" in line and "algo.beta=0.5" in line)
    assert "97.00 ± 1.41" in bp and "| 2 |" in bp  # mean ± sample std of 98 and 96
    assert "94.00 ± 1.41" in fdg and "-3.00" in fdg and "| 190 |" in fdg
    assert "99.00 ± 0.00" in half and "+2.00" in half and "| 1 |" in half
    assert (tmp_path / "out" / "t.md").read_text().count("\n") == len(lines)
    csv = (tmp_path / "out" / "t.csv").read_text().splitlines()
    assert csv[0].startswith("data,model,algo") and len(csv) == 4
    assert float(csv[2].split(",")[8]) == pytest.approx(0.94)


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
    row = next(line for line in capsys.readouterr().out.splitlines() if "| ddg |" in line)
    assert row.endswith("| 1.0 / 1.5 / – | 93.50 |")
