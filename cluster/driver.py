"""The driver of a distributed job: one code path for `ray job submit` and for a local run.

`run_job(cfg, layout, address=None)` (what `alexnet-pp train` and `python -m cluster.job` call when a
run has more than one worker, or is asked to be distributed):
1. takes the layout the command line built and checked (or builds it, for callers from Python);
2. makes sure the dataset exists, once, on the driver (generating the embedded one if needed);
3. connects to Ray — `address`, else RAY_ADDRESS (set for the driver of a submitted job), else a
   fresh local Ray on 127.0.0.1 with enough CPUs for the workers — and runs the worker group
   (cluster.workers), which restarts from the newest checkpoint up to parallel.max_failures times;
4. prints the run's summary, writes `run_dir/summary.json` and returns the `RunSummary`. A worker's
   error (naming rank, stage, tower) is printed and returned with ok False.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from alexnet_pp.config import RunConfig
from alexnet_pp.layout import Layout
from alexnet_pp.summary import RunSummary
from alexnet_pp.data import ensure_dataset
from alexnet_pp.pipeline import describe
from alexnet_pp.progress import Progress
from alexnet_pp.trainer import total_steps
from cluster.callbacks import load_callbacks
from cluster.faults import stuck_reports
from cluster.preflight import check_cluster_auth, check_writable
from cluster.discovery import DiscoveryServer
from cluster.run_summary import HistoryProgress
from cluster.workers import attempts_path, build_trainer, history_path, read_jsonl, workers_dir

log = logging.getLogger("cluster.driver")
# What a working-dir upload must leave out (virtual environments, generated data, run outputs).
# /docs: the benchmark records (5 MB of the 6 a package held), which no worker reads
WORKING_DIR_EXCLUDES = [".venv*", "/data", "/runs", "/docs", ".git", "__pycache__", "*.egg-info", ".pytest_cache",
                        "/build", "/dist", ".whl", ".gl"]
CODE_ROOT = Path(__file__).resolve().parent.parent  # holds the alexnet_pp and cluster packages


# --- preparation: everything that can fail before a worker starts --------------------------------


def _abs_sources(spec: str) -> str:
    parts = []
    for part in spec.split("::"):
        local = part and not part.startswith("pipe:") and "://" not in part
        parts.append(os.path.abspath(os.path.expanduser(part)) if local else part)
    return "::".join(parts)


def absolutize(cfg: RunConfig) -> RunConfig:
    """A copy whose paths do not depend on the working directory (Ray Train workers chdir away)."""
    cfg = copy.deepcopy(cfg)
    cfg.out_dir = os.path.abspath(os.path.expanduser(cfg.out_dir))
    cfg.data.synthetic_dir = os.path.abspath(os.path.expanduser(cfg.data.synthetic_dir))
    if cfg.checkpoint.dir:
        cfg.checkpoint.dir = _abs_sources(cfg.checkpoint.dir)
    cfg.data.train, cfg.data.val = _abs_sources(cfg.data.train), _abs_sources(cfg.data.val)
    return cfg


# --- Ray connection --------------------------------------------------------------------------------


def _connect(cfg: RunConfig, layout: Layout, address: Optional[str]) -> bool:
    """Connect to (or start) Ray; True when this call started a local Ray that we must shut down."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        kwargs: dict[str, Any] = {}
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # a plain driver: ship the code along
            kwargs["runtime_env"] = {"working_dir": str(CODE_ROOT), "excludes": WORKING_DIR_EXCLUDES}
        ray.init(address=address, **kwargs)
        return False
    if os.environ.get("RAY_ADDRESS"):  # the driver of `ray job submit`
        ray.init()
        return False
    p = cfg.parallel
    d = cfg.data  # every first-stage rank brings its augmentation actors
    need_cpus = math.ceil(layout.world_size * p.cpus_per_worker
                          + layout.tp * layout.dp * d.augment_actors * d.augment_cpus)
    need_gpus = math.ceil(layout.world_size * p.gpus_per_worker)
    start_local_ray(need_cpus)
    have_gpus = ray.cluster_resources().get("GPU", 0.0)
    if need_gpus > have_gpus:  # this machine will not grow: fail now rather than wait for placement
        ray.shutdown()
        raise RuntimeError(f"the job needs {layout.world_size} × parallel.gpus_per_worker={p.gpus_per_worker} GPUs; "
                           f"this machine has {have_gpus:g}. Lower parallel.gpus_per_worker or pp × tp × dp, "
                           "or pass --address of a cluster with GPUs")
    return True


