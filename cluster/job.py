"""The job entry point: one code path for `ray job submit` and for a local run.

    python -m cluster.job [--preset P] [--config Y] [--name N] [--out-dir D] [--address ADDR] \\
                          [--section.key VALUE ...]

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json '{"excludes": [".venv*", "data", "runs", ".git"]}' \\
        -- python -m cluster.job --preset demo --parallel.pp 2 --parallel.tp 2

`run_job(cfg, address=None)` (what `alexnet-pp train` calls for pp × tp × dp > 1):
1. validates the config and the P × T × D layout (ConfigError, before anything starts);
2. makes sure the dataset exists, once, on the driver (generating the embedded one if needed);
3. connects to Ray — `address`, else RAY_ADDRESS (set for the driver of a submitted job), else a
   fresh local Ray on 127.0.0.1 with enough CPUs for the workers — and runs the worker group
   (cluster.workers), which restarts from the newest checkpoint up to parallel.max_failures times;
4. prints a summary (and one `ALEXNET_PP_SUMMARY {json}` line for log scrapers), writes
   `run_dir/summary.json`, and returns {"ok", "losses", "evals", "steps", "restarts",
   "images_per_sec", ...}. A worker's error (naming rank, stage, tower) is printed and returned
   with ok False; the exit code of the module is 0 / 1 (failed) / 2 (configuration error).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

from alexnet_pp.config import PRESETS, ConfigError, RunConfig, load_config, parse_override_args, validate

log = logging.getLogger("cluster.job")

SUMMARY_PREFIX = "ALEXNET_PP_SUMMARY "
SUMMARY_MAX_LOSSES = 50  # more steps than this: the printed summary line leaves the loss list out
# What a working-dir upload must leave out (virtual environments, generated data, run outputs).
WORKING_DIR_EXCLUDES = [".venv*", "/data", "/runs", ".git", "__pycache__", "*.egg-info", ".pytest_cache",
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


def check_config(cfg: RunConfig) -> RunConfig:
    """Config and layout validation; raises ConfigError with what to change."""
    from cluster.topology import build_topology

    validate(cfg)
    build_topology(cfg)
    if cfg.parallel.cpus_per_worker <= 0 and cfg.parallel.gpus_per_worker <= 0:
        raise ConfigError("parallel.cpus_per_worker must be > 0 (or give each worker a GPU)")
    return cfg


# --- Ray connection --------------------------------------------------------------------------------


def _connect(cfg: RunConfig, address: Optional[str]) -> bool:
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
    need_cpus = math.ceil(cfg.world_size * p.cpus_per_worker)
    need_gpus = math.ceil(cfg.world_size * p.gpus_per_worker)
    env = {"PYTHONPATH": os.pathsep.join(x for x in (str(CODE_ROOT), os.environ.get("PYTHONPATH", "")) if x)}
    with _loopback_only():
        ray.init(
            address="local",  # never attach to some other cluster found on this machine
            num_cpus=max(need_cpus, os.cpu_count() or 1),  # logical CPUs: a worker slot each
            include_dashboard=True,  # the state API behind it: Ray Train polls it (and warns without it)
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": env},
        )
    have_gpus = ray.cluster_resources().get("GPU", 0.0)
    if need_gpus > have_gpus:  # this machine will not grow: fail now rather than wait for placement
        ray.shutdown()
        raise RuntimeError(f"the job needs {cfg.world_size} × parallel.gpus_per_worker={p.gpus_per_worker} GPUs; "
                           f"this machine has {have_gpus:g}. Lower parallel.gpus_per_worker or pp × tp × dp, "
                           "or pass --address of a cluster with GPUs")
    return True


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


def _check_resources(cfg: RunConfig) -> None:
    """Warn (not fail: autoscaling clusters grow) when the cluster lacks what the workers ask for."""
    import ray

    p = cfg.parallel
    have = ray.cluster_resources()
    for key, per in (("CPU", p.cpus_per_worker), ("GPU", p.gpus_per_worker)):
        need = per * cfg.world_size
        if need > have.get(key, 0.0) + 1e-9:
            log.warning("the job needs %g %s for %d workers but the cluster has %g now; "
                        "it waits until the cluster grows", need, key, cfg.world_size, have.get(key, 0.0))


# --- failure messages ------------------------------------------------------------------------------


def _is_secondary(text: str) -> bool:
    """A peer's crash shows up on the other ranks as a closed connection or a killed actor."""
    markers = ("closed by peer", "Connection reset", "Connection closed", "Broken pipe", "Socket Timeout")
    return any(m in text for m in markers)


