"""Per-worker Prometheus exporter: what one rank of a job measured, on its own HTTP endpoint.

`WorkerMetrics(run, coord, ...)` owns a private CollectorRegistry (never the process-global one,
so several exporters can live in one process, as in tests) and an HTTP server started by
`start()`. In a Ray Train worker:

    metrics = WorkerMetrics.for_worker(cfg, coord, job_id, attempt)  # started + registered, or None
    PipelineWorker(cfg, layout, callbacks=[metrics, ...]).run(); finally: metrics.close()

It is a cluster.callbacks.Callback: steps (with planned steps and data skip counts), evaluations
and checkpoints arrive through on_step / on_eval / on_checkpoint (or feed `set_skips(counts)`,
`checkpoint(seconds)`, `set_total_steps(n)` by hand). Every series
carries the labels run, stage, tower, replica, node; discovery adds `rank` as a
target label (cluster.discovery).

Counting images without double counting. Every rank of a replica's pipeline (P stages × T towers)
takes part in every sample of that replica, so `alexnet_pp_images_total` (and the per-kind skip
counter, which comes from the same data stream) is exported only by the replica's *lead* rank,
stage 0 tower 0 — the rank that reads the data — and counts the replica's share of each optimizer
step (`batch / dp`). Hence, for any layout:

    job images/s         sum(rate(alexnet_pp_images_total{run="R"}[5m]))
    per-replica images/s sum by (replica) (rate(alexnet_pp_images_total{run="R"}[5m]))

Everything else is per worker (per rank). Metric names are listed in SPECS; `sample_names()`
derives every name Prometheus will store (counters' `_total`, histograms' `_bucket/_sum/_count`),
which the dashboard test checks the Grafana panels against.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

from cluster.callbacks import Callback
from cluster.discovery import bind_with_fallback, node_ip, register_endpoint, resolve_host, unregister_endpoint
from cluster.timing import PHASES

log = logging.getLogger(__name__)

LABELS = ("run", "stage", "tower", "replica", "node")
# Step times run from ~10 ms (scaled-down CPU tests) to a minute (full AlexNet, long pipelines).
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0)
CHECKPOINT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True)
class Spec:
    kind: str  # counter | gauge | histogram
    name: str  # the full name as exposed (counters end in _total)
    help: str
    extra_labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    lead_only: bool = False  # exported by stage 0 / tower 0 ranks only (see the module docstring)
    cuda_only: bool = False  # exported only where CUDA is available


SPECS = (
    Spec("counter", "alexnet_pp_images_total", "Training images of this replica processed (lead rank only)",
         lead_only=True),
    Spec("histogram", "alexnet_pp_step_duration_seconds", "Wall time of one optimizer step on this rank",
         buckets=STEP_BUCKETS),
    Spec("counter", "alexnet_pp_stage_phase_seconds_total",
         "Seconds this rank spent per pipeline phase (idle = step time not in forward/backward/data_wait, "
         "so it overlaps send/recv)", ("phase",)),
    Spec("counter", "alexnet_pp_stage_phase_cpu_seconds_total",
         "CPU seconds of the thread running the pipeline schedule per phase (against "
         "alexnet_pp_stage_phase_seconds_total: the share of a core the phase's work got)", ("phase",)),
    Spec("gauge", "alexnet_pp_pipeline_bubble_ratio", "Measured idle fraction of the last step's pipeline schedule"),
    Spec("gauge", "alexnet_pp_pipeline_bubble_theoretical_ratio", "(P - 1) / (M + P - 1) for this layout"),
    Spec("counter", "alexnet_pp_data_wait_seconds_total", "Seconds spent waiting for input micro-batches"),
    Spec("counter", "alexnet_pp_schedule_thread_cpu_seconds_total",
         "CPU seconds of the thread running the pipeline schedule while stepping (its rate: cores' worth; "
         "below 1 it waited for messages or for a core)"),
    Spec("counter", "alexnet_pp_host_busy_cpu_seconds_total",
         "CPU seconds the cores this rank may run on were busy while it stepped, whoever ran there (its rate: "
         "the machine's busy cores; minus its ranks' process CPU, what the cluster's own processes took)"),
    Spec("gauge", "alexnet_pp_loss", "Training loss of the last optimizer step"),
    Spec("gauge", "alexnet_pp_learning_rate", "Learning rate after the last optimizer step"),
    Spec("gauge", "alexnet_pp_eval_top1_accuracy_ratio", "Validation top-1 accuracy of the last evaluation (0..1)"),
    Spec("gauge", "alexnet_pp_eval_top5_accuracy_ratio", "Validation top-5 accuracy of the last evaluation (0..1)"),
    Spec("gauge", "alexnet_pp_eval_loss", "Validation loss of the last evaluation"),
    Spec("counter", "alexnet_pp_samples_skipped_total", "Corrupt or unusable samples skipped by the data pipeline",
         ("kind",), lead_only=True),
    Spec("counter", "alexnet_pp_checkpoints_total", "Checkpoints this rank took part in"),
    Spec("histogram", "alexnet_pp_checkpoint_duration_seconds", "Wall time of one checkpoint save",
         buckets=CHECKPOINT_BUCKETS),
    # A gauge: a restarted worker is a new process that starts at attempt - 1, never at 0 (a counter
    # must start at 0 and only grow within one process).
    Spec("gauge", "alexnet_pp_worker_restarts",
         "Restarts of the worker group in this job before this worker started (attempt - 1)"),
    Spec("gauge", "alexnet_pp_gpu_memory_allocated_bytes", "CUDA memory allocated by torch on this worker",
         cuda_only=True),
    Spec("gauge", "alexnet_pp_step", "Last completed optimizer step"),
    # A gauge must not end in _total (Prometheus naming), hence _planned rather than steps_total.
    Spec("gauge", "alexnet_pp_steps_planned", "Optimizer steps this job will run in all"),
    Spec("gauge", "alexnet_pp_last_step_timestamp_seconds",
         "Unix time of the last completed step (of the exporter's start before the first step)"),
)


# prometheus-client's standard process collector, registered in every exporter's registry (resident
# memory, CPU time, open files of the worker process). Its samples carry no labels of their own: Prometheus
# adds the target labels discovery gives each endpoint (run, stage, tower, replica, node, rank).
PROCESS_NAMES = frozenset({"process_virtual_memory_bytes", "process_resident_memory_bytes",
                           "process_start_time_seconds", "process_cpu_seconds_total", "process_open_fds",
                           "process_max_fds"})


def sample_names(specs=None) -> set[str]:
    """Every metric name these exporters put into Prometheus (what PromQL may select); given `specs`,
    only the names of those specs."""
    out: set[str] = set(PROCESS_NAMES) if specs is None else set()
    for s in SPECS if specs is None else specs:
        if s.kind == "histogram":
            out |= {f"{s.name}_bucket", f"{s.name}_sum", f"{s.name}_count"}
        else:
            out.add(s.name)
    return out


def lead_only_names(specs=SPECS) -> set[str]:
    return sample_names([s for s in specs if s.lead_only])


def cuda_only_names(specs=SPECS) -> set[str]:
    return sample_names([s for s in specs if s.cuda_only])


def _field(stats: Any, name: str, default: Any = None) -> Any:
    return stats.get(name, default) if isinstance(stats, Mapping) else getattr(stats, name, default)


# --- the exporter ------------------------------------------------------------------------------------


class WorkerMetrics(Callback):
    """One rank's exporter. `coord` is an alexnet_pp.layout.Coord (stage, tower, replica)."""

    def __init__(self, run: str, coord: Any, node: Optional[str] = None, host: str = "127.0.0.1", port: int = 0,
                 replicas: int = 1, restarts: int = 0, total_steps: Optional[int] = None):
        self.run, self.coord, self.replicas = run, coord, max(1, replicas)
        self.host, self.port = host, port
        self.node = node or node_ip()
        self.lead = coord.stage == 0 and coord.tower == 0
        self.labels = {"run": run, "stage": str(coord.stage), "tower": str(coord.tower),
                       "replica": str(coord.replica), "node": self.node}
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._skips_seen: dict[str, int] = {}
        self._server = None
        self._registration: Optional[tuple[Any, dict[str, Any]]] = None
        self.address: Optional[tuple[str, int]] = None
        self.cuda = self._cuda_available()
        self.m: dict[str, Any] = {}
        for s in SPECS:
            if (s.lead_only and not self.lead) or (s.cuda_only and not self.cuda):
                continue
            names = LABELS + s.extra_labels
            if s.kind == "counter":
                self.m[s.name] = Counter(s.name, s.help, names, registry=self.registry)
            elif s.kind == "gauge":
                self.m[s.name] = Gauge(s.name, s.help, names, registry=self.registry)
            else:
                self.m[s.name] = Histogram(s.name, s.help, names, registry=self.registry, buckets=s.buckets)
        # Series that must exist from the start, so increase()/rate() see their first change.
        self._c("alexnet_pp_step_duration_seconds")
        self._c("alexnet_pp_data_wait_seconds_total")
        self._c("alexnet_pp_schedule_thread_cpu_seconds_total")
        self._c("alexnet_pp_host_busy_cpu_seconds_total")
        for p in PHASES:
            self._c("alexnet_pp_stage_phase_seconds_total", phase=p)
            self._c("alexnet_pp_stage_phase_cpu_seconds_total", phase=p)
        self._c("alexnet_pp_checkpoints_total")
        self._c("alexnet_pp_checkpoint_duration_seconds")
        self._c("alexnet_pp_worker_restarts").set(max(0, restarts))
        if self.lead:
            self._c("alexnet_pp_images_total")
            for kind in self._skip_kinds():
                self._c("alexnet_pp_samples_skipped_total", kind=kind)
        self._c("alexnet_pp_step").set(0)
        self._c("alexnet_pp_last_step_timestamp_seconds").set(time.time())
        if total_steps is not None:
            self.set_total_steps(total_steps)
        ProcessCollector(registry=self.registry)
        if self.cuda:
            import torch

            self._c("alexnet_pp_gpu_memory_allocated_bytes").set_function(lambda: float(torch.cuda.memory_allocated()))

    @classmethod
    def from_config(cls, cfg: Any, coord: Any, restarts: int = 0, node: Optional[str] = None) -> "WorkerMetrics":
        """From a RunConfig: run = cfg.name, host/port from cfg.metrics, replicas = cfg.parallel.dp."""
        return cls(cfg.name, coord, node=node, host=cfg.metrics.host, port=cfg.metrics.port,
                   replicas=cfg.parallel.dp, restarts=restarts)

    @classmethod
    def for_worker(cls, cfg: Any, coord: Any, job_id: str, attempt: int) -> Optional["WorkerMetrics"]:
        """What a Ray Train worker calls: None when cfg.metrics.enabled is off; otherwise the exporter,
        started and registered under cfg.run_dir for the driver's discovery (restarts = attempt − 1)."""
        if not cfg.metrics.enabled:
            return None
        m = cls.from_config(cfg, coord, restarts=max(0, attempt - 1))
        m.start()
        m.register(cfg.run_dir, job_id, attempt)
        return m

    @staticmethod
    def _cuda_available() -> bool:
        torch = sys.modules.get("torch")  # never import torch just for this
        try:
            return bool(torch is not None and torch.cuda.is_available())
        except Exception:
            return False

    @staticmethod
    def _skip_kinds() -> tuple[str, ...]:
        try:
            from alexnet_pp.data.stream import SKIP_KINDS

            return tuple(SKIP_KINDS)
        except Exception:  # the data package is optional for an exporter
            return ()

    def _c(self, name: str, **extra: str):
        return self.m[name].labels(**self.labels, **extra)

    # --- HTTP endpoint ---------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Serve /metrics; returns the (advertised host, port) Prometheus should scrape."""
        if self._server is not None:
            return self.address
        bind, advertise = resolve_host(self.host)
        self._server, _ = bind_with_fallback(
            bind, self.port, lambda b, p: start_http_server(p, addr=b, registry=self.registry))
        self.address = (advertise, self._server.server_port)
        log.info("metrics of %s/rank %s at http://%s:%d/metrics", self.run, getattr(self.coord, "rank", "?"),
                 *self.address)
        return self.address

    @property
    def url(self) -> Optional[str]:
        return f"http://{self.address[0]}:{self.address[1]}/metrics" if self.address else None

    def register(self, run_dir: Any, job_id: str, attempt: int) -> None:
        """Announce the endpoint to the driver's DiscoveryServer (cluster.discovery); undone by close()."""
        host, port = self.start()
        self._registration = register_endpoint(run_dir, job_id, attempt, self.coord, self.run, host, port,
                                               node=self.node)

    def close(self) -> None:
        reg, self._registration = self._registration, None
        if reg is not None:
            unregister_endpoint(*reg)
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> "WorkerMetrics":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- feeding ------------------------------------------------------------------------------------

    def set_total_steps(self, steps: int) -> None:
        self._c("alexnet_pp_steps_planned").set(steps)

    def on_step(self, stats: Any, coord: Any = None) -> None:
        """A cluster.timing.StepStats (or its asdict form): step, loss, phases, planned steps, skips."""
        self.set_skips(_field(stats, "skip_counts"))
        total_steps = _field(stats, "total_steps")
        with self._lock:
            step = _field(stats, "step")
            self._c("alexnet_pp_step").set(step)
            self._c("alexnet_pp_last_step_timestamp_seconds").set(time.time())
            if total_steps is not None:
                self.set_total_steps(total_steps)
            if self.lead:
                self._c("alexnet_pp_images_total").inc(_field(stats, "images", 0) / self.replicas)
            self._c("alexnet_pp_step_duration_seconds").observe(_field(stats, "seconds", 0.0))
            phases = _field(stats, "phases") or {}
            for phase, seconds in phases.items():
                if seconds > 0:
                    self._c("alexnet_pp_stage_phase_seconds_total", phase=phase).inc(seconds)
            for phase, seconds in (_field(stats, "phase_cpu") or {}).items():
                if seconds > 0:
                    self._c("alexnet_pp_stage_phase_cpu_seconds_total", phase=phase).inc(seconds)
            cpu = _field(stats, "cpu") or {}
            if cpu.get("main_thread", 0.0) > 0:
                self._c("alexnet_pp_schedule_thread_cpu_seconds_total").inc(cpu["main_thread"])
            if cpu.get("host_busy", 0.0) > 0:
                self._c("alexnet_pp_host_busy_cpu_seconds_total").inc(cpu["host_busy"])
            if phases.get("data_wait", 0.0) > 0:
                self._c("alexnet_pp_data_wait_seconds_total").inc(phases["data_wait"])
            self._c("alexnet_pp_pipeline_bubble_ratio").set(_field(stats, "bubble", math.nan))
            self._c("alexnet_pp_pipeline_bubble_theoretical_ratio").set(_field(stats, "theoretical_bubble", math.nan))
            self._c("alexnet_pp_loss").set(_field(stats, "loss", math.nan))
            self._c("alexnet_pp_learning_rate").set(_field(stats, "lr", math.nan))

    def on_eval(self, metrics: Mapping[str, float], coord: Any = None) -> None:
        """PipelineWorker's evaluation dict: top1 / top5 (ratios), val_loss."""
        with self._lock:
            for key, name in (("top1", "alexnet_pp_eval_top1_accuracy_ratio"),
                              ("top5", "alexnet_pp_eval_top5_accuracy_ratio"),
                              ("val_loss", "alexnet_pp_eval_loss")):
                if metrics.get(key) is not None:
                    self._c(name).set(float(metrics[key]))

    def set_skips(self, counts: Optional[Mapping[str, int]]) -> None:
        """Cumulative skip counts of the current data stream (worker.data.skip_counts()). The stream
        restarts its counts every epoch: a count lower than the last one seen starts afresh."""
        if not self.lead or not counts:
            return
        with self._lock:
            for kind, n in counts.items():
                last = self._skips_seen.get(kind, 0)
                delta = n - last if n >= last else n
                self._skips_seen[kind] = n
                child = self._c("alexnet_pp_samples_skipped_total", kind=kind)
                if delta > 0:
                    child.inc(delta)

    def on_checkpoint(self, step: int, seconds: float, coord: Any = None) -> None:
        self.checkpoint(seconds)

    def checkpoint(self, seconds: float) -> None:
        with self._lock:
            self._c("alexnet_pp_checkpoints_total").inc()
            self._c("alexnet_pp_checkpoint_duration_seconds").observe(seconds)

    def restarted(self, n: int = 1) -> None:
        self._c("alexnet_pp_worker_restarts").inc(n)
