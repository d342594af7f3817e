"""The schedule simulator against timelines worked out by hand.

Costs are whole numbers of seconds so every start and end can be checked exactly: F = 1 and a
whole backward BW = 2 unless a test says otherwise (StageCost(1, 2) — B = 2, W = 0)."""

import pytest

from alexnet_pp.planning.simulate import StageCost, deepspeed_1f1b_order, simulate, zb_h1_order


def compute(timeline, stage):
    """(start, end, kind, micro-batch) of a stage's compute events, in order."""
    return [(e.start, e.end, e.kind, e.micro_batch) for e in timeline.stages[stage] if e.kind in ("F", "B", "W", "BW")]


def events(timeline, stage):
    return [(e.start, e.end, e.kind, e.micro_batch) for e in timeline.stages[stage]]


EQUAL = StageCost(1, 2)


def test_two_stages_two_micro_batches_follow_deepspeeds_order_and_take_nine_seconds():
    t = simulate("1f1b", [EQUAL, EQUAL], 2)
    assert compute(t, 0) == [(0, 1, "F", 0), (1, 2, "F", 1), (4, 6, "BW", 0), (7, 9, "BW", 1)]
    assert compute(t, 1) == [(1, 2, "F", 0), (2, 4, "BW", 0), (4, 5, "F", 1), (5, 7, "BW", 1)]
    assert t.makespan == t.step_time == 9  # (M + P − 1)(F + B)


def test_deepspeed_sends_the_next_activation_only_after_the_gradient_arrives():
    """With 0.5 s transfers stage 0 receives gradient 0 (from 4.5 to 5) before it sends activation
    1 (5 to 5.5), so stage 1 starts forward 1 at 5.5, not at 4.5 as a textbook 1F1B would."""
    t = simulate("1f1b", [EQUAL, EQUAL], 2, p2p_seconds=0.5)
    assert events(t, 0) == [(0, 1, "F", 0), (1, 1.5, "send", 0), (1.5, 2.5, "F", 1), (2.5, 5, "recv", 0),
                            (5, 5.5, "send", 1), (5.5, 7.5, "BW", 0), (7.5, 9, "recv", 1), (9, 11, "BW", 1)]
    assert events(t, 1) == [(0, 1.5, "recv", 0), (1.5, 2.5, "F", 0), (2.5, 4.5, "BW", 0), (4.5, 5, "send", 0),
                            (5, 5.5, "recv", 1), (5.5, 6.5, "F", 1), (6.5, 8.5, "BW", 1), (8.5, 9, "send", 1)]
    assert t.makespan == 11
    textbook = simulate("1f1b", [EQUAL, EQUAL], 2, p2p_seconds=0.5, comm="async")
    assert compute(textbook, 1)[2] == (4.5, 5.5, "F", 1)
    assert textbook.makespan == 10


def test_stages_sharing_one_core_slow_down_only_while_both_compute():
    """Two stages on one core's worth of two (speed 1/2 each while both compute, else 1), worked
    by hand: F1 on stage 0 and F0 on stage 1 share 1…3; BW0 of stage 0 runs at half speed beside
    stage 1's F1 and BW1 (5…9), and stage 1's BW1 speeds up when it computes alone from 9."""
    half = lambda k: 1.0 if k == 1 else 0.5  # noqa: E731
    for comm in ("async", "blocking"):
        t = simulate("1f1b", [EQUAL, EQUAL], 2, comm=comm, rate=half)
        assert compute(t, 0) == [(0, 1, "F", 0), (1, 3, "F", 1), (5, 9, "BW", 0), (10, 12, "BW", 1)]
        assert compute(t, 1) == [(1, 3, "F", 0), (3, 5, "BW", 0), (5, 7, "F", 1), (7, 10, "BW", 1)]
        assert t.makespan == 12
    blocking = simulate("1f1b", [EQUAL, EQUAL], 2, rate=half)
    assert events(blocking, 0)[3] == (3, 5, "recv", 0)  # waiting for the gradient does not slow stage 1
    same = simulate("1f1b", [EQUAL, StageCost(1, 3)], 4, p2p_seconds=0.5, rate=lambda k: 1.0)
    assert same.stages == simulate("1f1b", [EQUAL, StageCost(1, 3)], 4, p2p_seconds=0.5).stages


