"""The cost model on the `test` preset's network (tiny) with toy profiles whose answers are known by hand.

Tiny network shapes per image (both towers): conv1 24×7×7 = 1176, conv2 64×3×3 = 576, conv3 and
conv4 96×3×3 = 864, conv5 64×1×1 = 64, fc6 and fc7 1024, fc8 10."""

import pytest

from alexnet_pp.config import ModelConfig
from alexnet_pp.pipeline import unit_names, unit_param_counts
from alexnet_pp.planning.costmodel import (
    Candidate,
    cut_elements,
    expected_max_normal,
    layer_io_elements,
    predict,
    saved_bytes_per_image,
    unit_costs,
    worker_param_counts,
)
from alexnet_pp.planning.profile import (
    DeviceProfile,
    Link,
    UnitTimes,
    assumed_gpu_profile,
    mean_profile,
    measure_jitter,
    measure_links,
    median_links,
    pooled_profile,
    start_co_runners,
    stop_co_runners,
    time_slicing_slowdown,
    time_units,
)

MS = 1e-3


def test_tiny_shapes_are_what_the_hand_sums_below_assume(tiny):
    io = layer_io_elements(tiny)
    assert {k: v[1] for k, v in io.items()} == {"conv1": 1176, "conv2": 576, "conv3": 864, "conv4": 864,
                                                 "conv5": 64, "fc6": 1024, "fc7": 1024, "fc8": 10}
    assert io["fc6"][0] == 64  # conv5's output, flattened


def test_after_a_tower_half_a_stage_sends_the_layers_input_and_that_half():
    cuts = dict(zip(unit_names(1), cut_elements(ModelConfig(width=0.25, image_size=64, num_classes=10), 1)))
    assert cuts["conv3.0"] == 576 + 864 // 2
    assert cuts["conv3.1"] == 864
    assert cuts["conv2"] == 576


def test_two_equal_stages_step_in_m_plus_one_forward_backward_times(tiny, make_profile):
    """Each unit costs 1 ms per image per kind; 6 units a stage, micro-batch 2: F = 12 ms and
    F + B + W = 36 ms a micro-batch, so (M + P − 1) · 36 = 180 ms for M = 4."""
    pred = predict(tiny, make_profile(), Candidate(2, 1, 1, 4, 8, partition="6"))
    assert pred.bounds == (0, 6, 12)
    assert pred.step_seconds == pytest.approx(0.180)
    assert pred.images_per_s == pytest.approx(8 / 0.180)
    s0, s1 = pred.stages
    assert s0.phases["forward"] == pytest.approx(4 * 12 * MS)
    assert s0.phases["backward"] == pytest.approx(4 * 24 * MS)
    assert s0.phases["idle"] + s0.phases["recv"] + s0.phases["send"] == pytest.approx(36 * MS)
    assert s0.bubble == pytest.approx(1 / 5)


def test_stages_sharing_one_core_take_the_sum_of_their_work(tiny, make_profile):
    """Both stages of the test above on one core: the core is never idle (one of them can always
    compute), so the step is all the work, 2 stages × 4 micro-batches × 36 ms."""
    import dataclasses

    one_core = dataclasses.replace(make_profile(), cores=1, threads=1)
    pred = predict(tiny, one_core, Candidate(2, 1, 1, 4, 8, partition="6"))
    assert pred.step_seconds == pytest.approx(0.288)
    assert pred.stages[0].phases["forward"] > 4 * 12 * MS  # stretched while stage 1 computes too


def test_unit_times_measured_beside_co_runners_speed_up_when_fewer_ranks_compute(tiny, make_profile):
    """Units timed with 3 co-runners on 2 cores ran at half speed. A stage computing alone in a 4-rank
    pipeline then runs at twice that; 4 replicas always compute together, so they stay as measured."""
    import dataclasses

    from alexnet_pp.planning.costmodel import compute_rate

    shared = dataclasses.replace(make_profile(), cores=2, threads=1, co_runners=3)
    rate = compute_rate(shared, Candidate(4, 1, 1, 4, 16))
    assert [rate(k) for k in (1, 2, 3, 4)] == pytest.approx([2, 2, 4 / 3, 1])
    assert compute_rate(shared, Candidate(2, 1, 2, 4, 16))(2) == 1  # 2 stages × 2 replicas on 2 cores
    assert compute_rate(make_profile(), Candidate(4, 1, 1, 4, 16)) is None  # a device per worker
    replicas = Candidate(1, 1, 4, 1, 16)
    assert predict(tiny, shared, replicas).step_seconds == pytest.approx(predict(tiny, make_profile(), replicas).step_seconds)
    pipeline = Candidate(4, 1, 1, 4, 16)
    assert predict(tiny, shared, pipeline).step_seconds < 0.8 * predict(tiny, make_profile(), pipeline).step_seconds


