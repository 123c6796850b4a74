"""dpbp bench: the measurement bookkeeping (no timings asserted) and one real tiny bench."""

import io
import json

import pytest
from conftest import run_cli
from rich.console import Console

import dpbp.bench as bench
from dpbp.bench import (
    CEILING,
    Case,
    Measurement,
    attach_predictions,
    markdown,
    measurement,
    plan,
    rows,
    spread,
    timed_throughput,
    train_overrides,
)
from dpbp.predict import run_speedup
from dpbp.simulate import Profile, predict_speedup


def history(seconds, images):
    """Epochs with cumulative training seconds and per-epoch images, as summary.json has."""
    return [{"train_seconds": s, "images": i} for s, i in zip(seconds, images)]


def summary(seconds, images, compute=None, idle=None, peak=(100,)):
    return {"status": "completed", "history": history(seconds, images),
            "compute_seconds": compute, "idle_seconds": idle, "peak_memory_bytes": list(peak)}


def test_plan_starts_with_bp_and_skips_what_needs_more_workers():
    cases = plan(["bp", "ddg", "fdg", "ddp", "gpipe", "dp_fdg", "pdasgd"], [1, 2, 4], True)
    assert cases[0] == Case("bp", 1)
    names = [c.name for c in cases]
    assert "ddg-w1" not in names and "gpipe-w1" not in names and "ddp-w1" not in names
    assert "pdasgd-w1" in names and "dp_fdg-w2" not in names and "dp_fdg-w4" in names
    assert names.count("bp-w1") == 1 and "ceiling-w2" in names and "ceiling-w1" not in names
    dp = next(c for c in cases if c.name == "dp_fdg-w4")
    assert (dp.modules, dp.replicas) == (2, 2)
    assert next(c for c in cases if c.name == "ddp-w4").modules == 1


def test_warm_up_epoch_is_not_timed():
    ips, images, seconds = timed_throughput(history([5.0, 7.0, 9.0], [100, 200, 200]))
    assert (images, seconds, ips) == (400, 4.0, 100.0)
    with pytest.raises(ValueError, match="at least 2 epochs"):
        timed_throughput(history([1.0], [10]))


def test_ceiling_adds_the_independent_processes_and_failures_are_kept():
    m = measurement(Case(CEILING, 2, 2), 0, [summary([1, 3], [10, 20]),
                                             summary([1, 5], [10, 20])], "d")
    assert m.images_per_second == 10 + 5 and m.images == 40 and m.seconds == 4
    bad = measurement(Case("fdg", 2), 0, [{"status": "failed", "error": "rank 1 died"}], "d")
    assert (bad.status, bad.error, bad.images_per_second) == ("failed", "rank 1 died", None)
    share = measurement(Case("fdg", 2), 0, [summary([1, 2], [1, 1], [3.0, 1.0], [1.0, 3.0])], "")
    assert share.compute_share == [0.75, 0.25]


def test_rows_speedup_efficiency_and_ceiling_use_medians():
    cases = [Case("bp", 1), Case("fdg", 2), Case(CEILING, 2, 2)]
    ms = [measurement(c, r, [summary([0, s], [0, 100])] * (2 if c.algo == CEILING else 1), "")
          for c, seconds in zip(cases, ([1.0, 1.0, 2.0], [0.5, 0.8, 0.5], [1.0, 1.0, 1.0]))
          for r, s in enumerate(seconds)]
    ms.append(measurement(Case("fdg", 2), 3, [{"status": "failed"}], ""))
    bp, fdg, ceiling = rows(cases, ms)
    assert bp["images_per_second"] == 100 and bp["speedup"] == 1.0
    assert fdg["images_per_second"] == 200 and fdg["repeats"] == 3 and fdg["failed"] == 1
    assert fdg["speedup"] == 2.0 and fdg["efficiency"] == 1.0
    assert ceiling["images_per_second"] == 200 and fdg["ceiling_speedup"] == 2.0
    assert fdg["efficiency_vs_ceiling"] == 1.0
    # the spread over the repeats: fdg ran at 200, 125 and 200 images/s (the failure not counted)
    assert (fdg["images_per_second_min"], fdg["images_per_second_max"]) == (125, 200)
    assert fdg["spread"] == (200 - 125) / 200 and bp["spread"] == (100 - 50) / 100
    attach_predictions([bp, fdg, ceiling], [{"algo": "fdg", "workers": 2, "speedup": 1.9,
                                             "speedup_run": 1.8}])
    text = markdown({"config": {"model": {"name": "m"}, "data": {"name": "d"}, "batch_size": 8,
                                "device": "cpu", "repeats": 3, "epochs": 2,
                                "steps_per_epoch": 2, "threads": 1},
                     "machine": {"host": "h", "platform": "p", "cpus": 2, "torch": "t"},
                     "started": "now", "rows": [bp, fdg, ceiling],
                     "predictions": [{"algo": "fdg", "workers": 2, "speedup": 1.9}]})
    assert ("| fdg | 2 | 2 x 1 | 200 | 125–200 | 2.00× | 100% | 2.00× | 100% | 62%–100% | 1.80 "
            "| -10% | 1.90 |") in text
    assert ("| ceiling | 2 | 1 x 2 | 200 | 200–200 | 2.00× | 100% | 2.00× | 100% | – | – | – "
            "| – |") in text


