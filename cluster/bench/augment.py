"""Augmentation actors benchmark: a training run limited to one CPU per worker, fed by 0, 1, 2, … actors.

    alexnet-pp bench augment [--actors 0,1,2] [--preset test] [--steps 12] [--repeats 3] [--out DIR]

A Ray cluster of nodes on 127.0.0.1 (ray.cluster_utils.Cluster, started and stopped here): a head
with no CPUs, a node with one CPU for the (1, 1, 1) training worker (parallel.cpus_per_worker 1,
train.threads 1), and a CPU-only node with max(--actors) CPUs for the actors. With 0 actors the worker
decodes and augments in its own process (data.workers 0); with N it trains while N actors
(data.augment_actors N, one CPU each) make its batches. The stored images are 256 px JPEGs cropped to
the network's input (64 px for the test preset), so decoding is a real share of the step, as it is
for a GPU that trains faster than one core decodes. Each row is a full run through the Ray job
path (cluster.driver.run_job) on the embedded dataset; images/s after the warm-up steps, the
repetitions alternating the actor counts, medians and ranges reported with the ratio to 0 actors.
On a machine with fewer cores than nodes' CPUs the nodes share them: read the ratios with the core
count beside them (it is in the report's environment).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from cluster.bench.report import Column, Report, Table, add_out_arg


def run_config(args, actors: int, scratch: Path):
    from alexnet_pp.config import load_config

    return load_config(args.preset, overrides={
        "name": f"augment-{actors}", "out_dir": str(scratch), "train.max_steps": str(args.warmup + args.steps),
        "train.threads": "1", "parallel.cpus_per_worker": "1", "data.workers": "0",
        "data.augment_actors": str(actors), "data.augment_cpus": "1", "checkpoint.resume": "false",
        "train.eval_every": "1000", "metrics.enabled": "false", "data.stored_size": str(args.stored_size),
        "data.synthetic_dir": str(args.data_dir), **dict(kv.split("=", 1) for kv in args.set)})


def one_run(args, actors: int, address: str, scratch: Path) -> tuple[float, float]:
    """images/s after the warm-up, and the share of the worker's step spent waiting for its batch."""
    from alexnet_pp.layout import Layout
    from cluster.driver import run_job

    cfg = run_config(args, actors, scratch)
    try:
        summary = run_job(cfg, Layout.from_config(cfg), address=address, warmup_steps=args.warmup)
    finally:
        shutil.rmtree(scratch / cfg.name, ignore_errors=True)
    if not summary.ok:
        raise RuntimeError(f"the run with {actors} actor(s) failed: {summary.error}")
    return summary.images_per_sec, summary.data_wait_share


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="alexnet-pp bench augment", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actors", default="0,1,2", help="actor counts to compare (0: the worker decodes itself)")
    ap.add_argument("--preset", default="test")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="runs per actor count, alternating the counts")
    ap.add_argument("--stored-size", type=int, default=256,
                    help="side of the stored JPEGs (default 256, ImageNet-sized: decoding is a real share of the step)")
    ap.add_argument("--data-dir", default="data/synthetic-augment",
                    help="the embedded dataset at --stored-size (generated when absent)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    add_out_arg(ap, "augment")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.actors.split(",")]
    args.data_dir = Path(args.data_dir).resolve()

    scratch = Path(tempfile.mkdtemp(prefix="alexnet-pp-augment-"))
    # Ray reads these when it is imported: nodes on 127.0.0.1 only, and token authentication (the
    # job path refuses a cluster without it), with a token of this run's own unless one is configured
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ.get("RAY_AUTH_MODE") != "token":
        token = scratch / "token"
        token.write_text(secrets.token_hex(32))
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    import ray
    from ray.cluster_utils import Cluster

    from alexnet_pp.data import ensure_dataset

    ensure_dataset(run_config(args, 0, Path(tempfile.gettempdir())))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                             "include_dashboard": False})
    rates: dict[int, list[float]] = {n: [] for n in counts}
    waits: dict[int, list[float]] = {n: [] for n in counts}
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")  # the training worker's node
        if max(counts) > 0:
            cluster.add_node(num_cpus=max(counts), node_ip_address="127.0.0.1")  # CPU-only: the actors'
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        for rep in range(args.repeats):
            order = counts if rep % 2 == 0 else counts[::-1]
            for n in order:
                rate, wait = one_run(args, n, cluster.address, scratch)
                rates[n].append(rate)
                waits[n].append(wait)
                print(f"run {rep + 1}/{args.repeats}: {n} actor(s): {rate:8.1f} images/s, data wait "
                      f"{100 * wait:4.1f}% of the step", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)

    report = Report("augment", args.out, argv, {"preset": args.preset, "stored_size": args.stored_size,
                                                 "steps": args.steps, "warmup": args.warmup,
                                                 "repeats": args.repeats, "overrides": args.set},
                    title="Training images/s with augmentation actors on a CPU-only node")
    base = statistics.median(rates[counts[0]]) if rates[counts[0]] else None
    rows = []
    print(f"\n{'actors':>6} {'images/s (median)':>18} {'range':>20} {'× first':>8} {'data wait':>10}")
    for n in counts:
        med = statistics.median(rates[n])
        ratio = med / base if base else None
        wait = statistics.median(waits[n])
        print(f"{n:>6} {med:>18.1f} {min(rates[n]):>9.1f} – {max(rates[n]):<8.1f} {ratio:>8.2f} {100 * wait:>9.1f}%")
        rows.append(report.add({"actors": n, "images_per_s": med, "min": min(rates[n]), "max": max(rates[n]),
                                "runs": rates[n], "ratio": ratio, "data_wait_share": wait,
                                "data_wait_runs": waits[n]}))
    report.tables.append(Table(f"(1,1,1), one CPU for the worker, preset {args.preset}; ratio to {counts[0]} actors",
                               rows, [Column("actors", "actors"), Column("images/s (median)", "images_per_s", ".1f"),
                                      Column("min", "min", ".1f"), Column("max", "max", ".1f"),
                                      Column("ratio", "ratio", ".2f"),
                                      Column("data wait, share of the step", "data_wait_share", ".1%")]))
    for path in report.write():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
