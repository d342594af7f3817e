"""The Ray Train worker group of a job: one TorchTrainer worker per rank, each running a PipelineWorker.

`build_trainer(cfg, job_id)` makes the TorchTrainer (P × T × D workers, PACK placement so the two
towers of a stage — neighbouring ranks — share a node; gloo on CPU, nccl with GPUs; restarts from
`cfg.parallel.max_failures`). `train_loop` is the per-worker function. Everything a worker leaves
for the driver goes under `run_dir`, so the driver can read it even after a failure:

    run_dir/workers/rank{r}.json   pid, host, coordinates, job, attempt of the live worker of rank r
    run_dir/attempts.jsonl         one line per worker-group start of a job (restarts = lines − 1)
    run_dir/history.jsonl          rank 0: one line per optimizer step and per evaluation

Reports: every worker calls `ray.train.report` at every evaluation and once at the end, with rank
0's metrics (Ray Train hangs unless every worker reports equally often). Before the final report
the per-rank step stats are all-gathered, and rank 0 returns the job's RunSummary as the train
function's return value. The layout arrives built and checked from the driver; workers never
re-derive it. Extra callbacks named in `cfg.callbacks` are constructed on every worker.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from alexnet_pp.config import RunConfig
from alexnet_pp.layout import Layout
from cluster.callbacks import Callback
from alexnet_pp.fileio import write_atomic

START_RETRIES = 10  # worker-group start attempts (Ray waits 60 s each) before the job fails
SUMMARY_STEPS = 5000  # per-rank step stats gathered for the end-of-run summary


# --- files under run_dir shared by driver and workers ------------------------------------------


def workers_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "workers"


def attempts_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "attempts.jsonl"


def history_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "history.jsonl"


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_jsonl(path: Path, job_id: Optional[str] = None) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed writer
            continue
        if job_id is None or rec.get("job") == job_id:
            out.append(rec)
    return out


def read_worker_files(run_dir: str | Path, job_id: Optional[str] = None) -> dict[int, dict[str, Any]]:
    """rank → the newest worker record (pid, host, coordinates, attempt) of that rank."""
    out = {}
    d = workers_dir(run_dir)
    if not d.is_dir():
        return out
    for p in sorted(d.glob("rank*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if job_id is None or rec.get("job") == job_id:
            out[int(rec["rank"])] = rec
    return out


# --- the train function (runs on every Ray Train worker) ----------------------------------------


def _register_attempt(cfg: RunConfig, job_id: str, rank: int) -> tuple[int, Optional[int]]:
    """Rank 0 logs this worker-group start; everyone learns the attempt number and resume step."""
    import torch.distributed as dist

    from cluster.checkpoint import CheckpointStore, checkpoint_dir

    box: list[Any] = [None]
    if rank == 0:
        latest = CheckpointStore(checkpoint_dir(cfg)).latest() if cfg.checkpoint.resume else None
        resume_step = latest[0] if latest else None
        attempt = len(read_jsonl(attempts_path(cfg.run_dir), job_id)) + 1
        _append_jsonl(attempts_path(cfg.run_dir),
                      {"job": job_id, "attempt": attempt, "resume_step": resume_step, "time": time.time()})
        box = [(attempt, resume_step)]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class HistoryLog(Callback):
    """Rank 0's step and evaluation lines in run_dir/history.jsonl (the driver's progress reads them);
    every rank reports each evaluation to Ray Train (equal report counts on every worker)."""

    def __init__(self, cfg: RunConfig, job_id: str, attempt: int, rank: int):
        self.path, self.job_id, self.attempt, self.rank = history_path(cfg.run_dir), job_id, attempt, rank
        self.last_loss: Optional[float] = None

    def on_step(self, stats, coord) -> None:
        self.last_loss = stats.loss
        if self.rank == 0:
            _append_jsonl(self.path, {"job": self.job_id, "attempt": self.attempt, "kind": "step", "step": stats.step,
                                      "epoch": stats.epoch, "loss": stats.loss, "lr": stats.lr,
                                      "seconds": stats.seconds, "bubble": stats.bubble})

    def on_eval(self, metrics, coord) -> None:
        import ray.train

        if self.rank == 0:
            _append_jsonl(self.path, {"job": self.job_id, "attempt": self.attempt, "kind": "eval", **metrics})
        ray.train.report({"kind": "eval", "attempt": self.attempt, "loss": self.last_loss, **metrics})


def train_loop(config: dict[str, Any]) -> Optional[dict[str, Any]]:
    """One rank of the job. `config`: {"cfg": RunConfig.to_dict(), "layout": Layout, "job_id": str, and
    optionally "data_factory": rank → TrainData, "warmup_steps": int}."""
    cfg_dict = config["cfg"]
    gpus = cfg_dict["parallel"]["gpus_per_worker"] > 0
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if gpus else "cpu")  # before deepspeed is imported
    import ray.train
    import torch
    import torch.distributed as dist

    from alexnet_pp.config import from_dict
    from cluster.callbacks import load_callbacks
    from cluster.engine import PipelineWorker
    from cluster.faults import StuckReport
    from cluster.metrics import WorkerMetrics
    from cluster.run_summary import summarize_run

    cfg, layout, job_id = from_dict(cfg_dict), config["layout"], config["job_id"]
    if gpus and torch.cuda.is_available():
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
    rank = dist.get_rank()
    coord = layout.coord(rank)
    attempt, resume_step = _register_attempt(cfg, job_id, rank)
    write_atomic(workers_dir(cfg.run_dir) / f"rank{rank}.json", json.dumps({
        "job": job_id, "attempt": attempt, "rank": rank, "stage": coord.stage, "tower": coord.tower,
        "replica": coord.replica, "pid": os.getpid(), "hostname": socket.gethostname(),
        "node_ip": ray.util.get_node_ip_address(), "started": time.time(),
    }, indent=1))
    exporter = WorkerMetrics.for_worker(cfg, coord, job_id, attempt)  # None when metrics are off
    history = HistoryLog(cfg, job_id, attempt, rank)
    stuck = StuckReport(cfg.run_dir, job_id, attempt, rank)  # the driver names a stage stuck in an instruction
    factory = config.get("data_factory")  # in-memory batches instead of the shard stream (benchmarks)
    worker = PipelineWorker(cfg, layout, data=factory(rank) if factory else None,
                            callbacks=[exporter, history, stuck, *load_callbacks(cfg.callbacks)])
    try:
        result = worker.run()  # raises WorkerError naming rank / stage / tower
    finally:
        if exporter:
            exporter.close()
    # Every rank's step stats (the newest few thousand: bounded on long runs) make the job summary.
    mine = {"coord": asdict(coord), "host": result.host, "stats": result.stats[-SUMMARY_STEPS:]}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    summary = summarize_run(gathered, config.get("warmup_steps", 1))
    ray.train.report({"kind": "final", "attempt": attempt, "resume_step": resume_step, "steps": result.steps,
                      "loss": result.losses[-1] if result.losses else None, "stopped": result.stopped,
                      "images_per_sec": summary.images_per_sec, "step_time_p50": summary.step_time_p50,
                      "step_time_p95": summary.step_time_p95, "bubble_per_stage": summary.bubble_per_stage})
    if rank != 0:
        return None
    summary.steps, summary.losses, summary.evals = result.steps, result.losses, result.evals
    summary.resumed_from, summary.resumed_layout = result.resumed_from, result.resumed_layout
    summary.cut, summary.cut_trials = result.cut, result.cut_trials
    summary.error = result.stopped  # a run that stopped early and why (cluster/faults.py)
    return summary.to_dict()


# --- the trainer ------------------------------------------------------------------------------


def build_trainer(cfg: RunConfig, layout: Layout, job_id: str, data_factory: Optional[Any] = None,
                  warmup_steps: int = 1, start: Optional[int] = None):
    """The TorchTrainer for this job; `cfg` must hold absolute paths (workers chdir elsewhere).
    `data_factory` and `warmup_steps`: as `cluster.driver.run_job` takes them. `start`: the driver
    restarts the worker group itself (parallel.elastic, cluster/elastic.py), so this trainer does not,
    and runs under a name of its own."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.engine import process_group_backend

    p = cfg.parallel
    resources: dict[str, float] = {"CPU": p.cpus_per_worker}
    if p.gpus_per_worker > 0:
        resources["GPU"] = p.gpus_per_worker
    storage = (Path(cfg.run_dir) / "ray").resolve()
    storage.mkdir(parents=True, exist_ok=True)
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "layout": layout, "job_id": job_id, "data_factory": data_factory,
                           "warmup_steps": warmup_steps},
        torch_config=TorchConfig(backend=process_group_backend(p.gpus_per_worker > 0), timeout_s=max(1, int(p.collective_timeout_s))),
        scaling_config=ray.train.ScalingConfig(
            num_workers=layout.world_size,
            use_gpu=p.gpus_per_worker > 0,
            resources_per_worker=resources,
            placement_strategy="PACK",  # towers of a stage are neighbouring ranks: same node
        ),
        run_config=ray.train.RunConfig(
            name=f"{cfg.name}-{job_id}" + (f"-{start}" if start is not None else ""),
            storage_path=str(storage),
            # max_failures: worker-group restarts. A worker group that cannot be placed (too few
            # resources) is a retried controller error; give up after ~10 tries of Ray's 60 s start
            # timeout instead of waiting forever on a cluster that will never fit the job.
            failure_config=ray.train.FailureConfig(max_failures=p.max_failures if start is None else 0,
                                                   controller_failure_limit=START_RETRIES),
        ),
    )