def test_the_background_leaves_the_ranks_fewer_cores(tiny, make_profile):
    """Units timed with one co-runner on 2 cores (full, not oversubscribed). A background of 0.2
    cores plus 0.05 per rank leaves 1.7 cores to 2 workers, 1.6 to 4; a worker alone keeps a whole
    core; a background past half the cores is clamped there (a broken measurement)."""
    import dataclasses

    from alexnet_pp.planning.costmodel import available_cores, compute_rate

    shared = dataclasses.replace(make_profile(), cores=2, threads=1, co_runners=1,
                                 background_cores=0.2, background_cores_per_rank=0.05)
    assert available_cores(shared, 2) == pytest.approx(1.7) and available_cores(shared, 4) == pytest.approx(1.6)
    assert compute_rate(shared, Candidate(1, 1, 2, 1, 16))(1) == pytest.approx(0.85)
    two = compute_rate(shared, Candidate(2, 1, 1, 4, 16))
    assert (two(1), two(2)) == (1.0, pytest.approx(0.85))
    four = compute_rate(shared, Candidate(4, 1, 1, 4, 16))
    assert [four(k) for k in (1, 2, 4)] == pytest.approx([1.0, 0.8, 0.4])
    assert compute_rate(shared, Candidate(1, 1, 1, 1, 16))(1) == 1.0
    broken = dataclasses.replace(shared, background_cores=5.0)
    assert available_cores(broken, 2) == 1.0
    replicas = Candidate(1, 1, 2, 1, 16)
    quiet = dataclasses.replace(shared, background_cores=0.0, background_cores_per_rank=0.0)
    assert predict(tiny, shared, replicas).step_seconds > predict(tiny, quiet, replicas).step_seconds


def test_towers_share_the_cores_as_replicas_do_and_lose_to_each_other_only_their_waits(tiny, make_profile):
    """Two towers on the 1.7 cores a background leaves of 2 get 0.85 of a core each, as two
    replicas do; what one tower loses waiting for the other, slowed by the background, is their
    sync_wait at each collective, from the jitter (measured: 1×2×1's passes at 0.74–0.84 of a core,
    waits included, where 1×1×2's got 0.87–0.93). Four tower ranks on 2 cores get 0.4."""
    import dataclasses

    from alexnet_pp.planning.costmodel import compute_rate, tower_sync_seconds, unit_costs
    from alexnet_pp.pipeline import pipeline_units

    shared = dataclasses.replace(make_profile(), cores=2, threads=1, co_runners=1,
                                 background_cores=0.2, background_cores_per_rank=0.05)
    assert compute_rate(shared, Candidate(1, 2, 1, 1, 16))(1) == pytest.approx(0.85)
    assert compute_rate(shared, Candidate(1, 1, 2, 1, 16))(1) == pytest.approx(0.85)
    assert compute_rate(shared, Candidate(1, 2, 2, 1, 16))(1) == pytest.approx(0.4)
    quiet = dataclasses.replace(shared, background_cores=0.0, background_cores_per_rank=0.0)
    assert compute_rate(quiet, Candidate(1, 2, 1, 1, 16))(1) == 1.0
    towers = Candidate(1, 2, 1, 1, 16)
    forward = lambda profile: predict(tiny, profile, towers).stages[0].phases["forward"]  # noqa: E731
    assert forward(shared) == pytest.approx(forward(quiet) / 0.85)
    noisy, noisy_quiet = (dataclasses.replace(p, jitter=1e-3) for p in (shared, quiet))
    costs = unit_costs(tiny, noisy, 16, 2)
    waits = tower_sync_seconds(noisy, pipeline_units(2), costs, range(len(costs)))[0]
    assert waits > 0
    assert forward(noisy_quiet) == pytest.approx(forward(quiet) + waits)
    assert forward(noisy) == pytest.approx((forward(quiet) + waits) / 0.85)


def test_every_ranks_tail_shares_the_cores_the_background_outside_the_ranks_leaves(tiny, make_profile):
    """All ranks all-reduce and step their optimizers at about the same time, and their other
    threads (the per-rank background) are the all-reduce's own workers then: 4 workers on the 1.8
    cores a background of 0.2 leaves of 2 run their tails at 0.45 of the speed the links and the
    optimizer were measured at; 2 workers at 0.9; one worker keeps its core; a device each: 1."""
    import dataclasses

    from alexnet_pp.planning.costmodel import tail_rate

    shared = dataclasses.replace(make_profile(), cores=2, threads=1, co_runners=1,
                                 background_cores=0.2, background_cores_per_rank=0.05)
    assert tail_rate(shared, Candidate(1, 1, 4, 1, 16)) == pytest.approx(0.45)
    assert tail_rate(shared, Candidate(2, 1, 2, 4, 16)) == pytest.approx(0.45)
    assert tail_rate(shared, Candidate(1, 1, 2, 1, 16)) == pytest.approx(0.9)
    assert tail_rate(shared, Candidate(1, 1, 1, 1, 16)) == 1.0
    assert tail_rate(make_profile(), Candidate(1, 1, 4, 1, 16)) == 1.0
    quiet = dataclasses.replace(shared, background_cores=0.0, background_cores_per_rank=0.0)
    two = Candidate(1, 1, 2, 1, 16)
    busy, calm = predict(tiny, shared, two).stages[0].phases, predict(tiny, quiet, two).stages[0].phases
    assert busy["optimizer"] == pytest.approx(calm["optimizer"] / 0.9)
    assert calm["allreduce"] > 0 and busy["allreduce"] > calm["allreduce"]


