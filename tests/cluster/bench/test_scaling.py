"""`alexnet-pp bench scaling`: which configurations a sweep runs, a failing one recorded without
stopping it, an interrupted sweep resuming, and a tiny sweep end to end (every file, every column,
every plot drawn), on local processes and through the Ray job path."""

from __future__ import annotations

import csv
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from alexnet_pp.config import load_config
from cluster.bench import scaling, scaling_rows
from cluster.bench.scaling import Spec, layouts_for, plan

REPO = Path(__file__).resolve().parents[3]


def test_every_layout_of_a_worker_count():
    assert layouts_for(1, 64, [4]) == [(1, 1, 1, 1)]
    assert layouts_for(2, 64, [4, 8]) == [(1, 1, 2, 1), (2, 1, 1, 4), (2, 1, 1, 8), (1, 2, 1, 1)]
    four = layouts_for(4, 64, [4])
    assert four == [(1, 1, 4, 1), (2, 1, 2, 4), (4, 1, 1, 4), (1, 2, 2, 1), (2, 2, 1, 4)]
    assert (2, 1, 2, 4) not in layouts_for(4, 4, [4])  # batch 4 does not split into D·M = 8 micro-batches


def test_the_calibration_trains_beside_as_many_workers_as_the_cores_hold(monkeypatch):
    monkeypatch.setattr(scaling, "cores", lambda: 2)
    assert [scaling.co_runners(w, 1) for w in (1, 2, 4)] == [0, 1, 1]
    assert scaling.co_runners(4, 2) == 0  # two threads a worker: one worker fills both cores
    monkeypatch.setattr(scaling, "cores", lambda: 16)
    assert scaling.co_runners(4, 1) == 3


def test_the_p2p_link_is_measured_beside_the_other_workers_the_cores_hold(monkeypatch):
    monkeypatch.setattr(scaling, "cores", lambda: 2)
    assert [scaling.link_co_runners(w, 1) for w in (1, 2, 3, 4, 8)] == [0, 0, 1, 2, 2]
    assert scaling.link_co_runners(4, 2) == 1  # two threads a worker: one fills both cores


def test_a_calibration_for_more_workers_than_cores_carries_the_measured_slowdown(tmp_path):
    """A real calibration of the tiny network for 4 one-thread workers: on a machine of fewer than 4
    cores the profile carries the time-slicing slowdown measured once for the sweep (and says so),
    and the p2p link was measured beside the others; on a bigger one neither applies. The next
    round's calibration measures the links again (predictions take their median) and reuses the
    slowdown."""
    from alexnet_pp.planning.profile import DeviceProfile

    argv = ["--preset", "test", "--workers", "4", "--micro-batches", "2", "--batch", "16", "--out", str(tmp_path)]
    sweep = scaling.Sweep(scaling.build_parser().parse_args(argv), argv)
    sweep.specs = plan([4], sweep.batch, [2], [], None, True, 1, "worker-count")
    try:
        out = sweep.calibrate(Spec("calibration", 4))
        again = sweep.calibrate(Spec("calibration", 4, round=1))
    finally:
        scaling.shutil.rmtree(sweep.scratch, ignore_errors=True)
    profile = DeviceProfile.load(tmp_path / out["profile"])
    second = DeviceProfile.load(tmp_path / again["profile"])
    if scaling.cores() < 4:
        assert profile.time_slicing_slowdown >= 1.0
        assert any(a.startswith("time slicing:") for a in profile.assumptions)
        assert any("p2p while" in a for a in profile.assumptions)
        assert second.time_slicing_slowdown == profile.time_slicing_slowdown
        assert sorted(sweep._links) == [(0, 0), (0, 1), (2, 0), (2, 1)]  # alone and beside 2, in each round
    else:
        assert profile.time_slicing_slowdown == 1.0


def test_idle_is_the_time_in_no_timed_instruction():
    phases = {"0": {"forward": 1.0, "backward": 2.0, "send": 0.5, "recv": 1.5, "idle": 2.5, "optimizer": 0.2}}
    assert scaling.exclusive_idle(phases)["0"] == {**phases["0"], "idle": 0.5}
    assert scaling.exclusive_idle({"0": {"forward": 1.0, "recv": 0.3, "idle": 0.2}})["0"]["idle"] == 0.0


