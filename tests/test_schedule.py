"""The schedule as data: delays, fill, drain, and that every message sent is received."""

import pytest

from dpbp import schedule
from dpbp.schedule import BACKWARD, FORWARD, RECV_ACT, RECV_GRAD, SEND_ACT, SEND_GRAD, STEP


def events(algo, k, nb):
    """{stage: [(tick, instr)]} over the whole run."""
    end = schedule.num_ticks(algo, k, nb)
    return {
        s: [(t, i) for t in range(end) for i in schedule.tick_program(algo, s, k, t, nb, end)]
        for s in range(k)
    }


@pytest.mark.parametrize("algo", ["bp", "ddg", "fr", "fdg"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_every_send_has_its_receive(algo, k):
    ev = events(algo, k, nb=9)
    for s in range(k):
        sent_up = [i.batch for _, i in ev[s] if i.op == SEND_ACT]
        sent_down = [i.batch for _, i in ev[s] if i.op == SEND_GRAD]
        if s + 1 < k:
            assert sent_up == [i.batch for _, i in ev[s + 1] if i.op == RECV_ACT]
        else:
            assert sent_up == []
        if s > 0:
            assert sent_down == [i.batch for _, i in ev[s - 1] if i.op == RECV_GRAD]
        else:
            assert sent_down == []


@pytest.mark.parametrize("k", [2, 3, 4])
def test_ddg_and_fr_delays(k):
    nb = 10
    for algo in ("ddg", "fr"):
        ev = events(algo, k, nb)
        for s in range(k):
            fwd = {i.batch: t for t, i in ev[s] if i.op == FORWARD}
            bwd = {i.batch: t for t, i in ev[s] if i.op == BACKWARD}
            assert sorted(fwd) == list(range(nb))  # forward at tick t is batch t
            assert all(fwd[b] == b for b in fwd)
            d = k - 1 - s  # the papers' K - k
            # fill: no backward before tick d; then batch t-d at tick t; the rest is dropped
            assert bwd == {b: b + d for b in range(nb - d)}


@pytest.mark.parametrize("k", [2, 3, 4])
def test_fdg_delays(k):
    nb = 12
    ev = events("fdg", k, nb)
    for s in range(k):
        fwd = {i.batch: t for t, i in ev[s] if i.op == FORWARD}
        bwd = {i.batch: t for t, i in ev[s] if i.op == BACKWARD}
        assert fwd == {b: b + s for b in range(nb)}  # stage s forwards batch t-s
        d = 2 * (k - 1 - s)
        # the gradient of a batch arrives 2(K-k) ticks after its forward here
        for b, t in bwd.items():
            assert t - fwd[b] == d
        end = schedule.num_ticks("fdg", k, nb)
        assert sorted(bwd) == [b for b in range(nb) if fwd[b] + d < end]


def test_fdg_stages_only_use_messages_of_the_previous_tick():
    k, nb = 3, 8
    ev = events("fdg", k, nb)
    sent = {(s, i.op, i.batch): t for s in ev for t, i in ev[s] if i.op in (SEND_ACT, SEND_GRAD)}
    for s in ev:
        for t, i in ev[s]:
            if i.op == RECV_ACT:
                assert sent[(s - 1, SEND_ACT, i.batch)] == t - 1
            if i.op == RECV_GRAD:
                assert sent[(s + 1, SEND_GRAD, i.batch)] == t - 1


def test_bp_is_sequential_within_a_tick():
    ev = events("bp", 3, 4)
    for s in ev:
        for t, i in ev[s]:
            assert i.batch == t
    assert [str(i) for t, i in ev[1] if t == 2] == ["<A2", "F2", ">A2", "<G2", "B2", ">G2", "S"]


def test_last_stage_steps_every_tick_and_sends_no_activation():
    for algo in ("bp", "ddg", "fr", "fdg"):
        ev = events(algo, 3, 6)
        ops = [i.op for _, i in ev[2]]
        assert ops.count(STEP) == 6 and SEND_ACT not in ops and RECV_GRAD not in ops


def test_format_table_shows_the_fill():
    table = schedule.format_table("fdg", 2, 4)
    lines = table.splitlines()
    assert lines[0].startswith("stage")
    assert len(lines) == 3
    # tick 0: stage 0 only forwards batch 0; stage 1 is idle
    row0 = [c.strip() for c in lines[1].split("|")]
    row1 = [c.strip() for c in lines[2].split("|")]
    assert row0[1] == "F0 >A0" and row1[1] == ""
    assert row1[2] == "<A0 F0 B0 >G0 S"
    assert row0[3] == "F2 >A2 <G0 B0 S"


@pytest.mark.parametrize("algo", ["bp", "ddg", "fr", "fdg", "dp_fdg"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_carried_is_what_is_in_flight_between_two_ticks(algo, k):
    """Brute force over the whole run: a message is in flight at tick T when its send happens
    before T and its receive at T or later; `carried` must name exactly those, all sent at T-1."""
    nb = 9
    end = schedule.num_ticks(algo, k, nb)
    ev = events(algo, k, nb)
    sent = {(s, i.op, i.batch): t for s in range(k) for t, i in ev[s]
            if i.op in (SEND_ACT, SEND_GRAD)}
    taken = {(s, i.op, i.batch): t for s in range(k) for t, i in ev[s]
             if i.op in (RECV_ACT, RECV_GRAD)}
    for tick in range(end + 1):
        for s in range(k):
            expected = []
            for (src, op, b), t in sent.items():
                peer, recv = (src + 1, RECV_ACT) if op == SEND_ACT else (src - 1, RECV_GRAD)
                if src == s and t < tick <= taken[(peer, recv, b)]:
                    expected.append((op, b))
                    assert t == tick - 1
            got = [(i.op, i.batch) for i in schedule.carried(algo, s, k, tick, nb, end)]
            assert sorted(got) == sorted(expected), (tick, s)
    anything = any(schedule.carried(algo, s, k, t, nb, end) for s in range(k)
                   for t in range(end))
    assert anything == (algo != "bp" and k > 1)  # bp finishes each batch within its tick


def test_format_table_fits_100_columns_in_blocks_of_ticks():
    table = schedule.format_table("fdg", 3, 8)
    assert max(len(line) for line in table.splitlines()) <= 100
    blocks = table.split("\n\n")
    assert len(blocks) > 1 and all(len(b.splitlines()) == 4 for b in blocks)
    heads = [b.splitlines()[0] for b in blocks]
    ticks = [int(c.strip()[2:]) for h in heads for c in h.split("|")[1:]]
    assert ticks == list(range(schedule.num_ticks("fdg", 3, 8)))  # every tick, once, in order
