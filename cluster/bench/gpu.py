"""GPU benchmark and checks: the paper network's training step on one CUDA device.

    alexnet-pp bench gpu [--batch 128] [--steps 30] [--warmup 5] [--out DIR]

In one run, on the same batches:
1. the plain training step (the single-process trainer's `train_step`) in float32 and under bf16
   autocast, each with our fused LRN kernel and with torch's `F.local_response_norm`, and bf16 in
   channels_last: images/s side by side, with ratios;
2. correctness on the device: the first losses of the float32 CUDA step against the same steps on the
   CPU (float64 reference would be too slow for the paper net; the CPU float32 run is the reference
   every other test already pins);
3. the DeepSpeed pipeline engine with (P, T, D) = (1, 1, 1) on the device — process group
   `cpu:gloo,cuda:nccl`, DS_ACCELERATOR=cuda — in float32, bf16 and bf16-mixed, the last two also with
   `parallel.channels_last`,
   against the plain step of the same precision and layout and against the fastest plain
   configuration (goal ≥ 0.95), and its losses against the plain step's. DeepSpeed's bf16 keeps
   bf16 weights with float32 master copies; the plain bf16 step is autocast over float32 weights,
   as is the engine's `bf16-mixed` (float32 weights and optimizer, each stage under autocast);
4. training from JPEG shards (the embedded dataset at 256 px, generated under --scratch): the
   bf16-mixed channels-last engine reading the shards through its loader, with `data.decode gpu`
   (nvJPEG: workers only parse headers) and `cpu` (workers decode, uint8 crops cross), against the
   engine on in-memory tensors from 3 (goal ≥ 0.9), with the step's data wait.
cuDNN's TF32 convolutions are left at torch's default (on); matmul TF32 at its default (off).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import alexnet_pp.model as model_mod
import ops
from alexnet_pp.config import load_config
from alexnet_pp.model import AlexNet
from alexnet_pp.optim import build_optimizer
from alexnet_pp.steps import train_step
from cluster.bench.engine import make_batches, tensor_data
from cluster.bench.report import Column, Report, Table, add_out_arg
from cluster.profiling import DIR_ENV, STEPS_ENV, summary


@contextlib.contextmanager
def lrn_impl(name: str):
    """Swap the model's LRN for torch's own (same math: alpha × size, see ops/__init__.py)."""
    saved = model_mod.lrn
    if name == "torch":
        model_mod.lrn = lambda x, size, alpha, beta, k: F.local_response_norm(x, size, alpha * size, beta, k)
    try:
        yield
    finally:
        model_mod.lrn = saved


def plain_run(cfg, batches, device: str, dtype: torch.dtype, channels_last: bool = False) -> tuple[list[float], list[float]]:
    """Seconds per step (synchronised: train_step reads the loss back) and losses. bf16 is autocast
    over float32 weights: pure bf16 weights would round most SGD updates away (8-bit mantissa)."""
    torch.manual_seed(cfg.train.seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = AlexNet(cfg.model).to(device=device).to(memory_format=fmt)
    opt = build_optimizer(model.parameters(), cfg.train)
    cast = (torch.autocast(device_type=torch.device(device).type, dtype=dtype) if dtype != torch.float32
            else contextlib.nullcontext())
    times, losses = [], []
    for x, y in batches:
        t0 = time.perf_counter()  # the copy from (pinned) host memory is part of a trainer's step
        x = x.to(device=device, non_blocking=True).contiguous(memory_format=fmt)
        y = y.to(device, non_blocking=True)
        with cast:
            losses.append(train_step(model, x, y, opt))
        times.append(time.perf_counter() - t0)
    return times, losses


def engine_run(cfg, batches: Optional[list], warmup: int, accelerator: str = "cuda"
               ) -> tuple[list[float], list[float], dict[str, float], dict[str, float]]:
    """Seconds per step, losses, and the median host-side seconds per step of each pipeline phase
    (not synchronised: where the host spends its time, not the GPU), wall and the schedule thread's CPU
    (wall well above CPU: the host waited for the device there). On `batches` in memory, or with
    None on cfg's shards through the engine's own loader."""
    from cluster.spawn import run_local

    os.environ["DS_ACCELERATOR"] = accelerator
    # TensorData pins again in the worker: pinning does not survive pickling
    factory = functools.partial(tensor_data, batches, cfg.parallel.micro_batches) if batches is not None else None
    (result,) = run_local(cfg, factory, threads=cfg.train.threads)
    stats = result.stats[warmup:]
    phases = {k: statistics.median(s["phases"].get(k, 0.0) for s in stats) for k in stats[0]["phases"]}
    cpu = {k: statistics.median((s.get("phase_cpu") or {}).get(k, 0.0) for s in stats) for k in phases}
    return [s["seconds"] for s in result.stats], result.losses, phases, cpu


def profile_plain(cfg, batches, device: str, prec: str, channels_last: bool) -> None:
    """Three steps of the plain step under torch.profiler, printed as cluster/profiling.py prints a rank's."""
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    plain_run(cfg, batches[:3], device, dtype, channels_last)  # warm: the allocator and cuDNN's choices
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        plain_run(cfg, batches[3:6], device, dtype, channels_last)
    print(f"\n## plain {prec}{'/channels_last' if channels_last else ''}, profiled (model built inside)\n"
          + summary(prof, 3))


def rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="alexnet-pp bench gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--check-steps", type=int, default=3, help="steps compared against the CPU")
    ap.add_argument("--no-engine", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="profile 3 steps of the best plain configuration and of the engine in the same "
                         "precision and layout (cluster/profiling.py) and print where their time goes")
    ap.add_argument("--only-engine", default="", help="comma-separated engine variants to run (default all: "
                    "fp32,bf16,bf16/channels_last,bf16-mixed,bf16-mixed/channels_last)")
    ap.add_argument("--shard-images", type=int, default=5120,
                    help="training images in the JPEG shards of section 4 (0: skip it)")
    ap.add_argument("--data-workers", type=int, default=0,
                    help="loader workers in section 4 (default: the cores less two, at most 12)")
    ap.add_argument("--scratch", default="/tmp/alexnet-pp-gpu-bench")
    add_out_arg(ap, "gpu")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("alexnet-pp bench gpu needs a CUDA device", file=sys.stderr)
        return 2
    dev = "cuda"
    name = torch.cuda.get_device_name(0)
    print(f"# device {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, fused LRN "
          f"{'on' if ops.FUSED_LRN_AVAILABLE else 'OFF'}, batch {args.batch}, {args.steps} timed steps "
          f"after {args.warmup}")
    overrides = {"train.batch_size": str(args.batch), "model.dropout": "0", "train.schedule": "constant",
                 "train.epochs": "1", "train.eval_every": "1000", "checkpoint.resume": "false",
                 "checkpoint.dir": os.path.join(args.scratch, "ckpt"), "out_dir": args.scratch,
                 "data.synthetic_classes": "1000"}
    cfg = load_config("paper", overrides=overrides)
    batches = [(x.pin_memory(), y.pin_memory()) for x, y in make_batches(cfg, args.steps + args.warmup)]
    report: dict = {"device": name, "torch": torch.__version__, "batch": args.batch, "plain": {}, "engine": {}}

    print("\n# 1. plain training step on the device (images/s, median)")
    rows = [("fp32", torch.float32, "ours", False), ("fp32", torch.float32, "torch", False),
            ("bf16", torch.bfloat16, "ours", False), ("bf16", torch.bfloat16, "torch", False),
            ("bf16", torch.bfloat16, "ours", True)]
    med: dict = {}
    for prec, dtype, impl, cl in rows:
        key = f"{prec}/{impl}LRN" + ("/channels_last" if cl else "")
        with lrn_impl(impl):
            times, losses = plain_run(cfg, batches, dev, dtype, cl)
        t = statistics.median(times[args.warmup:])
        med[key] = t
        report["plain"][key] = {"img_s": args.batch / t, "ms": 1000 * t, "losses": losses[:5]}
        print(f"{key:<28} {args.batch / t:9.0f} img/s  {1000 * t:7.2f} ms/step  first losses "
              + " ".join(f"{v:.4f}" for v in losses[:3]), flush=True)
    print(f"fused LRN speedup at model level: fp32 {med['fp32/torchLRN'] / med['fp32/oursLRN']:.2f}x, "
          f"bf16 {med['bf16/torchLRN'] / med['bf16/oursLRN']:.2f}x; bf16 vs fp32 "
          f"{med['fp32/oursLRN'] / med['bf16/oursLRN']:.2f}x")

    print(f"\n# 2. float32 losses on the device vs the CPU, first {args.check_steps} steps")
    few = batches[: args.check_steps]
    _, gpu_losses = plain_run(cfg, few, dev, torch.float32)
    _, cpu_losses = plain_run(cfg, few, "cpu", torch.float32)
    d = rel_diff(gpu_losses, cpu_losses)
    print("cuda " + " ".join(f"{v:.5f}" for v in gpu_losses) + "\ncpu  " + " ".join(f"{v:.5f}" for v in cpu_losses)
          + f"\nlargest relative difference {d:.2e} (TF32 convolutions: expect ≲ 1e-3)")
    report["cpu_check"] = {"cuda": gpu_losses, "cpu": cpu_losses, "max_rel_diff": d}

    if not args.no_engine:
        best_key = min(med, key=med.get)  # the fastest plain configuration: the engine's bar
        print(f"\n# 3. DeepSpeed engine (1,1,1) on the device vs the plain step (same precision and layout, "
              f"and the best plain: {best_key})")
        plain_profiled = False
        # (parallel.precision, the plain step's precision of the same arithmetic, channels-last)
        for prec, plain_prec, cl in (("fp32", "fp32", False), ("bf16", "bf16", False), ("bf16", "bf16", True),
                                     ("bf16-mixed", "bf16", False), ("bf16-mixed", "bf16", True)):
            layout = "/channels_last" if cl else ""
            variant, plain_key = prec + layout, f"{plain_prec}/oursLRN{layout}"
            if args.only_engine and variant not in args.only_engine.split(","):
                continue
            profiling = args.profile and plain_key == best_key
            if profiling and not plain_profiled:
                profile_plain(cfg, batches, dev, plain_prec, cl)
                plain_profiled = True
            profiler = {"callbacks": "cluster.profiling:StepProfiler"} if profiling else {}
            profile_dir = os.path.join(args.scratch, "profile")
            ecfg = load_config("paper", overrides={**overrides, "parallel.precision": prec,
                                                   "parallel.channels_last": str(cl).lower(),
                                                   "parallel.gpus_per_worker": "1", **profiler})
            if profiling:  # the callback reads these in the rank (callbacks are built without arguments)
                os.environ.update({DIR_ENV: profile_dir, STEPS_ENV: f"{args.warmup}:3"})
            try:
                times, losses, phases, phase_cpu = engine_run(ecfg, batches, args.warmup)
            except Exception as e:  # noqa: BLE001 - report and go on to the next variant
                print(f"{variant}: engine FAILED: {str(e).splitlines()[0][:400]}")
                report["engine"][variant] = {"error": str(e)[:4000]}
                continue
            finally:
                for key in (DIR_ENV, STEPS_ENV):
                    os.environ.pop(key, None)
            t = statistics.median(times[args.warmup:])
            plain_t = med[plain_key]
            d = rel_diff(losses[:3], report["plain"][plain_key]["losses"][:3])
            print(f"{variant}: engine {args.batch / t:9.0f} img/s  plain {args.batch / plain_t:9.0f} img/s  ratio "
                  f"{plain_t / t:.3f}; vs best plain {med[best_key] / t:.3f} (goal ≥ 0.95); first losses "
                  + " ".join(f"{v:.4f}" for v in losses[:3]) + f" (rel. diff to plain {d:.1e})", flush=True)
            print("      host ms per step: " + "  ".join(f"{k} {1000 * v:.2f}" for k, v in sorted(phases.items())))
            print("      host CPU ms per step: "
                  + "  ".join(f"{k} {1000 * v:.2f}" for k, v in sorted(phase_cpu.items())))
            if profiling:
                profile = Path(profile_dir) / "rank0.txt"
                print(f"\n## engine {variant}, profiled\n"
                      + (profile.read_text() if profile.exists() else "no profile written"))
            report["engine"][variant] = {"img_s": args.batch / t, "ratio": plain_t / t,
                                         "ratio_to_best_plain": med[best_key] / t, "best_plain": best_key,
                                         "losses": losses[:5], "loss_rel_diff": d, "host_phase_s": phases}
        bar = report["engine"].get(f"{SHARD_PRECISION}/channels_last", {})
        if args.shard_images > 0 and "img_s" in bar:
            shard_section(args, overrides, bar["img_s"], report)
    out = Report("gpu", args.out, argv, {"device": name, "torch": torch.__version__, "batch": args.batch,
                                         "steps": args.steps, "warmup": args.warmup},
                 title="Training step on one CUDA device: plain step, fused LRN, DeepSpeed engine")
    for key, r in report["plain"].items():
        out.add({"side": "plain", "variant": key, **r})
    for prec, r in report["engine"].items():
        out.add({"side": "engine", "variant": prec, **r})
    for decode, r in report.get("shards", {}).items():
        out.add({"side": "engine from JPEG shards", "variant": f"{SHARD_PRECISION}/channels_last, decode {decode}",
                 **r})
    out.add({"side": "cpu_check", **report["cpu_check"]})
    out.tables.append(Table("Images/s (median of the timed steps)", [r for r in out.rows if "img_s" in r], [
        Column("side", "side"), Column("variant", "variant"), Column("img/s", "img_s", ".0f"),
        Column("engine / plain (same precision, layout)", "ratio", ".3f"),
        Column("engine / best plain (goal ≥ 0.95)", "ratio_to_best_plain", ".3f"),
        Column("from shards / in memory (goal ≥ 0.9)", "ratio_to_tensors", ".3f"),
        Column("data wait ms/step", "data_wait_ms", ".2f")]))
    out.notes.append(f"float32 losses, GPU vs CPU, first {args.check_steps} steps: largest relative difference "
                     f"{report['cpu_check']['max_rel_diff']:.1e}")
    for path in out.write():
        print(f"wrote {path}")
    return 0