def test_a_sweep_calibrates_then_runs_baselines_then_each_layout_and_deepspeeds_cut():
    ids = [s.id for s in plan([1, 2], 64, [4], scaling.BASELINES)]
    assert ids == ["calibration:W1", "plain:W1", "engine:1x1x1:M1",
                   "calibration:W2", "plain:W2", "ddp:W2", "engine:1x1x2:M1", "engine:2x1x1:M4",
                   "ds-default:2x1x1:M4", "engine:1x2x1:M1"]
    explicit = plan([2], 64, [4], ("plain",), [(2, 1, 1, 2), (9, 2, 1, 2)], predict=False)
    assert [s.id for s in explicit] == ["plain:W2", "engine:2x1x1:M2", "engine:9x2x1:M2"]  # no baselines for 18


def fake_runner(calls, fail=(), interrupt=()):
    def run(sweep, spec: Spec):
        calls.append(spec.id)
        if spec.id in interrupt:
            interrupt.remove(spec.id)
            raise KeyboardInterrupt
        if spec.id in fail:
            raise RuntimeError(f"{spec.id} fell over")
        if spec.kind == "calibration":
            return {"micro_batch_sizes": [16], "co_runners": spec.workers - 1, "profile": "none"}
        ips = 100.0 * spec.workers ** 0.8 * (0.9 if spec.kind == "ds-default" else 1.0)
        row = {"images_per_s": ips, "step_p50_s": 64 / ips, "step_p95_s": 70 / ips, "steps_timed": 3,
               "peak_memory_bytes": {str(r): 2**28 for r in range(spec.workers)}}
        if spec.kind in ("engine", "ds-default"):
            row.update(partition="measured", bubble_theory=(spec.pp - 1) / (spec.m + spec.pp - 1),
                       bubble_measured={str(s): 0.2 for s in range(spec.pp)},
                       phases_s={str(s): {"forward": 0.1, "backward": 0.2, "idle": 0.05} for s in range(spec.pp)})
        else:
            row["threads"] = 1
        return row
    return run


def test_a_failing_configuration_is_recorded_and_an_interrupted_sweep_resumes(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--preset", "test", "--workers", "1,2", "--micro-batches", "2", "--gpu-workers", "", "--no-predict",
            "--out", str(out)]
    calls: list[str] = []
    # first run: 2×1×1 fails (recorded, the sweep goes on), then Ctrl-C at 1×2×1
    code = scaling.main(argv, runner=fake_runner(calls, fail={"engine:2x1x1:M2"}, interrupt=["engine:1x2x1:M1"]))
    assert code == 130
    assert calls == ["plain:W1", "engine:1x1x1:M1", "plain:W2", "ddp:W2", "engine:1x1x2:M1", "engine:2x1x1:M2",
                     "ds-default:2x1x1:M2", "engine:1x2x1:M1"]
    partial = json.loads((out / "scaling.json").read_text())
    assert "INCOMPLETE: the sweep was interrupted; run the same command again to resume" in partial["notes"]
    failed = next(r for r in partial["rows"] if r["id"] == "engine:2x1x1:M2")
    assert failed["status"] == "failed" and "RuntimeError: engine:2x1x1:M2 fell over" in failed["error"]
    assert "2×1×1 M2 | RuntimeError: engine:2x1x1:M2 fell over" in (out / "scaling.md").read_text()
    # the same command again: only what is left runs, and the report holds every row
    calls.clear()
    assert scaling.main(argv, runner=fake_runner(calls)) == 0
    assert calls == ["engine:1x2x1:M1"]
    rows = json.loads((out / "scaling.json").read_text())["rows"]
    assert [r["id"] for r in rows] == ["plain:W1", "engine:1x1x1:M1", "plain:W2", "ddp:W2", "engine:1x1x2:M1",
                                       "engine:2x1x1:M2", "ds-default:2x1x1:M2", "engine:1x2x1:M1"]
    two = next(r for r in rows if r["id"] == "engine:1x1x2:M1")
    assert two["efficiency"] == pytest.approx(2**0.8 / 2) and two["vs_plain"] == pytest.approx(1.0)
    assert two["vs_ddp"] == pytest.approx(1.0) and two["peak_memory_max_bytes"] == 2**28
    assert two["bytes_replicas"] > 0 and two["bytes_stages"] == 0 and "predicted_images_per_s" not in two
    # --retry-failed runs the failure again; other settings refuse to mix with these rows
    calls.clear()
    assert scaling.main([*argv, "--retry-failed"], runner=fake_runner(calls)) == 0
    assert calls == ["engine:2x1x1:M2"]
    ok = next(r for r in json.loads((out / "scaling.json").read_text())["rows"] if r["id"] == "engine:2x1x1:M2")
    assert ok["status"] == "ok" and ok["vs_ds_default"] == pytest.approx(1 / 0.9)
    assert scaling.main([*argv, "--steps", "3"], runner=fake_runner(calls)) == 2
    assert "measured with other settings; pass --fresh" in capsys.readouterr().err


