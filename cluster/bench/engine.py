"""Engine benchmark: the pipeline engine against the plain single-process trainer, side by side.

    alexnet-pp bench engine [--preset paper] [--batch 128] [--steps 6] [--out DIR]

Measures, in one run, on the same model, batches and thread count (in-memory data, so the data
pipeline does not blur the engine's numbers; the paper's network and batch by default):
1. images/s of the engine with (P, T, D) = (1, 1, 1) vs the plain trainer (goal: ratio ≥ 0.95);
2. the pipeline bubble per stage for P = 2 and M = 2, 4, 8 micro-batches next to the theoretical
   (P − 1) / (M + P − 1) (goal: within 5 percentage points). Each stage's measured idle share of
   the schedule is split into load imbalance — the time it waits because the other stage has more
   work per micro-batch (busy_max − busy_stage) / schedule time, which the theory's equal stages
   exclude — and the remaining fill/drain bubble, which is what the formula predicts;
3. the speedup of (P, T, D) = (2, 1, 1), one thread per worker, over the plain trainer with one
   thread, at M = 8 (goal: ≥ 1.5×; the best 2-way cut bounds it near 1.7×).
Steps after `--warmup` are timed; medians are reported.
"""

from __future__ import annotations

import argparse
import functools
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


def engine_stats(cfg: RunConfig, batches: list, warmup: int) -> list:
    results = run_local(cfg, functools.partial(tensor_data, batches, cfg.parallel.micro_batches), threads=cfg.train.threads)
    return [r.stats[warmup:] for r in results]  # per rank


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
    and the formula's (equal stages)."""
    theory = 1 / (m + 1)
    fwd = [median([s["phases"].get("forward", 0.0) / m for s in stats]) for stats in per_rank]
    bwd = [median([s["phases"].get("backward", 0.0) / m for s in stats]) for stats in per_rank]
    ideal = simulate_1f1b(fwd, bwd, m)
    return [{"M": m, "stage": stage, "measured": median([s["bubble"] for s in stats]), "ideal_1f1b": ideal[stage],
             "theory": theory, "stage_ms_per_micro_batch": 1000 * (fwd[stage] + bwd[stage])}
            for stage, stats in enumerate(per_rank)]


def main(argv: Optional[Sequence[str]] = None) -> int:
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
    ap.add_argument("--sections", default="1,2,3", help="which comparisons to run, e.g. 3")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run, e.g. parallel.defer_weight_grads=false")
    add_out_arg(ap, "engine")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    sections = {int(x) for x in args.sections.split(",")}
    steps = args.steps + args.warmup
    report = Report("engine", args.out, argv, {"preset": args.preset, "batch": args.batch, "steps": args.steps,
                                               "warmup": args.warmup, "partition": args.partition,
                                               "overrides": args.set},
                    title="Engine vs plain trainer, pipeline bubble, 2-stage speedup")

    if 1 in sections:
        section_engine_vs_plain(args, steps, report)
    if 2 in sections:
        section_bubble(args, steps, report)
    if 3 in sections:
        section_speedup(args, steps, report)
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


def section_bubble(args, steps: int, report: Report) -> None:
    batches = make_batches(bench_cfg(args, 1, 1, 1), steps)
    print(f"\n# 2. pipeline bubble, P = 2, one thread per stage ({args.partition} partition)")
    print(f"{'M':>3} {'stage':>5} {'ms/micro-batch':>15} {'measured':>9} {'theory':>7} {'diff (pp)':>10} "
          f"{'ideal 1F1B, these stage times':>30}")
    rows = []
    for m in (2, 4, 8):
        cfg = bench_cfg(args, 2, m, 1)
        for row in bubble_rows(engine_stats(cfg, batches, args.warmup), m):
            print(f"{m:>3} {row['stage']:>5} {row['stage_ms_per_micro_batch']:>15.1f} {row['measured']:>9.3f} "
                  f"{row['theory']:>7.3f} {100 * (row['measured'] - row['theory']):>+10.1f} {row['ideal_1f1b']:>30.3f}")
            rows.append(report.add({"section": "bubble", **row}))
    report.tables.append(Table(f"2. Pipeline bubble, P = 2, one thread per stage ({args.partition} partition)", rows, [
        Column("M", "M"), Column("stage", "stage"), Column("ms / micro-batch", "stage_ms_per_micro_batch", ".1f"),
        Column("measured", "measured", ".3f"), Column("theory", "theory", ".3f"),
        Column("diff (pp)", lambda r: 100 * (r["measured"] - r["theory"]), "+.1f"),
        Column("ideal 1F1B, these stage times", "ideal_1f1b", ".3f")]))


def section_speedup(args, steps: int, report: Report) -> None:
    print("\n# 3. (2,1,1), one thread per worker, vs plain trainer with one thread, M = 8")
    rows = []
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
    report.tables.append(Table("3. (2,1,1), one thread per worker, vs plain trainer with one thread, M = 8 "
                               "(goal ≥ 1.5×)", rows, [
        Column("batch", "batch"), Column("plain img/s", "plain_img_s", ".1f"),
        Column("pipeline img/s", "pipeline_img_s", ".1f"), Column("speedup", "speedup", ".2f")]))


if __name__ == "__main__":
    sys.exit(main())
