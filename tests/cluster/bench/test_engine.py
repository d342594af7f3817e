"""`alexnet-pp bench engine` (cluster/bench/engine.py): the bubble repeats and the schedule comparison,
on made-up rank results (the real runs are the benchmark)."""

from types import SimpleNamespace

import pytest

from cluster.bench.engine import bubble_rows, bubble_spread, main, schedule_ratio, schedule_row, schedule_summary
from cluster.bench.report import Report
from cluster.bench.timelines import plot_timelines


def rank(r, stage, bubble, fwd, bwd, wgt, peak, m=4):
    stats = [{"step": k, "seconds": 2.0 + 0.1 * k, "bubble": bubble,
              "phases": {"forward": fwd * m, "backward": bwd * m, "backward_weight": wgt * m}} for k in range(1, 5)]
    t, events = 100.0, []
    for i in range(m):
        for name, phase, d in (("ForwardPass", "forward", fwd), ("BackwardPass", "backward", bwd),
                               ("BackwardWeightPass", "backward_weight", wgt), ("SendGrad", "send", 0.01)):
            if d:
                events.append({"name": name, "phase": phase, "start": t, "end": t + d, "buffer_id": i % 2})
                t += d
    return SimpleNamespace(coord={"rank": r, "stage": stage}, stats=stats, cut="6",
                           peak_memory=peak * 2**20, timeline=events)


def test_a_schedule_row_takes_medians_per_stage_and_the_slowest_ranks_step():
    results = [rank(0, 0, 0.10, 0.1, 0.05, 0.05, 900), rank(1, 1, 0.20, 0.1, 0.05, 0.05, 700)]
    row = schedule_row("zb-h1", 2, 4, results, warmup=1, batch=128)
    assert row["bubble"] == [0.10, 0.20] and row["mean_bubble"] == pytest.approx(0.15)
    assert row["fbw_ms"][0] == pytest.approx((100, 50, 50))
    assert row["step_s"] == pytest.approx(2.3)  # steps 2..4: 2.2, 2.3, 2.4
    assert row["img_s"] == pytest.approx(128 / 2.3)
    assert row["peak_mb"] == {0: 900, 1: 700}
    assert row["theory"] == pytest.approx(1 / 13) and len(row["ideal"]) == 2
    assert row["cut"] == "6"


