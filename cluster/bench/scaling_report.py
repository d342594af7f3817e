"""A scaling sweep's report: the Markdown tables (measured layouts beside their predictions and the
baselines, the baselines, each stage's phases and CPU, the predicted GPU counts) and its notes."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

from cluster.bench.report import Column, Report, Table
from cluster.bench.scaling_rows import SweepView, background_cores, background_of, charged_cores, cpu_ratio_of

PHASES = ("forward", "backward", "send", "recv", "idle", "data_wait", "optimizer")
TOLERANCE = 0.15  # the prediction's goal: within 15 % of the measurement


def _ms(x: Optional[float]) -> Optional[float]:
    return None if x is None else 1000 * x


def _mib(x: Optional[float]) -> Optional[float]:
    return None if x is None else x / 2**20


def _mb(x: Optional[float]) -> Optional[float]:
    return None if x is None else x / 1e6


def _bubble(r: dict[str, Any]) -> Optional[str]:
    measured = r.get("bubble_measured") or {}
    if not measured or r.get("pp", 1) < 2:
        return None
    sim = r.get("predicted_bubble") or {}
    return " / ".join(f"{v:.2f}" + (f" ({sim[k]:.2f})" if k in sim else "") for k, v in sorted(measured.items())) \
        + f" vs {r.get('bubble_theory', math.nan):.2f}"


def _ratio(key: str) -> Callable[[dict[str, Any]], Optional[str]]:
    def cell(r: dict[str, Any]) -> Optional[str]:
        v = r.get(key)
        return None if v is None else f"{v:.2f}×"

    return cell


def _with_runs(key: str) -> Callable[[dict[str, Any]], Optional[str]]:
    """The figure; over several rounds, the median and the range of the runs."""
    def cell(r: dict[str, Any]) -> Optional[str]:
        if r.get(key) is None:
            return None
        runs = r.get(f"{key}_runs") or []
        return f"{r[key]:.1f}" + (f" ({min(runs):.0f}–{max(runs):.0f})" if len(runs) > 1 else "")
    return cell


def _error(r: dict[str, Any]) -> Optional[str]:
    if "prediction_error" not in r:
        return None
    runs = r.get("prediction_error_runs") or []
    spread = f" ({100 * min(runs):+.0f}…{100 * max(runs):+.0f}%)" if len(runs) > 1 else ""
    return f"{100 * r['prediction_error']:+.0f}%{spread}"


def _bytes(r: dict[str, Any]) -> Optional[str]:
    if r.get("bytes_stages") is None:
        return None
    return f"{_mb(r['bytes_stages']):.1f} / {_mb(r['bytes_towers']):.1f} / {_mb(r['bytes_replicas']):.1f}"


def _background(r: dict[str, Any]) -> Optional[str]:
    measured = background_cores(r)
    used = r.get("predicted_background")
    if measured is None and not used:
        return None
    text = "–" if measured is None else f"{measured:.2f}"
    return text + (f" ({charged_cores(used, r['workers']):.2f})" if used else "")


def build_report(sweep: SweepView, rows: list[dict[str, Any]], env: dict[str, Any], complete: bool) -> Report:
    a = sweep.args
    report = Report("scaling", sweep.out, sweep.argv, sweep.settings(), env,
                    title=f"Scaling: layouts over {', '.join(map(str, sorted({r['workers'] for r in rows if r['kind'] != 'predicted-gpu'})))} "
                          f"workers on {env.get('machine')}")
    report.rows = rows
    m = sweep.model
    measured = [r for r in rows if r["kind"] in ("engine", "ds-default")]
    base = [r for r in rows if r["kind"] in ("plain", "ddp")]
    cal = [r for r in rows if r["kind"] == "calibration"]
    gpu = [r for r in rows if r["kind"] == "predicted-gpu"]
    failed = [r for r in rows if r.get("status") == "failed"]
    where = "Ray job path (cluster.driver.run_job)" if a.launcher == "ray" else "local processes (cluster.spawn.run_local)"
    report.tables.append(Table(
        "Measured layouts: measured vs predicted images/s, beside the baselines", measured, [
            Column("layout P×T×D", lambda r: f"{r['pp']}×{r['tp']}×{r['dp']}"),
            Column("M", "micro_batches"), Column("mb", "micro_batch"), Column("W", "workers"),
            Column("partition (cut trained on)", lambda r: None if not r.get("partition") else
                   r["partition"] + (f" ({r['cut']})" if r.get("cut") else "")),
            Column("img/s measured", _with_runs("images_per_s")),
            Column("img/s predicted", _with_runs("predicted_images_per_s")),
            Column("error", _error),
            Column("efficiency", "efficiency", ".2f"),
            Column("step p50 / p95 ms", lambda r: f"{_ms(r['step_p50_s']):.0f} / {_ms(r['step_p95_s']):.0f}"),
            Column("bubble per stage (simulated) vs theory", _bubble),
            Column("plain img/s", "plain_images_per_s", ".1f"), Column("DDP img/s", "ddp_images_per_s", ".1f"),
            Column("DS parameters img/s", "ds_default_images_per_s", ".1f"),
            Column("× plain", _ratio("vs_plain")), Column("× DDP", _ratio("vs_ddp")),
            Column("× DS", _ratio("vs_ds_default")),
            Column("peak MiB (max rank)", lambda r: _mib(r.get("peak_memory_max_bytes")), ".0f"),
            Column("MB/step stages / towers / replicas", _bytes),
            Column("background cores (predicted)", _background), Column("load", "load_1min", ".1f"),
            Column("status", lambda r: r.get("status") if r.get("status") != "ok" else "")],
        intro=(f"Every layout ran {a.warmup} warm-up + {a.steps} timed steps through the {where}"
               + (f", in each of {a.repeats} rounds (each calibrated afresh, every second one in the opposite order); "
                  "img/s measured and predicted are the medians over the rounds, the run's range in brackets, and "
                  "error is the medians' (each run's against its own prediction in brackets); the other "
                  "columns are the median run's" if a.repeats > 1 else "") + ", "
               f"{a.threads} torch thread(s) per worker, on {'in-memory tensors' if a.data == 'tensors' else 'the shard stream'}; "
               f"preset `{a.preset}` (width {m.width}, {m.image_size} px, {m.num_classes} classes), batch {sweep.batch}. "
               "img/s = images of the timed steps / their time; error = measured / predicted − 1; efficiency = "
               "img/s / (W × img/s of 1×1×1). Predicted: `costmodel.predict` at the cut the run trained on with "
               + ("unit times pooled over every calibration of this sweep at the layout's micro-batch (each "
                  "layout's run calibrated right before and right after it)" if a.calibrate == "layout" else
                  "the profile calibrated in this run for W workers, its unit times pooled over every calibration "
                  "of this sweep at the same micro-batches")
               + ", the links' medians over the rounds' measurements for W, and the CPU a pass costs inside the "
               "engine over its calibrated CPU, the median of the runs this sweep finished before it at W (before "
               "any, where the workers' threads outnumber the cores, the time-slicing slowdown measured once a sweep)"
               + " (on a CPU, the run's other workers training beside it, as many as the cores hold; the "
               "simulated ranks share the cores the background leaves while more compute than there are). "
               "Background cores: CPU on the machine outside the ranks' schedule threads while they stepped — the "
               "cores outside the ranks' processes (Ray's daemons, the training controller) plus W × each rank's "
               "other threads (communication, Ray's core worker) — measured in this run; in brackets what its "
               "prediction charged, the medians of the runs this sweep finished before it (at the same W where "
               "there were any), never its own. Bubble: each stage's idle share "
               "of the schedule, measured (simulated by the cost model) vs (P − 1)/(M + P − 1). `DS parameters`: the same layout cut by DeepSpeed's default "
               "`partition_method=parameters`. MB/step: computed from the network's shapes, not measured. load: the "
               f"machine's 1-minute load average when the configuration started ({env.get('cores')} cores).")))
    report.tables.append(Table("Baselines (same run, same batches)", base, [
        Column("baseline", lambda r: "plain single-process trainer" if r["kind"] == "plain" else "PyTorch DDP (gloo)"),
        Column("W", "workers"), Column("processes × threads",
                                       lambda r: f"1 × {r['threads']}" if r["kind"] == "plain" else f"{r['workers']} × {r['threads']}"),
        Column("img/s", "images_per_s", ".1f"), Column("efficiency", "efficiency", ".2f"),
        Column("step p50 / p95 ms", lambda r: f"{_ms(r['step_p50_s']):.0f} / {_ms(r['step_p95_s']):.0f}"),
        Column("× plain", _ratio("vs_plain")),
        Column("peak MiB (max rank)", lambda r: _mib(r.get("peak_memory_max_bytes")), ".0f"),
        Column("MB/step between replicas", lambda r: _mb(r.get("bytes_replicas")), ".1f"),
        Column("status", lambda r: r.get("status") if r.get("status") != "ok" else "")],
        intro=("plain: the whole network in one process with min(W × threads, cores) torch threads (the single-process "
               "trainer's step); DDP: torch.nn.parallel.DistributedDataParallel over W processes, each on its rows of "
               "the global batch (from W = 2). Efficiency against the same baseline at W = 1 (DDP: the plain trainer).")))
    phase_rows = []
    for r in measured:
        for stage, ph in sorted((r.get("phases_s") or {}).items()):
            pred = (r.get("predicted_phases_s") or {}).get(stage, {})
            phase_rows.append({"layout": r["label"], "stage": stage, **{k: ph.get(k) for k in PHASES},
                               "pred": pred, "bubble": (r.get("bubble_measured") or {}).get(stage),
                               "cpu": (r.get("cpu_share") or {}).get(stage),
                               "phase_cpu": (r.get("phases_cpu_s") or {}).get(stage),
                               "charged_cpu": (r.get("predicted_phases_cpu_s") or {}).get(stage, {})})
    report.tables.append(Table("Where each stage's step goes: measured ms per step (predicted)", phase_rows, [
        Column("layout", "layout"), Column("stage", "stage"),
        *[Column(p, (lambda p: lambda r: None if r.get(p) is None else
                     f"{_ms(r[p]):.1f}" + (f" ({_ms(r['pred'][p]):.1f})" if p in r["pred"] else ""))(p)) for p in PHASES],
        Column("bubble", "bubble", ".3f"),
        Column("CPU: schedule thread / other threads", lambda r: None if not r.get("cpu") else
               f"{r['cpu']['main_thread']:.2f} / {r['cpu']['other_threads']:.2f}"),
        Column("CPU ms: forward / backward (charged)", lambda r: None if not r.get("phase_cpu") else " / ".join(
               f"{_ms(r['phase_cpu'].get(p, 0.0)):.1f}"
               + (f" ({_ms(r['charged_cpu'][p]):.1f})" if p in r["charged_cpu"] else "") for p in ("forward", "backward")))],
        intro=("Mean seconds per timed step of one rank of the stage, per phase (cluster/timing.py); idle is the time in "
               "no timed instruction, so the phases add up to the step (the bubble also counts send and recv waits). The cost model "
               "predicts forward, backward, send, recv, idle and optimizer (its optimizer phase is the optimizer step and "
               "the engine's sweeps over the gradients around the all-reduce; the all-reduce over replicas is its own "
               "predicted phase, in the JSON); it does "
               "not model data_wait. CPU: cores' worth of CPU time per rank of the stage over its timed steps, of the "
               "thread that runs the schedule (computes, and waits in sends and receives) and of the process's other "
               "threads (communication, data, runtime); the schedule thread's share falls short of 1 by the time it "
               "waited for messages or for a core. CPU ms: the schedule thread's CPU time inside the forward and "
               "backward phases, the work they cost; against their wall time above, how much of a core they got; "
               "in brackets the CPU the cost model charges them (the calibrated unit times, times the engine's CPU "
               "ratio of the runs before it): the model's error in work, apart from its error in sharing the cores.")))
    report.tables.append(Table("PREDICTED, not measured: GPU counts this machine lacks", gpu, [
        Column("profile", "profile"), Column("GPUs", "workers"), Column("batch", "batch"),
        Column("best layout P×T×D", lambda r: f"{r['pp']}×{r['tp']}×{r['dp']}"), Column("M", "micro_batches"),
        Column("img/s predicted", "predicted_images_per_s", ".0f"), Column("efficiency predicted", "predicted_efficiency", ".2f"),
        Column("data parallel only img/s predicted", "dp_only_images_per_s", ".0f"),
        Column("GiB per GPU", lambda r: r["predicted_memory_bytes"] / 2**30, ".1f")],
        intro=(f"The paper network (60,965,224 parameters) at {a.gpu_batch_per_worker} images per GPU, on the assumed "
               "H100 profiles of alexnet_pp/planning/profile.py (`assumed_gpu_profile`: NVLink 4 in one domain, or "
               "8 GPUs per node on NVLink joined by InfiniBand NDR), each calibrated on this repository's one measured "
               "H100 step. The planner's best layout per count; none of these numbers was measured.")))
    if failed:
        report.tables.append(Table("Failed configurations (the sweep went on)", failed, [
            Column("configuration", "label"), Column("error", lambda r: (r.get("error") or "").strip().splitlines()[-1][:300]
                                                     if r.get("error") else "")]))
    within = [abs(r["prediction_error"]) <= TOLERANCE for r in measured if "prediction_error" in r]
    worst = max((abs(r["prediction_error"]) for r in measured if "prediction_error" in r), default=None)
    if within:
        report.notes.append(f"prediction within {100 * TOLERANCE:.0f}% of the measurement for {sum(within)} of "
                            f"{len(within)} measured layouts (largest error {100 * worst:.0f}%)")
    for w in sorted({r["workers"] for r in measured}):
        bg = background_of([r for r in measured if r["workers"] == w], w)
        if bg:
            report.notes.append(f"background at W={w}, medians over {bg['runs']} layout(s): {bg['cores']:.2f} cores "
                                f"outside the ranks' processes + {bg['cores_per_rank']:.3f} per rank in its other threads "
                                f"= {charged_cores(bg, w):.2f} of {env.get('cores')} cores (for "
                                "`alexnet-pp plan --device-profile`: a profile's background_cores and "
                                "background_cores_per_rank)")
        for tp in sorted({r["tp"] for r in measured if r["workers"] == w}):
            ratio = cpu_ratio_of(sweep, measured, w, tp)
            if ratio:
                report.notes.append(f"engine CPU at W={w}, T={tp}: the runs' forward and backward phases cost "
                                    f"{ratio['ratio']:.2f}× the CPU their calibration charges (median over "
                                    f"{ratio['runs']} layout(s)); each layout is charged the median of the runs before "
                                    "it at its worker count and tower count (for `alexnet-pp plan --device-profile`: a "
                                    "profile's engine_cpu_ratio)")
    loads = [r.get("load_1min") for r in rows if r.get("load_1min") is not None]
    if loads:
        report.notes.append(f"load average (1 min) before each configuration: {min(loads):.1f}–{max(loads):.1f} on "
                            f"{env.get('cores')} cores (other processes share this machine when it exceeds the workers)")
    for r in cal:
        if r.get("status") == "ok" and not r.get("around"):
            report.notes.append(f"calibration W={r['workers']}: micro-batches {r['micro_batch_sizes']}, "
                                f"{r['co_runners']} co-runner(s), profile {r['profile']}")
    around = [r for r in cal if r.get("around") and r.get("status") == "ok" and r.get("profile")]
    if around:
        co = sorted({(r["workers"], r["co_runners"]) for r in around})
        report.notes.append(f"calibrated right before and right after each layout's run, in every round: "
                            f"{len({r['base_id'].rsplit(':', 1)[0] for r in around})} "
                            "layouts' profiles under profiles/ (calibration-<layout>-before/after[-<run>].json), with "
                            + ", ".join(f"{c} co-runner(s) at W = {w}" for w, c in co))
    report.notes.append("peak memory: each rank's maximum resident set since training began (CPU, Linux VmHWM "
                        "after a reset) or CUDA memory allocated (GPU); a first stage's includes the in-memory input "
                        "batches")
    if not complete:
        report.notes.append("INCOMPLETE: the sweep was interrupted; run the same command again to resume")
    report.notes.append("each configuration's own output: logs/<configuration>.log")
    return report