def test_an_all_reduce_that_keeps_its_ranks_cores_part_busy_stretches_only_as_its_cpu_exceeds_them(
        tiny, make_profile):
    """Two ranks alone kept 0.6 of a core busy in the all-reduce (loopback also waits on the peer):
    4 ranks on the 1.8 cores left need 2.4, so their all-reduce runs at 0.75 of the measured speed,
    not the 0.45 of CPU-bound work; 2 ranks need 1.2 and keep the measured speed. The optimizer,
    all CPU, still runs at 0.45."""
    import dataclasses

    from alexnet_pp.planning.costmodel import tail_rate

    base = dataclasses.replace(make_profile(), cores=2, threads=1, co_runners=1,
                               background_cores=0.2, background_cores_per_rank=0.05)
    part = dataclasses.replace(base, allreduce=dataclasses.replace(base.allreduce, busy=0.6))
    four, two = Candidate(1, 1, 4, 1, 16), Candidate(1, 1, 2, 1, 16)
    assert tail_rate(part, four, part.allreduce.busy) == pytest.approx(0.75)
    assert tail_rate(part, two, part.allreduce.busy) == 1.0
    waits, cpu = predict(tiny, part, four).stages[0].phases, predict(tiny, base, four).stages[0].phases
    assert waits["allreduce"] == pytest.approx(cpu["allreduce"] * 0.45 / 0.75)
    assert waits["optimizer"] == pytest.approx(cpu["optimizer"])


def test_a_layout_with_more_workers_than_cores_pays_the_time_slicing_slowdown(tiny, make_profile):
    """A pass costs 1.25× the CPU while oversubscribed: 4 one-thread workers on 2 cores compute and
    run their tails at 1/1.25 of what sharing alone gives, whatever number compute at once; 2 workers
    on 2 cores pay nothing, 2 two-thread workers do; a device per worker never does."""
    import dataclasses

    from alexnet_pp.planning.costmodel import compute_rate, tail_rate

    shared = dataclasses.replace(make_profile(), cores=2, threads=1, co_runners=1)
    sliced = dataclasses.replace(shared, time_slicing_slowdown=1.25)
    four = Candidate(4, 1, 1, 4, 16)
    assert [compute_rate(sliced, four)(k) for k in (1, 2, 3, 4)] == \
        pytest.approx([compute_rate(shared, four)(k) / 1.25 for k in (1, 2, 3, 4)])
    assert tail_rate(sliced, Candidate(1, 1, 4, 1, 16)) == pytest.approx(0.5 / 1.25)
    two = Candidate(2, 1, 1, 4, 16)
    assert compute_rate(sliced, two)(2) == compute_rate(shared, two)(2) == 1.0
    assert tail_rate(sliced, Candidate(1, 1, 2, 1, 16)) == 1.0
    threaded = dataclasses.replace(sliced, threads=2, co_runners=0)
    assert compute_rate(threaded, two)(1) == pytest.approx(1 / 1.25)
    assert predict(tiny, sliced, four).step_seconds > predict(tiny, shared, four).step_seconds
    gpu = dataclasses.replace(make_profile(), time_slicing_slowdown=1.25)
    assert predict(tiny, gpu, four).step_seconds == predict(tiny, make_profile(), four).step_seconds


def test_the_engines_measured_cpu_ratio_replaces_the_time_slicing_slowdown_at_any_worker_count(tiny, make_profile):
    """Where earlier runs measured how much more CPU the engine's passes cost than calibrated, that
    ratio is charged instead of the synthetic slowdown: 1.1 for four workers on 2 cores (not 1.25),
    and 1.05 for two (which the slowdown never charges); a device per worker is never charged."""
    import dataclasses

    from alexnet_pp.planning.costmodel import compute_rate, tail_rate

    shared = dataclasses.replace(make_profile(), cores=2, threads=1, co_runners=1, time_slicing_slowdown=1.25)
    four, two = Candidate(4, 1, 1, 4, 16), Candidate(2, 1, 1, 4, 8, partition="6")
    measured = dataclasses.replace(shared, engine_cpu_ratio=1.1)
    assert compute_rate(measured, four)(3) == pytest.approx(compute_rate(shared, four)(3) * 1.25 / 1.1)
    assert tail_rate(measured, Candidate(1, 1, 4, 1, 16)) == pytest.approx(0.5 / 1.1)
    light = dataclasses.replace(shared, engine_cpu_ratio=1.05)
    assert compute_rate(light, two)(2) == pytest.approx(1 / 1.05)
    assert predict(tiny, light, two).stages[0].cpu == pytest.approx({"forward": 0.048 * 1.05, "backward": 0.096 * 1.05})
    gpu = dataclasses.replace(make_profile(), engine_cpu_ratio=1.3)
    assert predict(tiny, gpu, four).step_seconds == predict(tiny, make_profile(), four).step_seconds


