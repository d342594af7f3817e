"""Engine benchmark: the pipeline engine against the plain single-process trainer, side by side.

    alexnet-pp bench engine [--preset paper] [--batch 128] [--steps 6] [--sections 1,2,3,4] [--out DIR]

Measures, in one run, on the same model, batches and thread count (in-memory data, so the data
pipeline does not blur the engine's numbers; the paper's network and batch by default):
1. images/s of the engine with (P, T, D) = (1, 1, 1) vs the plain trainer (goal: ratio ≥ 0.95);
2. the pipeline bubble per stage for P = 2 and M = 2, 4, 8 micro-batches next to the theoretical
   (P − 1) / (M + P − 1) (goal: within 5 percentage points). Each stage's measured idle share of
   the schedule is split into load imbalance — the time it waits because the other stage has more
   work per micro-batch (busy_max − busy_stage) / schedule time, which the theory's equal stages
   exclude — and the remaining fill/drain bubble, which is what the formula predicts;
3. the speedup of (P, T, D) = (2, 1, 1), one thread per worker, over the plain trainer with one
   thread, at M = 8 (goal: ≥ 1.5×; two equal stages bound it near 1.8×);
4. 1F1B against ZB-H1 (`parallel.schedule`), side by side for each P×M of `--schedule-layouts`
   (default P = 2, 3 and M = 4, 8), one thread per worker: the measured bubble per stage (goal:
   ZB-H1's ≤ ⅓ of 1F1B's), images/s (goal: ≥ 1.1× at M = 4) and peak memory per rank (goal:
   ≤ 1.1×; also the largest rank's peak against 1F1B's largest, the memory a worker needs), each
   schedule next to its ideal for the measured per-stage F, B, W times
   (alexnet_pp/planning/simulate.py). `--repeats N` repeats it and ends with median and range;
   `--figure PATH` draws both schedules' measured instruction timelines of one step per P×M
   (cluster/bench/timelines.py).
Steps after `--warmup` are timed; medians are reported. `--runs N` repeats comparison 2 and ends
with each stage's largest distance from theory over the runs (goal: within 5 points in every run).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import time
from typing import Optional, Sequence

import torch

from alexnet_pp.config import RunConfig, load_config
from alexnet_pp.host import configure_host
from alexnet_pp.model import AlexNet
from alexnet_pp.optim import build_optimizer
from alexnet_pp.steps import train_step
from alexnet_pp.summary import trials_text
from cluster.bench.report import Column, Report, Table, add_out_arg
from cluster.feeds import TensorData
from cluster.spawn import run_local


def bench_cfg(args, pp: int, m: int, threads: int) -> RunConfig:
    return load_config(args.preset, overrides={
        "parallel.pp": str(pp), "parallel.micro_batches": str(m), "train.batch_size": str(args.batch),
        "train.threads": str(threads), "train.epochs": "1", "train.eval_every": "1000",
        "train.schedule": "constant", "model.dropout": "0", "checkpoint.resume": "false",
        "checkpoint.dir": os.path.join(args.scratch, f"ckpt-{pp}-{m}"), "out_dir": args.scratch,
        "parallel.partition": args.partition, "data.synthetic_classes": "1000" if args.preset == "paper" else "10",
        **dict(kv.split("=", 1) for kv in args.set),
    })


def make_batches(cfg: RunConfig, steps: int) -> list:
    g = torch.Generator().manual_seed(0)
    s, b, c = cfg.model.image_size, cfg.train.batch_size, cfg.model.num_classes
    return [(torch.randn(b, 3, s, s, generator=g), torch.randint(0, c, (b,), generator=g)) for _ in range(steps)]


def tensor_data(batches, m, rank):
    return TensorData(batches, replica=0, replicas=1, micro_batches=m)


def plain_step_seconds(cfg: RunConfig, batches: list, threads: int, warmup: int) -> list[float]:
    prev = torch.get_num_threads()
    configure_host(threads, cfg.train.keep_freed_memory)  # as the engine's workers do
    torch.manual_seed(cfg.train.seed)
    model = AlexNet(cfg.model)
    opt = build_optimizer(model.parameters(), cfg.train)
    times = []
    for x, y in batches:
        t0 = time.perf_counter()
        train_step(model, x, y, opt)
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(prev)
    return times[warmup:]


def engine_results(cfg: RunConfig, batches: list) -> list:
    """Each rank's RankResult (cluster/engine.py): stats per step, bounds, peak_memory, timeline."""
    return run_local(cfg, functools.partial(tensor_data, batches, cfg.parallel.micro_batches), threads=cfg.train.threads)