def test_rounds_repeat_the_sweep_and_every_second_one_runs_each_worker_count_backwards():
    ids = [s.id for s in plan([1, 2], 64, [4], ("plain",), repeats=2)]
    assert ids == ["calibration:W1", "plain:W1", "engine:1x1x1:M1",
                   "calibration:W2", "plain:W2", "engine:1x1x2:M1", "engine:2x1x1:M4", "engine:1x2x1:M1",
                   "calibration:W1#2", "engine:1x1x1:M1#2", "plain:W1#2",
                   "calibration:W2#2", "engine:1x2x1:M1#2", "engine:2x1x1:M4#2", "engine:1x1x2:M1#2", "plain:W2#2"]


def test_calibrating_per_layout_brackets_each_run_and_keeps_the_order_of_rounds():
    ids = [s.id for s in plan([1, 2], 64, [4], ("plain",), repeats=2, calibrate="layout")]
    around = lambda x: [f"calibration:{x}:before", x, f"calibration:{x}:after"]  # noqa: E731
    assert ids == ["plain:W1", *around("engine:1x1x1:M1"),
                   "plain:W2", *around("engine:1x1x2:M1"), *around("engine:2x1x1:M4"), *around("engine:1x2x1:M1"),
                   *[i + "#2" for i in around("engine:1x1x1:M1")], "plain:W1#2",
                   *[i + "#2" for i in [*around("engine:1x2x1:M1"), *around("engine:2x1x1:M4"), *around("engine:1x1x2:M1")]],
                   "plain:W2#2"]
    assert plan([1], 64, [4], (), calibrate="layout", predict=False) == plan([1], 64, [4], (), predict=False)


def test_a_layout_is_predicted_from_every_calibration_of_the_sweep_at_its_micro_batch(tmp_path):
    """1×1×1 (micro-batch 8) is calibrated at 1× and 3× a GPU's unit times: predicted at 2×. 2×1×1 M2
    and 1×1×2 (micro-batch 4) are calibrated at 1× (its after-calibration fails), and 4× and 7×:
    both are predicted from the mean of the three, 4×, whichever ran beside them. The links are the
    medians over the worker count's calibrations: 1×1×2's before-calibration measured a slow
    all-reduce, which the two others at W = 2 outvote."""
    import dataclasses

    from alexnet_pp.planning.costmodel import Candidate, predict
    from alexnet_pp.planning.profile import Link, assumed_gpu_profile

    def calibration(sweep, n, k):
        gpu = assumed_gpu_profile("h100-nvlink", sweep.model)
        units = [dataclasses.replace(u, forward=[k * f], backward_input=[k * b], backward_weight=[k * w])
                 for u, (f, b, w) in zip(gpu.units, gpu.unit_seconds(n))]
        return dataclasses.replace(gpu, micro_batches=[n], units=units)

    slower = {(1, "before"): 1.0, (1, "after"): 3.0, (2, "before"): 1.0, (3, "before"): 4.0, (3, "after"): 7.0}
    seen = {}

    def run(sweep, spec):
        seen["sweep"] = sweep
        if spec.kind == "calibration":
            if spec.around == "after" and spec.pp == 2:
                raise RuntimeError("no calibration after the pipeline")
            path = sweep.spec_profile_path(spec)
            path.parent.mkdir(parents=True, exist_ok=True)
            n = 8 // (spec.dp * spec.m)
            profile = calibration(sweep, n, slower[spec.pp + 2 * (spec.dp - 1), spec.around])
            if spec.dp == 2 and spec.around == "before":
                profile = dataclasses.replace(profile, allreduce=Link(bandwidth=1e6, latency=1e-2))
            profile.save(path)
            return {"micro_batch_sizes": [n], "co_runners": 0, "profile": str(path.relative_to(sweep.out))}
        return {"images_per_s": 100.0, "step_p50_s": 0.08, "step_p95_s": 0.09, "steps_timed": 2,
                "peak_memory_bytes": {"0": 1}, "partition": "measured", "phases_s": {"0": {"forward": 0.01}}}

    out = tmp_path / "out"
    assert scaling.main(["--preset", "test", "--layouts", "1,1,1", "2,1,1,2", "1,1,2", "--baselines", "",
                         "--gpu-workers", "", "--batch", "8", "--out", str(out)], runner=run) == 0
    rows = {r["id"]: r for r in json.loads((out / "scaling.json").read_text())["rows"]}
    sweep = seen["sweep"]

    def expect(k, n, *layout):
        return predict(sweep.model, calibration(sweep, n, k), Candidate(*layout, 8, "1f1b", "measured")).images_per_s

    assert rows["engine:1x1x1:M1"]["predicted_images_per_s"] == pytest.approx(expect(2.0, 8, 1, 1, 1, 1), rel=1e-9)
    assert rows["engine:2x1x1:M2"]["predicted_images_per_s"] == pytest.approx(expect(4.0, 4, 2, 1, 1, 2), rel=1e-9)
    assert rows["engine:1x1x2:M1"]["predicted_images_per_s"] == pytest.approx(expect(4.0, 4, 1, 1, 2, 1), rel=1e-9)
    assert "(pooled: 3 calibrations)" in rows["engine:2x1x1:M2"]["profile"]
    assert "(pooled: 2 calibrations)" in rows["engine:1x1x1:M1"]["profile"]
    assert rows["calibration:engine:2x1x1:M2:after"]["status"] == "failed"
    md = (out / "scaling.md").read_text()
    assert "calibrated right before and right after each layout's run, in every round: 3 layouts' profiles" in md
    assert "pooled over every calibration of this sweep at the layout's micro-batch" in md


