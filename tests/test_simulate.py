"""The throughput simulator on hand-computed schedules (exact: every time is a sum of halves)."""

import pytest

from dpbp import schedule
from dpbp.simulate import (
    RECV,
    RUN,
    SEND,
    SYNC,
    Op,
    Profile,
    bp_one_device,
    execute,
    pipeline_order,
    predict_speedup,
    simulate,
)

# K=2, forward 1 and backward 2 per module and batch: one batch is 6 seconds of plain BP
TWO = Profile(forward=(1, 1), backward=(2, 2))


def makespans(algo, profile, batches, **kw):
    return [simulate(algo, profile, n, **kw).makespan for n in batches]


def test_bp_is_locked():
    # per batch: F0 1, F1 1, B1 2, B0 2, one stage at a time
    assert makespans("bp", TWO, [1, 2, 5]) == [6, 12, 30]
    r = simulate("bp", TWO, 5)
    assert r.busy == (15, 15) and r.idle == (15, 15)
    assert r.speedup(bp_one_device(TWO)) == 1


def test_ddg_makespan():
    # stage 0 at tick t: F_t >A_t <G_{t-1} B_{t-1}; stage 1: <A_t F_t B_t >G_t (time: start-end)
    #   stage 0: F0 0-1  F1 1-2  B0 4-6  F2 6-7  B1 7-9   F3 9-10  B2 10-12 ...
    #   stage 1: F0 1-2  B0 2-4  F1 4-5  B1 5-7  F2 7-8  B2 8-10   F3 10-11 B3 11-13 ...
    # stage 1 ends batch n at 3n+4; stage 0 drops the last gradient and ends B_{N-2} at 3N
    assert makespans("ddg", TWO, [1, 2, 5]) == [4, 7, 16]
    r = simulate("ddg", TWO, 5)
    assert r.busy == (5 * 1 + 4 * 2, 5 * 3)
    assert r.spans[0][:5] == (("F0", 0, 1), ("F1", 1, 2), ("B0", 4, 6), ("S", 6, 6),
                              ("F2", 6, 7))


def test_fdg_makespan():
    # stage 0 at tick t: F_t, then <G_{t-2} B_{t-2}; stage 1 at tick t: <A_{t-1} F B >G
    #   stage 0: F0 0-1  F1 1-2  F2 2-3  B0 4-6  F3 6-7  B1 7-9  F4 9-10  B2 10-12 ...
    #   stage 1:         F0 1-2  B0 2-4  F1 4-5  B1 5-7  F2 7-8  B2 8-10  ...
    # without transfer time this is DDG's timeline with the forwards regrouped: 3N+1
    assert makespans("fdg", TWO, [1, 2, 5]) == [4, 7, 16]
    assert simulate("fdg", TWO, 5).busy == (13, 15)


def test_fr_replays_the_forward_on_all_but_the_last_stage():
    # as DDG, but stage 0's backward is replay 1 + backward 2:
    #   stage 0: F0 0-1  F1 1-2  B0 4-7  F2 7-8  B1 8-11  F3 11-12 B2 12-15 ...
    #   stage 1: F0 1-2  B0 2-4  F1 4-5  B1 5-7  F2 8-9   B2 9-11  F3 12-13 B3 13-15 ...
    # a tick is 4 seconds once both stages wait for each other: 4N-1 from N=2
    assert makespans("fr", TWO, [1, 2, 3, 5]) == [4, 7, 11, 19]
    r = simulate("fr", TWO, 5)
    assert [s for s in r.spans[0] if s[0] == "B0"] == [("B0", 4, 7)]
    assert r.busy == (5 * 1 + 4 * 3, 5 * 3)  # the last stage does not replay


def test_transfer_time():
    slow = Profile(forward=(1, 1), backward=(2, 2), transfer=(1,))
    # bp: the activation and the gradient each cross once per batch: 6 + 2
    assert makespans("bp", slow, [1, 2, 5]) == [8, 16, 40]
    # fdg: stage 1 forwards at tick t what stage 0 sent at tick t-1, so the transfer hides
    # behind the other stage's work except on the way in: 3N+2 instead of 3N+1
    #   stage 0: F0 0-1  F1 1-2  F2 2-3  B0 6-8 (G0 sent at 5, arrives 6)  F3 8-9  B1 9-11 ...
    #   stage 1:         F0 2-3  B0 3-5  F1 5-6  B1 6-8  F2 8-9  B2 9-11  F3 11-12 B3 12-14 ...
    assert makespans("fdg", slow, [1, 2, 3, 5]) == [5, 8, 11, 17]
    # ddg: stage 1's forward of batch t waits for stage 0's forward of the same tick
    #   stage 0: F0 0-1  F1 1-2  B0 6-8  F2 8-9   B1 9-11
    #   stage 1: F0 2-3  B0 3-5  F1 5-6  B1 6-8   F2 10-11 B2 11-13  (A2 arrives at 10)
    assert makespans("ddg", slow, [3]) == [13]