def engine_stats(cfg: RunConfig, batches: list, warmup: int) -> list:
    return [r.stats[warmup:] for r in engine_results(cfg, batches)]  # per rank


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def simulate_1f1b(fwd: list[float], bwd: list[float], m: int) -> list[float]:
    """Idle share of each stage's schedule in an ideal 1F1B pipeline (no communication cost) whose
    stage s takes fwd[s] / bwd[s] per micro-batch: what the formula would say for unequal stages."""
    p = len(fwd)
    orders = []
    for s in range(p):  # DeepSpeed's order: warm-up forwards, then one forward / one backward, cool-down
        warm = min(p - s - 1, m)
        order = [("F", i) for i in range(warm)]
        f, b = warm, 0
        while b < m:
            if f < m:
                order.append(("F", f))
                f += 1
            order.append(("B", b))
            b += 1
        orders.append(order)
    done: dict = {}
    clock = [0.0] * p
    pending = [list(o) for o in orders]
    while any(pending):
        for s in range(p):
            while pending[s]:
                kind, i = pending[s][0]
                dep = (("F", s - 1, i) if s > 0 else None) if kind == "F" else (("B", s + 1, i) if s < p - 1 else ("F", s, i))
                if dep is not None and dep not in done:
                    break
                start = max(clock[s], done.get(dep, 0.0))
                clock[s] = start + (fwd[s] if kind == "F" else bwd[s])
                done[(kind, s, i)] = clock[s]
                pending[s].pop(0)
    span = max(clock)
    return [1 - m * (fwd[s] + bwd[s]) / span for s in range(p)]


def bubble_rows(per_rank: list, m: int) -> list[dict]:
    """Per stage: the measured idle share of the schedule (step time less the stage's own optimizer
    step, as the engine reports it), the ideal 1F1B idle for the measured per-micro-batch stage times,
    and the formula's (equal stages). The measured share splits into load imbalance, M × (t_max − t)
    over the schedule's time, where t is the stage's forward + backward per micro-batch (the wait for
    a stage with more work, which equal stages would not have), and the rest, the fill and drain
    that the formula counts."""
    theory = 1 / (m + 1)
    fwd = [median([s["phases"].get("forward", 0.0) / m for s in stats]) for stats in per_rank]
    bwd = [median([s["phases"].get("backward", 0.0) / m for s in stats]) for stats in per_rank]
    ideal = simulate_1f1b(fwd, bwd, m)
    per_micro_batch = [f + b for f, b in zip(fwd, bwd)]
    slowest = max(per_micro_batch)
    rows = []
    for stage, stats in enumerate(per_rank):
        measured, t = median([s["bubble"] for s in stats]), per_micro_batch[stage]
        schedule = m * t / (1 - measured) if measured < 1 else math.inf
        imbalance = m * (slowest - t) / schedule
        rows.append({"M": m, "stage": stage, "measured": measured, "ideal_1f1b": ideal[stage], "theory": theory,
                     "stage_ms_per_micro_batch": 1000 * t, "imbalance": imbalance, "fill_drain": measured - imbalance})
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="alexnet-pp bench engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper", help="model size (default: paper, the full network)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="threads for comparison 1 (both sides)")
    ap.add_argument("--partition", default="measured")
    ap.add_argument("--speedup-batches", type=lambda v: [int(x) for x in v.split(",")], default=[128, 256],
                    help="global batches for comparison 3 (M = 8 micro-batches each)")
    ap.add_argument("--scratch", default="/tmp/alexnet-pp-bench")
    ap.add_argument("--sections", default="1,2,3,4", help="which comparisons to run, e.g. 3")
    ap.add_argument("--runs", type=int, default=1, help="repeat comparison 2 this many times")
    ap.add_argument("--schedule-layouts", default="2x4,2x8,3x4,3x8", help="comparison 4's P×M pairs")
    ap.add_argument("--repeats", type=int, default=1, help="repeat comparison 4 this many times")
    ap.add_argument("--figure", help="comparison 4: write the measured timelines here (PNG)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run, e.g. parallel.defer_weight_grads=false")
    add_out_arg(ap, "engine")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    sections = {int(x) for x in args.sections.split(",")}
    steps = args.steps + args.warmup
    report = Report("engine", args.out, argv, {"preset": args.preset, "batch": args.batch, "steps": args.steps,
                                               "warmup": args.warmup, "partition": args.partition,
                                               "sections": sorted(sections), "runs": args.runs,
                                               "schedule_layouts": args.schedule_layouts, "repeats": args.repeats,
                                               "overrides": args.set},
                    title="Engine vs plain trainer, pipeline bubble, 2-stage speedup, 1F1B vs ZB-H1")

    if 1 in sections:
        section_engine_vs_plain(args, steps, report)
    if 2 in sections:
        bubble = [row for run in range(args.runs) for row in section_bubble(args, steps, report, run)]
        if args.runs > 1:
            bubble_spread(bubble, args.runs, report)
    if 3 in sections:
        section_speedup(args, steps, report)
    if 4 in sections:
        section_schedules(args, steps, report)
    for path in report.write():
        print(f"wrote {path}")
    return 0