def test_with_more_ranks_than_cores_a_passs_waits_go_to_the_other_ranks_work():
    """One stage, F = 1 and BW = 2 of work with 1 s of waits in each, at half speed (shared cores),
    worked by hand. Without `solo` the waits stretch with the work: F (1 + 1) / 0.5 = 4, BW
    (2 + 1) / 0.5 = 6. With solo = 1 a pass takes the longer of its work at the shared speed and its
    work alone plus its waits: F max(2, 1 + 1) = 2, BW max(4, 2 + 1) = 4; with 3 s of waits in the
    forward, the waits show: max(2, 1 + 3) = 4."""
    half = lambda k: 0.5  # noqa: E731
    waits = StageCost(1, 2, 0, forward_wait=1, backward_wait=1)
    assert compute(simulate("1f1b", [waits], 1, rate=half), 0) == [(0, 4, "F", 0), (4, 10, "BW", 0)]
    assert compute(simulate("1f1b", [waits], 1, rate=half, solo=lambda k: 1.0), 0) == [(0, 2, "F", 0), (2, 6, "BW", 0)]
    long = StageCost(1, 2, 0, forward_wait=3)
    assert compute(simulate("1f1b", [long], 1, rate=half, solo=lambda k: 1.0), 0) == [(0, 4, "F", 0), (4, 8, "BW", 0)]


def test_waits_go_to_other_ranks_only_while_the_computing_ranks_outnumber_the_cores():
    """The case above with solo only while both stages compute (k = 2): stage 0's F0 starts alone,
    so its 1 s of waits stretch with its work at full speed: 0…2 (1 + 1); stage 1's F0 then starts
    while stage 0's F1 computes and takes its floor."""
    half = lambda k: 1.0 if k == 1 else 0.5  # noqa: E731
    both = lambda k: 1.0 if k == 2 else None  # noqa: E731
    waits = StageCost(1, 2, 0, forward_wait=1)
    t = simulate("1f1b", [waits, StageCost(1, 2, 0, forward_wait=5)], 2, comm="async", rate=half, solo=both)
    assert compute(t, 0)[0] == (0, 2, "F", 0)
    assert compute(t, 1)[0] == (2, 8, "F", 0)


def test_a_floor_of_waits_holds_when_the_shared_speed_changes_mid_pass():
    """Two stages, async, speed 1/2 while both compute, else 1, worked by hand: stage 0's F0 runs
    alone 0…1; from 1 its F1 and stage 1's F0 (1 of work, 5 of waits, solo 1) share the cores, so
    both finish their work at 3; stage 0's F1 ends there, stage 1's F0 not before its floor,
    1 + 1 + 5 = 7."""
    half = lambda k: 1.0 if k == 1 else 0.5  # noqa: E731
    t = simulate("1f1b", [EQUAL, StageCost(1, 2, 0, forward_wait=5)], 2, comm="async", rate=half, solo=lambda k: 1.0)
    assert compute(t, 1)[0] == (1, 7, "F", 0)
    assert compute(t, 0)[:2] == [(0, 1, "F", 0), (1, 3, "F", 1)]


def test_two_stages_four_micro_batches_interleave_one_forward_one_backward():
    t = simulate("1f1b", [EQUAL, EQUAL], 4)
    assert compute(t, 0) == [(0, 1, "F", 0), (1, 2, "F", 1), (4, 6, "BW", 0), (6, 7, "F", 2), (7, 9, "BW", 1),
                             (9, 10, "F", 3), (10, 12, "BW", 2), (13, 15, "BW", 3)]
    assert compute(t, 1) == [(1, 2, "F", 0), (2, 4, "BW", 0), (4, 5, "F", 1), (5, 7, "BW", 1), (7, 8, "F", 2),
                             (8, 10, "BW", 2), (10, 11, "F", 3), (11, 13, "BW", 3)]
    assert t.makespan == 15


def test_a_slow_second_stage_sets_the_pace_and_the_first_stage_waits():
    t = simulate("1f1b", [StageCost(1, 2), StageCost(2, 4)], 4)
    assert compute(t, 1) == [(1, 3, "F", 0), (3, 7, "BW", 0), (7, 9, "F", 1), (9, 13, "BW", 1), (13, 15, "F", 2),
                             (15, 19, "BW", 2), (19, 21, "F", 3), (21, 25, "BW", 3)]
    assert compute(t, 0) == [(0, 1, "F", 0), (1, 2, "F", 1), (7, 9, "BW", 0), (9, 10, "F", 2), (13, 15, "BW", 1),
                             (15, 16, "F", 3), (19, 21, "BW", 2), (25, 27, "BW", 3)]
    assert t.makespan == 27
    assert t.bubble(1) == pytest.approx(1 - 24 / 27)
    assert t.bubble(0) == pytest.approx(1 - 12 / 27)