def test_the_share_of_the_ceiling_is_also_paired_within_each_repeat():
    """A drift that slows a whole repeat moves the algorithm and that repeat's ceiling alike:
    per repeat the share is 80% and 100%, where the medians alone would give 350 / 400."""
    cases = [Case("bp", 1), Case("fdg", 2), Case(CEILING, 2, 2)]
    ms = [measurement(Case("bp", 1), r, [summary([0, 1], [0, 250])], "") for r in (0, 1)]
    ms += [measurement(Case("fdg", 2), r, [summary([0, 1], [0, ips])], "")
           for r, ips in enumerate((400, 300))]
    ms += [measurement(Case(CEILING, 2, 2), r, [summary([0, 1], [0, ips / 2])] * 2, "")
           for r, ips in enumerate((500, 300))]
    ms.append(measurement(Case("fdg", 2), 2, [summary([0, 1], [0, 10])], ""))  # no ceiling
    bp, fdg, ceiling = rows(cases, ms)
    assert (fdg["vs_ceiling_min"], fdg["vs_ceiling_max"]) == (0.8, 1.0)
    assert fdg["efficiency_vs_ceiling"] == pytest.approx(300 / 400)  # medians: 300 of 10/300/400
    assert bp["vs_ceiling_min"] is None and ceiling["vs_ceiling_min"] is None


def test_spread_is_min_max_over_the_median():
    assert spread([]) == (None, None, None)
    assert spread([5.0]) == (5.0, 5.0, 0.0)
    assert spread([90.0, 100.0, 120.0]) == (90.0, 120.0, 0.3)


def test_prediction_error_is_relative_to_the_measured_speedup():
    measured = [{"algo": "ddg", "workers": 4, "speedup": 2.5}, {"algo": "fr", "workers": 4,
                                                                "speedup": 2.0},
                {"algo": "ceiling", "workers": 4, "speedup": 3.6},
                {"algo": "fdg", "workers": 8, "speedup": None}]
    attach_predictions(measured, [
        {"algo": "ddg", "workers": 4, "speedup": 3.0, "speedup_run": 2.75},
        {"algo": "fr", "workers": 4, "speedup": 2.0, "speedup_run": 1.5},
        {"algo": "fdg", "workers": 8, "speedup": 6.0, "speedup_run": 4.0}])
    ddg, fr, ceiling, fdg = measured
    assert ddg["prediction_error"] == pytest.approx(0.1) and ddg["predicted_speedup"] == 3.0
    assert fr["prediction_error"] == pytest.approx(-0.25)
    assert ceiling["predicted_run_speedup"] is None and ceiling["prediction_error"] is None
    assert fdg["predicted_run_speedup"] == 4.0 and fdg["prediction_error"] is None


