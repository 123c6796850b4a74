"""ADL (dpbp/algos/adl.py) and weight prediction (keep.Predicted), checked exactly against
hand-written float64 references of their rules.

The network and data are test_stage's (module 1: Linear-Tanh-Linear-Tanh, module 2: Linear +
cross-entropy), here with momentum SGD and weight decay, as torch.optim.SGD defines them:
d = g + wd * w; v = d (first step) or mu * v + d; w = w - lr * v.

- ADL with M: FDG's schedule (K = 2: module 2 trains on batch t-1 at tick t, module 1 applies the
  gradient of batch t-2 scaled by beta), but each module sums the gradients of M backward passes
  and updates after batch j when (j + 1) % M == 0.
- Weight prediction (SpecTrain): the forward of batch b on module 1 runs on
  w - lr * tau * v, tau = b // M - (b - in_flight) // M updates ahead (M = 1: the batches in
  flight), and its gradient is taken at exactly those weights; for Features Replay the forward
  sent up runs on them and the replay on the current weights.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_cfg
from test_resume import assert_same_run, signal_at
from test_stage import LR, NB, Feed, f1, f2_grads, g1, modules

from dpbp import schedule
from dpbp.config import from_dict, validate
from dpbp.errors import ConfigError, Interrupted
from dpbp.executor import LocalExecutor
from dpbp.interrupt import StopRequest
from dpbp.stage import Stage
from dpbp.train import train

MOM, WD = 0.9, 1e-3


def stages(algo: str, m: int, predict: bool, beta: float) -> tuple[list[Stage], list]:
    m1, m2 = modules()
    out = [Stage(mod, k, 2, algo, torch.optim.SGD(mod.parameters(), lr=LR, momentum=MOM,
                                                  weight_decay=WD),
                 beta=beta, accumulate=m, predict=predict)
           for k, mod in enumerate((m1, m2))]
    return out, [*m1.parameters(), *m2.parameters()]


def run(algo: str, m: int = 1, predict: bool = False, beta: float = 1.0) -> list[torch.Tensor]:
    st, params = stages(algo, m, predict, beta)
    end = schedule.num_ticks(algo, 2, NB)
    LocalExecutor(st, Feed()).run([schedule.program(algo, s, 2, range(end), NB, end, m)
                                   for s in range(2)])
    return [p.detach() for p in params]


# -- the reference ------------------------------------------------------------------------------


def sgd(w, v, grads):
    """torch.optim.SGD's step with momentum and weight decay."""
    d = [g + WD * x for g, x in zip(grads, w)]
    v = [di.clone() for di in d] if v is None else [MOM * vi + di for vi, di in zip(v, d)]
    return [x - LR * vi for x, vi in zip(w, v)], v


def add(acc, grads):
    return list(grads) if acc is None else [a + g for a, g in zip(acc, grads)]


def reference(algo, m=1, predict=False, beta=1.0, mean=False, tau_shift=0):
    """`mean` (divide the sum by M) and `tau_shift` perturb the rules, to show the check bites."""
    m1, m2 = modules()
    w1 = [p.detach().clone() for p in m1.parameters()]
    w2 = [p.detach().clone() for p in m2.parameters()]
    v1 = v2 = acc1 = acc2 = None
    feed = Feed()
    pipelined = algo not in ("ddg", "fr")
    d = 2 if pipelined else 1
    used, acts, delta, in_flight = {}, {}, {}, []

    def step(w, v, acc):
        return sgd(w, v, [a / m for a in acc] if mean else acc)

    for t in range(NB + (1 if pipelined else 0)):
        b1, b2 = t, (t - 1 if pipelined else t)
        if b1 < NB:  # module 1 forwards batch t on the current or the predicted weights
            tau = b1 // m - (b1 - len(in_flight)) // m + tau_shift
            w = w1 if not predict or v1 is None or tau == 0 else [
                x - LR * tau * vi for x, vi in zip(w1, v1)]
            used[b1], acts[b1] = w, f1(feed.x[b1], w)
            in_flight.append(b1)
        if 0 <= b2 < NB:  # module 2: no delay
            g2, delta[b2] = f2_grads(acts[b2][1], feed.y[b2], w2)
            acc2 = add(acc2, g2)
            if (b2 + 1) % m == 0:
                (w2, v2), acc2 = step(w2, v2, acc2), None
        g = b1 - d
        if 0 <= g < NB:  # module 1: the delayed batch, at the weights its forward used
            in_flight.remove(g)
            x = feed.x[g]
            acc1 = add(acc1, g1(x, f1(x, w1), w1, delta[g]) if algo == "fr" else  # replay
                       g1(x, acts[g], used[g], delta[g] * beta))
            if (g + 1) % m == 0:
                (w1, v1), acc1 = step(w1, v1, acc1), None
    return w1 + w2