def start_local_ray(cpus: int) -> None:
    """Start a Ray of this machine only, on 127.0.0.1, with at least `cpus` logical CPUs: what a job
    without --address runs on (jobs started after it in this process join it and leave it running)."""
    import ray

    env = {"PYTHONPATH": os.pathsep.join(x for x in (str(CODE_ROOT), os.environ.get("PYTHONPATH", "")) if x)}
    with _loopback_only():
        ray.init(
            address="local",  # never attach to some other cluster found on this machine
            num_cpus=max(cpus, os.cpu_count() or 1),  # logical CPUs: a worker slot each
            include_dashboard=True,  # the state API behind it: Ray Train polls it (and warns without it)
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": env},
        )


@contextlib.contextmanager
def _loopback_only():
    """Keep a local Ray on 127.0.0.1. Ray replaces a loopback node address by the machine's routable IP
    unless "multi-node clusters" are off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read at import time),
    so switch that off for the processes this ray.init starts, then restore it for this process."""
    try:
        from ray._private import ray_constants
    except ImportError:  # pragma: no cover - private module moved: fall back on Ray's default
        yield
        return
    var = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    old_env, old_flag = os.environ.get(var), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[var], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old_env


def _check_resources(cfg: RunConfig, layout: Layout) -> None:
    """Warn (not fail: autoscaling clusters grow) when the cluster lacks what the workers ask for."""
    import ray

    p = cfg.parallel
    have = ray.cluster_resources()
    for key, per in (("CPU", p.cpus_per_worker), ("GPU", p.gpus_per_worker)):
        need = per * layout.world_size
        if need > have.get(key, 0.0) + 1e-9:
            log.warning("the job needs %g %s for %d workers but the cluster has %g now; "
                        "it waits until the cluster grows", need, key, layout.world_size, have.get(key, 0.0))


# --- failure messages ------------------------------------------------------------------------------


def _is_secondary(text: str) -> bool:
    """A peer's crash shows up on the other ranks as a closed connection or a killed actor."""
    markers = ("closed by peer", "Connection reset", "Connection closed", "Broken pipe", "Socket Timeout")
    return any(m in text for m in markers)


def describe_failure(error: BaseException, layout: Layout) -> str:
    """The worker errors of a failed fit, the root cause first, each naming rank / stage / tower."""
    failures = getattr(error, "worker_failures", None)
    if not failures:
        cause = getattr(error, "controller_failure", None) or error
        return f"{type(cause).__name__}: {cause}"
    lines = []
    for rank, exc in sorted(failures.items()):
        base = getattr(exc, "_base_exc", exc)
        # a WorkerError's message starts with the rank's place already (cluster/engine.py)
        text = str(base) if type(base).__name__ == "WorkerError" else f"{type(base).__name__}: {base}"
        if f"rank {rank} (" not in text:
            label = layout.coord(rank).label() if 0 <= rank < layout.world_size else f"rank {rank}"
            text = f"{label}: {text}"
        lines.append((int(_is_secondary(text)), rank, text.strip()))
    lines.sort()
    return "\n".join(text for _, _, text in lines)


# --- results ---------------------------------------------------------------------------------------


def collect_history(run_dir: Path, job_id: str) -> tuple[list[int], list[float], list[dict[str, Any]]]:
    """Steps, losses and evaluations this job logged; a step redone after a restart keeps its last value."""
    losses: dict[int, float] = {}
    evals: dict[int, dict[str, Any]] = {}
    for rec in read_jsonl(history_path(run_dir), job_id):
        if rec.get("kind") == "step":
            losses[int(rec["step"])] = float(rec["loss"])
        elif rec.get("kind") == "eval":
            evals[int(rec["step"])] = {k: v for k, v in rec.items() if k not in ("job", "kind")}
    steps = sorted(losses)
    return steps, [losses[s] for s in steps], [evals[s] for s in sorted(evals)]