def test_the_background_a_prediction_charges_comes_from_runs_before_it():
    """Medians over the earlier runs at the same worker count, else over all earlier runs; runs that
    failed or measured nothing (an older sweep, no /proc/stat) do not count."""
    def run(w, outside, others, kind="engine", status="ok"):
        return {"kind": kind, "workers": w, "status": status, "outside_ranks_cores": outside,
                "cpu_share": {"0": {"main_thread": 0.7, "other_threads": others[0]},
                              "1": {"main_thread": 0.6, "other_threads": others[-1]}}}

    assert scaling_rows.background_of([], 2) is None
    one = run(1, 0.10, [0.02])
    assert scaling_rows.background_of([one, {"kind": "plain", "workers": 2, "status": "ok"}], 2) == \
        {"cores": 0.10, "cores_per_rank": pytest.approx(0.02), "runs": 1}
    twos = [run(2, 0.20, [0.05, 0.07]), run(2, 0.40, [0.09]), run(2, 9.0, [1.0], status="failed"),
            run(2, None, [1.0]), run(2, 0.30, [0.08], kind="ds-default")]
    got = scaling_rows.background_of([one, *twos], 2)
    assert got == {"cores": pytest.approx(0.30), "cores_per_rank": pytest.approx(0.08), "runs": 3}
    assert scaling_rows.background_cores(twos[0]) == pytest.approx(0.20 + 2 * 0.06)
    assert scaling_rows.background_of([one, *twos], 4)["runs"] == 4  # none at W = 4 yet: all of them