def section_engine_vs_plain(args, steps: int, report: Report) -> None:
    print(f"# 1. engine (1,1,1) vs plain trainer, {args.threads} threads, batch {args.batch}, preset {args.preset}")
    cfg = bench_cfg(args, 1, 1, args.threads)
    batches = make_batches(cfg, steps)
    plain = median(plain_step_seconds(cfg, batches, args.threads, args.warmup))
    eng = median([s["seconds"] for s in engine_stats(cfg, batches, args.warmup)[0]])
    ratio = plain / eng
    print(f"plain {args.batch / plain:8.1f} img/s   engine {args.batch / eng:8.1f} img/s   ratio {ratio:.3f} (goal ≥ 0.95)")
    row = report.add({"section": "engine_vs_plain", "batch": args.batch, "threads": args.threads,
                      "plain_img_s": args.batch / plain, "engine_img_s": args.batch / eng, "ratio": ratio})
    report.tables.append(Table(f"1. Engine (1,1,1) vs plain trainer, {args.threads} threads (goal ≥ 0.95)", [row], [
        Column("batch", "batch"), Column("plain img/s", "plain_img_s", ".1f"),
        Column("engine img/s", "engine_img_s", ".1f"), Column("ratio", "ratio", ".3f")]))


def section_bubble(args, steps: int, report: Report, run: int = 0) -> list[dict]:
    batches = make_batches(bench_cfg(args, 1, 1, 1), steps)
    of_runs = f", run {run + 1} of {args.runs}" if args.runs > 1 else ""
    print(f"\n# 2. pipeline bubble, P = 2, one thread per stage ({args.partition} partition){of_runs}")
    print(f"{'M':>3} {'stage':>5} {'cut':>10} {'ms/micro-batch':>15} {'measured':>9} {'theory':>7} {'diff (pp)':>10} "
          f"{'ideal 1F1B, these stage times':>30} {'imbalance (pp)':>15} {'fill/drain − theory (pp)':>25}")
    rows = []
    for m in (2, 4, 8):
        cfg = bench_cfg(args, 2, m, 1)
        try:
            results = engine_results(cfg, batches)
        except Exception as e:  # noqa: BLE001 - a crashed configuration is a result; the runs go on
            error = f"{type(e).__name__}: {e}"
            print(f"{m:>3} FAILED: {error.splitlines()[0][:300]}", flush=True)
            report.add({"section": "bubble_failed", "M": m, "run": run, "error": error[:2000]})
            report.notes.append(f"comparison 2, run {run + 1}, M = {m} failed: {error}"[:400])
            continue
        cut = results[0].cut  # as parallel.partition takes it: "6", or "conv3.0[52:]" inside a tower half
        checked = trials_text(results[0].cut_trials) or "none"
        print(f"    live check before the first step, ms per micro-batch per stage: {checked}")
        for row in bubble_rows([r.stats[args.warmup:] for r in results], m):
            print(f"{m:>3} {row['stage']:>5} {cut:>10} {row['stage_ms_per_micro_batch']:>15.1f} "
                  f"{row['measured']:>9.3f} {row['theory']:>7.3f} {100 * (row['measured'] - row['theory']):>+10.1f} "
                  f"{row['ideal_1f1b']:>30.3f} {100 * row['imbalance']:>15.1f} "
                  f"{100 * (row['fill_drain'] - row['theory']):>+25.1f}")
            rows.append(report.add({"section": "bubble", **row, "run": run, "cut": cut, "live_check": checked}))
    report.tables.append(Table(f"2. Pipeline bubble, P = 2, one thread per stage ({args.partition} partition)"
                               f"{of_runs}", rows, [
        Column("M", "M"), Column("stage", "stage"), Column("cut", "cut"),
        Column("ms / micro-batch", "stage_ms_per_micro_batch", ".1f"),
        Column("measured", "measured", ".3f"), Column("theory", "theory", ".3f"),
        Column("diff (pp)", lambda r: 100 * (r["measured"] - r["theory"]), "+.1f"),
        Column("ideal 1F1B, these stage times", "ideal_1f1b", ".3f"),
        Column("imbalance (pp)", lambda r: 100 * r["imbalance"], ".1f"),
        Column("fill/drain − theory (pp)", lambda r: 100 * (r["fill_drain"] - r["theory"]), "+.1f"),
        Column("live check: cut, ms / micro-batch per stage", "live_check")],
        intro="imbalance: the share of the schedule a stage waits for one with more work per micro-batch "
              "(the cut's doing, not the schedule's); fill/drain: the measured share less that. Live check: "
              "the cuts the engine timed before its first step (cluster/stage_cut.py), in order; it trains on "
              "the best balanced one (slowest stage over the mean)."))
    return rows