def planned_steps(cfg: RunConfig, info: Any) -> int:
    """The driver's estimate of the job's optimizer steps (the workers know it exactly)."""
    return total_steps(cfg, max(1, info.train_samples // cfg.train.batch_size))


# --- the job ---------------------------------------------------------------------------------------


def run_job(cfg: RunConfig, layout: Optional[Layout] = None, address: Optional[str] = None,
            allow_insecure_cluster: bool = False, data_factory: Optional[Any] = None,
            warmup_steps: int = 1) -> RunSummary:
    """Run a P × T × D job through Ray Train; see the module docstring. `data_factory(rank)`, when
    given, is what a rank's first stage reads instead of the shard stream (cluster.feeds.TensorData,
    for benchmarks; it travels pickled to every worker); `warmup_steps`: steps the summary leaves out."""
    layout = layout or Layout.from_config(cfg)  # ConfigError propagates: nothing has started yet
    load_callbacks(cfg.callbacks)  # a name that does not import fails here, not on every worker
    cfg = absolutize(cfg)
    check_writable(cfg)  # an unwritable run or checkpoint directory: ConfigError, before any worker
    print(f"job {cfg.name}: {layout.describe()}", flush=True)
    if layout.pp > 1:
        measured = cfg.parallel.partition.strip() == "measured"
        print(("stage cuts are timed on rank 0 when the workers start; the FLOP estimate would cut:\n"
               if measured else "") + describe(cfg.model, layout.partition, tp=layout.tp), flush=True)
    job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_dir = Path(cfg.run_dir)
    t0 = time.perf_counter()
    summary = RunSummary(ok=False, job_id=job_id, run_dir=str(run_dir), layout=layout.shape)
    started_ray = False
    discovery: Optional[DiscoveryServer] = None
    progress: Optional[HistoryProgress] = None
    try:
        info = ensure_dataset(cfg)  # once, on the driver, before any worker
        log.info("dataset: %d train / %d val samples", info.train_samples, info.val_samples)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        for stale in workers_dir(run_dir).glob("rank*.json"):  # another job's workers
            stale.unlink(missing_ok=True)
        started_ray = _connect(cfg, layout, address)
        if not started_ray:  # a cluster we joined must ask for a token (cluster/preflight.py)
            check_cluster_auth(allow_insecure_cluster)
        _check_resources(cfg, layout)
        if cfg.metrics.enabled:
            discovery = DiscoveryServer(run_dir, cfg.name, host=cfg.metrics.host, port=cfg.metrics.sd_port,
                                        job=job_id).start()
            print(f"metrics: Prometheus service discovery at {discovery.url} (file_sd: "
                  f"{run_dir / 'prometheus-targets.json'}); scrape config:\n{discovery.scrape_config()}", flush=True)
        progress = HistoryProgress(history_path(run_dir), job_id, Progress(planned_steps(cfg, info),
                                   cfg.train.log_every, desc=cfg.name), cfg.train.batch_size).start()
        try:
            if cfg.parallel.elastic:  # the driver restarts the worker group, with fewer replicas if it must
                from cluster.elastic import run_elastic

                result, cfg, layout, changes = run_elastic(
                    cfg, layout, lambda c, lay, start: build_trainer(c, lay, job_id, data_factory, warmup_steps, start=start).fit(),
                    describe_failure)
            else:
                result, changes = build_trainer(cfg, layout, job_id, data_factory, warmup_steps).fit(), []
            if result.return_value:  # rank 0's summary: timing from every rank
                summary = RunSummary.from_dict({**result.return_value, "job_id": job_id, "run_dir": str(run_dir),
                                                "layout": layout.shape})
            summary.ok = not summary.error  # the ranks stopped early and said why (cluster/faults.py)
            summary.replica_changes = [asdict(c) for c in changes]
        except Exception as e:  # ray.train.TrainingFailedError and anything Ray raises on the way
            # a rank stuck in its own instruction first: its peers' timeouts follow from it
            summary.error = "\n".join([*stuck_reports(run_dir, job_id), describe_failure(e, layout)])
    except Exception as e:  # dataset or Ray start-up problems: fail, don't hang, say what happened
        summary.error = f"{type(e).__name__}: {e}"
    finally:
        if progress is not None:
            progress.close()
        if discovery is not None:
            discovery.close()
        if started_ray:
            import ray

            ray.shutdown()
    attempts = read_jsonl(attempts_path(run_dir), job_id)
    steps, losses, evals = collect_history(run_dir, job_id)
    if losses or not summary.losses:  # the history has every attempt's steps; rank 0 only its own
        summary.loss_steps, summary.losses, summary.evals = steps, losses, evals
        summary.steps = max(summary.steps, steps[-1] if steps else 0)
    summary.restarts = max(0, len(attempts) - 1)
    summary.resume_steps = [a.get("resume_step") for a in attempts]
    summary.wall_seconds = time.perf_counter() - t0
    try:
        summary.write(run_dir / "summary.json")
    except OSError as e:
        log.warning("could not write %s: %s", run_dir / "summary.json", e)
    print(summary.format(), file=sys.stdout if summary.ok else sys.stderr, flush=True)
    return summary
