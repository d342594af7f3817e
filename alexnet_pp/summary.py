"""A run's result, one type from the worker to the driver to `run_dir/summary.json`.

The single-process trainer fills the same fields it can (no stages, no restarts); a distributed
job's rank 0 fills the timing fields from every rank's step stats (cluster/run_summary.py) and the
driver adds what only it knows (job id, restarts, error). `summary.json` is `to_dict()`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from alexnet_pp.fileio import write_atomic


@dataclass
class RunSummary:
    ok: bool = True
    job_id: str = ""
    run_dir: str = ""
    layout: tuple[int, int, int] = (1, 1, 1)  # (P, T, D)
    error: Optional[str] = None
    steps: int = 0
    loss_steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    restarts: int = 0
    resume_steps: list[Optional[int]] = field(default_factory=list)  # per worker-group start
    resumed_from: Optional[int] = None
    resumed_layout: Optional[tuple[int, int, int]] = None  # (P, T, D) of the checkpoint, when it differs
    # parallel.elastic: each restart with fewer replicas (start, replicas D → D', micro_batches M → M',
    # global_batch), from cluster/elastic.py
    replica_changes: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = math.nan
    # timing, from the steps after the first (warm-up)
    steps_timed: int = 0
    images_per_sec: float = math.nan
    step_time_p50: float = math.nan
    step_time_p95: float = math.nan
    theoretical_bubble: float = math.nan
    bubble_per_stage: dict[str, float] = field(default_factory=dict)
    phase_share_per_stage: dict[str, dict[str, float]] = field(default_factory=dict)
    data_wait_share: float = math.nan
    phase_seconds_per_stage: dict[str, dict[str, float]] = field(default_factory=dict)  # mean per step
    peak_memory_per_rank: dict[str, int] = field(default_factory=dict)  # bytes (GPU: CUDA allocations; CPU: max RSS)
    # cores' worth of CPU per rank of each stage while it stepped: the thread running the schedule, and
    # the process's other threads (communication, data, runtime); below 1 on a CPU, the rank waited or was preempted
    cpu_share_per_stage: dict[str, dict[str, float]] = field(default_factory=dict)
    # the schedule thread's CPU seconds per phase, mean per step of one rank of the stage: beside
    # phase_seconds_per_stage, what a phase cost in work and what it spent waiting for a core or a peer
    phase_cpu_seconds_per_stage: dict[str, dict[str, float]] = field(default_factory=dict)
    # the ranks' machine meanwhile: cores busy, whoever ran; of them, those outside every rank's process
    # (the cluster's own processes, anything else there): on a CPU, cores the ranks could not have
    host_busy_cores: float = math.nan
    outside_ranks_cores: float = math.nan
    cut: str = ""  # the stage cut it trained on, as parallel.partition takes it ("3", "conv3.0[82:]")
    cut_trials: dict[str, list[float]] = field(default_factory=dict)  # the live cut check: cut → s per micro-batch per stage

    @property
    def final_loss(self) -> Optional[float]:
        return self.losses[-1] if self.losses else None

    @property
    def last_eval(self) -> dict[str, Any]:
        return self.evals[-1] if self.evals else {}

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "final_loss": self.final_loss}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunSummary":
        names = {f.name for f in dataclasses.fields(cls)}
        out = cls(**{k: v for k, v in data.items() if k in names})
        out.layout = tuple(out.layout)
        out.resumed_layout = tuple(out.resumed_layout) if out.resumed_layout else None
        return out

    def write(self, path: str | Path) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=1, default=str) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> "RunSummary":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def format(self) -> str:
        """The lines printed at the end of a run."""
        last = self.last_eval
        if not self.ok:
            return f"job {self.job_id} FAILED after {self.steps} steps, restarts {self.restarts}:\n{self.error}"
        lines = []
        if self.bubble_per_stage:
            lines.append(
                f"throughput {_f(self.images_per_sec, '.1f')} images/s over {self.steps_timed} steps; "
                f"step time p50 {_f(self.step_time_p50, '.3f')} s, p95 {_f(self.step_time_p95, '.3f')} s; "
                f"data wait {_f(self.data_wait_share * 100, '.1f')}% of stage 0's time")
            if self.cut:
                tried = trials_text(self.cut_trials)
                lines.append(f"stage cut {self.cut}" + (f" (live check, ms per micro-batch per stage: {tried})"
                                                        if tried else ""))
            for stage, bubble in self.bubble_per_stage.items():
                shares = ", ".join(f"{k} {v * 100:.0f}%" for k, v in self.phase_share_per_stage.get(stage, {}).items())
                cpu = self.cpu_share_per_stage.get(stage)
                lines.append(f"  stage {stage}: bubble {_f(bubble, '.3f')} (theory {_f(self.theoretical_bubble, '.3f')}); "
                             f"{shares}" + (f"; CPU per rank {cpu['main_thread']:.2f} cores in the schedule thread, "
                                            f"{cpu['other_threads']:.2f} in others" if cpu else ""))
            if math.isfinite(self.host_busy_cores):
                lines.append(f"  machine: {self.host_busy_cores:.2f} cores busy while the ranks stepped, "
                             f"{self.outside_ranks_cores:.2f} of them outside the ranks' processes")
        if self.resumed_layout:
            lines.append(f"resumed step {self.resumed_from}, written by layout (P, T, D) = {self.resumed_layout}, "
                         f"on {self.layout}")
        for change in self.replica_changes:
            (d0, d1), (m0, m1) = change["replicas"], change["micro_batches"]
            lines.append(f"elastic: continued on {d1} replica{'s' if d1 > 1 else ''} instead of {d0} "
                         f"(micro-batches {m0} → {m1}, global batch {change['global_batch']} kept)")
        who = f"job {self.job_id}" if self.job_id else "run"
        lines.append(
            f"{who} done: {self.steps} steps, final loss {_f(self.final_loss, '.4f')}, "
            f"val top-1 {_f(last.get('top1'), '.3f')} top-5 {_f(last.get('top5'), '.3f')}, "
            f"{_f(self.images_per_sec, '.1f')} images/s"
            + (f", restarts {self.restarts}" if self.job_id else "")
            + f"; outputs in {self.run_dir}")
        return "\n".join(lines)


def trials_text(trials: dict[str, list[float]]) -> str:
    """The live cut check's trials, {"conv3.0[90:]": [0.43, 0.445], …} → "conv3.0[90:] 430/445; …"
    (ms per micro-batch per stage, in the order timed)."""
    return "; ".join(f"{cut} {'/'.join(f'{1000 * t:.0f}' for t in live)}" for cut, live in trials.items())


def _f(x: Any, spec: str) -> str:
    if x is None or not isinstance(x, (int, float)) or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, spec)
