"""The end-of-run summary from every rank's step stats, and the driver's progress from history.jsonl."""

from __future__ import annotations

import io
import json
import math

import pytest

from alexnet_pp.progress import Progress
from alexnet_pp.summary import RunSummary
from cluster.run_summary import HistoryProgress, summarize_run


def stats(step: int, seconds: float, bubble: float, data_wait: float = 0.0) -> dict:
    return {"step": step, "epoch": 0, "loss": 1.0, "lr": 0.01, "images": 64, "seconds": seconds,
            "phases": {"forward": seconds / 4, "backward": seconds / 2, "data_wait": data_wait, "idle": seconds / 4},
            "bubble": bubble, "theoretical_bubble": 0.2}


def test_summary_of_a_two_stage_job():
    # stage 0 (two towers) and stage 1; step 1 is warm-up (10 s) and must not count
    ranks = [
        {"coord": {"rank": 0, "stage": 0, "tower": 0, "replica": 0},
         "stats": [stats(1, 10.0, 0.9, 0.5)] + [stats(s, 1.0, 0.2, 0.1) for s in range(2, 12)]},
        {"coord": {"rank": 1, "stage": 0, "tower": 1, "replica": 0},
         "stats": [stats(1, 10.0, 0.9, 0.5)] + [stats(s, 1.0, 0.3, 0.1) for s in range(2, 12)]},
        {"coord": {"rank": 2, "stage": 1, "tower": 0, "replica": 0},
         "stats": [stats(1, 10.0, 0.9)] + [stats(s, 1.0 if s < 11 else 3.0, 0.4) for s in range(2, 12)]},
    ]
    s = summarize_run(ranks)
    assert s.steps_timed == 10
    assert s.images_per_sec == pytest.approx(640 / 12.0)  # step time = the slowest rank's
    assert s.step_time_p50 == pytest.approx(1.0)
    assert 1.0 < s.step_time_p95 <= 3.0
    assert s.bubble_per_stage == {"0": pytest.approx(0.25), "1": pytest.approx(0.4)}
    assert s.theoretical_bubble == 0.2
    assert s.data_wait_share == pytest.approx(0.1)
    assert s.phase_share_per_stage["1"]["backward"] == pytest.approx(0.5)
    text = s.format()
    assert "53.3 images/s" in text and "stage 1: bubble 0.400 (theory 0.200)" in text


def test_summary_of_a_single_step_and_of_nothing():
    one = summarize_run([{"coord": {"stage": 0}, "stats": [stats(1, 2.0, 0.0)]}])
    assert one.images_per_sec == 32.0  # the only step is kept
    empty = summarize_run([])
    assert math.isnan(empty.images_per_sec) and empty.bubble_per_stage == {}
    assert "n/a images/s" in empty.format()