def bubble_spread(rows: list[dict], runs: int, report: Optional[Report] = None) -> list[dict]:
    """Per (M, stage): the distance from theory in every run, its median and largest absolute value."""
    print(f"\n# 2. over {runs} runs: measured − theory (pp) per run; goal |diff| ≤ 5 in every run")
    out = []
    for m, stage in sorted({(r["M"], r["stage"]) for r in rows}):
        mine = [r for r in rows if r["M"] == m and r["stage"] == stage]
        diffs = [100 * (r["measured"] - r["theory"]) for r in mine]
        fill = [100 * (r["fill_drain"] - r["theory"]) for r in mine]
        worst = max(abs(d) for d in diffs)
        ok = worst <= 5 and len(diffs) == runs  # a run that failed is not a run within 5 points
        status = ("ok" if ok else "OVER 5" if worst > 5
                  else f"INCOMPLETE, {runs - len(diffs)} run(s) failed")
        print(f"M {m} stage {stage}: {' '.join(f'{d:+5.1f}' for d in diffs)}   median {median(diffs):+5.1f}  "
              f"largest |diff| {worst:4.1f}  {status}; fill/drain − theory {' '.join(f'{d:+5.1f}' for d in fill)}")
        out.append({"section": "bubble_spread", "M": m, "stage": stage, "diff_pp": diffs, "runs": runs,
                    "median_diff_pp": median(diffs), "largest_abs_diff_pp": worst, "ok": ok, "status": status,
                    "fill_drain_diff_pp": fill})
    if report is not None:
        report.rows += out
        report.tables.append(Table(f"2. Over {runs} runs: measured − theory, percentage points "
                                   "(goal: |diff| ≤ 5 in every run)", out, [
            Column("M", "M"), Column("stage", "stage"),
            Column("per run", lambda r: " ".join(f"{d:+.1f}" for d in r["diff_pp"])),
            Column("median", "median_diff_pp", "+.1f"), Column("largest |diff|", "largest_abs_diff_pp", ".1f"),
            Column("within 5", "status"),
            Column("fill/drain − theory per run", lambda r: " ".join(f"{d:+.1f}" for d in r["fill_drain_diff_pp"]))],
            intro="The goal is on the measured bubble; the last column leaves out each run's load imbalance."))
    return out


def section_speedup(args, steps: int, report: Report) -> None:
    print("\n# 3. (2,1,1), one thread per worker, vs plain trainer with one thread, M = 8")
    rows = []
    given = args.batch
    for batch in args.speedup_batches:
        args.batch = batch
        cfg = bench_cfg(args, 2, 8, 1)
        big = make_batches(cfg, steps)
        plain1 = median(plain_step_seconds(bench_cfg(args, 1, 1, 1), big, 1, args.warmup))
        pipe8 = median([s["seconds"] for s in engine_stats(cfg, big, args.warmup)[0]])
        speedup = plain1 / pipe8
        print(f"batch {batch:>4} (micro-batch {batch // 8:>3}): plain {batch / plain1:7.1f} img/s   pipeline "
              f"{batch / pipe8:7.1f} img/s   speedup {speedup:.2f}× (goal ≥ 1.5×)")
        rows.append(report.add({"section": "pipeline_speedup", "batch": batch, "plain_img_s": batch / plain1,
                                "pipeline_img_s": batch / pipe8, "speedup": speedup}))
    args.batch = given  # comparison 4 runs at --batch
    report.tables.append(Table("3. (2,1,1), one thread per worker, vs plain trainer with one thread, M = 8 "
                               "(goal ≥ 1.5×)", rows, [
        Column("batch", "batch"), Column("plain img/s", "plain_img_s", ".1f"),
        Column("pipeline img/s", "pipeline_img_s", ".1f"), Column("speedup", "speedup", ".2f")]))