CASES = [("adl", 2, False, 1.0), ("adl", 3, False, 0.5), ("adl", 2, True, 0.5),
         ("fdg", 1, True, 1.0), ("fdg", 1, True, 0.5), ("ddg", 1, True, 1.0),
         ("fr", 1, True, 1.0), ("fr", 1, False, 1.0),
         ("adl", 1, False, 1.0)]


@pytest.mark.parametrize("algo,m,predict,beta", CASES)
def test_update_rule_matches_the_reference(algo, m, predict, beta):
    for g, w in zip(run(algo, m, predict, beta), reference(algo, m, predict, beta), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_adl_with_m_1_is_fdg():
    for a, b in zip(run("adl", 1, beta=0.5), run("fdg", 1, beta=0.5), strict=True):
        assert torch.equal(a, b)


def test_the_reference_tells_the_variants_apart():
    """So that the check above can fail: accumulation, the sum (not the mean), prediction and
    its exact tau each change module 1's weights."""
    base = reference("adl", 2, beta=0.5)[0]
    assert not torch.allclose(base, reference("fdg", 1, beta=0.5)[0])
    assert not torch.allclose(base, reference("adl", 2, beta=0.5, mean=True)[0])
    assert not torch.allclose(reference("fr", predict=True)[0], reference("fr")[0])
    pred = reference("fdg", 1, predict=True)[0]
    assert not torch.allclose(pred, reference("fdg", 1)[0])
    assert not torch.allclose(pred, reference("fdg", 1, predict=True, tau_shift=1)[0])
    adl_pred = reference("adl", 2, predict=True)[0]
    assert not torch.allclose(adl_pred, reference("adl", 2, predict=True, tau_shift=1)[0])


def test_a_perturbed_rule_is_detected():
    got = run("adl", 2, True, 0.5)
    wrong = reference("adl", 2, True, 0.5, tau_shift=1)
    assert not all(torch.allclose(g, w, rtol=1e-12, atol=1e-12) for g, w in zip(got, wrong))


@pytest.mark.parametrize("algo,m,ticks,tau", [("fdg", 1, 5, 2), ("ddg", 1, 5, 1),
                                              ("adl", 2, 5, 1), ("adl", 2, 6, 1),
                                              ("adl", 3, 6, 1), ("adl", 4, 6, 0)])
def test_the_forward_runs_on_and_stashes_the_extrapolated_weights(algo, m, ticks, tau):
    """After `ticks` ticks, module 1's next forward runs on w - lr * tau * v (tau updates until
    its gradient is applied), and those exact tensors are what its backward will use."""
    st, _ = stages(algo, m, True, 1.0)
    end = schedule.num_ticks(algo, 2, NB)
    LocalExecutor(st, Feed()).run([schedule.program(algo, s, 2, range(ticks), NB, end, m)
                                   for s in range(2)])
    s0 = st[0]
    assert s0.lookahead(ticks) == tau
    want = {n: p.detach() - LR * tau * s0.optimizer.state[p]["momentum_buffer"]
            for n, p in s0.params.items()}
    s0.forward(ticks, Feed().x[ticks])
    got = s0.pending[ticks].weights
    for n in want:
        torch.testing.assert_close(got[n].detach(), want[n], rtol=1e-15, atol=1e-15)
        assert (tau == 0) == torch.equal(got[n].detach(), s0.params[n].detach())


@pytest.mark.parametrize("overrides,msg", [
    (("algo=adl", "algo.accumulate=0"), r"algo.accumulate=0 must be at least 1"),
    (("algo=fdg", "algo.weight_prediction=true", "algo.weights=live"),
     r"weight_prediction=true needs algo.weights=stash"),
    (("algo=ddg", "algo.weight_prediction=true", "optim.momentum=0"),
     r"needs optim.momentum > 0"),
    (("algo=fr", "algo.weight_prediction=true", "optim.momentum=0"),
     r"needs optim.momentum > 0"),
])
def test_bad_options_are_one_sentence(overrides, msg):
    from conftest import QUICK, compose_dict

    with pytest.raises(ConfigError, match=msg):
        validate(from_dict(compose_dict(*QUICK, "gpus=2", *overrides)))


def test_the_schedule_steps_every_m_backwards():
    lines = schedule.format_table("adl", 2, 6, accumulate=2).splitlines()
    steps = [sum(ln.count(" S") for ln in lines if ln.startswith(f"{s:5d} |")) for s in range(2)]
    assert steps == [2, 3]  # module 1: batches 1, 3 (5 arrives after the end); module 2: 1, 3, 5


RESUME = ("executor=local", "model.name=resnet8", "trainer.batch_size=128", "trainer.epochs=3",
          "trainer.check_every=4", "sched.milestones=[2]", "seed=4")


@pytest.mark.parametrize("algo,k,extra", [
    ("adl", 2, ("algo.accumulate=3", "algo.weight_prediction=true")),
    ("fr", 2, ("algo.weight_prediction=true",)),
])
def test_a_signal_mid_window_resumes_exactly(tmp_path, algo, k, extra):
    """Stopped at tick 15, inside an accumulation window (ADL: the summed gradients go into the
    checkpoint), resumed: the same run, bit for bit."""
    settings = (*RESUME, f"algo={algo}", f"gpus={k}", *extra)
    ref = train(make_cfg(*settings), tmp_path / "ref")
    stop = StopRequest()
    with pytest.raises(Interrupted, match=r"stopped by SIGTERM at tick 15"):
        train(make_cfg(*settings), tmp_path / "run", logger_factory=signal_at(stop, 13),
              stop=stop)
    ck = torch.load(tmp_path / "run" / "checkpoints" / "stage1.pt", weights_only=True)
    # module 2 has trained batches 0..13 by then: 12 and 13 wait for the update after 14
    assert bool(ck["inflight"]["grads"]) == (algo == "adl")
    resumed = train(make_cfg(*settings, "resume=true"), tmp_path / "run")
    assert_same_run(tmp_path / "ref", ref, tmp_path / "run", resumed, k)


def executor_cfg(algo: str, k: int, executor: str, extra: tuple[str, ...]):
    # 22 batches per epoch, max_steps=30: accumulation windows and the pipeline cross the epoch end
    return make_cfg(f"algo={algo}", f"gpus={k}", f"executor={executor}", "seed=1",
                    "model.name=resnet8",
                    "sched.milestones=[100]", "trainer.epochs=2", "trainer.max_steps=30",
                    "trainer.check_every=7", *extra)


@pytest.mark.slow
@pytest.mark.parametrize("k,extra", [
    (2, ("algo.accumulate=3", "algo.weight_prediction=true")),
    (3, ("algo.weight_prediction=true",)),
    (4, ("algo.weight_prediction=true",)),
])
def test_local_and_dist_give_identical_results(tmp_path, k, extra):
    from dpbp.launch import launch

    local = train(executor_cfg("adl", k, "local", extra), tmp_path / "local")
    dist = launch(executor_cfg("adl", k, "dist", extra), tmp_path / "dist")
    for key in ("final_test_acc", "final_test_loss", "updates", "history_memory_bytes"):
        assert local[key] == dist[key], key
    assert local["updates"][0] < 30  # module 1 updated once per M backwards, after its fill
    untimed = [[{key: v for key, v in e.items() if key != "train_seconds"} for e in s["history"]]
               for s in (local, dist)]
    assert untimed[0] == untimed[1]
    for s in range(k):
        a, b = (torch.load(d / "checkpoints" / f"stage{s}.pt", weights_only=True)
                for d in (tmp_path / "local", tmp_path / "dist"))
        for name in a["module"]:
            assert torch.equal(a["module"][name], b["module"][name]), name


def test_bench_plans_adl_and_lpp_sgd_rows_and_the_simulator_models_adl():
    """`dpbp bench algos=[adl,lpp_sgd]`: ADL like FDG (W >= 2), LPP-SGD like hogwild (W >= 1,
    not simulated); the simulator runs ADL's schedule as FDG's (its steps every tick: the
    step time of the M - 1 skipped steps is counted, a small overestimate)."""
    from dpbp.bench import plan
    from dpbp.simulate import Profile, simulate

    names = [c.name for c in plan(["adl", "lpp_sgd"], [1, 2, 4], False)]
    assert names == ["bp-w1", "lpp_sgd-w1", "adl-w2", "lpp_sgd-w2", "adl-w4", "lpp_sgd-w4"]
    two = Profile(forward=(1, 1), backward=(2, 2))
    assert simulate("adl", two, 5).makespan == simulate("fdg", two, 5).makespan


def test_dpbp_schedule_adl_shows_a_step_every_m_backwards(capsys):
    from dpbp import cli

    assert cli.main(["schedule", "adl", "2", "6", "algo.accumulate=3"]) == 0
    out = capsys.readouterr().out
    assert "a step after every 3 backwards" in out
    table = out.split("\n", 2)[2]  # below the two header lines
    assert table.count(" S") == 1 + 2  # module 1: batch 2; module 2: batches 2 and 5
    assert cli.main(["schedule", "adl", "2", "algo.accumulate=0"]) == 2
    assert "algo.accumulate=0 must be at least 1" in capsys.readouterr().err
    assert cli.main(["schedule", "adl", "2", "trainer.epochs=3"]) == 2
    assert "usage: dpbp schedule" in capsys.readouterr().err