def test_each_stage_is_charged_its_units_cpu_at_the_share_they_were_timed_with_and_the_slicing(tiny, make_profile):
    """6 units a stage at 1 ms per image per kind, micro-batch 2, M = 4: 48 ms of forward and 96 ms of
    backward (B + W) per step. Timed with a core each: charged as is; with two one-thread co-runners on
    2 cores each timed unit got 2/3 of a core; two two-thread workers on 2 cores also pay the 1.25×
    slicing; a device per worker has no CPU to charge."""
    import dataclasses

    two = Candidate(2, 1, 1, 4, 8, partition="6")
    alone = dataclasses.replace(make_profile(), cores=2, threads=1, co_runners=1, time_slicing_slowdown=1.25)
    for sp in predict(tiny, alone, two).stages:
        assert sp.cpu == pytest.approx({"forward": 0.048, "backward": 0.096})
    crowded = dataclasses.replace(alone, co_runners=2)
    assert predict(tiny, crowded, two).stages[0].cpu == pytest.approx({"forward": 0.032, "backward": 0.064})
    threaded = dataclasses.replace(alone, threads=2, co_runners=0)
    assert predict(tiny, threaded, two).stages[1].cpu == pytest.approx({"forward": 0.060, "backward": 0.120})
    assert all(sp.cpu == {} for sp in predict(tiny, make_profile(), two).stages)


def test_deepspeeds_serialised_transfers_lengthen_each_steady_step(tiny, make_profile):
    """1 ms per message: an activation goes as two messages (activations and labels), 2 ms, a
    gradient as one, 1 ms. Worked by hand through DeepSpeed's order: the last backward of stage 0
    ends at 192 ms."""
    slow = Link(bandwidth=1e30, latency=1 * MS)
    pred = predict(tiny, make_profile(p2p=slow), Candidate(2, 1, 1, 4, 8, partition="6"))
    assert pred.step_seconds == pytest.approx(0.192)


def test_the_optimizer_step_follows_each_stages_last_backward(tiny, make_profile):
    rate = 1e-8
    pred = predict(tiny, make_profile(optimizer=rate), Candidate(2, 1, 1, 4, 8, partition="6"))
    counts = worker_param_counts(tiny, 1)
    p0, p1 = sum(counts[:6]), sum(counts[6:])
    assert pred.step_seconds == pytest.approx(max(0.180 + p0 * rate, 0.156 + p1 * rate))
    assert pred.stages[1].phases["optimizer"] == pytest.approx(p1 * rate)


def test_the_engines_gradient_sweeps_join_the_optimizer_phase_as_the_engine_runs_them(tiny, make_profile):
    """Flat gradients: the buffer zeroed every step, scaled by 1/D only with replicas; DeepSpeed's own
    reduce (flat_grads off): its flatten, scale and copy back at any D."""
    opt, zero, scale, copy = 1e-8, 2e-9, 3e-9, 7e-9
    profile = make_profile(optimizer=opt)
    profile.grad_zero_seconds_per_param, profile.grad_scale_seconds_per_param = zero, scale
    profile.reduce_copy_seconds_per_param = copy
    p = sum(worker_param_counts(tiny, 1))

    def phase(dp, flat):
        return predict(tiny, profile, Candidate(1, 1, dp, 1, 8), flat_grads=flat).stages[0].phases["optimizer"]

    assert phase(1, True) == pytest.approx(p * (opt + zero))
    assert phase(2, True) == pytest.approx(p * (opt + zero + scale))
    assert phase(1, False) == phase(2, False) == pytest.approx(p * (opt + copy))


def test_with_two_towers_each_worker_does_half_of_each_layer_and_all_of_fc8(tiny, make_profile):
    """Per image and kind: conv1, conv2, conv5 half of 1 ms; conv3, conv4, fc6, fc7 one tower half
    (1 ms); fc8 whole (1 ms): 6.5 ms, × 3 kinds × 2 images = 39 ms."""
    costs = unit_costs(tiny, make_profile(), 2, 2)
    assert [c.forward for c in costs] == pytest.approx([1 * MS, 1 * MS, 2 * MS, 2 * MS, 1 * MS, 2 * MS, 2 * MS, 2 * MS])
    free = predict(tiny, make_profile(), Candidate(1, 2, 1, 1, 2))
    assert free.step_seconds == pytest.approx(0.039)
    # 1 ms per collective step: 4 all-gathers of two ranks (1 step each) forward, 3 all-reduces (2 steps) backward
    slow = predict(tiny, make_profile(allreduce=Link(1e30, 1 * MS)), Candidate(1, 2, 1, 1, 2))
    assert slow.step_seconds == pytest.approx(0.039 + 0.004 + 0.006)
    assert slow.stages[0].phases["tower_comm"] == pytest.approx(0.010)


def test_the_expected_maximum_of_normals_matches_the_tabulated_order_statistics():
    assert [round(expected_max_normal(k), 4) for k in (1, 2, 3, 4, 8)] == [0.0, 0.5642, 0.8463, 1.0294, 1.4236]


def test_replicas_wait_for_the_slowest_once_a_step_by_the_profiles_jitter(tiny, make_profile):
    """1×1×2, M = 2, micro-batch 2: 12 units of F = B = W = 2 ms, so 144 ms of compute a step; the two
    replicas then meet at the all-reduce, the slower 0.564 σ late on average, σ = sqrt(jitter · 144 ms)."""
    jitter = 1e-3
    layout = Candidate(1, 1, 2, 2, 8)
    steady = predict(tiny, make_profile(), layout)
    noisy_profile = make_profile()
    noisy_profile.jitter = jitter
    noisy = predict(tiny, noisy_profile, layout)
    wait = 0.5642 * (jitter * 0.144) ** 0.5
    assert steady.step_seconds == pytest.approx(0.144)
    assert noisy.step_seconds == pytest.approx(0.144 + wait, rel=1e-4)
    assert noisy.stages[0].phases["allreduce"] == pytest.approx(wait, rel=1e-4)
    four = predict(tiny, noisy_profile, Candidate(1, 1, 4, 1, 8))  # 72 ms of compute, four replicas
    assert four.step_seconds == pytest.approx(0.072 + 1.0294 * (jitter * 0.072) ** 0.5, rel=1e-4)


