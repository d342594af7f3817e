"""Forward+backward timing of ops.lrn against torch.nn.LocalResponseNorm.

    alexnet-pp bench lrn [--device cpu|cuda] [--reps 9] [--threads 2] [--out DIR]

Shapes are AlexNet's two LRN inputs at batch 32 (conv1: 32x96x55x55, conv2:
32x256x27x27), float32.  torch's module gets the equivalent hyper-parameters
(``alpha * size``, since it divides alpha by size).  All contenders run in the
same process on the same tensors, interleaved repetition by repetition after a
warm-up, and the median per contender is reported.  "ours" is ``ops.lrn`` with
its automatic backend (the fused C++ kernel on CPU, the fused Triton kernel on
CUDA when available); ``--no-fallback`` drops the extra row that times the
pure-torch fallback path too.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

import ops
from cluster.bench.report import Column, Report, Table, add_out_arg
from ops import lrn, lrn_cpu, select_backend

DEFAULT_SHAPES = {"conv1": (32, 96, 55, 55), "conv2": (32, 256, 27, 27)}
SIZE, ALPHA, BETA, K = 5, 1e-4, 0.75, 2.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, g: torch.Tensor) -> None:
    y = fn(x)
    torch.autograd.grad(y, x, g)


def _time_once(fn, x, g, device, inner: int) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        _step(fn, x, g)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3 / inner


def bench_shape(shape: Sequence[int], contenders: Dict[str, Callable], device: torch.device,
                dtype: torch.dtype, reps: int, warmup: int, inner: int, channels_last: bool,
                seed: int = 0) -> Dict[str, List[float]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=gen).mul_(10).to(device=device, dtype=dtype)
    g = torch.randn(tuple(shape), generator=gen).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        g = g.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    for _ in range(warmup):
        for fn in contenders.values():
            _time_once(fn, x, g, device, inner)
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for r in range(reps):
        names = list(contenders)
        if r % 2:  # alternate the order so neither side always runs first
            names.reverse()
        for name in names:
            times[name].append(_time_once(contenders[name], x, g, device, inner))
    return times


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--reps", type=int, default=9, help="timed repetitions per contender (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--inner", type=int, default=None,
                    help="fwd+bwd calls per timed repetition (default 1 on CPU, 20 on CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"], default="float32")
    ap.add_argument("--channels-last", action="store_true", help="use channels_last inputs")
    ap.add_argument("--shape", action="append", default=None, metavar="NxCxHxW",
                    help="benchmark this shape instead of the AlexNet ones (repeatable)")
    ap.add_argument("--no-fallback", action="store_true", help="skip timing the pure-torch path")
    add_out_arg(ap, "lrn")
    args = ap.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    inner = args.inner or (20 if device.type == "cuda" else 1)
    shapes = ({s: tuple(int(v) for v in s.lower().split("x")) for s in args.shape}
              if args.shape else {f"{k} " + "x".join(map(str, v)): v for k, v in DEFAULT_SHAPES.items()})

    probe = torch.empty(1, 1, 1, 1, device=device, dtype=dtype)
    backend = select_backend(probe)
    ref = torch.nn.LocalResponseNorm(SIZE, ALPHA * SIZE, BETA, K)
    contenders: Dict[str, Callable] = {
        "torch": ref,
        "ours": lambda t: lrn(t, SIZE, ALPHA, BETA, K),
    }
    if not args.no_fallback and backend != "torch":
        contenders["ours_torch_path"] = lambda t: lrn(t, SIZE, ALPHA, BETA, K, backend="torch")

    # build/compile outside the timed region
    _step(contenders["ours"], probe.expand(1, 8, 2, 2).clone().requires_grad_(True),
          torch.ones(1, 8, 2, 2, device=device, dtype=dtype))

    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                dev_name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
    print(f"LRN forward+backward  device={device.type} ({dev_name})  threads={torch.get_num_threads()}  "
          f"dtype={args.dtype}  layout={'channels_last' if args.channels_last else 'contiguous'}")
    print(f"ours backend={backend}  reps={args.reps} (median, interleaved, {args.warmup} warm-up)  "
          f"inner={inner}  torch {torch.__version__}")
    extra = [n for n in contenders if n not in ("torch", "ours")]
    header = f"{'shape':<24}{'torch ms':>10}{'ours ms':>10}{'speedup':>9}"
    for n in extra:
        header += f"{n + ' ms':>22}{'speedup':>9}"
    print(header)
    print("-" * len(header))

    results = []
    for label, shape in shapes.items():
        times = bench_shape(shape, contenders, device, dtype, args.reps, args.warmup, inner,
                            args.channels_last)
        med = {n: statistics.median(v) for n, v in times.items()}
        line = f"{label:<24}{med['torch']:>10.2f}{med['ours']:>10.2f}{med['torch'] / med['ours']:>8.2f}x"
        for n in extra:
            line += f"{med[n]:>22.2f}{med['torch'] / med[n]:>8.2f}x"
        print(line, flush=True)
        results.append({
            "label": label, "shape": list(shape), "median_ms": med, "times_ms": times,
            "speedup": {n: med["torch"] / med[n] for n in contenders if n != "torch"},
        })

    settings = {
        "device": device.type, "device_name": dev_name, "threads": torch.get_num_threads(),
        "dtype": args.dtype, "channels_last": args.channels_last, "reps": args.reps,
        "warmup": args.warmup, "inner": inner, "backend": backend, "torch": torch.__version__,
        "fused_lrn_available": ops.FUSED_LRN_AVAILABLE,
        "cpu_kernel_available": lrn_cpu.available(),
        "hparams": {"size": SIZE, "alpha": ALPHA, "beta": BETA, "k": K},
    }
    report = Report("lrn", args.out, list(argv if argv is not None else sys.argv[1:]), settings,
                    title="LRN forward + backward: ours vs torch.nn.LocalResponseNorm")
    for r in results:
        report.add(r)
    columns = [Column("shape", "label"), Column("torch ms (median)", lambda r: r["median_ms"]["torch"], ".2f"),
               Column("ours ms (median)", lambda r: r["median_ms"]["ours"], ".2f"),
               Column("speedup", lambda r: r["speedup"]["ours"], ".2f"),
               Column("ours ms (spread)", lambda r: f"{min(r['times_ms']['ours']):.2f}–{max(r['times_ms']['ours']):.2f}")]
    report.tables.append(Table("Median of interleaved repetitions", report.rows, columns))
    for path in report.write():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
