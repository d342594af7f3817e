"""Checkpoint speed: the layout-free distributed write and read against a plain torch.save / torch.load.

    python -m benchmarks.checkpoint_bench [--preset paper] [--layouts 2,2,1:1,1,1] [--reps 5] [--json out.json]

For each layout, one process per rank holds exactly its stage's and tower's parameters and SGD
momentum (built as a pipeline rank builds them) and runs the checkpoint code the engine runs
(cluster/checkpoint.py: every rank of replica 0 writes its parts in parallel, barrier, rank 0 writes
the marker) and then the read a resuming rank does. Beside it, in the same run and alternating with
it, one process `torch.save`s and `torch.load`s the same tensors (weights and momentum of the whole
network) as one file. Reported: medians and spreads of seconds and MB/s, and the ratios (goal: write
and read each ≤ 1.2× the plain save / load). Files go to --scratch; the page cache is not dropped
(both sides alike), so this measures the code path and the file system's write-back, not the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from alexnet_pp.config import load_config
from alexnet_pp.layout import Layout
from alexnet_pp.model import AlexNet


def _rank_shard(cfg, layout: Layout, rank: int):
    """The modules rank `rank` holds, built as the engine builds them (no DeepSpeed needed)."""
    from cluster.stage_layers import GroupRef, rank_layers

    coord = layout.coord(rank)
    specs, bounds = rank_layers(cfg.model, layout.tp, coord.tower, GroupRef(), cfg.train.seed,
                                layout.partition.bounds)
    layers = [specs[i].build() for i in range(bounds[coord.stage], bounds[coord.stage + 1])]
    module = SimpleNamespace(forward_funcs=layers)
    params = [p for layer in layers for p in layer.parameters()]
    sgd = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    for p in params:  # a momentum buffer per parameter, as after the first step
        sgd.state[p]["momentum_buffer"] = torch.randn_like(p)
    return module, sgd


def _rank_main(rank: int, world: int, port: int, cfg_dict: dict, layout: Layout, scratch: str, reps: int,
               out: str) -> None:
    import torch.distributed as dist

    from alexnet_pp.config import from_dict
    from cluster.checkpoint import EngineCheckpoints

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = from_dict(cfg_dict)
    cfg.checkpoint.dir, cfg.checkpoint.keep = scratch, 1
    module, sgd = _rank_shard(cfg, layout, rank)
    schedule = SimpleNamespace(state_dict=lambda: {"lr": 0.01})
    ckpt = EngineCheckpoints(cfg, layout, rank)
    writes, reads = [], []
    for rep in range(reps + 1):  # the first is a warm-up
        dist.barrier()
        t0 = time.perf_counter()
        ckpt.save(SimpleNamespace(optimizer=sgd), module, schedule, {"step": rep + 1, "epoch": 0, "step_in_epoch": 0})
        dist.barrier()
        t1 = time.perf_counter()
        ckpt.load_weights(module)
        ckpt.load_state(SimpleNamespace(optimizer=sgd), module, SimpleNamespace(load_state_dict=lambda s: None))
        dist.barrier()
        t2 = time.perf_counter()
        if rep:
            writes.append(t1 - t0)
            reads.append(t2 - t1)
    if rank == 0:
        Path(out).write_text(json.dumps({"write": writes, "read": reads}))
    dist.destroy_process_group()


def distributed(cfg, layout: Layout, reps: int, scratch: Path) -> dict:
    from cluster.spawn import free_port, start_ranks

    directory = Path(tempfile.mkdtemp(prefix="ckpt-", dir=scratch))
    out = directory / "times.json"
    try:
        start_ranks(_rank_main, (layout.world_size, free_port(), cfg.to_dict(), layout, str(directory / "c"), reps,
                                 str(out)), layout.world_size, join=True)
        return json.loads(out.read_text())
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def plain(cfg, reps: int, scratch: Path) -> dict:
    """torch.save / torch.load of the whole network's weights and momentum, one file."""
    torch.set_num_threads(1)
    model = AlexNet(cfg.model)
    tensors = {**model.state_dict(), **{f"momentum.{k}": torch.randn_like(v) for k, v in model.state_dict().items()}}
    path = Path(tempfile.mkdtemp(prefix="plain-", dir=scratch)) / "model.pt"
    writes, reads = [], []
    try:
        for rep in range(reps + 1):
            t0 = time.perf_counter()
            torch.save(tensors, path)
            t1 = time.perf_counter()
            torch.load(path, weights_only=True)
            t2 = time.perf_counter()
            if rep:
                writes.append(t1 - t0)
                reads.append(t2 - t1)
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
    return {"write": writes, "read": reads, "bytes": sum(v.numel() * v.element_size() for v in tensors.values())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--layouts", default="2,2,1:1,1,1", help="P,T,D of each layout, ':'-separated")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of each side (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of plain and distributed per layout")
    ap.add_argument("--scratch", default=tempfile.gettempdir())
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    report: dict = {"preset": args.preset, "layouts": {}}
    for spec in args.layouts.split(":"):
        pp, tp, dp = (int(x) for x in spec.split(","))
        cfg = load_config(args.preset, overrides={"parallel.pp": str(pp), "parallel.tp": str(tp),
                                                  "parallel.dp": str(dp), "parallel.partition": "flops",
                                                  "train.batch_size": str(8 * dp), "data.train": "x",
                                                  "data.val": "x"}, check_data=False)
        layout = Layout.from_config(cfg)
        sides = {"plain": {"write": [], "read": []}, "distributed": {"write": [], "read": []}}
        nbytes = 0
        for _ in range(args.rounds):  # alternate the sides, so a drift of the machine hits both
            p = plain(cfg, args.reps, scratch)
            nbytes = p["bytes"]
            d = distributed(cfg, layout, args.reps, scratch)
            for side, got in (("plain", p), ("distributed", d)):
                for k in ("write", "read"):
                    sides[side][k] += got[k]
        row = {"bytes": nbytes}
        for side, times in sides.items():
            for k, xs in times.items():
                med = statistics.median(xs)
                row[f"{side}_{k}_s"] = med
                row[f"{side}_{k}_spread_s"] = [min(xs), max(xs)]
                row[f"{side}_{k}_MBps"] = nbytes / med / 1e6
        row["write_ratio"] = row["distributed_write_s"] / row["plain_write_s"]
        row["read_ratio"] = row["distributed_read_s"] / row["plain_read_s"]
        report["layouts"][spec] = row
        print(f"({spec}) {nbytes / 1e6:.0f} MB: write {row['distributed_write_s']:.3f} s "
              f"({row['distributed_write_MBps']:.0f} MB/s, spread {row['distributed_write_spread_s'][0]:.3f}–"
              f"{row['distributed_write_spread_s'][1]:.3f}) vs torch.save {row['plain_write_s']:.3f} s "
              f"({row['plain_write_MBps']:.0f} MB/s): {row['write_ratio']:.2f}× (goal ≤ 1.2); "
              f"read {row['distributed_read_s']:.3f} s ({row['distributed_read_MBps']:.0f} MB/s) vs torch.load "
              f"{row['plain_read_s']:.3f} s ({row['plain_read_MBps']:.0f} MB/s): {row['read_ratio']:.2f}× (goal ≤ 1.2)",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