def test_with_more_workers_than_cores_an_early_replica_leaves_its_core_to_the_late_ones(tiny, make_profile):
    """1×1×4 on 2 cores: a replica that reaches the all-reduce early sleeps in it, and a late one
    takes its core, so the last arrives when the four ranks' shared work is done, as simulated; the
    jitter adds no wait. Two replicas on the same 2 cores have a core each: the early one's idles."""
    import dataclasses

    shared = dataclasses.replace(make_profile(), cores=2, threads=1, co_runners=1)
    noisy = dataclasses.replace(shared, jitter=1e-3)
    four = Candidate(1, 1, 4, 1, 8)
    assert predict(tiny, noisy, four).step_seconds == pytest.approx(predict(tiny, shared, four).step_seconds)
    assert predict(tiny, noisy, four).stages[0].phases["allreduce"] == pytest.approx(
        predict(tiny, shared, four).stages[0].phases["allreduce"])
    two = Candidate(1, 1, 2, 1, 8)
    assert predict(tiny, noisy, two).step_seconds > predict(tiny, shared, two).step_seconds


def test_two_towers_wait_for_each_other_at_each_collective_after_the_compute_since_the_last(tiny, make_profile):
    """1×2×1, micro-batch 2, per unit F = B = W as in the two-tower test above (ms: conv1 1, conv2 1,
    conv3 2, conv4 2, conv5 1, fc6 2, fc7 2, fc8 2). Forward, the towers meet before conv3, fc6, fc7
    and fc8, after 2, 5, 2 and 2 ms of forward; backward after fc7, fc6 and conv3 (the layers whose
    input gradient is all-reduced), after 8, 4 and 10 ms of backward."""
    jitter = 1e-3
    profile = make_profile()
    profile.jitter = jitter
    pred = predict(tiny, profile, Candidate(1, 2, 1, 1, 2))
    wait = sum(0.5642 * (jitter * t * MS) ** 0.5 for t in (2, 5, 2, 2, 8, 4, 10))
    assert pred.step_seconds == pytest.approx(0.039 + wait, rel=1e-4)
    assert pred.stages[0].phases["tower_comm"] == pytest.approx(wait, rel=1e-4)


def test_with_more_workers_than_cores_the_towers_waits_go_to_the_other_ranks_work(tiny, make_profile):
    """The units above, micro-batch 2: a tower rank's forward is 13 ms of work, and the towers meet
    before conv3, fc6, fc7 and fc8. 1×2×2 on 2 cores runs four ranks at half a core each, so its
    forward takes 26 ms of work; a tower waiting for its peer leaves its core to the other replica,
    so the waits (3.7 ms at this jitter) do not lengthen it. Only waits longer than the work's
    stretch (here 13 ms) show. 1×2×1 on the same cores keeps a core per rank: its waits idle it."""
    import dataclasses

    jitter = 1e-3
    shared = dataclasses.replace(make_profile(), cores=2, threads=1, co_runners=1, jitter=jitter)
    waits = sum(0.5642 * (jitter * t * MS) ** 0.5 for t in (2, 5, 2, 2))
    forward = lambda profile, layout: predict(tiny, profile, layout).stages[0].phases["forward"]  # noqa: E731
    replicated_towers, towers = Candidate(1, 2, 2, 1, 4), Candidate(1, 2, 1, 1, 2)
    assert forward(shared, replicated_towers) == pytest.approx(0.026, rel=1e-4)
    assert forward(dataclasses.replace(shared, jitter=0.0), replicated_towers) == pytest.approx(0.026, rel=1e-4)
    assert forward(shared, towers) == pytest.approx(0.013 + waits, rel=1e-4)
    long_waits = dataclasses.replace(shared, jitter=0.1)
    assert forward(long_waits, replicated_towers) == pytest.approx(
        0.013 + sum(0.5642 * (0.1 * t * MS) ** 0.5 for t in (2, 5, 2, 2)), rel=1e-4)


def test_neighbouring_stages_meet_at_each_blocking_transfer_by_the_profiles_jitter(tiny, make_profile):
    """1F1B's sends and receives block until both stages reach them, in the steady state after one
    forward or backward each: stages of F 40 / B 60 and F 20 / B 20 ms meet 0.564 σ late on average,
    σ = sqrt(jitter · 35 ms), on every transfer. ZB-H1's asynchronous sends never meet."""
    from alexnet_pp.planning.costmodel import rendezvous_wait
    from alexnet_pp.planning.simulate import StageCost

    profile = make_profile()
    profile.jitter = 1e-3
    a, b = StageCost(0.04, 0.06), StageCost(0.02, 0.02)
    assert rendezvous_wait(profile, "1f1b", a, b) == pytest.approx(0.5642 * (1e-3 * 0.035) ** 0.5, rel=1e-4)
    assert rendezvous_wait(profile, "zb-h1", a, b) == 0.0
    assert rendezvous_wait(make_profile(), "1f1b", a, b) == 0.0  # no jitter measured: no wait
    # a stage's tower waits, kept apart from its work where the ranks outnumber the cores, are still
    # time between the meetings: 10 ms of them on each side make it 40 ms
    waiting = StageCost(0.04, 0.06, 0.0, 0.005, 0.005), StageCost(0.02, 0.02, 0.0, 0.005, 0.005)
    assert rendezvous_wait(profile, "1f1b", *waiting) == pytest.approx(0.5642 * (1e-3 * 0.040) ** 0.5, rel=1e-4)
    pipe = Candidate(2, 1, 1, 4, 8, partition="6")
    assert predict(tiny, profile, pipe).step_seconds > predict(tiny, make_profile(), pipe).step_seconds


