"""Engine benchmark: the pipeline engine against the plain single-process trainer, side by side.

    python -m benchmarks.engine_bench [--steps 12] [--json out.json]

Measures, in one run, on the same model, batches and thread count (in-memory data, so the data
pipeline does not blur the engine's numbers):
1. images/s of the engine with (P, T, D) = (1, 1, 1) vs the plain trainer (goal: ratio ≥ 0.95);
2. the measured pipeline bubble per stage for P = 2 and M = 2, 4, 8 micro-batches next to the
   theoretical (P − 1) / (M + P − 1) (goal: within 5 percentage points);
3. the speedup of (P, T, D) = (2, 1, 1), one thread per worker, over the plain trainer with one
   thread, at M = 8 (goal: ≥ 1.5×).
Steps after `--warmup` are timed; medians are reported.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import torch

from alexnet_pp.config import RunConfig, load_config
from alexnet_pp.model import AlexNet
from alexnet_pp.optim import build_optimizer
from alexnet_pp.steps import train_step
from cluster.engine import TensorData
from cluster.spawn import run_local


def bench_cfg(args, pp: int, m: int, threads: int) -> RunConfig:
    return load_config(args.preset, overrides={
        "parallel.pp": str(pp), "parallel.micro_batches": str(m), "train.batch_size": str(args.batch),
        "train.threads": str(threads), "train.epochs": "1", "train.eval_every": "1000",
        "train.schedule": "constant", "model.dropout": "0", "checkpoint.resume": "false",
        "checkpoint.dir": os.path.join(args.scratch, f"ckpt-{pp}-{m}"), "out_dir": args.scratch,
        "parallel.partition": args.partition,
    })


def make_batches(cfg: RunConfig, steps: int) -> list:
    g = torch.Generator().manual_seed(0)
    s, b, c = cfg.model.image_size, cfg.train.batch_size, cfg.model.num_classes
    return [(torch.randn(b, 3, s, s, generator=g), torch.randint(0, c, (b,), generator=g)) for _ in range(steps)]


def _data(batches, m, rank):
    return TensorData(batches, replica=0, replicas=1, micro_batches=m)


def plain_step_seconds(cfg: RunConfig, batches: list, threads: int, warmup: int) -> list[float]:
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
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
    results = run_local(cfg, functools.partial(_data, batches, cfg.parallel.micro_batches), threads=cfg.train.threads)
    return [r.stats[warmup:] for r in results]  # per rank


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo", help="model size (default: demo, width 0.5 at 112 px)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="threads for comparison 1 (both sides)")
    ap.add_argument("--partition", default="flops")
    ap.add_argument("--scratch", default="/tmp/alexnet-pp-bench")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    steps = args.steps + args.warmup
    report: dict = {}

    print(f"# 1. engine (1,1,1) vs plain trainer, {args.threads} threads, batch {args.batch}, preset {args.preset}")
    cfg = bench_cfg(args, 1, 1, args.threads)
    batches = make_batches(cfg, steps)
    plain = median(plain_step_seconds(cfg, batches, args.threads, args.warmup))
    eng = median([s["seconds"] for s in engine_stats(cfg, batches, args.warmup)[0]])
    ratio = plain / eng
    print(f"plain {args.batch / plain:8.1f} img/s   engine {args.batch / eng:8.1f} img/s   ratio {ratio:.3f} (goal ≥ 0.95)")
    report["engine_vs_plain"] = {"plain_img_s": args.batch / plain, "engine_img_s": args.batch / eng, "ratio": ratio}

    print("\n# 2. pipeline bubble, P = 2, one thread per stage")
    print(f"{'M':>3} {'stage':>5} {'measured':>9} {'theory':>7} {'diff (pp)':>10}")
    report["bubble"] = []
    plain1 = None
    for m in (2, 4, 8):
        cfg = bench_cfg(args, 2, m, 1)
        per_rank = engine_stats(cfg, batches, args.warmup)
        theory = (2 - 1) / (m + 2 - 1)
        for stage, stats in enumerate(per_rank):
            measured = median([s["bubble"] for s in stats])
            print(f"{m:>3} {stage:>5} {measured:>9.3f} {theory:>7.3f} {100 * (measured - theory):>+10.1f}")
            report["bubble"].append({"M": m, "stage": stage, "measured": measured, "theory": theory})
        if m == 8:
            pipe8 = median([s["seconds"] for s in per_rank[0]])
            plain1 = median(plain_step_seconds(cfg, batches, 1, args.warmup))
            speedup = plain1 / pipe8
    print("\n# 3. (2,1,1), one thread per worker, vs plain trainer with one thread, M = 8")
    print(f"plain {args.batch / plain1:8.1f} img/s   pipeline {args.batch / pipe8:8.1f} img/s   speedup {speedup:.2f}× (goal ≥ 1.5×)")
    report["pipeline_speedup"] = {"plain_img_s": args.batch / plain1, "pipeline_img_s": args.batch / pipe8,
                                  "speedup": speedup}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