SHARD_PRECISION = "bf16-mixed"  # the plain bf16 step's arithmetic: the engine variant meant to match its speed


def shard_section(args, overrides: dict, tensor_img_s: float, report: dict, accelerator: str = "cuda") -> None:
    """Section 4: the SHARD_PRECISION channels-last engine from JPEG shards, decoded on the GPU and on the CPU
    (accelerator "cpu": the same code on a CPU, to try it out where no GPU is)."""
    from alexnet_pp.data import ensure_dataset

    workers = args.data_workers or max(1, min(12, len(os.sched_getaffinity(0)) - 2))
    classes = 1000
    data = {"data.synthetic_dir": os.path.join(args.scratch, "shards"), "data.synthetic_classes": str(classes),
            "data.synthetic_train_per_class": str(-(-args.shard_images // classes)),
            "data.synthetic_val_per_class": "1", "data.workers": str(workers)}
    base = {**overrides, **data, "parallel.precision": SHARD_PRECISION, "parallel.channels_last": "true",
            "parallel.gpus_per_worker": "1" if accelerator == "cuda" else "0"}
    t0 = time.perf_counter()
    shard_cfg = load_config("paper", overrides=base)
    info = ensure_dataset(shard_cfg)
    print(f"\n# 4. engine (1,1,1) {SHARD_PRECISION} channels_last from JPEG shards ({info.train_samples} images of "
          f"{shard_cfg.data.stored_size} px, made or found in "
          f"{time.perf_counter() - t0:.0f} s), {workers} loader workers, vs the same engine on in-memory "
          f"tensors ({tensor_img_s:.0f} img/s)")
    report["shards"] = {}
    for decode in ("gpu", "cpu"):
        try:
            cfg = load_config("paper", overrides={**base, "data.decode": decode})
            times, _, phases, _ = engine_run(cfg, None, args.warmup, accelerator)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"decode {decode}: FAILED: {str(e).splitlines()[0][:400]}")
            report["shards"][decode] = {"error": str(e)[:4000]}
            continue
        img_s, wait = args.batch / statistics.median(times[args.warmup:]), phases.get("data_wait", 0.0)
        report["shards"][decode] = {"img_s": img_s, "ratio_to_tensors": img_s / tensor_img_s,
                                    "data_wait_ms": 1000 * wait, "steps": len(times), "workers": workers}
        print(f"decode {decode}: {img_s:9.0f} img/s  {img_s / tensor_img_s:.3f} of in-memory (goal ≥ 0.9); "
              f"data wait {1000 * wait:.2f} ms/step over {len(times)} steps", flush=True)


if __name__ == "__main__":
    sys.exit(main())
