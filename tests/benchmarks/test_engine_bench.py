"""The engine benchmark's schedule comparison, on made-up rank results (the real runs are the benchmark)."""

from types import SimpleNamespace

import pytest

from benchmarks.engine_bench import schedule_row
from benchmarks.timelines import plot_timelines


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
    return SimpleNamespace(coord={"rank": r, "stage": stage}, stats=stats, bounds=(0, 6, 12),
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
    assert row["cut"] == [0, 6, 12]


def test_the_timeline_figure_is_written(tmp_path):
    one_f = {r.coord["rank"]: (r.coord["stage"], r.timeline)
             for r in (rank(0, 0, 0.1, 0.1, 0.1, 0, 1), rank(1, 1, 0.1, 0.1, 0.1, 0, 1))}
    zb = {r.coord["rank"]: (r.coord["stage"], r.timeline)
          for r in (rank(0, 0, 0.1, 0.1, 0.05, 0.05, 1), rank(1, 1, 0.1, 0.1, 0.05, 0.05, 1))}
    out = tmp_path / "t.png"
    plot_timelines([(2, 4, one_f, zb)], str(out), title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_the_comparison_summary_takes_memory_from_runs_given_the_cut(capsys):
    from benchmarks.engine_bench import schedule_summary

    rows = [{"P": 2, "M": 4, "schedule": s, "mean_bubble": b, "img_s": i} for s, b, i in
            (("1f1b", 0.2, 10.0), ("zb-h1", 0.1, 11.0), ("1f1b", 0.22, 9.0), ("zb-h1", 0.12, 10.0))]
    ratios = [{"P": 2, "M": 4, "bubble_ratio": 0.5, "speedup": 1.1, "memory_ratio": 0.8, "both_given_the_cut": False},
              {"P": 2, "M": 4, "bubble_ratio": 0.55, "speedup": 1.11, "memory_ratio": 1.02, "both_given_the_cut": True}]
    schedule_summary({"schedules": rows, "schedule_ratios": ratios}, [(2, 4)])
    out = capsys.readouterr().out
    assert "peak memory 1.020 [1.020 – 1.020]" in out
    assert "1f1b bubble 0.210 [0.200 – 0.220]" in out and "images/s 1.105 [1.100 – 1.110]" in out