def test_the_timeline_figure_is_written(tmp_path):
    one_f = {r.coord["rank"]: (r.coord["stage"], r.timeline)
             for r in (rank(0, 0, 0.1, 0.1, 0.1, 0, 1), rank(1, 1, 0.1, 0.1, 0.1, 0, 1))}
    zb = {r.coord["rank"]: (r.coord["stage"], r.timeline)
          for r in (rank(0, 0, 0.1, 0.1, 0.05, 0.05, 1), rank(1, 1, 0.1, 0.1, 0.05, 0.05, 1))}
    out = tmp_path / "t.png"
    plot_timelines([(2, 4, one_f, zb)], str(out), title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_the_ratios_compare_zb_h1_with_1f1b_rank_by_rank():
    one_f = {"P": 2, "M": 4, "mean_bubble": 0.2, "img_s": 10.0, "peak_mb": {0: 100, 1: 200}, "cut_given": False}
    zb = {"P": 2, "M": 4, "mean_bubble": 0.05, "img_s": 12.0, "peak_mb": {0: 105, 1: 180}, "cut_given": True}
    r = schedule_ratio(one_f, zb, run=0)
    assert r["bubble_ratio"] == pytest.approx(0.25) and r["speedup"] == pytest.approx(1.2)
    assert r["memory_ratio"] == pytest.approx(1.05) and r["both_given_the_cut"] is False
    assert r["largest_memory_ratio"] == pytest.approx(0.9)  # 180 against 200: the largest ranks' peaks


def test_the_comparison_summary_takes_memory_from_runs_given_the_cut(capsys):
    rows = [{"P": 2, "M": 4, "schedule": s, "mean_bubble": b, "img_s": i} for s, b, i in
            (("1f1b", 0.2, 10.0), ("zb-h1", 0.1, 11.0), ("1f1b", 0.22, 9.0), ("zb-h1", 0.12, 10.0))]
    ratios = [{"P": 2, "M": 4, "bubble_ratio": 0.5, "speedup": 1.1, "memory_ratio": 0.8, "largest_memory_ratio": 0.7,
               "both_given_the_cut": False},
              {"P": 2, "M": 4, "bubble_ratio": 0.55, "speedup": 1.11, "memory_ratio": 1.02,
               "largest_memory_ratio": 0.98, "both_given_the_cut": True}]
    summary = schedule_summary(rows, ratios, [(2, 4)])
    out = capsys.readouterr().out
    assert "peak memory per rank 1.020 [1.020 – 1.020], largest rank's 0.980 [0.980 – 0.980]" in out
    assert "1f1b bubble 0.210 [0.200 – 0.220]" in out and "images/s 1.105 [1.100 – 1.110]" in out
    assert summary[0]["zb-h1"]["img_s"] == {"median": 10.5, "min": 10.0, "max": 11.0}


def test_a_stages_idle_share_splits_into_load_imbalance_and_fill_and_drain():
    # M = 2: stage 0 does 0.3 s per micro-batch, stage 1 0.4 s; each busy 80% / 60% of its schedule
    fast, slow = rank(0, 0, 0.4, 0.1, 0.2, 0, 1, m=2), rank(1, 1, 0.2, 0.2, 0.2, 0, 1, m=2)
    rows = bubble_rows([fast.stats, slow.stats], 2)
    assert rows[0]["measured"] == 0.4 and rows[0]["theory"] == pytest.approx(1 / 3)
    # stage 0's schedule: 2 × 0.3 / (1 − 0.4) = 1 s, of which it waits 2 × (0.4 − 0.3) = 0.2 s for stage 1
    assert rows[0]["imbalance"] == pytest.approx(0.2) and rows[0]["fill_drain"] == pytest.approx(0.2)
    assert rows[1]["imbalance"] == 0 and rows[1]["fill_drain"] == pytest.approx(0.2)


def test_the_bubble_spread_is_the_largest_distance_from_theory_over_the_runs(tmp_path, capsys):
    rows = [{"M": 2, "stage": s, "measured": 1 / 3 + d, "theory": 1 / 3, "fill_drain": 1 / 3} for s, d in
            ((0, 0.01), (1, -0.02), (0, -0.06), (1, 0.03))]
    report = Report("engine", tmp_path, [], environment={})
    spread = bubble_spread(rows, 2, report)
    assert [(r["stage"], r["largest_abs_diff_pp"], r["ok"]) for r in spread] == [(0, pytest.approx(6), False),
                                                                                  (1, pytest.approx(3), True)]
    assert "OVER 5" in capsys.readouterr().out
    assert "| 2 | 0 | +1.0 -6.0 |" in report.markdown()


def test_a_run_that_failed_keeps_its_m_from_counting_as_within_five_points(tmp_path, capsys):
    rows = [{"M": 2, "stage": 0, "measured": 1 / 3 + 0.01, "theory": 1 / 3, "fill_drain": 1 / 3}]  # run 2 crashed
    spread = bubble_spread(rows, 2, Report("engine", tmp_path, [], environment={}))
    assert not spread[0]["ok"] and "INCOMPLETE, 1 run(s) failed" in capsys.readouterr().out


def test_a_crashed_configuration_is_recorded_and_the_comparison_goes_on(tmp_path, monkeypatch, capsys):
    import cluster.bench.engine as bench

    def engine_results(cfg, batches):
        if cfg.parallel.micro_batches == 4:
            raise RuntimeError("process 0 terminated with signal SIGABRT")
        return real(cfg, batches)

    real = lambda cfg, batches: [_Result(cfg.parallel.micro_batches) for _ in range(2)]  # noqa: E731
    monkeypatch.setattr(bench, "engine_results", engine_results)
    args = bench.build_parser().parse_args(["--preset", "test", "--batch", "16", "--steps", "1", "--warmup", "0",
                                            "--scratch", str(tmp_path)])
    report = Report("engine", tmp_path, [], environment={})
    rows = bench.section_bubble(args, 1, report)
    assert sorted({r["M"] for r in rows}) == [2, 8]  # M = 4 failed, M = 8 still ran
    assert [r for r in report.rows if r["section"] == "bubble_failed"][0]["M"] == 4
    assert "SIGABRT" in capsys.readouterr().out and any("M = 4 failed" in n for n in report.notes)
    assert rows[0]["live_check"] == "3 500/300; 2 400/410"


class _Result:
    """What a rank returns to the bubble comparison: step stats with phases, and its cut."""

    def __init__(self, m: int):
        self.cut = "2"
        self.cut_trials = {"3": [0.5, 0.3], "2": [0.4, 0.41]}
        self.stats = [{"phases": {"forward": 0.1 * m, "backward": 0.2 * m}, "bubble": 1 / (m + 1), "seconds": 1.0}]


def test_the_help_names_the_new_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--runs", "--schedule-layouts", "--repeats", "--figure", "--out"):
        assert flag in out
    assert "1F1B against ZB-H1" in out