def test_three_stages_four_micro_batches_with_equal_stages():
    t = simulate("1f1b", [EQUAL] * 3, 4)
    assert compute(t, 0) == [(0, 1, "F", 0), (1, 2, "F", 1), (2, 3, "F", 2), (7, 9, "BW", 0), (9, 10, "F", 3),
                             (10, 12, "BW", 1), (13, 15, "BW", 2), (16, 18, "BW", 3)]
    assert compute(t, 1) == [(1, 2, "F", 0), (2, 3, "F", 1), (5, 7, "BW", 0), (7, 8, "F", 2), (8, 10, "BW", 1),
                             (10, 11, "F", 3), (11, 13, "BW", 2), (14, 16, "BW", 3)]
    assert compute(t, 2) == [(2, 3, "F", 0), (3, 5, "BW", 0), (5, 6, "F", 1), (6, 8, "BW", 1), (8, 9, "F", 2),
                             (9, 11, "BW", 2), (11, 12, "F", 3), (12, 14, "BW", 3)]
    assert t.makespan == 18


def test_three_stages_four_micro_batches_with_a_slow_middle_stage():
    t = simulate("1f1b", [StageCost(1, 2), StageCost(2, 4), StageCost(1, 2)], 4)
    assert compute(t, 0) == [(0, 1, "F", 0), (1, 2, "F", 1), (3, 4, "F", 2), (10, 12, "BW", 0), (12, 13, "F", 3),
                             (16, 18, "BW", 1), (22, 24, "BW", 2), (26, 28, "BW", 3)]
    assert compute(t, 1) == [(1, 3, "F", 0), (3, 5, "F", 1), (6, 10, "BW", 0), (10, 12, "F", 2), (12, 16, "BW", 1),
                             (16, 18, "F", 3), (18, 22, "BW", 2), (22, 26, "BW", 3)]
    assert compute(t, 2) == [(3, 4, "F", 0), (4, 6, "BW", 0), (6, 7, "F", 1), (7, 9, "BW", 1), (12, 13, "F", 2),
                             (13, 15, "BW", 2), (18, 19, "F", 3), (19, 21, "BW", 3)]
    assert t.makespan == 28


@pytest.mark.parametrize("stages,micro_batches", [(2, 2), (2, 4), (2, 8), (3, 4), (4, 8), (4, 3), (5, 16)])
def test_equal_stages_idle_for_the_textbook_bubble(stages, micro_batches):
    t = simulate("1f1b", [StageCost(1.5, 2.0, 1.0)] * stages, micro_batches)
    for s in range(stages):
        assert t.bubble(s) == pytest.approx((stages - 1) / (micro_batches + stages - 1))


def test_zb_h1_two_stages_four_micro_batches_fill_the_cool_down_with_weight_gradients():
    """F = B = W = 1: stage 1 runs its first backward without W, stage 0 defers nothing (its B and W
    run as one backward pass, BW)."""
    t = simulate("zb-h1", [StageCost(1, 1, 1)] * 2, 4)
    assert compute(t, 0) == [(0, 1, "F", 0), (1, 2, "F", 1), (3, 5, "BW", 0), (5, 6, "F", 2), (6, 8, "BW", 1),
                             (8, 9, "F", 3), (9, 11, "BW", 2), (11, 13, "BW", 3)]
    assert compute(t, 1) == [(1, 2, "F", 0), (2, 3, "B", 0), (3, 4, "F", 1), (4, 5, "B", 1), (5, 6, "W", 0),
                             (6, 7, "F", 2), (7, 8, "B", 2), (8, 9, "W", 1), (9, 10, "F", 3), (10, 11, "B", 3),
                             (11, 12, "W", 2), (12, 13, "W", 3)]
    assert t.makespan == 13
    assert simulate("1f1b", [StageCost(1, 1, 1)] * 2, 4).makespan == 15