def stage_phase_ms(stats: list[dict], m: int) -> tuple[float, float, float]:
    """Median forward, backward (B) and weight-gradient (W) ms per micro-batch of one rank's steps."""
    return tuple(1000 * median([s["phases"].get(k, 0.0) / m for s in stats])
                 for k in ("forward", "backward", "backward_weight"))


def schedule_row(schedule: str, pp: int, m: int, results: list, warmup: int, batch: int) -> dict:
    """One schedule's numbers: per stage (its ranks' medians) the bubble and F, B, W; the job's
    images/s (the slowest rank's step); each rank's peak memory; the ideal for these stage times."""
    from alexnet_pp.planning.simulate import StageCost, simulate
    from cluster.zero_bubble import theoretical_bubble

    by_stage: dict[int, list] = {}
    for r in results:
        by_stage.setdefault(r.coord["stage"], []).append(r)
    bubble, fbw = [], []
    for stage in range(pp):
        stats = [s for r in by_stage[stage] for s in r.stats[warmup:]]
        bubble.append(median([s["bubble"] for s in stats]))
        fbw.append(stage_phase_ms(stats, m))
    steps: dict[int, float] = {}
    for r in results:
        for s in r.stats[warmup:]:
            steps[s["step"]] = max(steps.get(s["step"], 0.0), s["seconds"])
    step_s = median(list(steps.values()))
    # 1F1B's backward is B and W at once
    costs = [StageCost(f, b, w) if schedule == "zb-h1" else StageCost(f, b + w) for f, b, w in fbw]
    ideal = simulate(schedule, costs, m, comm="async").bubbles()
    return {"P": pp, "M": m, "schedule": schedule, "cut": results[0].cut, "bubble": bubble,
            "mean_bubble": sum(bubble) / pp, "ideal": ideal, "theory": theoretical_bubble(schedule, pp, m),
            "fbw_ms": fbw, "img_s": batch / step_s, "step_s": step_s,
            "step_spread_s": [min(steps.values()), max(steps.values())],
            "peak_mb": {r.coord["rank"]: r.peak_memory / 2**20 for r in results},
            "timeline": {r.coord["rank"]: (r.coord["stage"], r.timeline) for r in results}}


def schedule_ratio(one_f: dict, zb: dict, run: int) -> dict:
    """ZB-H1 against 1F1B on one P×M: bubble, images/s, the largest per-rank peak-memory ratio, and the
    ratio of the largest ranks' peaks (the memory a worker must have: the paper's claim for ZB-H1)."""
    mem = max((zb["peak_mb"][r] / one_f["peak_mb"][r] if one_f["peak_mb"][r] else math.nan) for r in one_f["peak_mb"])
    largest = max(zb["peak_mb"].values()) / max(one_f["peak_mb"].values()) if one_f["peak_mb"] else math.nan
    bubble = zb["mean_bubble"] / one_f["mean_bubble"] if one_f["mean_bubble"] > 0 else math.nan
    return {"section": "schedule_ratio", "run": run, "P": one_f["P"], "M": one_f["M"], "bubble_ratio": bubble,
            "speedup": zb["img_s"] / one_f["img_s"], "memory_ratio": mem, "largest_memory_ratio": largest,
            "both_given_the_cut": one_f["cut_given"] and zb["cut_given"]}


def per_stage(xs: Sequence[float], spec: str = ".3f") -> str:
    return " ".join(format(x, spec) for x in xs)


def fbw_text(fbw: Sequence[Sequence[float]]) -> str:
    return " | ".join("/".join(f"{x:.0f}" for x in t) for t in fbw)


def peaks_text(peak_mb: dict) -> str:
    return " ".join(f"{v:.0f}" for _, v in sorted(peak_mb.items()))