def test_each_layout_is_predicted_with_the_background_of_the_runs_before_it(tmp_path):
    """Layouts at W = 2 in one sweep: the first has no earlier run and is predicted without a
    background; the second charges what the first measured (0.4 cores outside the ranks, 0.1 per
    rank's other threads) and so predicts fewer images/s from the same calibration."""
    from alexnet_pp.planning.profile import assumed_gpu_profile
    import dataclasses

    def run(sweep, spec):
        if spec.kind == "calibration":
            path = sweep.spec_profile_path(spec)
            path.parent.mkdir(parents=True, exist_ok=True)
            dataclasses.replace(assumed_gpu_profile("h100-nvlink", sweep.model), cores=2, threads=1,
                                co_runners=1).save(path)
            return {"micro_batch_sizes": [4], "co_runners": 1, "profile": str(path.relative_to(sweep.out))}
        return {"images_per_s": 100.0, "step_p50_s": 0.08, "step_p95_s": 0.09, "steps_timed": 2,
                "peak_memory_bytes": {"0": 1}, "partition": "measured", "phases_s": {"0": {"forward": 0.01}},
                "host_busy_cores": 1.9, "outside_ranks_cores": 0.4, "cut": "2" if spec.pp == 2 else "",
                "cpu_share": {"0": {"main_thread": 0.7, "other_threads": 0.1}},
                "phases_cpu_s": {str(s): {"forward": 0.02, "backward": 0.04, "recv": 0.01} for s in range(spec.pp)}}

    out = tmp_path / "out"
    argv = ["--preset", "test", "--layouts", "1,1,2", "1,1,2,2", "2,1,1,2", "1,2,1", "1,2,1,2", "--baselines", "",
            "--gpu-workers", "", "--batch", "8", "--out", str(out)]
    assert scaling.main(argv, runner=run) == 0
    rows = {r["id"]: r for r in json.loads((out / "scaling.json").read_text())["rows"]}
    first, second = rows["engine:1x1x2:M1"], rows["engine:1x1x2:M2"]
    assert first["predicted_background"] is None and first["predicted_cpu_ratio"] is None
    assert second["predicted_background"] == {"cores": 0.4, "cores_per_rank": 0.1, "runs": 1}
    assert second["predicted_step_s"] > first["predicted_step_s"]
    # the engine's CPU: the first run's forward and backward CPU (60 ms, its recv's not counted) over
    # what its calibration charges them; the layout after it is charged that
    sweep = scaling.Sweep(scaling.build_parser().parse_args(argv), argv)
    raw = [json.loads(line) for line in (out / "scaling.rows.jsonl").read_text().splitlines()]
    ran = {r["id"]: r for r in raw if "id" in r}
    from alexnet_pp.planning.costmodel import Candidate, predict

    charged = sum(sp.cpu["forward"] + sp.cpu["backward"] for sp in predict(
        sweep.model, sweep.profile(ran["engine:1x1x2:M1"]), Candidate(1, 1, 2, 1, 8)).stages)
    ratio = scaling_rows.compute_cpu_ratio(sweep, ran["engine:1x1x2:M1"])
    assert ratio == pytest.approx(0.06 / charged)
    assert second["predicted_cpu_ratio"] == {"ratio": pytest.approx(ratio), "runs": 1}
    assert rows["engine:2x1x1:M2"]["predicted_cpu_ratio"]["runs"] == 2  # both W = 2 runs before it
    # two towers: the runs with towers where there are any, else every run at W = 2
    assert rows["engine:1x2x1:M1"]["predicted_cpu_ratio"]["runs"] == 3
    assert rows["engine:1x2x1:M2"]["predicted_cpu_ratio"]["runs"] == 1
    assert scaling_rows.compute_cpu_ratio(sweep, {**ran["engine:1x1x2:M1"], "id": "older", "phases_cpu_s": {}}) is None
    md = (out / "scaling.md").read_text()
    assert "| 0.60 |" in md and "| 0.60 (0.60) |" in md  # measured 0.4 + 2 × 0.1; charged the same
    assert "engine CPU at W=2, T=1:" in md and "engine CPU at W=2, T=2:" in md
    assert "background at W=2, medians over 5 layout(s): 0.40 cores outside the ranks' processes + 0.100 per rank" in md
    # predicted at the cut the run trained on, which the engine's live check may have moved
    assert rows["engine:2x1x1:M2"]["predicted_cut"] == "2" and "measured (2)" in md