@pytest.mark.parametrize("stages,micro_batches", [(2, 4), (3, 4), (4, 8), (4, 16)])
def test_zb_h1_idles_a_third_of_1f1b_when_f_b_and_w_are_equal(stages, micro_batches):
    cost = [StageCost(1, 1, 1)] * stages
    zb, ofob = simulate("zb-h1", cost, micro_batches), simulate("1f1b", cost, micro_batches)
    assert zb.makespan == micro_batches * 3 + (stages - 1) * (1 + 1 - 1)  # (P − 1)(F + B − W) idle
    for s in range(stages):
        assert zb.idle(s) == pytest.approx(ofob.idle(s) / 3)
        assert zb.bubble(s) < ofob.bubble(s)


def test_zb_h1_holds_no_more_micro_batches_than_1f1bs_first_stage():
    for stages, m in [(2, 4), (4, 8), (3, 2)]:
        cost = [StageCost(1, 1, 1)] * stages
        ofob, zb = simulate("1f1b", cost, m), simulate("zb-h1", cost, m)
        assert [ofob.peak_in_flight(s) for s in range(stages)] == [min(stages - s, m) for s in range(stages)]
        assert max(zb.peak_in_flight(s) for s in range(stages)) == ofob.peak_in_flight(0)


def test_gpipe_holds_every_micro_batch_and_idles_like_1f1b():
    cost = [StageCost(1, 2)] * 3
    g = simulate("gpipe", cost, 4)
    assert [g.peak_in_flight(s) for s in range(3)] == [4, 4, 4]
    assert g.makespan == simulate("1f1b", cost, 4).makespan == 18


def test_the_step_ends_when_the_slowest_stage_finishes_its_all_reduce_and_optimizer():
    t = simulate("1f1b", [EQUAL, EQUAL], 2, tail_seconds=[1, 3])
    assert t.makespan == 9
    assert t.step_time == 7 + 3  # stage 1's last backward ends at 7


def test_one_stage_runs_its_micro_batches_back_to_back():
    t = simulate("1f1b", [StageCost(1, 2, 1)], 3, tail_seconds=[0.5])
    assert compute(t, 0) == [(0, 1, "F", 0), (1, 4, "BW", 0), (4, 5, "F", 1), (5, 8, "BW", 1), (8, 9, "F", 2),
                             (9, 12, "BW", 2)]
    assert t.step_time == 12.5
    assert t.bubble(0) == 0


def test_zb_h1_order_is_1f1b_with_weight_gradients_deferred_by_the_stage_index():
    # the first stage never delays a W: each runs with its B as one backward pass, as in 1F1B
    assert zb_h1_order(3, 4, 0) == [("F", 0), ("F", 1), ("F", 2), ("BW", 0), ("F", 3), ("BW", 1), ("BW", 2),
                                    ("BW", 3)]
    assert zb_h1_order(3, 4, 1) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("W", 0), ("F", 3), ("B", 2),
                                    ("W", 1), ("B", 3), ("W", 2), ("W", 3)]
    assert zb_h1_order(3, 4, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2), ("W", 0), ("F", 3),
                                    ("B", 3), ("W", 1), ("W", 2), ("W", 3)]


@pytest.mark.parametrize("stages,micro_batches", [(2, 2), (2, 5), (3, 4), (4, 8), (4, 2)])
def test_the_1f1b_instruction_stream_is_deepspeeds_train_schedule(stages, micro_batches):
    schedule = pytest.importorskip("deepspeed.runtime.pipe.schedule")
    names = {"ForwardPass": "F", "BackwardPass": "BW", "SendActivation": "sendA", "RecvActivation": "recvA",
             "SendGrad": "sendG", "RecvGrad": "recvG"}
    for s in range(stages):
        sched = schedule.TrainSchedule(micro_batches=micro_batches, stages=stages, stage_id=s)
        theirs = [(names[type(c).__name__], c.buffer_id) for step in sched for c in step if type(c).__name__ in names]
        buffers = sched.num_pipe_buffers()
        ours = [(kind, mb % buffers) for kind, mb in deepspeed_1f1b_order(stages, micro_batches, s)]
        assert ours == theirs


def test_unknown_schedules_and_mismatched_transfer_lists_are_errors():
    with pytest.raises(ValueError, match="unknown schedule"):
        simulate("interleaved", [EQUAL], 2)
    with pytest.raises(ValueError, match="cuts"):
        simulate("1f1b", [EQUAL, EQUAL], 2, p2p_seconds=[0.1, 0.2])
    with pytest.raises(ValueError, match="blocking"):
        simulate("zb-h1", [EQUAL, EQUAL], 2, comm="blocking")