def test_run_length_prediction_counts_the_drain_and_not_the_fill():
    """A bench run times epochs 2.. of short runs: the pipeline's drain is inside that window,
    its fill is not. Long windows approach the long-run prediction."""
    one = Profile((3.0,), (6.0,), (1.0,))
    assert run_speedup("bp", one, steps=8, epochs=2) == pytest.approx(1.0)
    assert run_speedup("ddp", one, steps=8, epochs=2, replicas=2) == pytest.approx(2.0)
    two = Profile((1.5, 1.5), (3.0, 3.0), (0.5, 0.5))
    assert run_speedup("bp", two, 8, 2) == pytest.approx(predict_speedup("bp", two))
    # FDG, K = 2: one drain tick in a window of 8 batches; almost none in one of 1000
    short, long = run_speedup("fdg", two, 8, 2), run_speedup("fdg", two, 1000, 2)
    assert short == pytest.approx(16 / 9) and short < long < 2.0
    assert long == pytest.approx(predict_speedup("fdg", two, num_batches=2000), rel=1e-3)
    assert run_speedup("gpipe", two, 8, 3) == pytest.approx(predict_speedup("gpipe", two))
    with pytest.raises(ValueError, match="at least 2 epochs"):
        run_speedup("fdg", two, 8, 1)


def test_a_measured_baseline_scales_the_speedup():
    """BP's one-device time measured apart (the whole model as a unit) is the baseline, not the
    modules' sum."""
    two = Profile((1.5, 1.5), (3.0, 3.0), (0.5, 0.5))
    for algo in ("bp", "fdg", "gpipe"):
        assert predict_speedup(algo, two, baseline=8.0) == pytest.approx(
            predict_speedup(algo, two) * 8.0 / 10.0)
        assert run_speedup(algo, two, 8, 2, baseline=8.0) == pytest.approx(
            run_speedup(algo, two, 8, 2) * 8.0 / 10.0)


def test_predictions_time_each_module_as_a_unit(monkeypatch):
    """The simulator gets one time per module, taken on the chained blocks, and BP's baseline
    from the whole model: with every timed unit taking 1 s, whatever its size, BP on 2 modules
    runs at 1/1.75 of the whole (a per-block sum would say otherwise), and the record
    keeps each split's counts and module times."""
    from dpbp.predict import module_balance, predict_rows
    from dpbp.profile import BlockProfile

    # a unit: forward 0.25 s, backward 0.5 s, step 0.25 s; BP on K modules waits for K forwards
    # and K backwards per batch, only the step of module 1 is not hidden: (0.75 K + 0.25) s

    def unit_seconds(blocks, x, y, lr=0.0, repeats=5):
        n = len(blocks)
        return BlockProfile([0.25] * n, [0.5] * n, [0.25] * n, [4] * n, [0] * n)

    monkeypatch.setattr("dpbp.predict.profile_blocks", unit_seconds)
    monkeypatch.setattr("dpbp.predict.profile_links",
                        lambda sizes, device: ([0.0] * len(sizes), [0.0] * len(sizes)))
    cfg = {"data": {"name": "synthetic", "shape": [1, 8, 8], "num_classes": 10},
           "model": {"name": "resnet20"}, "batch_size": 4, "device": "cpu", "threads": 1,
           "seed": 0, "algos": ["bp", "ddg"], "predict_gpus": [2, 3], "steps_per_epoch": 4,
           "epochs": 2, "microbatches": 2, "split": "time"}
    preds, record = predict_rows(cfg, [], splits={2: [4, 7]})
    got = {(p["algo"], p["workers"]): p["speedup"] for p in preds}
    assert got[("bp", 2)] == pytest.approx(1 / 1.75) and got[("bp", 3)] == pytest.approx(1 / 2.5)
    assert 0.9 < got[("ddg", 2)] < 1.0  # one second per tick, less the fill and drain
    assert record["modules"]["2"]["counts"] == [4, 7] and len(record["forward"]) == 11
    assert record["modules"]["2"]["forward"] == [0.25, 0.25]
    assert sum(record["modules"]["3"]["counts"]) == 11
    assert module_balance({"2": {"counts": [4, 7], "forward": [0.1, 0.1],
                                 "backward": [0.1, 0.2], "step": [0.0, 0.0]}}) == (
        "K=2 (4+7 blocks): 200 / 300 ms, balance 83%")