def test_history_progress_feeds_progress(tmp_path):
    path = tmp_path / "history.jsonl"
    out = io.StringIO()
    hp = HistoryProgress(path, "job1", Progress(4, log_every=2, stream=out), images_per_step=64)
    hp.poll()  # no file yet: nothing, no error
    lines = [{"job": "job1", "kind": "step", "step": s, "loss": 1.0 / s, "lr": 0.01} for s in (1, 2)]
    lines += [{"job": "other", "kind": "step", "step": 3, "loss": 9.0, "lr": 0.01},
              {"job": "job1", "kind": "eval", "step": 2, "top1": 0.5, "top5": 0.9}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"job": "job1", "kind": "st')  # cut short
    hp.poll()
    with open(path, "a") as f:  # the cut line completes; then a restart redoes step 2
        f.write('ep", "step": 3, "loss": 0.3, "lr": 0.01}\n')
        f.write(json.dumps({"job": "job1", "kind": "step", "step": 2, "loss": 5.0, "lr": 0.01}) + "\n")
        f.write(json.dumps({"job": "job1", "kind": "step", "step": 4, "loss": 0.25, "lr": 0.01}) + "\n")
    hp.close()
    text = out.getvalue()
    assert "step 2/4 loss=0.5000" in text and "step 4/4 loss=0.2500" in text
    assert "eval at step 2: top-1 0.500 top-5 0.900" in text
    assert "9.0000" not in text and "5.0000" not in text


def test_one_summary_type_survives_the_trip_to_summary_json_and_back(tmp_path):
    s = summarize_run([{"coord": {"stage": 0}, "stats": [stats(1, 2.0, 0.0), stats(2, 1.0, 0.1)]}])
    s.job_id, s.layout, s.losses, s.loss_steps, s.restarts = "j1", (2, 1, 1), [2.0, 1.5], [1, 2], 1
    s.wall_seconds = 3.0  # NaN (unset) never equals itself
    s.host_busy_cores, s.outside_ranks_cores = 1.9, 0.3
    s.write(tmp_path / "summary.json")
    back = RunSummary.read(tmp_path / "summary.json")
    assert back == s and back.final_loss == 1.5
    assert json.loads((tmp_path / "summary.json").read_text())["final_loss"] == 1.5
    s.cut, s.cut_trials = "conv3.0[82:]", {"conv3.0[40:]": [0.40, 0.46], "conv3.0[82:]": [0.43, 0.431]}
    s.write(tmp_path / "summary.json")
    assert RunSummary.read(tmp_path / "summary.json") == s
    assert "stage cut conv3.0[82:] (live check, ms per micro-batch per stage: conv3.0[40:] 400/460; conv3.0[82:] " \
           "430/431)" in s.format()
    failed = RunSummary(ok=False, job_id="j2", steps=3, error="rank 1 (stage 0, tower 1, replica 0): boom")
    assert "FAILED after 3 steps" in failed.format() and "rank 1" in failed.format()


def test_summary_keeps_each_ranks_peak_memory_and_the_stages_phase_seconds():
    ranks = [
        {"coord": {"rank": 0, "stage": 0, "tower": 0, "replica": 0},
         "stats": [{**stats(s, 1.0, 0.2), "peak_memory": 100 * s} for s in range(1, 4)]},
        {"coord": {"rank": 1, "stage": 1, "tower": 0, "replica": 0},
         "stats": [{**stats(s, 2.0, 0.2), "peak_memory": 7} for s in range(1, 4)]},
    ]
    s = summarize_run(ranks)
    assert s.peak_memory_per_rank == {"0": 300, "1": 7}
    assert s.phase_seconds_per_stage["0"]["backward"] == pytest.approx(0.5)  # seconds per step, not a share
    assert s.phase_seconds_per_stage["1"]["forward"] == pytest.approx(0.5)
    assert summarize_run(ranks).to_dict()["peak_memory_per_rank"] == {"0": 300, "1": 7}


def test_benchmarks_can_leave_out_more_warm_up_steps():
    ranks = [{"coord": {"rank": 0, "stage": 0}, "stats": [stats(1, 9.0, 0.0), stats(2, 5.0, 0.0)] +
              [stats(s, 1.0, 0.0) for s in range(3, 6)]}]
    assert summarize_run(ranks).step_time_p95 > 1.0
    three = summarize_run(ranks, warmup_steps=2)
    assert three.steps_timed == 3 and three.step_time_p95 == pytest.approx(1.0)


def test_the_cpu_a_stages_ranks_got_over_the_timed_steps():
    # warm-up step 1 spends no CPU and must not count; stage 0's two ranks: 0.5 and 0.7 cores in the
    # schedule thread, 0.1 more in other threads; stage 1: one rank, 0.25 and 0.2
    def cpu_stats(step, seconds, main, process):
        return {**stats(step, seconds, 0.0), "cpu": {"main_thread": main, "process": process}}

    ranks = [
        {"coord": {"rank": 0, "stage": 0}, "stats": [cpu_stats(1, 5.0, 0.0, 0.0)] +
         [cpu_stats(s, 2.0, 1.0, 1.2) for s in (2, 3)]},
        {"coord": {"rank": 1, "stage": 0}, "stats": [cpu_stats(1, 5.0, 0.0, 0.0)] +
         [cpu_stats(s, 2.0, 1.4, 1.6) for s in (2, 3)]},
        {"coord": {"rank": 2, "stage": 1}, "stats": [cpu_stats(1, 5.0, 0.0, 0.0)] +
         [cpu_stats(2, 1.0, 0.25, 0.45), cpu_stats(3, 3.0, 0.75, 1.35)]},
        {"coord": {"rank": 3, "stage": 2}, "stats": [stats(s, 1.0, 0.0) for s in (1, 2, 3)]},  # no CPU recorded
    ]
    s = summarize_run(ranks)
    assert s.cpu_share_per_stage["0"] == {"main_thread": pytest.approx(0.6), "other_threads": pytest.approx(0.1)}
    assert s.cpu_share_per_stage["1"] == {"main_thread": pytest.approx(0.25), "other_threads": pytest.approx(0.2)}
    assert "2" not in s.cpu_share_per_stage
    assert "CPU per rank 0.60 cores in the schedule thread, 0.10 in others" in s.format()


def test_each_phases_cpu_per_step_of_one_rank_of_the_stage():
    # stage 0's two ranks: 0.3 and 0.5 s of forward CPU per timed step (mean 0.4); the warm-up step's
    # 9 s must not count; stage 1's rank recorded none (an older record): no entry
    def with_cpu(step, forward, recv):
        return {**stats(step, 1.0, 0.0), "phase_cpu": {"forward": forward, "recv": recv}}

    ranks = [
        {"coord": {"rank": 0, "stage": 0}, "stats": [with_cpu(1, 9.0, 9.0), with_cpu(2, 0.2, 0.0), with_cpu(3, 0.4, 0.02)]},
        {"coord": {"rank": 1, "stage": 0}, "stats": [with_cpu(1, 9.0, 9.0), with_cpu(2, 0.5, 0.01), with_cpu(3, 0.5, 0.01)]},
        {"coord": {"rank": 2, "stage": 1}, "stats": [stats(s, 1.0, 0.0) for s in (1, 2, 3)]},
    ]
    s = summarize_run(ranks)
    assert s.phase_cpu_seconds_per_stage["0"] == {"forward": pytest.approx(0.4), "recv": pytest.approx(0.01)}
    assert "1" not in s.phase_cpu_seconds_per_stage


def test_the_machine_beside_the_ranks_per_host_then_the_median_over_hosts():
    # host a: ranks 0 and 1 see 1.8 and 2.0 busy cores (median 1.9) and take 0.8 + 0.7 cores in their
    # processes: 0.4 outside them. Host b: its one rank sees 1.0, takes 0.9: 0.1 outside. Warm-up
    # step 1 (nothing busy) and the rank of an older record without host_busy do not count.
    def host_stats(step, seconds, process, busy):
        return {**stats(step, seconds, 0.0), "cpu": {"main_thread": process / 2, "process": process, "host_busy": busy}}

    ranks = [
        {"coord": {"rank": 0, "stage": 0}, "host": "a",
         "stats": [host_stats(1, 5.0, 0.0, 0.0)] + [host_stats(s, 2.0, 1.6, 3.6) for s in (2, 3)]},
        {"coord": {"rank": 1, "stage": 1}, "host": "a",
         "stats": [host_stats(1, 5.0, 0.0, 0.0)] + [host_stats(s, 2.0, 1.4, 4.0) for s in (2, 3)]},
        {"coord": {"rank": 2, "stage": 0}, "host": "b",
         "stats": [host_stats(1, 5.0, 0.0, 0.0), host_stats(2, 1.0, 0.9, 1.0), host_stats(3, 3.0, 2.7, 3.0)]},
        {"coord": {"rank": 3, "stage": 1}, "stats": [stats(s, 1.0, 0.0) for s in (1, 2, 3)]},
    ]
    s = summarize_run(ranks)
    assert s.host_busy_cores == pytest.approx((1.9 + 1.0) / 2)
    assert s.outside_ranks_cores == pytest.approx((0.4 + 0.1) / 2)
    assert "machine: 1.45 cores busy while the ranks stepped, 0.25 of them outside the ranks' processes" in s.format()
    one = summarize_run(ranks[:2])
    assert (one.host_busy_cores, one.outside_ranks_cores) == (pytest.approx(1.9), pytest.approx(0.4))
    none = summarize_run(ranks[3:])  # no machine readings: unknown, and no line for it
    assert math.isnan(none.host_busy_cores) and "machine:" not in none.format()
