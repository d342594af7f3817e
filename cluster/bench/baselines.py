"""The scaling benchmark's baselines, on the same in-memory batches as the layouts they stand beside.

- `plain`: the single-process trainer's step (alexnet_pp.steps.train_step) on the whole network,
  one process with the given torch threads;
- `ddp`: PyTorch's DistributedDataParallel of the same network over gloo (NCCL on GPUs), one
  process per worker, each stepping on its rows of the global batch — data parallel only, what most
  users would pick instead of a pipeline.

Each runs in fresh processes (cluster.spawn.start_ranks), so its peak memory is its own. Steps
after `warmup` are timed on every rank; a step's time is the slowest rank's.
"""

from __future__ import annotations

import os
import pickle
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.run_summary import _percentile


@dataclass
class BaselineJob:
    model: dict  # ModelConfig fields
    train: dict  # TrainConfig fields (the optimiser; threads and allocator)
    steps: int  # warm-up + timed
    warmup: int
    batch: int
    threads: int
    distinct: int = 2
    seed: int = 0
    device: str = "cpu"
    collective_timeout_s: float = 300.0
    extra: dict = field(default_factory=dict)


def _rank_main(rank: int, world: int, port: int, job: BaselineJob, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    try:
        payload: Any = {"ok": True, **_train(rank, world, job)}
    except BaseException as e:  # reported to the parent
        payload = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(payload))


def _train(rank: int, world: int, job: BaselineJob) -> dict:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from alexnet_pp.config import ModelConfig, TrainConfig
    from alexnet_pp.dropout import batch_keys
    from alexnet_pp.host import configure_host
    from alexnet_pp.model import AlexNet
    from alexnet_pp.optim import build_optimizer
    from alexnet_pp.steps import train_step
    from cluster.bench.synthetic import global_batches
    from cluster.timing import peak_memory_bytes

    configure_host(job.threads, True)
    model_cfg, train_cfg = ModelConfig(**job.model), TrainConfig(**job.train)
    device = torch.device(f"cuda:{rank}" if job.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = AlexNet(model_cfg, seed=train_cfg.seed).to(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=job.collective_timeout_s))
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device.type == "cuda" else None)
    opt = build_optimizer(model.parameters(), train_cfg)
    n = job.batch // world
    lo = rank * n
    times = []
    for step, (x, y) in enumerate(global_batches(job.steps, job.batch, model_cfg.image_size, model_cfg.num_classes,
                                                 job.distinct, job.seed)):
        keys = batch_keys(train_cfg.seed, step, lo, n)  # the rows' dropout keys, as every layout gives them
        t0 = time.perf_counter()
        train_step(model, x[lo:lo + n].to(device), y[lo:lo + n].to(device), opt, train_cfg.grad_clip, keys.to(device))
        times.append(time.perf_counter() - t0)  # train_step reads the loss back: the step is done
    if world > 1:
        dist.destroy_process_group()
    return {"times": times, "peak_memory": peak_memory_bytes()}


def run(job: BaselineJob, world: int) -> dict[str, Any]:
    """`world` = 1: the plain trainer; more: DDP over `world` processes. Images/s over the timed steps,
    step p50 / p95 and every rank's peak memory."""
    from cluster.spawn import free_port, start_ranks

    with tempfile.TemporaryDirectory(prefix="alexnet-pp-baseline-") as tmp:
        ctx = start_ranks(_rank_main, (world, free_port(), job, tmp), world)
        while not ctx.join():
            pass
        payloads = []
        for r in range(world):
            path = Path(tmp, f"rank{r}.pkl")
            if not path.exists():
                raise RuntimeError(f"baseline rank {r} exited without a result")
            payloads.append(pickle.loads(path.read_bytes()))
    failed = [p for p in payloads if not p["ok"]]
    if failed:
        raise RuntimeError(failed[0]["error"] + "\n" + failed[0]["traceback"])
    per_step = [max(p["times"][s] for p in payloads) for s in range(job.steps)]
    timed = per_step[job.warmup:] if len(per_step) > job.warmup else per_step
    return {"images_per_s": job.batch * len(timed) / sum(timed), "step_p50_s": _percentile(timed, 0.5),
            "step_p95_s": _percentile(timed, 0.95), "steps_timed": len(timed),
            "step_spread_s": [min(timed), max(timed)], "step_median_s": statistics.median(timed),
            "peak_memory_bytes": {str(r): p["peak_memory"] for r, p in enumerate(payloads)}}
