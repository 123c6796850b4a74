"""scripts/device_check.sh and its parts: argument handling, the tables built from given
measurements, and the paths a machine without CUDA takes (no timings asserted)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from dpbp import cuda_check, device_report, paper_predict
from dpbp.cuda_check import Run, compare, overhead_result, plan_checks, refusal

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_check.sh"


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


# --- the script's arguments ---------------------------------------------------------------

def test_help_says_what_is_written_and_creates_nothing(tmp_path):
    r = run_script("--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for word in ("device_cuda", "device_papers", "device_cpu_scaling", "--quick", "--cpu-only",
                 "--seconds"):
        assert word in r.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [("--bogus",), ("out1", "out2"), ("--seconds",),
                                  ("--seconds", "soon"), ("out1", "--", "out2"),
                                  ("--quick", "-x")])
def test_bad_arguments_exit_2_with_one_line(tmp_path, args):
    r = run_script(*args, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("device_check.sh: ") and "--help" in lines[0]
    assert r.stdout == "" and list(tmp_path.iterdir()) == []  # nothing was started


# --- part 1: the CPU-scaling table ---------------------------------------------------------

def bench_result() -> dict:
    """A bench.json as dpbp bench writes it, with two repeats and predictions attached."""
    def row(algo, w, ips, low, high, speedup, pred=None, err=None, ceil=None):
        return {"algo": algo, "workers": w, "modules": 1 if algo in ("ddp", "ceiling") else w,
                "replicas": w if algo in ("ddp", "ceiling") else 1, "repeats": 2, "failed": 0,
                "images_per_second": ips, "images_per_second_min": low,
                "images_per_second_max": high, "speedup": speedup, "ceiling_speedup": ceil,
                "efficiency_vs_ceiling": speedup / ceil if ceil else None,
                "predicted_run_speedup": pred, "prediction_error": err,
                "predicted_speedup": pred}
    rows = [row("bp", 1, 100, 98, 102, 1.0, 1.0, 0.0, 1.0),
            row("ddg", 4, 300, 290, 310, 3.0, 3.3, 0.1, 3.8),
            row("fdg", 4, 250, 240, 260, 2.5, 1.75, -0.3, 3.8),
            row("ceiling", 4, 380, 370, 390, 3.8, None, None, 3.8),
            row("fdg", 8, 500, 480, 520, 5.0, 6.0, 0.2, 7.0)]
    return {"config": {"model": {"name": "resnet20"},
                       "data": {"name": "synthetic", "shape": [3, 32, 32]}, "batch_size": 128,
                       "threads": 1, "epochs": 2, "steps_per_epoch": 6, "repeats": 2},
            "repeats_done": 2, "rows": rows, "profile": {"forward": [0.1]}}


def test_simulator_error_per_worker_count():
    errors = device_report.error_by_workers(device_report.scaling_rows(bench_result()))
    assert set(errors) == {4, 8}  # W = 1 is the base, the ceiling has no prediction
    assert errors[4] == {"mean_abs": pytest.approx(0.2), "max_abs": 0.3, "algos": 2}
    assert errors[8]["max_abs"] == 0.2


def test_cpu_scaling_table_states_command_machine_torch_and_date(tmp_path):
    bench_dir, out = tmp_path / "bench", tmp_path / "out"
    bench_dir.mkdir()
    (bench_dir / "bench.json").write_text(json.dumps(bench_result()))
    assert device_report.main(["cpu-scaling", str(bench_dir), str(out),
                               "--command", "dpbp bench gpus=[1,4,8]"]) == 0
    md = (out / "device_cpu_scaling.md").read_text()
    assert md.startswith("# Device check 1: CPU scaling")
    assert "- Command: `dpbp bench gpus=[1,4,8]`" in md and f"torch {torch.__version__}" in md
    assert "CPUs, GPU: " in md and "- Date: " in md
    assert "| fdg | 4 | 4 x 1 | 250 | 240–260 | 2.50× | 3.80× | 66% | 1.75× | -30% | 1.75× |" \
        in md
    assert "| 4 | 2 | 20% | 30% |" in md
    doc = json.loads((out / "device_cpu_scaling.json").read_text())
    assert doc["command"] == "dpbp bench gpus=[1,4,8]" and doc["machine"]["cpus"] >= 1
    assert doc["machine"]["torch"] == torch.__version__ and doc["date"]
    assert doc["error_by_workers"]["8"]["mean_abs"] == 0.2
    assert device_report.main(["cpu-scaling", str(tmp_path / "none"), str(out),
                               "--command", "x"]) == 1


def test_summary_names_each_part_its_status_and_result(tmp_path):
    (tmp_path / "device_cuda.json").write_text(json.dumps({"skipped": "no CUDA"}))
    (tmp_path / "device_papers.json").write_text(json.dumps({"predictions": [{}, {}]}))
    (tmp_path / "device_cpu_scaling.json").write_text(json.dumps(
        {"rows": [{"images_per_second": 1.0}, {"images_per_second": None}],
         "error_by_workers": {"4": {"mean_abs": 0.12}}}))
    parts = tmp_path / "parts.tsv"
    parts.write_text("cuda\t0\t2\npapers\t124\t60\ncpu\t1\t300\n")
    text = device_report.summary(tmp_path, parts).splitlines()
    assert text[1].split()[:3] == ["cuda", "ok", "2"] and "skipped: no CUDA" in text[1]
    assert "timed out" in text[2] and "2 predictions" in text[2]
    assert "exit 1" in text[3] and "1/2 rows measured" in text[3] and "W=4: 12%" in text[3]
    (tmp_path / "device_cuda.json").write_text(json.dumps(
        {"checks": [{"verdict": "pass"}, {"verdict": "FAIL: x"}], "overhead": None}))
    assert device_report.headline(tmp_path, "cuda") == \
        "1/2 CUDA checks pass; harness overhead –"
    (tmp_path / "device_cuda.json").write_text(json.dumps(
        {"checks": [{"verdict": "pass"}], "overhead": {"overhead": 0.034}}))
    assert device_report.headline(tmp_path, "cuda").endswith("harness overhead 3.4%")


def test_a_skipped_part_says_why(tmp_path):
    assert device_report.main(["skipped", str(tmp_path), "device_cuda", "--cpu-only was given",
                               "scripts/device_check.sh --cpu-only"]) == 0
    md = (tmp_path / "device_cuda.md").read_text()
    assert "Skipped: --cpu-only was given." in md and "`scripts/device_check.sh --cpu-only`" in md
    assert device_report.headline(tmp_path, "cuda") == "skipped: --cpu-only was given"


# --- part 2: CUDA against the CPU ----------------------------------------------------------

def test_plan_covers_every_algo_that_runs_on_one_gpu():
    checks = {c.name: c for c in plan_checks()}
    for algo in ("bp", "ddg", "fr", "fdg"):
        for k in (2, 4):
            assert "executor=local" in checks[f"{algo}-k{k}"].overrides
            assert f"gpus={k}" in checks[f"{algo}-k{k}"].overrides
    assert checks["pdasgd-k1"].tolerance == checks["hogwild-k1"].tolerance == "async"
    # the most delayed pipeline at K = 2: adl (ties with fdg, first by name)
    assert checks["adl-k2-amp"].reference == "adl-k2" and checks["adl-k2-amp"].tolerance == "amp"
    assert "trainer.channels_last=true" in checks["bp-k1-channels_last"].overrides
    assert all(c.reference in checks for c in checks.values())
    refused = {r.name for r in cuda_check.REFUSED}
    assert {"ddp-k2", "gpipe-k2", "dp_fdg-k4", "pdasgd-k2", "hogwild-k2"} <= refused


def summary(*losses: float, status: str = "completed") -> dict:
    return {"status": status, "final_test_acc": 0.9,
            "history": [{"train_loss": v, "test_loss": v} for v in losses]}


def run(summary_: dict, returncode: int = 0, message: str = "") -> Run:
    return Run("x", "cuda", ["algo=bp"], "d", returncode=returncode, summary=summary_,
               message=message)


def test_compare_checks_status_finiteness_and_the_first_epoch_loss():
    cpu = run(summary(2.25, 0.80))
    ok = compare(run(summary(2.30, 0.95)), cpu, 0.05)
    assert ok["verdict"] == "pass" and ok["first_epoch_diff"] == pytest.approx(0.05 / 2.25)
    assert ok["last_epoch_diff"] == pytest.approx(0.15 / 0.80)  # shown, not checked
    far = compare(run(summary(2.50, 0.80)), cpu, 0.05)
    assert far["verdict"].startswith("FAIL: first-epoch loss differs by 11.1% > 5%")
    nan = compare(run(summary(2.25, math.nan)), cpu, 0.05)
    assert not nan["finite"] and nan["verdict"] == "FAIL: a loss is not finite"
    failed = compare(run({"status": "failed", "error": "CUDA out of memory"}, 1), cpu, 0.05)
    assert failed["verdict"] == "FAIL: failed: CUDA out of memory"
    no_ref = compare(run(summary(2.25)), run({}, 1, "dpbp: run failed: boom"), 0.05)
    assert no_ref["verdict"] == "FAIL: no CPU reference (dpbp: run failed: boom)"


def test_refusal_and_overhead_bookkeeping():
    said = "dpbp: gpus=2 but this machine has 1 GPUs; lower gpus, or use executor=local."
    r = refusal(cuda_check.REFUSED[1], run({}, 2, said))
    assert r["status"] == "not runnable on one GPU" and r["dpbp_said"] == said
    assert r["command"].startswith("dpbp train algo=bp")
    assert refusal(cuda_check.REFUSED[1], run(summary(1.0), 0))["status"].startswith("ran")
    o = overhead_result([100.0, 120.0], [90.0, None, 100.0])
    assert (o["plain_median"], o["dpbp_median"]) == (110.0, 95.0)
    assert o["overhead"] == pytest.approx(1 - 95 / 110)
    assert overhead_result([100.0], [None])["overhead"] is None


def test_without_cuda_one_line_and_exit_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_check.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("dpbp.cuda_check: CUDA parts skipped: ")
    assert "is_available() is False" in out[0]
    assert json.loads((tmp_path / "device_cuda.json").read_text())["skipped"]


def test_harness_end_to_end_with_the_cpu_standing_in(tmp_path):
    """Real runs, few: model-parallel BP on the 'GPU' (here the CPU) against the CPU (bit for
    bit the same on a CPU), and the overhead loop pair with 2 steps per epoch."""
    code = cuda_check.main([str(tmp_path), "--device", "cpu", "--only", "bp-k2", "--jobs", "1",
                            "--overhead-steps", "2", "--overhead-repeats", "1"])
    doc = json.loads((tmp_path / "device_cuda.json").read_text())
    (check,) = doc["checks"]
    assert code == 0 and check["verdict"] == "pass" and check["first_epoch_diff"] == 0.0
    assert len(check["train_loss"]) == 2 and doc["not_runnable"] == []
    o = doc["overhead"]
    assert o["plain_median"] > 0 and o["dpbp_median"] > 0 and o["overhead"] is not None
    md = (tmp_path / "device_cuda.md").read_text()
    assert "| bp-k2 | `algo=bp gpus=2 executor=local` | completed | yes |" in md
    assert "Harness overhead: **" in md and "### Why these tolerances" in md


# --- part 3: the papers' settings ----------------------------------------------------------

def test_paper_speedups_come_from_the_reference_tables():
    s, t = paper_predict.paper_speedup("wrn28_10", "fdg", 2)
    assert (s, t) == (pytest.approx(219.1 / 118.3), 118.3)  # §4.6: 1.85x
    assert paper_predict.paper_speedup("wrn28_10", "fdg", 4)[0] == pytest.approx(2.96, abs=0.01)
    assert paper_predict.paper_speedup("resnet110", "ddg", 4) == (1.87, None)  # §2.7
    assert paper_predict.paper_speedup("resnet110", "fdg", 2) == (None, None)
    assert paper_predict.paper_speedup("wrn28_10", "bp", 3) == (1.0, 219.1)
    assert paper_predict.paper_speedup("resnet20", "bp", 2) == (None, None)


def test_predictions_with_and_without_transfers():
    prof = {"model": "wrn28_10", "blocks": 4, "forward": [1.0] * 4, "backward": [2.0] * 4,
            "step": [0.0] * 4, "staged_copy": [0.5] * 3, "counts": {2: [2, 2], 4: [1] * 4}}
    preds = {(p["algo"], p["modules"]): p for p in paper_predict.predictions(prof)}
    assert set(preds) == {(a, k) for a in paper_predict.ALGOS for k in (2, 4)}
    fdg = preds[("fdg", 2)]
    assert 1.9 < fdg["predicted"] <= 2.0 and fdg["predicted_staged"] <= fdg["predicted"]
    assert fdg["paper_speedup"] == pytest.approx(1.852, abs=1e-3)
    assert fdg["bp_seconds_per_batch"] == 12.0 and fdg["counts"] == [2, 2]


def test_papers_part_runs_on_the_cpu_with_a_tiny_batch(tmp_path):
    assert paper_predict.main([str(tmp_path), "--device", "cpu", "--models", "resnet20",
                               "--batch", "2", "--repeats", "1"]) == 0
    doc = json.loads((tmp_path / "device_papers.json").read_text())
    assert doc["device"] == "cpu" and len(doc["predictions"]) == 3 * 4
    assert all(sum(p["counts"]) == 11 and p["predicted"] > 0 for p in doc["predictions"])
    md = (tmp_path / "device_papers.md").read_text()
    assert "## resnet20 (11 blocks)" in md and "On the CPU with a small batch" in md


def test_papers_part_skips_without_cuda_unless_told(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert paper_predict.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "skipped" in out[0] and "--device cpu" in out[0]