def test_time_budget_stops_before_a_repeat_that_would_not_fit(tmp_path, monkeypatch):
    """Each fake case takes 10 s of a fake clock: 3 cases are 30 s a repeat. A budget of 70 s
    runs 2 repeats (a third would end at 90 s); bench.json is written after every case."""
    clock = [0.0]
    written = []

    def fake_case(cfg, case, repeat, out, balance=None):
        clock[0] += 10.0
        return Measurement(case.algo, case.workers, repeat, "completed",
                           images_per_second=100.0 * case.workers)

    monkeypatch.setattr(bench, "run_case", fake_case)
    monkeypatch.setattr(bench.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(bench, "write_json", lambda result, out: written.append(
        len(result["measurements"])))
    monkeypatch.setattr(bench, "write_outputs", lambda result, out: None)
    monkeypatch.setattr(bench, "machine", lambda: {})
    cfg = {"algos": ["fdg"], "gpus": [1, 2], "ceiling": True, "repeats": 5,
           "time_budget_s": 70, "predict": False, "device": "cpu"}
    console = Console(file=io.StringIO())
    result = bench.run_bench(cfg, tmp_path, console)
    assert result["repeats_done"] == 2 and written == [1, 2, 3, 4, 5, 6]
    assert all(r["repeats"] == 2 for r in result["rows"])
    cfg["time_budget_s"] = 15  # spent inside the first repeat: the later cases are not started
    clock[0], written[:] = 0.0, []
    result = bench.run_bench(cfg, tmp_path, console)
    assert result["repeats_done"] == 0 and [r["repeats"] for r in result["rows"]] == [1, 1, 0]


def test_runs_get_synthetic_data_sized_to_the_epoch():
    cfg = {"data": {"name": "synthetic", "shape": [3, 32, 32]}, "steps_per_epoch": 5,
           "batch_size": 16, "model": {"name": "resnet20"}, "device": "cpu", "seed": 0,
           "epochs": 3, "threads": 1, "microbatches": 4, "train": ["trainer.amp=true"]}
    args = train_overrides(cfg, Case("ddp", 2, 2))
    assert "data.train_size=160" in args and "algo=ddp" in args and "gpus=2" in args
    assert 'data.shape=[3, 32, 32]' in args and args[-1] == "trainer.amp=true"
    ceiling = train_overrides(cfg, Case(CEILING, 2, 2))
    assert "algo=bp" in ceiling and "gpus=1" in ceiling
    assert not any(a.startswith("split.") for a in args)  # no bench split: the run's default
    assert "split.balance=[4, 7]" in train_overrides(cfg, Case("fdg", 2), [4, 7])


def test_a_language_model_is_benched_with_its_own_keys_and_context(tmp_path):
    """model=gpt on data=text: the runs get the section's model keys (model.layers=...), the
    profile builds the transformer for the text's context and vocabulary, and the tables count
    sequences. Before, the profile raised a traceback and the runs dropped model.layers."""
    from dpbp.predict import split_counts

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    model = {"name": "gpt", "layers": 2, "dim": 16, "heads": 2}
    cfg = {"data": {"name": "text", "path": str(text), "context": 8, "test_fraction": 0.1},
           "model": model, "batch_size": 4, "device": "cpu", "threads": 1, "seed": 0,
           "steps_per_epoch": 2, "epochs": 2, "microbatches": 2, "train": [], "split": "time"}
    args = train_overrides(cfg, Case("fdg", 2), [2, 2])
    assert args[2:6] == ["model=gpt", "model.layers=2", "model.dim=16", "model.heads=2"]
    counts, profile = split_counts(cfg, [2, 3])
    assert counts[2] and sum(counts[2]) == 4 == len(profile.forward)  # embed, 2 blocks, head
    assert bench.unit(cfg) == "sequences" and bench.unit({"data": {"name": "digits"}}) == "images"


def test_split_by_time_is_profiled_once_and_given_to_every_multi_module_run(monkeypatch,
                                                                              tmp_path):
    """split=time: one profile in the bench's process, the same counts for every case with that
    many modules (ddp's and the ceiling's one-module runs get none); split=flops: none, each run
    splits by its own default."""
    calls, given = [], []
    monkeypatch.setattr("dpbp.predict.split_counts",
                        lambda cfg, modules: (calls.append(modules) or {2: [4, 7], 3: [2, 4, 5]},
                                                   None))
    monkeypatch.setattr(bench, "run_case", lambda cfg, case, repeat, out, balance=None: (
        given.append((case.name, balance)) or Measurement(case.algo, case.workers, repeat,
                                                          "completed", images_per_second=1.0)))
    for name in ("write_json", "write_outputs"):
        monkeypatch.setattr(bench, name, lambda result, out: None)
    monkeypatch.setattr(bench, "machine", lambda: {})
    cfg = {"algos": ["fdg", "ddp"], "gpus": [1, 2, 3], "ceiling": True, "repeats": 2,
           "time_budget_s": None, "predict": False, "device": "cpu", "split": "time"}
    result = bench.run_bench(cfg, tmp_path, Console(file=io.StringIO()))
    assert calls == [[2, 3]] and result["splits"] == {2: [4, 7], 3: [2, 4, 5]}
    assert given[:7] == [("bp-w1", None), ("fdg-w2", [4, 7]), ("ddp-w2", None),
                         ("ceiling-w2", None), ("fdg-w3", [2, 4, 5]), ("ddp-w3", None),
                         ("ceiling-w3", None)]
    assert given[7:] == given[:7]  # the second repeat: the same splits
    cfg["split"], calls[:], given[:] = "flops", [], []
    assert bench.run_bench(cfg, tmp_path, Console(file=io.StringIO()))["splits"] == {}
    assert calls == [] and all(b is None for _, b in given)


def test_split_counts_balance_the_profiled_time_or_the_flops():
    """Both modes cut the real model into K consecutive non-empty modules; flops gives what
    `dpbp train` gives by default (build.resolve_balance)."""
    from conftest import make_cfg

    from dpbp.build import resolve_balance
    from dpbp.data import load_dataset
    from dpbp.models import build_blocks
    from dpbp.predict import split_counts

    cfg = {"data": {"name": "synthetic", "shape": [3, 8, 8], "num_classes": 10},
           "model": {"name": "resnet20"}, "batch_size": 8, "device": "cpu", "threads": 1,
           "seed": 0}
    for by in ("time", "flops"):
        counts, profile = split_counts({**cfg, "split": by}, [2, 3])
        assert (profile is not None) == (by == "time")
        assert [len(c) for c in counts.values()] == [2, 3]
        assert all(sum(c) == 11 and min(c) >= 1 for c in counts.values())
    run = make_cfg("data=synthetic", "data.shape=[3,8,8]", "gpus=3", "algo=fdg")
    ds = load_dataset(run.data)
    assert split_counts({**cfg, "split": "flops"}, [3])[0][3] == resolve_balance(
        run, build_blocks("resnet20", 3, 10), ds, ds.train_x.device)


@pytest.mark.slow
def test_bench_end_to_end(tmp_path):
    """Real runs, tiny: every output file is written and every case measured."""
    out = tmp_path / "b"
    r = run_cli("bench", "algos=[fdg]", "gpus=[1,2]", "model=mlp", "data.shape=[1,8,8]",
                "batch_size=16", "steps_per_epoch=2", "epochs=2", "repeats=1", "predict=true",
                "predict_gpus=[3]", "split=time", f"hydra.run.dir={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "bench.json").read_text())
    got = {(row["algo"], row["workers"]): row for row in result["rows"]}
    assert set(got) == {("bp", 1), ("fdg", 2), (CEILING, 2)}
    assert all(row["repeats"] == 1 and row["images_per_second"] > 0 for row in got.values())
    assert len(got[("fdg", 2)]["compute_share"]) == 2
    assert got[("fdg", 2)]["split"] == result["splits"]["2"]  # the run was cut as the bench said
    fdg = got[("fdg", 2)]
    assert fdg["images_per_second_min"] == fdg["images_per_second_max"] > 0
    assert fdg["predicted_run_speedup"] > 0 and fdg["prediction_error"] == pytest.approx(
        fdg["predicted_run_speedup"] / fdg["speedup"] - 1)
    assert got[(CEILING, 2)]["prediction_error"] is None
    predicted = {(p["algo"], p["workers"]) for p in result["predictions"]}
    assert {("fdg", 2), ("fdg", 3), ("bp", 3)} <= predicted
    assert (out / "bench.md").read_text().startswith("# dpbp bench")
    assert (out / "bench.png").stat().st_size > 1000
    assert result["machine"]["torch"] and len(result["profile"]["forward"]) > 1


@pytest.mark.slow
def test_bench_rejects_an_unknown_algo(tmp_path):
    r = run_cli("bench", "algos=[bp,nope]", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert r.returncode == 2 and "unknown algo nope" in r.stderr
    r = run_cli("bench", "split=blocks", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert r.returncode == 2 and "split must be time or flops, not 'blocks'" in r.stderr
