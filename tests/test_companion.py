"""Companions in whole runs (DGL's auxiliary heads, DNI's gradient predictors): identical numbers
under executor=local and executor=dist, exact resume with the companions' weights, optimizer
state and predictions in flight, and their cost reported apart from the network's.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_cfg
from test_executor import config, stage_params
from test_resume import assert_same_run, settings, signal_at, stage_files

from dpbp import algos, p2p
from dpbp.bench import plan
from dpbp.build import build_model, resolve_balance
from dpbp.data import load_dataset
from dpbp.errors import ConfigError, Interrupted
from dpbp.interrupt import StopRequest
from dpbp.launch import aux_parameters, launch
from dpbp.simulate import Profile, simulate
from dpbp.stage import Stage
from dpbp.train import train

LOCAL_MODELS = [n for n in algos.names() if algos.get(n).companion is not None]


def companions(run_dir, k):
    return [c["companion"] for c in stage_files(run_dir, k)]


def assert_same_companions(dir_a, dir_b, k):
    for a, b in zip(companions(dir_a, k), companions(dir_b, k), strict=True):
        if a is None:
            assert b is None
            continue
        for name in a["model"]:
            assert torch.equal(a["model"][name], b["model"][name]), name
        sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
        assert sa.keys() == sb.keys() and len(sa) > 0
        for i in sa:
            assert torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"])


def test_the_two_algorithms_have_companions():
    assert sorted(LOCAL_MODELS) == ["dgl", "dni"]


@pytest.mark.parametrize("algo", LOCAL_MODELS)
def test_signal_mid_epoch_and_resume_is_exact(tmp_path, algo):
    k = 3
    ref_dir = tmp_path / "ref"
    ref = train(make_cfg(*settings(algo, k)), ref_dir)
    stop = StopRequest()
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupted, match=r"stopped by SIGTERM at tick 15"):
        train(make_cfg(*settings(algo, k)), run_dir, logger_factory=signal_at(stop, 13),
              stop=stop)
    cks = stage_files(run_dir, k)
    # DNI: the last prediction of modules 1 and 2 waits for its target, which is in flight
    held = sum(len(c["companion"]["inflight"].get("pending", [])) for c in cks[:-1])
    assert held == (2 if algos.get(algo).boundary == "synthetic" else 0)
    assert sum(len(c["messages"]) for c in cks) > 0
    resumed = train(make_cfg(*settings(algo, k), "resume=true"), run_dir)
    assert_same_run(ref_dir, ref, run_dir, resumed, k)
    assert_same_companions(ref_dir, run_dir, k)


@pytest.mark.parametrize("algo", LOCAL_MODELS)
def test_the_companions_cost_is_reported_per_module(tmp_path, algo):
    cfg = config(algo, 3, "local", max_steps=4, epochs=1)
    s = train(cfg, tmp_path)
    assert len(s["aux_parameters"]) == 3 and s["aux_parameters"][-1] == 0
    # the run header (launch.print_split) counts the same
    ds = load_dataset(cfg.data, "cpu", seed=cfg.seed)
    blocks = build_model(cfg, ds)
    counts = resolve_balance(cfg, blocks, ds, torch.device("cpu"))
    assert aux_parameters(cfg, blocks, counts, ds) == s["aux_parameters"]
    assert all(n > 0 for n in s["aux_parameters"][:-1]) and all(f > 0 for f in s["aux_flops"][:-1])
    # SGD with momentum: the weights and as many momentum bytes (float32)
    assert s["aux_parameter_bytes"] == [8 * n for n in s["aux_parameters"]]
    assert s["num_parameters"] == train(config("bp", 1, "local", max_steps=4, epochs=1),
                                        tmp_path / "bp")["num_parameters"]


def test_dgl_steps_every_module_on_every_batch_and_dni_too(tmp_path):
    steps = 30
    s = train(config("dgl", 3, "local"), tmp_path / "dgl")
    assert s["updates"] == [steps] * 3  # no fill: no module waits for a gradient
    s = train(config("dni", 3, "local"), tmp_path / "dni")
    assert s["updates"] == [steps] * 3


@pytest.mark.parametrize("key,value,msg", [("n_lin", -1, "algo.n_lin=-1"),
                                           ("kernel", 4, "algo.kernel=4 an odd number")])
def test_bad_companion_options_are_one_sentence(key, value, msg):
    algo = "dgl" if key == "n_lin" else "dni"
    with pytest.raises(ConfigError, match=msg):
        make_cfg(f"algo={algo}", "gpus=2", f"algo.{key}={value}")


@pytest.mark.slow
@pytest.mark.parametrize("algo,k", [(a, 3) for a in LOCAL_MODELS])
def test_local_and_dist_give_identical_results(tmp_path, algo, k):
    """K = 3 has a first, a middle and a last module, so every kind of module and boundary
    (activations up; DNI's gradients down into a predictor) is exercised. K = 2 and 4 passed
    too when run (parametrize k over 2, 3, 4); they are left out to keep the suite's time (a K = 4
    dist run costs about 40 s here)."""
    local_dir, dist_dir = tmp_path / "local", tmp_path / "dist"
    local = train(config(algo, k, "local", max_steps=12), local_dir)
    dist = launch(config(algo, k, "dist", max_steps=12), dist_dir)
    for key in ("final_test_acc", "final_test_loss", "updates", "history_memory_bytes",
                "aux_parameters", "aux_flops"):
        assert local[key] == dist[key], key
    untimed = [[{k: v for k, v in e.items() if k != "train_seconds"} for e in s["history"]]
               for s in (local, dist)]
    assert untimed[0] == untimed[1]
    for a, b in zip(stage_params(local_dir, k), stage_params(dist_dir, k), strict=True):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    assert_same_companions(local_dir, dist_dir, k)


def test_the_simulator_models_dgl_without_and_dni_with_a_dependency_on_the_next_module():
    """Forward 1 and backward 2 per module (plain BP: 6 per batch). DGL: module 1 runs
    F B per batch, module 2 one tick behind: 3N+1, twice BP's throughput; its head's time
    (Profile.aux) adds to module 1's backward. DNI: module 1's backward of batch t waits for
    module 2's gradient of batch t-1 (its predictor's target): the same 3N+1 here."""
    two = Profile(forward=(1, 1), backward=(2, 2))
    assert [simulate("dgl", two, n).makespan for n in (1, 2, 5)] == [4, 7, 16]
    assert simulate("dgl", Profile(forward=(1, 1), backward=(2, 2), aux=(0.5, 0)),
                    5).makespan == 18
    dni = simulate("dni", two, 5)
    assert dni.makespan == 16
    spans = {label: (start, end) for label, start, end in dni.spans[0]}
    assert spans["B1"] == (4, 6)  # waited from 3 to 4 for module 2's gradient of batch 0


def test_bench_plans_dgl_and_dni_rows():
    names = [c.name for c in plan(["bp", "dgl", "dni"], [1, 2], True)]
    assert "dgl-w2" in names and "dni-w2" in names and "dgl-w1" not in names


def test_dpbp_schedule_prints_dgl_and_dni(capsys):
    from dpbp import cli

    assert cli.main(["schedule", "dgl", "3"]) == 0
    out = capsys.readouterr().out
    assert "<A0 F0 B0 S" in out and ">G" not in out.split("\n", 2)[2]
    assert cli.main(["schedule", "dni", "3"]) == 0
    out = capsys.readouterr().out
    assert "F1 >A1 <G0 L0 B1 S" in out and "trains the gradient predictor" in out


@pytest.mark.parametrize("algo", LOCAL_MODELS)
def test_a_finished_run_is_not_extended(tmp_path, algo):
    """DGL drained its pipelined forward, DNI dropped its last predictors' targets: more epochs
    would not equal a longer run."""
    train(make_cfg(*settings(algo, 2), "trainer.epochs=1"), tmp_path)
    with pytest.raises(ConfigError, match="drained"):
        train(make_cfg(*settings(algo, 2), "trainer.epochs=2", "resume=true"), tmp_path)


@pytest.mark.parametrize("algo", LOCAL_MODELS)
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_schedules_never_deadlock_under_nccl_ordering(monkeypatch, algo, k):
    """test_dist's NCCL-ordered simulation of p2p.P2P (messages matched by order per
    communicator), with every module k < K given its companion."""
    import test_dist

    options = make_cfg(f"algo={algo}", "gpus=2").algo

    def stage(module, s, num_stages, name, optimizer, **kw):
        build = algos.get(name).companion
        companion = None if s == num_stages - 1 else build(
            options, (3,), 3, torch.device("cpu"),
            lambda m: torch.optim.SGD(m.parameters(), lr=0.1), 0.1)
        return Stage(module, s, num_stages, name, optimizer, companion=companion, **kw)

    monkeypatch.setattr(test_dist, "Stage", stage)
    test_dist.run_ranks(algo, k, num_batches=12, chunk=3, groups_for=p2p.make_groups)


def test_report_notes_the_auxiliary_models_and_shows_the_papers_dgl_numbers():
    from dpbp.paper import paper_accuracy
    from dpbp.report import aux_notes

    rows = [{"algo": "dgl", "modules": 2, "settings": "", "aux_parameters": [1234, 0],
             "aux_flops": [2e6, 0]},
            {"algo": "bp", "modules": 1, "settings": "", "aux_parameters": None}]
    assert aux_notes(rows) == [
        "Auxiliary models of dgl K=2 (not in the network's parameters): 1,234 / 0 parameters "
        "and 2.00 / 0.00 MFLOPs per sample, per module."]
    # the FDG paper's DGL reruns (test error 6.77 / 8.88 / 9.65 % at K = 2 / 3 / 4)
    assert [paper_accuracy("cifar10", "resnet56", "dgl", k) for k in (2, 3, 4)] == \
        [93.23, 91.12, 90.35]
    assert paper_accuracy("cifar10", "resnet56", "dni", 2) is None
