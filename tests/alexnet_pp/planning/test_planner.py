"""The planner's choice on toy cost tables (the `test` preset's network, every unit 1 ms per image
for each of F, B and W), worked out by hand for 2 workers and a batch of 8:

- data parallel (1×1×2): each replica trains 4 images through 12 units × 3 ms = 144 ms, any M;
- two towers (1×2×1): a tower does 6.5 ms of each kind per image (half of conv1, conv2, conv5,
  one half of each split layer, all of fc8): 8 × 19.5 = 156 ms;
- two stages (2×1×1), 6 units each, micro-batch 8/M: (M + 1) · 18 ms · 8/M, 162 ms at M = 8.
"""

import pytest

from alexnet_pp.planning.cli_plan import main_plan
from alexnet_pp.planning.costmodel import Candidate
from alexnet_pp.planning.planner import candidate_layouts, format_table, rank_layouts
from alexnet_pp.planning.profile import DeviceProfile, Link

SLOW_COLLECTIVES = Link(bandwidth=1e30, latency=1.0)  # every all-reduce / all-gather step: 1 s


def shape(layout):
    return (layout.pp, layout.tp, layout.dp, layout.micro_batches)


def test_every_layout_of_four_workers_is_enumerated_once():
    got = sorted(shape(x) for x in candidate_layouts(4, 8))
    want = sorted([(1, 1, 4, m) for m in (1, 2)] + [(2, 1, 2, m) for m in (1, 2, 4)] + [(4, 1, 1, m) for m in (1, 2, 4, 8)]
                  + [(1, 2, 2, m) for m in (1, 2, 4)] + [(2, 2, 1, m) for m in (1, 2, 4, 8)])
    assert got == want


def test_one_stage_is_not_repeated_per_pipeline_schedule():
    layouts = list(candidate_layouts(2, 8, ("1f1b", "zb-h1")))
    assert sum(1 for x in layouts if x.pp == 1) == len([x for x in candidate_layouts(2, 8) if x.pp == 1])


def test_with_free_links_the_planner_picks_data_parallelism_with_the_least_memory(tiny, make_profile):
    ranked = rank_layouts(tiny, make_profile(), workers=2, batch=8)
    best = ranked[0]
    assert best.layout == Candidate(1, 1, 2, 4, 8)  # 144 ms at every M; micro-batch 1 holds the least
    assert best.step_seconds == pytest.approx(0.144)
    by_shape = {shape(p.layout): p for p in ranked}
    assert by_shape[(1, 2, 1, 1)].step_seconds == pytest.approx(0.156)
    assert by_shape[(2, 1, 1, 8)].step_seconds == pytest.approx(0.162)
    assert by_shape[(2, 1, 1, 1)].step_seconds == pytest.approx(0.288)
    speeds = [p.images_per_s for p in ranked]
    assert speeds == sorted(speeds, reverse=True)


def test_with_slow_collectives_the_planner_picks_the_pipeline_with_the_most_micro_batches(tiny, make_profile):
    ranked = rank_layouts(tiny, make_profile(allreduce=SLOW_COLLECTIVES), workers=2, batch=8)
    assert shape(ranked[0].layout) == (2, 1, 1, 8)
    assert ranked[0].images_per_s == pytest.approx(8 / 0.162)


def test_offered_zb_h1_the_planner_takes_it_for_its_smaller_bubble(tiny, make_profile):
    """ZB-H1, F = B = W = 6 ms a micro-batch of 1 on each stage: 8 · 18 + (F + B − W) = 150 ms; at
    M = 4 (micro-batch 2, 12 ms each): 4 · 36 + 12 = 156 ms, still ahead of 1F1B's 162 ms at M = 8."""
    ranked = rank_layouts(tiny, make_profile(allreduce=SLOW_COLLECTIVES), workers=2, batch=8,
                          schedules=("1f1b", "zb-h1"))
    assert ranked[0].layout == Candidate(2, 1, 1, 8, 8, "zb-h1")
    assert ranked[0].step_seconds == pytest.approx(0.150)
    assert ranked[1].layout == Candidate(2, 1, 1, 4, 8, "zb-h1")
    assert ranked[1].step_seconds == pytest.approx(0.156)
    assert ranked[2].layout == Candidate(2, 1, 1, 8, 8, "1f1b")


def test_layouts_over_the_memory_limit_rank_after_every_layout_that_fits(tiny, make_profile):
    everything = rank_layouts(tiny, make_profile(), workers=2, batch=8)
    limit = min(p.memory_per_worker for p in everything)
    ranked = rank_layouts(tiny, make_profile(), workers=2, batch=8, max_memory=limit)
    fits = [p.fits for p in ranked]
    assert fits == sorted(fits, reverse=True) and any(fits) and not all(fits)
    assert all(p.memory_per_worker <= limit for p in ranked if p.fits)


def test_the_table_labels_its_numbers_as_predictions(tiny, make_profile):
    ranked = rank_layouts(tiny, make_profile(), workers=2, batch=8)
    table = format_table(ranked, top=3)
    assert "img/s (pred)" in table
    assert "1×1×2" in table.splitlines()[2]
    # the toy profile was measured at micro-batches 1 and 2: the best layout (micro-batch 1) is not extrapolated
    assert not ranked[0].extrapolated and "*" not in table.splitlines()[2]
    assert any(p.extrapolated for p in ranked)
    full = format_table(ranked)
    assert "extrapolated" in full.splitlines()[-1]


def test_plan_command_prints_the_ranking_and_the_profiles_assumptions(tmp_path, capsys, make_profile):
    path = tmp_path / "toy.json"
    make_profile(allreduce=SLOW_COLLECTIVES).save(path)
    assert main_plan(["--workers", "2", "--batch", "8", "--preset", "test", "--device-profile", str(path),
                      "--schedule", "1f1b", "--schedule", "zb-h1", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "PREDICTED" in out and "toy costs" in out
    first_row = out.splitlines()[3]
    assert "2×1×1" in first_row and "zb-h1" in first_row


def test_plan_command_refuses_a_worker_count_no_layout_can_use(tmp_path, make_profile):
    """13 workers: 13 replicas cannot split 8 images, 13 stages exceed the 12 units, T = 2 needs an even count."""
    path = tmp_path / "toy.json"
    make_profile().save(path)
    with pytest.raises(SystemExit, match="no layout"):
        main_plan(["--workers", "13", "--batch", "8", "--preset", "test", "--device-profile", str(path)])


def test_plan_measures_this_cpu_and_its_time_slicing_for_more_workers_than_cores(tmp_path, capsys):
    """Without a profile, `plan` measures this machine (the tiny network, fast) and keeps it; for
    more one-thread workers than cores it also measures what time slicing costs them."""
    from alexnet_pp.host import cores

    path = tmp_path / "measured.json"
    workers = cores() + 1
    assert main_plan(["--workers", str(workers), "--batch", "8", "--preset", "test", "--measure-micro-batches", "1,2",
                      "--co-runners", "1", "--save-profile", str(path), "--top", "2"]) == 0
    profile = DeviceProfile.load(path)
    assert profile.cores == cores() and profile.co_runners == 1 and profile.time_slicing_slowdown >= 1.0
    out = capsys.readouterr().out
    assert "time slicing: a pass took" in out and "PREDICTED" in out