@pytest.mark.parametrize("algo,kw", [
    ("bp", {}), ("ddg", {}), ("fr", {}), ("fdg", {}), ("dp_fdg", {}), ("ddp", {}),
    ("gpipe", {"microbatches": 2}), ("gpipe", {"microbatches": 4, "pipeline": "1f1b"}),
])
def test_one_module_is_plain_backprop(algo, kw):
    one = Profile(forward=(1.5,), backward=(2.5,), step=(0.5,))
    assert bp_one_device(one) == 4.5
    r = simulate(algo, one, 7, **kw)
    assert r.makespan == 7 * 4.5 and r.idle == (0,)
    assert predict_speedup(algo, one, **kw) == 1


@pytest.mark.parametrize("k", [2, 3, 4])
def test_steady_state_speedup_of_balanced_modules(k):
    balanced = Profile(forward=(1,) * k, backward=(2,) * k)
    for algo in ("ddg", "fdg"):
        assert k * 0.9 < predict_speedup(algo, balanced, num_batches=200) < k + 1e-9
    assert predict_speedup("bp", balanced, num_batches=200) == 1


def test_gpipe_and_1f1b_gantt():
    # K=2, M=2: a microbatch takes F 1 and B 2 on each stage; backwards in microbatch order
    #   GPipe            0   1   2   3   4   5   6   7   8   9
    #   stage 0          F0  F1  .   .   .   B0----  B1----|
    #   stage 1          .   F0  F1  B0----  B1----  .   .
    #   1F1B
    #   stage 0          F0  F1  .   .   B0----  .   B1----|
    #   stage 1          .   F0  B0----  F1  B1----  .   .
    # both flush at 9 = (M+K-1) * 3, the next batch starts there
    p = Profile(forward=(2, 2), backward=(4, 4))
    g = simulate("gpipe", p, 2, microbatches=2)
    assert g.spans[0][:5] == (("F0.0", 0, 1), ("F0.1", 1, 2), ("B0.0", 5, 7), ("B0.1", 7, 9),
                              ("S0", 9, 9))
    assert g.spans[1][:4] == (("F0.0", 1, 2), ("F0.1", 2, 3), ("B0.0", 3, 5), ("B0.1", 5, 7))
    assert g.spans[0][5] == ("F1.0", 9, 10)
    assert g.makespan == 18
    f = simulate("gpipe", p, 2, microbatches=2, pipeline="1f1b")
    assert f.spans[0][:4] == (("F0.0", 0, 1), ("F0.1", 1, 2), ("B0.0", 4, 6), ("B0.1", 7, 9))
    assert f.spans[1][:4] == (("F0.0", 1, 2), ("B0.0", 2, 4), ("F0.1", 4, 5), ("B0.1", 5, 7))
    assert f.makespan == 18


def test_pipeline_orders():
    assert pipeline_order("gpipe", 0, 2, 3) == ["F0", "F1", "F2", "B0", "B1", "B2"]
    assert pipeline_order("1f1b", 0, 4, 6) == ["F0", "F1", "F2", "F3", "B0", "F4", "B1", "F5",
                                               "B2", "B3", "B4", "B5"]
    assert pipeline_order("1f1b", 3, 4, 3) == ["F0", "B0", "F1", "B1", "F2", "B2"]
    with pytest.raises(ValueError, match="unknown pipeline"):
        pipeline_order("zb", 0, 2, 2)


def test_dp_fdg_replicas():
    two = simulate("dp_fdg", TWO, 5, replicas=2)
    assert two.makespan == simulate("fdg", TWO, 5).makespan
    assert two.throughput == 2 * simulate("fdg", TWO, 5).throughput
    assert len(two.busy) == 4
    # one module: every batch is F, B, all-reduce, step
    one = Profile(forward=(1,), backward=(2,), step=(0.5,), allreduce=(0.5,))
    assert simulate("dp_fdg", one, 4, replicas=2).makespan == 4 * 4
    assert simulate("dp_fdg", one, 4, replicas=1).makespan == 4 * 3.5  # nothing to reduce
    # K=2, N=2, all-reduce 1 before each step (G0 leaves stage 1 before its all-reduce):
    #   stage 0: F0 0-1  F1 1-2  B0 4-6  AR 6-7
    #   stage 1: F0 1-2  B0 2-4  AR 4-5  F1 5-6  B1 6-8  AR 8-9   (fdg without: 7)
    ar = Profile(forward=(1, 1), backward=(2, 2), allreduce=(1, 1))
    assert simulate("dp_fdg", ar, 2, replicas=2).makespan == 9