def test_a_repeated_sweep_reports_the_median_run_and_every_runs_figures(tmp_path, capfd):
    """Three rounds whose machine runs at 1, 3 and 2 times a base speed and whose calibrations time
    the units 4, 2 and 1 times a GPU's: each row's images/s is the median, its error the median's;
    every run is predicted from the three calibrations' mean (7/3 times a GPU's), where the progress
    line could pool only the calibrations taken so far; one more round resumes the sweep."""
    import dataclasses

    from alexnet_pp.planning.costmodel import Candidate, predict
    from alexnet_pp.planning.profile import assumed_gpu_profile

    speed = {0: 1.0, 1: 3.0, 2: 2.0, 3: 1.5}
    slower = {0: 4.0, 1: 2.0, 2: 1.0, 3: 1.0}  # unit times of each round's calibration

    def scaled(model, k):
        gpu = assumed_gpu_profile("h100-nvlink", model)
        return dataclasses.replace(gpu, units=[dataclasses.replace(
            u, forward=[k * x for x in u.forward], backward_input=[k * x for x in u.backward_input],
            backward_weight=[k * x for x in u.backward_weight]) for u in gpu.units])

    def run(sweep, spec):
        if spec.kind == "calibration":
            path = sweep.profile_path(spec.workers, spec.round)
            path.parent.mkdir(parents=True, exist_ok=True)
            dataclasses.replace(scaled(sweep.model, slower[spec.round]), name=f"round{spec.round}").save(path)
            return {"micro_batch_sizes": [8], "co_runners": 0, "profile": str(path.relative_to(sweep.out))}
        ips = 100.0 * speed[spec.round]
        return {"images_per_s": ips, "step_p50_s": 16 / ips, "step_p95_s": 20 / ips, "steps_timed": 2,
                "peak_memory_bytes": {"0": spec.round}, "partition": "measured",
                "phases_s": {"0": {"forward": spec.round, "backward": 0.0}}}

    out = tmp_path / "out"
    argv = ["--preset", "test", "--workers", "1", "--baselines", "", "--gpu-workers", "", "--batch", "8",
            "--calibrate", "worker-count", "--repeats", "3", "--out", str(out)]
    assert scaling.main(argv, runner=run) == 0
    rows = json.loads((out / "scaling.json").read_text())["rows"]
    assert [r["id"] for r in rows] == ["calibration:W1", "engine:1x1x1:M1"]
    one = rows[1]
    assert one["images_per_s_runs"] == [100.0, 200.0, 300.0] and one["images_per_s"] == 200.0
    model = load_config("test", None, {}).model
    pooled = predict(model, scaled(model, 7 / 3), Candidate(1, 1, 1, 1, 8, "1f1b", "measured")).images_per_s
    assert one["predicted_images_per_s_runs"] == pytest.approx([pooled] * 3, rel=1e-9)
    assert one["predicted_images_per_s"] == pytest.approx(pooled, rel=1e-9)
    assert one["prediction_error"] == pytest.approx(200.0 / pooled - 1)
    assert one["prediction_error_runs"] == pytest.approx([100.0 / pooled - 1, 200.0 / pooled - 1, 300.0 / pooled - 1])
    progress = capfd.readouterr().err  # each run's line: the calibrations so far, 4, then 3, then 7/3 × a GPU's
    for k in (4.0, 3.0, 7 / 3):
        early = predict(model, scaled(model, k), Candidate(1, 1, 1, 1, 8, "1f1b", "measured")).images_per_s
        assert f"(predicted {early:.1f}," in progress
    assert one["phases_s"]["0"]["forward"] == 2 and one["runs"] == 3  # the median run's phases: round 3's
    assert rows[0]["profiles"] == ["profiles/w1.json", "profiles/w1-run2.json", "profiles/w1-run3.json"]
    md = (out / "scaling.md").read_text()
    assert "| 200.0 (100–300) |" in md and "in each of 3 rounds" in md
    # a fourth round resumes the same sweep: only its two configurations run
    calls: list[str] = []
    assert scaling.main([*argv[:-4], "--repeats", "4", "--out", str(out)],
                        runner=lambda sw, spec: calls.append(spec.id) or run(sw, spec)) == 0
    assert calls == ["calibration:W1#4", "engine:1x1x1:M1#4"]
    assert json.loads((out / "scaling.json").read_text())["rows"][1]["images_per_s_runs"] == [100.0, 150.0, 200.0, 300.0]


COLUMNS = ["id", "kind", "status", "workers", "pp", "tp", "dp", "micro_batches", "micro_batch", "images_per_s",
           "efficiency", "step_p50_s", "step_p95_s", "bubble_theory", "bubble_measured.0", "bubble_measured.1",
           "phases_s.0.forward", "phases_s.1.backward", "phases_s.0.send", "phases_s.1.recv", "phases_s.0.idle",
           "phases_s.0.data_wait", "phases_s.1.optimizer", "bytes_stages", "bytes_towers", "bytes_replicas",
           "peak_memory_bytes.0", "peak_memory_bytes.1", "cpu_share.0.main_thread", "cpu_share.1.other_threads",
           "phases_cpu_s.0.forward", "phases_cpu_s.1.backward", "predicted_images_per_s", "prediction_error",
           "plain_images_per_s", "ddp_images_per_s", "ds_default_images_per_s", "vs_plain", "vs_ddp", "vs_ds_default",
           "error"]