def describe_failure(error: BaseException, cfg: RunConfig) -> str:
    """The worker errors of a failed fit, the root cause first, each naming rank / stage / tower."""
    from cluster.topology import build_topology

    failures = getattr(error, "worker_failures", None)
    if not failures:
        cause = getattr(error, "controller_failure", None) or error
        return f"{type(cause).__name__}: {cause}"
    topo = build_topology(cfg)
    lines = []
    for rank, exc in sorted(failures.items()):
        base = getattr(exc, "_base_exc", exc)
        text = f"{type(base).__name__}: {base}"
        if f"rank {rank} (" not in text:
            label = topo.coord(rank).label() if 0 <= rank < topo.world_size else f"rank {rank}"
            text = f"{label}: {text}"
        lines.append((int(_is_secondary(text)), rank, text.strip()))
    lines.sort()
    return "\n".join(text for _, _, text in lines)


# --- results ---------------------------------------------------------------------------------------


def collect_history(run_dir: Path, job_id: str) -> tuple[list[int], list[float], list[dict[str, Any]]]:
    """Steps, losses and evaluations this job logged; a step redone after a restart keeps its last value."""
    from cluster.workers import history_path, read_jsonl

    losses: dict[int, float] = {}
    evals: dict[int, dict[str, Any]] = {}
    for rec in read_jsonl(history_path(run_dir), job_id):
        if rec.get("kind") == "step":
            losses[int(rec["step"])] = float(rec["loss"])
        elif rec.get("kind") == "eval":
            evals[int(rec["step"])] = {k: v for k, v in rec.items() if k not in ("job", "kind")}
    steps = sorted(losses)
    return steps, [losses[s] for s in steps], [evals[s] for s in sorted(evals)]