def test_jitter_is_the_variance_of_a_repetitions_compute_per_second_of_it():
    """One size, two units, three repetitions: forward + training backward of both units add up to
    3, 4 and 8 s; their variance 7 s² over their mean 5 s."""
    samples = {(2, 0, 0): [1, 2, 3], (2, 0, 1): [0, 0, 0], (2, 0, 2): [1, 1, 1],
               (2, 1, 0): [0, 0, 0], (2, 1, 1): [0.5, 0.5, 0.5], (2, 1, 2): [1, 1, 4]}
    assert measure_jitter(samples, [2]) == pytest.approx(7 / 5)
    assert measure_jitter({k: v[:1] for k, v in samples.items()}, [2]) == 0.0  # one repetition: no spread


def test_bytes_between_stages_towers_and_replicas_come_from_the_shapes_and_parameters(tiny, make_profile):
    # cut after conv3.0, micro-batch 2, M = 4: activations and gradients of 1008 floats an image, plus labels
    pipe = predict(tiny, make_profile(), Candidate(2, 1, 1, 4, 8, partition="conv3.1"))
    assert pipe.bytes_per_step == {"stages": 4 * (2 * 4 * 1008 * 2 + 8 * 2), "towers": 0, "replicas": 0}
    # T = 2: gathers of conv3, fc6, fc7, fc8 inputs; all-reduces (2× the bytes in a two-rank ring) of the first three
    towers = predict(tiny, make_profile(), Candidate(1, 2, 1, 1, 2))
    assert towers.bytes_per_step["towers"] == 4 * 2 * (3 * 576 + 3 * 64 + 3 * 1024 + 1024)
    # D = 4: a ring all-reduce sends 2(D − 1)/D of the gradients from each of D ranks
    replicas = predict(tiny, make_profile(), Candidate(1, 1, 4, 1, 8))
    assert replicas.bytes_per_step["replicas"] == 2 * 3 * 4 * sum(unit_param_counts(tiny, 1))


def test_a_cut_inside_a_tower_half_shares_its_compute_parameters_and_sends_the_pieces_so_far(tiny, make_profile):
    # stage 0 = conv1 … conv3.1 and the first 12 of conv4.0's 48 channels: 4.25 of the 1-ms units
    pred = predict(tiny, make_profile(), Candidate(2, 1, 1, 4, 8, partition="conv4.0[12:]"))
    assert (pred.cut.bounds, pred.cut.splits) == ((0, 4, 12), (12,))
    s0, s1 = pred.stages
    assert s0.units[-1] == "conv4.0[:12]" and s1.units[:2] == ["conv4.0[12:]", "conv4.1"]
    assert s0.phases["forward"] == pytest.approx(4 * 2 * 4.25 * MS)
    assert s1.phases["forward"] == pytest.approx(4 * 2 * 7.75 * MS)
    counts = worker_param_counts(tiny, 1)
    assert s0.params == int(sum(counts[:4]) + counts[4] / 4)
    # conv4's input and a quarter of tower 0's output, 864 + 432 / 4 floats an image
    assert pred.bytes_per_step["stages"] == 4 * (2 * 4 * 972 * 2 + 8 * 2)
    saved = saved_bytes_per_image(tiny)  # stage 1 holds one micro-batch of 2: its share of conv4.0's, and what it received
    assert s1.memory["activations"] == int(1 * 2 * (0.75 * saved[4] + sum(saved[5:]) + 4 * 972))


def test_memory_holds_weights_gradients_momentum_and_the_micro_batches_in_flight(tiny, make_profile):
    pred = predict(tiny, make_profile(), Candidate(2, 1, 1, 4, 8, partition="6"))
    counts, saved = worker_param_counts(tiny, 1), saved_bytes_per_image(tiny)
    s0, s1 = pred.stages
    assert (s0.in_flight, s1.in_flight) == (2, 1)  # 1F1B: P − s micro-batches on stage s
    assert s0.memory["parameters"] == s0.memory["gradients"] == s0.memory["optimizer"] == 4 * sum(counts[:6])
    assert s0.memory["activations"] == 2 * 2 * sum(saved[:6])
    assert s1.memory["activations"] == 1 * 2 * (sum(saved[6:]) + 4 * 864)  # + the received conv4 output
    assert pred.memory_per_worker == max(s0.memory["total"], s1.memory["total"])
    assert not predict(tiny, make_profile(memory=1000), Candidate(1, 1, 2, 1, 8)).fits


