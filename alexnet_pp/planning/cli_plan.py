"""`alexnet-pp plan`: rank the layouts of a number of workers by predicted images/s.

    alexnet-pp plan --workers 64 --batch 4096 [--device-profile FILE | h100-nvlink | h100-ib]

Without --device-profile this machine is measured first (about a minute for the paper network on
one CPU thread); --save-profile keeps that measurement for the next plan.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from alexnet_pp.config import PRESETS, ConfigError, load_config
from alexnet_pp.planning.planner import format_table, rank_layouts
from alexnet_pp.planning.profile import (
    ASSUMED,
    DeviceProfile,
    assumed_gpu_profile,
    measure_profile,
    oversubscribed,
    time_slicing_slowdown,
    with_time_slicing,
)
from alexnet_pp.planning.simulate import SCHEDULES


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="alexnet-pp plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, required=True, help="workers (GPUs or CPU processes) of the run")
    ap.add_argument("--batch", type=int, help="global batch per optimizer step (default: the preset's)")
    ap.add_argument("--device-profile", metavar="FILE",
                    help=f"a profile JSON, or an assumed one: {', '.join(ASSUMED)} (default: measure this machine)")
    ap.add_argument("--save-profile", metavar="FILE", help="write the measured profile here")
    ap.add_argument("--schedule", action="append", choices=SCHEDULES,
                    help="pipeline schedule(s) to consider; repeat for several (default: 1f1b, what the engine runs)")
    ap.add_argument("--preset", choices=PRESETS, default="paper", help="model to plan for (default: paper)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. model.width=0.5")
    ap.add_argument("--max-memory-gib", type=float, help="memory per worker (default: the profile's device memory)")
    ap.add_argument("--partition", default="measured", help="stage cuts as parallel.partition (default: measured)")
    ap.add_argument("--min-micro-batch", type=int, default=1, help="smallest micro-batch to consider")
    ap.add_argument("--top", type=int, default=20, help="rows to print (0: all)")
    ap.add_argument("--measure-micro-batches", default="16,32", help="sizes to time units at when measuring")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker when measuring a CPU")
    ap.add_argument("--co-runners", type=int, default=0,
                    help="when measuring a CPU: processes training the network meanwhile, as the run's other "
                         "workers on this machine would (workers per machine − 1)")
    return ap


def load_profile(spec: Optional[str], model_cfg, args) -> DeviceProfile:
    if spec in ASSUMED:
        return assumed_gpu_profile(spec, model_cfg)
    if spec:
        return DeviceProfile.load(spec)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = tuple(int(x) for x in args.measure_micro_batches.split(","))
    print(f"measuring this machine ({device}, micro-batches {sizes}); --device-profile FILE skips this")
    profile = measure_profile(model_cfg, sizes, device, threads=args.threads, co_runners=args.co_runners)
    if oversubscribed(args.workers, args.threads, profile.cores):  # the run's workers time-slice the cores
        slowdown = time_slicing_slowdown(model_cfg, args.workers, args.co_runners, args.threads, min(sizes))
        profile = with_time_slicing(profile, slowdown, args.workers)
    if args.save_profile:
        profile.save(args.save_profile)
        print(f"profile written to {args.save_profile}")
    return profile


def main_plan(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = dict(kv.split("=", 1) for kv in args.set)
    except ValueError:
        raise SystemExit("--set takes KEY=VALUE")
    try:
        cfg = load_config(args.preset, None, overrides, check_data=False)
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    batch = args.batch or cfg.train.batch_size
    profile = load_profile(args.device_profile, cfg.model, args)
    max_mem = int(args.max_memory_gib * 2**30) if args.max_memory_gib else None
    try:
        preds = rank_layouts(cfg.model, profile, args.workers, batch, tuple(args.schedule or ("1f1b",)), max_mem,
                             args.partition, args.min_micro_batch)
    except (ValueError, ConfigError) as e:
        raise SystemExit(f"error: {e}")
    print(f"PREDICTED layouts for {args.workers} workers, batch {batch}, preset {args.preset}: profile "
          f"{profile.name} ({profile.device}). Nothing below was measured.")
    print(format_table(preds, args.top or None))
    print("assumptions:")
    for a in profile.assumptions:
        print(f"  - {a}")
    print("  - memory: weights, gradients and momentum in float32, plus the activations autograd keeps for the "
          "micro-batches in flight; framework workspace and the CUDA context are not counted")
    best = preds[0]
    if not best.fits:
        print("no layout fits in memory; the table is ordered by speed regardless")
    return 0