def _fmt(x: Any, spec: str = ".4f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x)) else "n/a"


def planned_steps(cfg: RunConfig, info: Any) -> int:
    """The driver's estimate of the job's optimizer steps (the workers know it exactly)."""
    from alexnet_pp.trainer import total_steps

    return total_steps(cfg, max(1, info.train_samples // cfg.train.batch_size))


def print_summary(summary: dict[str, Any]) -> None:
    from cluster.run_summary import format_run_summary

    last = summary["evals"][-1] if summary["evals"] else {}
    if summary["ok"] and "phase_share_per_stage" in summary:
        print(format_run_summary(summary), flush=True)
    if summary["ok"]:
        bubbles = ", ".join(f"stage {s}: {b:.2f}" for s, b in sorted(summary.get("bubble_per_stage", {}).items()))
        print(
            f"job {summary['job_id']} done: {summary['steps']} steps, final loss {_fmt(summary['final_loss'])}, "
            f"val top-1 {_fmt(last.get('top1'), '.3f')} top-5 {_fmt(last.get('top5'), '.3f')}, "
            f"{_fmt(summary['images_per_sec'], '.1f')} images/s, restarts {summary['restarts']}"
            + (f", bubble {bubbles}" if bubbles else "")
            + f"; outputs in {summary['run_dir']}",
            flush=True,
        )
    else:
        print(f"job {summary['job_id']} FAILED after {summary['steps']} steps, restarts {summary['restarts']}:\n"
              f"{summary['error']}", file=sys.stderr, flush=True)
    # One machine-readable line for log scrapers; long loss histories stay in run_dir/summary.json.
    line = summary if len(summary.get("losses", [])) <= SUMMARY_MAX_LOSSES else {
        k: v for k, v in summary.items() if k not in ("losses", "loss_steps")}
    print(SUMMARY_PREFIX + json.dumps(line, default=str), flush=True)


# --- the job ---------------------------------------------------------------------------------------


def run_job(cfg: RunConfig, address: Optional[str] = None) -> dict[str, Any]:
    """Run a P × T × D job through Ray Train; see the module docstring."""
    from alexnet_pp.progress import Progress
    from cluster.discovery import DiscoveryServer
    from cluster.run_summary import HistoryProgress
    from cluster.workers import attempts_path, build_trainer, history_path, hooks_from_env, read_jsonl, workers_dir

    cfg = check_config(absolutize(cfg))  # ConfigError propagates: nothing has started yet
    from alexnet_pp.pipeline import describe
    from cluster.topology import build_topology

    topo = build_topology(cfg)
    print(f"job {cfg.name}: (P, T, D) = ({topo.pp}, {topo.tp}, {topo.dp}), {topo.world_size} workers, micro-batch "
          f"{topo.micro_batch} × {topo.micro_batches}", flush=True)
    if topo.pp > 1:
        measured = cfg.parallel.partition.strip() == "measured"
        print(("stage cuts are timed on rank 0 when the workers start; the FLOP estimate would cut:\n"
               if measured else "") + describe(cfg.model, topo.partition), flush=True)
    job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_dir = Path(cfg.run_dir)
    t0 = time.perf_counter()
    summary: dict[str, Any] = {
        "ok": False, "job_id": job_id, "run_dir": str(run_dir), "layout": [cfg.parallel.pp, cfg.parallel.tp,
                                                                          cfg.parallel.dp],
        "error": None, "losses": [], "loss_steps": [], "evals": [], "steps": 0, "restarts": 0,
        "images_per_sec": float("nan"), "final_loss": None,
    }
    started_ray = False
    return_value: Optional[dict[str, Any]] = None
    discovery: Optional[DiscoveryServer] = None
    progress: Optional[HistoryProgress] = None
    try:
        from alexnet_pp.data import ensure_dataset

        info = ensure_dataset(cfg)  # once, on the driver, before any worker
        log.info("dataset: %d train / %d val samples", info.train_samples, info.val_samples)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        for stale in workers_dir(run_dir).glob("rank*.json"):  # another job's workers
            stale.unlink(missing_ok=True)
        started_ray = _connect(cfg, address)
        _check_resources(cfg)
        if cfg.metrics.enabled:
            discovery = DiscoveryServer(run_dir, cfg.name, host=cfg.metrics.host, port=cfg.metrics.sd_port,
                                        job=job_id).start()
            print(f"metrics: Prometheus service discovery at {discovery.url} (file_sd: "
                  f"{run_dir / 'prometheus-targets.json'}); scrape config:\n{discovery.scrape_config()}", flush=True)
        progress = HistoryProgress(history_path(run_dir), job_id, Progress(planned_steps(cfg, info),
                                   cfg.train.log_every, desc=cfg.name), cfg.train.batch_size).start()
        trainer = build_trainer(cfg, job_id, hooks_from_env())
        try:
            result = trainer.fit()
            return_value = result.return_value
            summary["ok"] = True
        except Exception as e:  # ray.train.TrainingFailedError and anything Ray raises on the way
            summary["error"] = describe_failure(e, cfg)
    except ConfigError:
        raise
    except Exception as e:  # dataset or Ray start-up problems: fail, don't hang, say what happened
        summary["error"] = f"{type(e).__name__}: {e}"
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
    summary.update(
        losses=losses, loss_steps=steps, evals=evals, steps=steps[-1] if steps else 0,
        restarts=max(0, len(attempts) - 1), resume_steps=[a.get("resume_step") for a in attempts],
        final_loss=losses[-1] if losses else None, wall_seconds=time.perf_counter() - t0,
    )
    if return_value:
        summary.update({k: return_value[k] for k in ("images_per_sec", "step_time_p50", "step_time_p95",
                                                      "bubble_per_stage", "theoretical_bubble", "steps_timed",
                                                      "phase_share_per_stage", "data_wait_share")
                        if k in return_value})
        summary["steps"] = return_value.get("steps", summary["steps"])
    if summary["ok"] and not losses and return_value:  # history unreadable: fall back on rank 0's view
        summary.update(losses=return_value["losses"], evals=return_value["evals"],
                       final_loss=return_value["losses"][-1] if return_value["losses"] else None)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    except OSError as e:
        log.warning("could not write %s: %s", run_dir / "summary.json", e)
    print_summary(summary)
    return summary


# --- command line ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cluster.job",
        description="Run a pipeline-parallel AlexNet job on Ray (local, or the cluster of `ray job submit`). "
        "Settings: --section.key VALUE (e.g. --parallel.pp 2 --parallel.tp 2 --train.max_steps 100).",
    )
    p.add_argument("--preset", choices=PRESETS, default="demo", help="starting point (default: demo)")
    p.add_argument("--config", help="YAML file applied on top of the preset")
    p.add_argument("--name", help="run name (run_dir = out_dir/name)")
    p.add_argument("--out-dir", "--out_dir", dest="out_dir", help="where runs go (default: runs)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to use (default: RAY_ADDRESS, as set by `ray job submit`, else a local Ray)")
    return p


def config_from_args(argv: Sequence[str]) -> tuple[RunConfig, argparse.Namespace]:
    parser = build_parser()
    args, extra = parser.parse_known_args(list(argv))
    overrides: dict[str, Any] = dict(parse_override_args(extra))
    if args.name:
        overrides["name"] = args.name
    if args.out_dir:
        overrides["out_dir"] = args.out_dir
    return load_config(args.preset, args.config, overrides), args


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, args = config_from_args(sys.argv[1:] if argv is None else argv)
        result = run_job(cfg, address=args.address)
    except ConfigError as e:
        print(f"cluster.job: configuration error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