def test_saved_activations_include_at_least_each_convolutions_input(tiny):
    saved = dict(zip(unit_names(1), saved_bytes_per_image(tiny)))
    assert saved["conv1"] >= 4 * 3 * 67 * 67  # the zero-padded image conv1 reads
    assert saved["conv2"] >= 4 * 1176
    assert all(v > 0 for v in saved.values())


def test_overlapping_the_all_reduce_with_the_last_backward_hides_part_of_it(tiny, make_profile):
    slow = Link(bandwidth=2e6, latency=0.0)
    layout = Candidate(1, 1, 2, 2, 8)
    plain = predict(tiny, make_profile(allreduce=slow), layout)
    hidden = predict(tiny, make_profile(allreduce=slow), layout, overlap_allreduce=True)
    compute_only = predict(tiny, make_profile(), layout)
    assert compute_only.step_seconds < hidden.step_seconds < plain.step_seconds


def test_a_run_configuration_names_its_layout():
    from alexnet_pp.config import load_config

    run = load_config("demo", None, {"parallel.pp": "2", "parallel.tp": "2", "parallel.micro_batches": "4"},
                      check_data=False)
    assert Candidate.of(run) == Candidate(2, 2, 1, 4, 64, "1f1b", "measured")
    assert Candidate.of(run).micro_batch == 16
    run.parallel.schedule = "zb-h1"  # the engine's schedule is the one predicted
    assert Candidate.of(run).schedule == "zb-h1" and Candidate.of(run, "1f1b").schedule == "1f1b"


def test_a_profile_fits_a_plus_b_n_and_never_scales_below_proportional():
    def profile(fw):
        units = [UnitTimes(n, fw, [0.0, 0.0], [0.0, 0.0]) for n in unit_names(1)]
        return DeviceProfile("p", "cpu", [16, 32], units, 0.0, Link(1e9, 0), Link(1e9, 0))
    fixed = profile([0.010 + 16e-3, 0.010 + 32e-3])  # 10 ms + 1 ms an image
    assert fixed.unit_seconds(24)[0][0] == pytest.approx(0.010 + 24e-3)
    assert fixed.unit_seconds(64)[0][0] == pytest.approx(0.010 + 64e-3)
    better_small = profile([0.010, 0.030])  # the line would give −10 ms at n = 0
    assert better_small.unit_seconds(4)[0][0] == pytest.approx(0.010 * 4 / 16)


def test_a_profile_survives_a_json_round_trip(tmp_path, make_profile):
    p = make_profile(p2p=Link(3e9, 2e-5))
    p.inter_node, p.workers_per_node = Link(1e9, 1e-5), 4
    p.save(tmp_path / "p.json")
    assert DeviceProfile.load(tmp_path / "p.json") == p


def test_calibrations_around_a_run_average_into_the_profile_it_ran_at(make_profile):
    import dataclasses

    before = dataclasses.replace(make_profile(f=1e-3, b=2e-3, optimizer=1e-9), jitter=0.01, name="before",
                                 time_slicing_slowdown=1.1)
    after = dataclasses.replace(make_profile(f=3e-3, b=4e-3, optimizer=3e-9), jitter=0.03, name="after",
                                time_slicing_slowdown=1.3)
    mean = mean_profile([before, after])
    assert mean.units[4].forward == pytest.approx([2e-3, 4e-3]) and mean.units[4].backward_input == pytest.approx([3e-3, 6e-3])
    assert mean.optimizer_seconds_per_param == pytest.approx(2e-9) and mean.jitter == pytest.approx(0.02)
    assert mean.time_slicing_slowdown == pytest.approx(1.2)
    assert mean.name == "before + after" and mean_profile([before]) is before
    with pytest.raises(ValueError, match="other sizes or units"):
        mean_profile([before, dataclasses.replace(after, micro_batches=[1, 4])])


def test_a_sweeps_calibrations_at_the_same_size_pool_and_the_rest_stay_the_runs_own(make_profile):
    """Unit and optimizer times: the mean over the calibrations measured at the same sizes, threads,
    co-runners and network. Links and the time-slicing slowdown, measured for the run's worker
    count, stay the run's own."""
    import dataclasses

    own = dataclasses.replace(make_profile(f=1e-3, b=2e-3, optimizer=1e-9, p2p=Link(3e9, 2e-5)), name="w4",
                              time_slicing_slowdown=1.2, co_runners=1, threads=1)
    twin = dataclasses.replace(make_profile(f=3e-3, b=4e-3, optimizer=5e-9), name="w2", co_runners=1, threads=1)
    others = [dataclasses.replace(twin, micro_batches=[1, 4]), dataclasses.replace(twin, co_runners=0),
              dataclasses.replace(twin, threads=2), dataclasses.replace(twin, model={"width": 1.0})]
    pooled = pooled_profile(own, [own, twin, *others])
    assert pooled.units[4].forward == pytest.approx([2e-3, 4e-3])
    assert pooled.optimizer_seconds_per_param == pytest.approx(3e-9)
    assert pooled.p2p == own.p2p and pooled.time_slicing_slowdown == 1.2 and pooled.co_runners == 1
    assert pooled.name == "w4 (pooled: 2 calibrations)"
    assert pooled.assumptions[-1].startswith("unit, optimizer and gradient-sweep times: the mean of 2 calibrations")
    assert pooled_profile(own, others) is own and pooled_profile(own, []) is own