def section_schedules(args, steps: int, report: Report) -> None:
    """Each (P, M) on one cut: the first 1F1B run settles it (`--partition`, measured: checked on live
    stage times), every later run of either schedule is given it, so both do the same work per stage;
    from the second repetition on the schedules take turns running first."""
    pairs = [tuple(int(x) for x in pm.split("x")) for pm in args.schedule_layouts.split(",") if pm]
    print(f"\n# 4. 1F1B vs ZB-H1, one thread per worker, batch {args.batch}, {args.repeats} repetition(s); "
          f"the cut: 1F1B's first run ({args.partition}), then given to every run")
    print(f"{'run':>3} {'P':>2} {'M':>2} {'schedule':>8} {'cut':>8} {'bubble per stage':>22} {'mean':>6} {'theory':>6} "
          f"{'ideal':>17} {'F/B/W ms per micro-batch and stage':>40} {'img/s':>7} {'peak MB per rank':>22}")
    batches = make_batches(bench_cfg(args, 1, 1, 1), steps)
    cuts: dict[tuple[int, int], str] = {}
    timelines: dict[tuple[int, int], tuple[dict, dict]] = {}
    rows: list[dict] = []
    ratios: list[dict] = []
    for rep in range(args.repeats):
        for pp, m in pairs:
            order = ("zb-h1", "1f1b") if rep % 2 and (pp, m) in cuts else ("1f1b", "zb-h1")
            done = {}
            for schedule in order:
                cfg = bench_cfg(args, pp, m, 1)
                cfg.parallel.schedule = schedule
                given = (pp, m) in cuts
                if given:
                    cfg.parallel.partition = cuts[pp, m]
                row = schedule_row(schedule, pp, m, engine_results(cfg, batches), args.warmup, args.batch)
                row["run"], row["cut_given"] = rep, given
                cuts.setdefault((pp, m), row["cut"])
                done[schedule] = row
                print(f"{rep + 1:>3} {pp:>2} {m:>2} {schedule:>8} {row['cut']:>8} "
                      f"{per_stage(row['bubble']):>22} {row['mean_bubble']:>6.3f} {row['theory']:>6.3f} "
                      f"{per_stage(row['ideal']):>17} {fbw_text(row['fbw_ms']):>40} {row['img_s']:>7.1f} "
                      f"{peaks_text(row['peak_mb']):>22}")
                rows.append(report.add({"section": "schedule", **{k: v for k, v in row.items() if k != "timeline"}}))
            a, z = done["1f1b"], done["zb-h1"]
            ratio = report.add(schedule_ratio(a, z, rep))
            ratios.append(ratio)
            settled = "" if a["cut_given"] else "; 1F1B settled the cut in this run, its peak includes that"
            print(f"          zb-h1 / 1f1b: bubble {ratio['bubble_ratio']:.2f} (goal ≤ 0.33), images/s "
                  f"{ratio['speedup']:.2f}× (goal ≥ 1.1× at M = 4), peak memory ≤ {ratio['memory_ratio']:.2f}× per "
                  f"rank (goal ≤ 1.1×), largest rank's {ratio['largest_memory_ratio']:.2f}×{settled}")
            timelines[pp, m] = (a["timeline"], z["timeline"])
    report.tables.append(Table(
        f"4. 1F1B vs ZB-H1, one thread per worker, batch {args.batch}", rows, [
            Column("run", lambda r: r["run"] + 1), Column("P", "P"), Column("M", "M"), Column("schedule", "schedule"),
            Column("cut", "cut"), Column("cut given", "cut_given"),
            Column("bubble per stage", lambda r: per_stage(r["bubble"])), Column("mean", "mean_bubble", ".3f"),
            Column("theory", "theory", ".3f"), Column("ideal, these stage times", lambda r: per_stage(r["ideal"])),
            Column("F/B/W ms per micro-batch, per stage", lambda r: fbw_text(r["fbw_ms"])),
            Column("img/s", "img_s", ".1f"), Column("peak MB per rank", lambda r: peaks_text(r["peak_mb"]))],
        intro=f"The cut of each P×M is settled by 1F1B's first run ({args.partition} partition) and given to every "
              "later run; from the second repetition on the schedules take turns running first."))
    report.tables.append(Table(
        "4. ZB-H1 / 1F1B (goals: bubble ≤ 0.33, images/s ≥ 1.1× at M = 4, peak memory ≤ 1.1× per rank)",
        ratios, [
            Column("run", lambda r: r["run"] + 1), Column("P", "P"), Column("M", "M"),
            Column("bubble", "bubble_ratio", ".2f"), Column("images/s", "speedup", ".2f"),
            Column("peak memory (largest per rank)", "memory_ratio", ".2f"),
            Column("largest rank's peak memory", "largest_memory_ratio", ".2f"),
            Column("both given the cut", "both_given_the_cut")],
        intro="Peak memory per rank: the largest of the ranks' own ratios; largest rank's: ZB-H1's largest "
              "per-rank peak over 1F1B's, the memory each worker must have. Where 1F1B settled the cut in "
              "that run, its peak memory includes the measuring."))
    if args.repeats > 1:
        summary = schedule_summary(rows, ratios, pairs)
        report.rows += summary
        report.tables.append(Table(f"4. Over {args.repeats} repetitions: median [min – max]", summary, [
            Column("P", "P"), Column("M", "M"),
            *[spread_column(f"{s} {what}", s, key)
              for s in ("1f1b", "zb-h1") for what, key in (("bubble", "mean_bubble"), ("img/s", "img_s"))],
            *[spread_column(f"zb-h1 / 1f1b {what}", key)
              for what, key in (("bubble", "bubble_ratio"), ("images/s", "speedup"),
                                ("peak memory per rank", "memory_ratio"),
                                ("largest rank's peak memory", "largest_memory_ratio"))]],
            intro="Peak memory only from repetitions where both schedules were given the cut, when there are any."))
    if args.figure:
        from cluster.bench.timelines import plot_timelines

        os.makedirs(os.path.dirname(os.path.abspath(args.figure)), exist_ok=True)
        plot_timelines([(pp, m, *timelines[pp, m]) for pp, m in pairs], args.figure,
                       title=f"Measured instruction timelines of one step (the last of run {args.repeats}; "
                             f"{args.preset} network, batch {args.batch}, one thread per worker)")
        print(f"timelines: {args.figure}")
        report.images.append((os.path.relpath(os.path.abspath(args.figure), os.path.abspath(report.out_dir)),
                              "measured instruction timelines, 1F1B and ZB-H1"))