def test_ddp():
    one = Profile(forward=(1,), backward=(2,), step=(0.5,), allreduce=(1,))
    r = simulate("ddp", one, 3, replicas=4)
    assert r.makespan == 3 * 4.5 and r.throughput == 12 / 13.5
    # two buckets: the all-reduce of module 1 overlaps the backward of module 0
    #   compute: F 0-2  B1 2-4  B0 4-6  (wait)  S 7   network: AR1 4-5  AR0 6-7
    two = Profile(forward=(1, 1), backward=(2, 2), allreduce=(1, 1))
    assert simulate("ddp", two, 3, replicas=2).makespan == 3 * 8
    over = simulate("ddp", two, 3, replicas=2, overlap=True)
    assert over.makespan == 3 * 7 and len(over.busy) == 2


def test_tick_algorithms_run_the_schedule():
    k, n = 3, 4
    r = simulate("ddg", Profile(forward=(1,) * k, backward=(2,) * k), n)
    end = schedule.num_ticks("ddg", k, n)
    for s in range(k):
        ops = [str(i) for i in schedule.program("ddg", s, k, range(end), n, end)
               if i.op in ("F", "B", "S")]
        assert [label for label, _, _ in r.spans[s]] == ops


def test_execute_barrier_waits_for_the_slowest():
    t = execute([[Op(RUN, 1), Op(SYNC, 0.5, "ar", group=2), Op(RUN, 1)],
                 [Op(RUN, 3), Op(SYNC, 0.5, "ar", group=2)]])
    assert t.end == [4.5, 3.5] and t.busy == [2, 3]


def test_execute_async_send():
    t = execute([[Op(RUN, 1), Op(SEND, 2, "m"), Op(RUN, 1)], [Op(RECV, 0, "m"), Op(RUN, 1)]])
    assert t.end == [2, 4]  # the sender does not wait; the message lands at 3


def test_deadlock_is_reported():
    with pytest.raises(ValueError, match="deadlock.*stage 1 at <G0"):
        execute([[Op(RUN, 1)], [Op(RECV, 0, "never", "<G0")]], ["stage 0", "stage 1"])
    with pytest.raises(ValueError, match="deadlock.*device 0 at AR"):
        execute([[Op(SYNC, 1, "ar", "AR", group=2)]])
    with pytest.raises(ValueError, match="sent twice"):
        execute([[Op(SEND, 0, "m"), Op(SEND, 0, "m")]])


def test_from_blocks():
    p = Profile.from_blocks([1, 2, 3, 4, 5], [2, 4, 6, 8, 10], [2, 3],
                            block_transfer=[0.5, 0.25, 1, 2], block_allreduce=[1, 1, 1, 1, 1])
    assert p == Profile(forward=(3, 12), backward=(6, 24), step=(0, 0), transfer=(0.25,),
                        allreduce=(2, 3))
    assert Profile.from_blocks([1, 2, 3], [1, 1, 1], [1, 1, 1]).forward == (1, 2, 3)
    with pytest.raises(ValueError, match="add up to the 5 blocks"):
        Profile.from_blocks([1] * 5, [1] * 5, [2, 2])
    with pytest.raises(ValueError, match=">= 1"):
        Profile.from_blocks([1] * 2, [1] * 2, [2, 0])
    with pytest.raises(ValueError, match="block_backward has 4 entries, expected 5"):
        Profile.from_blocks([1] * 5, [1] * 4, [2, 3])
    with pytest.raises(ValueError, match="block_transfer has 5 entries, expected 4"):
        Profile.from_blocks([1] * 5, [1] * 5, [2, 3], block_transfer=[1] * 5)


def test_profile_validation():
    p = Profile(forward=[1, 2], backward=[3, 4])
    assert p.step == (0, 0) and p.transfer == (0,) and p.allreduce == (0, 0) and p.modules == 2
    with pytest.raises(ValueError, match="one forward and one backward"):
        Profile(forward=(1, 2), backward=(1,))
    with pytest.raises(ValueError, match="transfer has 2 entries, expected 1"):
        Profile(forward=(1, 2), backward=(1, 1), transfer=(1, 1))
    with pytest.raises(ValueError, match="negative"):
        Profile(forward=(1, -2), backward=(1, 1))


def test_simulate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown algo"):
        simulate("pipedream", TWO, 2)
    with pytest.raises(ValueError, match="only ddp and dp_fdg take replicas"):
        simulate("fdg", TWO, 2, replicas=2)
    with pytest.raises(ValueError, match="at least 1"):
        simulate("bp", TWO, 0)