PLOTS = ["scaling.png", "phases.png", "bubble.png", "predicted_vs_measured.png", "gpu_predicted.png"]


def assert_drawn_png(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 500 and im.height >= 300
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20)
        inked = sum(n for n, c in colours if c != (255, 255, 255))
    assert len(colours) > 50, f"{path.name}: almost nothing drawn"
    assert inked > 0.02 * im.width * im.height, f"{path.name}: mostly blank"


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_tiny_sweep_end_to_end(tmp_path, capfd):
    """Local processes, the test preset: 2×1×1 with its baselines and DeepSpeed's cut, each calibrated
    right before and after its run; 1×1×1 for the efficiency; and a layout that cannot be (9 stages of
    8 units) recorded as failed, its calibrations skipped, while the sweep goes on."""
    out = tmp_path / "out"
    argv = ["--preset", "test", "--launcher", "spawn", "--workers", "2", "--layouts", "1,1,1", "2,1,1,2", "9,2,1,2",
            "--steps", "2", "--warmup", "1", "--calibration-reps", "1", "--gpu-workers", "8",
            "--set", f"data.synthetic_dir={tmp_path / 'data'}", "--out", str(out)]
    assert scaling.main(argv) == 0
    progress = capfd.readouterr().err
    for name in ("scaling.json", "scaling.csv", "scaling.md", "scaling.rows.jsonl", *PLOTS,
                 "profiles/calibration-engine-2x1x1-M2-before.json", "profiles/calibration-ds-default-2x1x1-M2-after.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(["logs", "profiles", "scaling.rows.jsonl", "scaling.json",
                                                            "scaling.csv", "scaling.md", *PLOTS])  # no run files
    data = json.loads((out / "scaling.json").read_text())
    assert data["command"].startswith("alexnet-pp bench scaling --preset test --launcher spawn")
    assert data["environment"]["versions"]["deepspeed"] and data["settings"]["batch"] == 32
    rows = {r["id"]: r for r in data["rows"]}
    layouts = ["engine:1x1x1:M1", "engine:2x1x1:M2", "ds-default:2x1x1:M2", "engine:9x2x1:M2", "ds-default:9x2x1:M2"]
    assert set(rows) == {"plain:W2", "ddp:W2", *layouts, *[f"calibration:{x}:{a}" for x in layouts for a in ("before", "after")],
                         "predicted-gpu:h100-nvlink:W1", "predicted-gpu:h100-nvlink:W8", "predicted-gpu:h100-ib:W1",
                         "predicted-gpu:h100-ib:W8"}
    assert rows["calibration:engine:2x1x1:M2:after"]["co_runners"] == min(2, len(os.sched_getaffinity(0))) - 1
    assert "at most 8 stages" in rows["calibration:engine:9x2x1:M2:before"]["skipped"]
    assert rows["engine:9x2x1:M2"]["status"] == "failed" and "at most 8 stages" in rows["engine:9x2x1:M2"]["error"]
    pipe = rows["engine:2x1x1:M2"]
    assert pipe["status"] == "ok" and pipe["steps_timed"] == 2 and pipe["images_per_s"] > 0
    assert pipe["cut"] and pipe["predicted_cut"] == pipe["cut"]  # predicted at the cut it trained on
    assert set(pipe["phases_s"]) == {"0", "1"} and pipe["phases_s"]["0"]["forward"] > 0
    for ph in pipe["phases_s"].values():  # the phases add up to the step (idle: in no timed instruction)
        assert sum(ph.values()) == pytest.approx(32 / pipe["images_per_s"], rel=0.25)  # the mean step
    assert pipe["bubble_theory"] == pytest.approx(1 / 3) and set(pipe["bubble_measured"]) == {"0", "1"}
    assert set(pipe["cpu_share"]) == {"0", "1"}
    for cpu in pipe["cpu_share"].values():  # one thread's CPU time cannot outrun the wall clock
        assert 0 < cpu["main_thread"] <= 1.05 and cpu["other_threads"] >= 0
    assert set(pipe["phases_cpu_s"]) == {"0", "1"}
    for stage, cpu in pipe["phases_cpu_s"].items():  # the work in each phase, within its wall time
        wall = pipe["phases_s"][stage]
        assert 0 < cpu["forward"] <= wall["forward"] * 1.05 + 1e-3 and 0 < cpu["backward"] <= wall["backward"] * 1.05 + 1e-3
    ncores = len(os.sched_getaffinity(0))
    assert 0 < pipe["host_busy_cores"] <= ncores + 0.05 and 0 <= pipe["outside_ranks_cores"] <= pipe["host_busy_cores"]
    assert pipe["predicted_background"]["runs"] >= 1  # 1×1×1 ran before it
    assert set(pipe["predicted_phases_cpu_s"]) == {"0", "1"}
    assert all(c["forward"] > 0 and c["backward"] > 0 for c in pipe["predicted_phases_cpu_s"].values())
    assert pipe["peak_memory_bytes"]["0"] > 50 * 2**20 and pipe["predicted_images_per_s"] > 0
    assert pipe["bytes_stages"] > 0 and pipe["bytes_towers"] == 0 and pipe["bytes_replicas"] == 0
    assert pipe["vs_plain"] > 0 and pipe["vs_ddp"] > 0 and pipe["vs_ds_default"] > 0
    assert rows["ddp:W2"]["bytes_replicas"] > 0 and rows["plain:W2"]["threads"] == min(2, len(os.sched_getaffinity(0)))
    header = next(csv.reader(open(out / "scaling.csv")))
    assert [c for c in COLUMNS if c not in header] == []
    md = (out / "scaling.md").read_text()
    for heading in ("img/s measured", "img/s predicted", "plain img/s", "DDP img/s", "DS parameters img/s",
                    "PREDICTED, not measured", "Failed configurations", "at most 8 stages",
                    "CPU: schedule thread / other threads", "CPU ms: forward / backward (charged)"):
        assert heading in md, heading
    for name in PLOTS:
        assert_drawn_png(out / name)
        assert f"]({name})" in md
    assert pipe["efficiency"] > 0 and rows["engine:1x1x1:M1"]["efficiency"] == 1.0
    assert "[16/17] 9×2×1 M2 DS parameters: FAILED: ConfigError" in progress
    assert "[17/17] calibrate after 9×2×1 M2 DS parameters: the layout cannot be" in progress


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_the_sweep_runs_layouts_through_the_ray_job_path(tmp_path):
    """`--launcher ray` (the default): the job runs through cluster.driver.run_job on the in-memory
    batches and the run summary brings back every rank's losses, phases and peak memory. A separate process: Ray reads its auth mode once, at import
    (tests/cluster/test_job.py sets it for its own module)."""
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), DS_ACCELERATOR="cpu",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cluster.cli", "bench", "scaling", "--preset", "test", "--workers", "2",
           "--layouts", "2,1,1,2", "--baselines", "", "--no-predict", "--gpu-workers", "", "--steps", "2",
           "--warmup", "1", "--set", f"data.synthetic_dir={tmp_path / 'data'}", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads((out / "scaling.json").read_text())["rows"]
    assert row["status"] == "ok", row.get("error")
    assert row["launcher"] == "ray" and row["steps_timed"] == 2 and row["images_per_s"] > 0 and row["cut"]
    assert set(row["phases_s"]) == {"0", "1"} and set(row["peak_memory_bytes"]) == {"0", "1"}
    assert min(row["peak_memory_bytes"].values()) > 50 * 2**20
    assert set(row["cpu_share"]) == {"0", "1"} and all(0 < c["main_thread"] <= 1.05 for c in row["cpu_share"].values())
    assert set(row["phases_cpu_s"]) == {"0", "1"} and all(c["forward"] > 0 for c in row["phases_cpu_s"].values())
    assert 0 < row["host_busy_cores"] <= len(os.sched_getaffinity(0)) + 0.05
    assert 0 <= row["outside_ranks_cores"] <= row["host_busy_cores"]
    log = (out / "logs" / "engine-2x1x1-M2.log").read_text()
    assert "job engine-2x1x1-M2: (P, T, D) = (2, 1, 1)" in log  # the driver's own first line
    assert len(row["losses"]) == 3 and all(x == x for x in row["losses"])