def spread(xs: Sequence[float]) -> dict:
    return {"median": median(xs), "min": min(xs), "max": max(xs)}


def spread_text(d: dict) -> str:
    return f"{d['median']:.3f} [{d['min']:.3f} – {d['max']:.3f}]"


def spread_column(header: str, *keys: str) -> Column:
    """A summary row's spread at row[keys[0]][keys[1]]…, as "median [min – max]"."""
    return Column(header, lambda r: spread_text(functools.reduce(lambda d, k: d[k], keys, r)))


def schedule_summary(rows: list[dict], ratios: list[dict], pairs: Sequence[tuple[int, int]]) -> list[dict]:
    """Median and range over the repetitions of each (P, M): per schedule bubble and images/s, and the
    ratios; memory only from runs where both schedules were given the cut."""
    print("\n# 4. over the repetitions: median [min – max]")
    out = []
    for pp, m in pairs:
        mine = [r for r in rows if r["P"] == pp and r["M"] == m]
        rs = [r for r in ratios if r["P"] == pp and r["M"] == m]
        given = [r for r in rs if r["both_given_the_cut"]] or rs
        row = {"section": "schedule_summary", "P": pp, "M": m,
               **{s: {k: spread([r[k] for r in mine if r["schedule"] == s]) for k in ("mean_bubble", "img_s")}
                  for s in ("1f1b", "zb-h1")},
               "bubble_ratio": spread([r["bubble_ratio"] for r in rs]), "speedup": spread([r["speedup"] for r in rs]),
               "memory_ratio": spread([r["memory_ratio"] for r in given]),
               "largest_memory_ratio": spread([r["largest_memory_ratio"] for r in given])}
        print(" ".join([f"P {pp} M {m}:"]
                       + [f"{s} bubble {spread_text(row[s]['mean_bubble'])} img/s {spread_text(row[s]['img_s'])};"
                          for s in ("1f1b", "zb-h1")]
                       + [f"zb-h1/1f1b bubble {spread_text(row['bubble_ratio'])}, images/s "
                          f"{spread_text(row['speedup'])}, peak memory per rank {spread_text(row['memory_ratio'])}, "
                          f"largest rank's {spread_text(row['largest_memory_ratio'])}"]))
        out.append(row)
    return out


if __name__ == "__main__":
    sys.exit(main())