def test_a_sweeps_jitter_is_the_median_over_its_calibrations_not_the_mean(make_profile):
    """One calibration disturbed by something else measures a jitter hundreds of times the others'
    (0.004 to 15 ms² per second of compute within one sweep here); the mean would take that to
    every meeting of ranks the sweep predicts, the median does not."""
    import dataclasses

    calm = [dataclasses.replace(make_profile(), name=f"c{i}", jitter=j) for i, j in enumerate((1e-4, 2e-4, 3e-4))]
    disturbed = dataclasses.replace(make_profile(), name="d", jitter=1.5e-2)
    assert pooled_profile(calm[0], [*calm, disturbed]).jitter == pytest.approx(2.5e-4)
    assert pooled_profile(calm[0], calm).jitter == pytest.approx(2e-4)


def test_links_measured_in_several_rounds_take_each_figures_median(make_profile):
    import dataclasses

    runs = [dataclasses.replace(make_profile(), p2p=Link(bw, lat), allreduce=Link(2 * bw, 3 * lat, busy))
            for bw, lat, busy in ((2e9, 1e-4, 0.7), (3e9, 3e-3, 0.9), (1e9, 2e-4, 0.8))]
    p2p, allreduce = median_links(runs)
    assert p2p == Link(bandwidth=2e9, latency=2e-4)
    assert allreduce.bandwidth == 4e9 and allreduce.latency == pytest.approx(6e-4) and allreduce.busy == 0.8


def test_a_profile_saved_before_jitter_was_measured_loads_without_it(tmp_path, make_profile):
    data = make_profile().to_dict()
    del data["jitter"], data["time_slicing_slowdown"], data["allreduce"]["busy"]
    loaded = DeviceProfile.from_dict(data)
    assert loaded.jitter == 0.0 and loaded.time_slicing_slowdown == 1.0 and loaded.allreduce.busy == 1.0


def test_a_profile_measured_for_another_network_is_refused(make_profile):
    with pytest.raises(ValueError, match="measured for model"):
        predict(ModelConfig(), make_profile(), Candidate(1, 1, 1, 1, 8))


def test_the_assumed_h100_reproduces_the_measured_h100_step_and_names_its_figures():
    nvlink, ib = assumed_gpu_profile("h100-nvlink"), assumed_gpu_profile("h100-ib")
    single = predict(ModelConfig(), nvlink, Candidate(1, 1, 1, 1, 128))
    assert single.images_per_s == pytest.approx(9177, rel=0.01)
    text = " ".join(ib.assumptions)
    assert "450 GB/s" in text and "50 GB/s" in text and "InfiniBand" in text
    # a two-stage pipeline of 8 replicas puts each stage on its own node: the cut runs over InfiniBand
    layout = Candidate(2, 1, 8, 8, 1024)
    assert predict(ModelConfig(), ib, layout).step_seconds > predict(ModelConfig(), nvlink, layout).step_seconds
    with pytest.raises(ValueError, match="unknown assumed profile"):
        assumed_gpu_profile("tpu")


def test_timing_the_tiny_network_gives_every_unit_a_time_and_conv1_no_input_gradient(tiny):
    times = time_units(tiny, 2, reps=1)
    assert len(times) == len(unit_names(1))
    assert times[0][1] == 0.0
    assert all(f > 0 for f, _, _ in times)
    assert all(b > 0 for _, b, _ in times[1:])


def test_two_local_processes_measure_a_link_with_positive_bandwidth_and_latency():
    p2p, allreduce = measure_links("gloo", sizes=(1024, 4 << 20), reps=2)
    for link in (p2p, allreduce):
        assert link.bandwidth > 0 and link.latency > 0
    assert p2p.busy == 1.0 and 0 < allreduce.busy <= 1.0  # the all-reduce's CPU over its wall time


def _children() -> set[int]:
    """This process's child processes (Linux /proc)."""
    import os

    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
            out.add(int(pid))
    return out


def test_a_link_measured_beside_training_processes_stops_them_after(tiny):
    before = _children()
    p2p, allreduce = measure_links("gloo", sizes=(1024, 4 << 20), reps=2, beside=(tiny, 2, 2))
    for link in (p2p, allreduce):
        assert link.bandwidth > 0 and link.latency > 0
    assert _children() == before


def test_the_time_slicing_slowdown_is_measured_and_every_co_runner_stopped_even_paused_ones(tiny):
    """The extra co-runners are paused and resumed in turn; whichever state the last rep left them in,
    none outlives the measurement."""
    before = _children()
    for reps in (1, 2):  # an odd count ends with the extras running, an even one with them paused
        slowdown = time_slicing_slowdown(tiny, workers=4, co_runners=1, threads=1, micro_batch=2, reps=reps)
        assert 1.0 <= slowdown < 10.0
        assert _children() == before


def test_co_runners_train_the_network_until_stopped(tiny):
    procs = start_co_runners(tiny, 1, threads=1, micro_batch=2)
    try:
        assert all(p.poll() is None for p in procs)
    finally:
        stop_co_runners(procs)
    assert all(p.returncode is not None for p in procs)
