"""End-of-run numbers from every rank's per-step stats, and the driver's live progress.

`summarize_run(ranks)` folds the StepStats dicts of all ranks (`RankResult.stats`, with the
rank's `coord`) into the timing fields of a `RunSummary` (alexnet_pp/summary.py): job images/s,
step time p50/p95, the measured pipeline bubble per stage next to theory, the data-wait share,
the per-stage phase breakdown (shares, mean seconds per step, and the schedule thread's CPU seconds
in each phase), the CPU a stage's ranks got
(cores' worth: the thread running the schedule, the process's other threads), what the ranks'
machine spent beside them (the cluster's own processes, anything else running there) and each
rank's peak memory. The ranks of a synchronous pipeline finish a step together, so a
step's job time is the slowest rank's; each rank's first step (warm-up: allocation, the first p2p
shape exchange) is left out when there are others (`warmup_steps`: more, for benchmarks).

`HistoryProgress` feeds the existing `alexnet_pp.progress.Progress` (bar on a terminal, a line every
N steps in logs) from rank 0's `run_dir/history.jsonl` while `trainer.fit()` blocks the driver.
"""

from __future__ import annotations

import json
import math
import statistics
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from alexnet_pp.summary import RunSummary


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _get(obj: Any, name: str) -> Any:
    return obj[name] if isinstance(obj, Mapping) else getattr(obj, name)


def summarize_run(ranks: Iterable[Any], warmup_steps: int = 1) -> RunSummary:
    """`ranks`: per rank, a WorkerResult or {"coord": {...stage...}, "stats": [StepStats dict, ...]}."""
    step_time: dict[int, float] = {}
    step_images: dict[int, float] = {}
    by_stage: dict[int, list[dict[str, Any]]] = {}
    peak: dict[str, int] = {}
    hosts: dict[str, list[tuple[float, float, float]]] = {}  # per machine, per rank: seconds, host busy, process
    theory = math.nan
    for i, r in enumerate(ranks):
        coord, stats = _get(r, "coord"), list(_get(r, "stats"))
        stage = int(_get(coord, "stage"))
        timed = stats[warmup_steps:] if len(stats) > warmup_steps else stats
        by_stage.setdefault(stage, []).extend(timed)
        rank = coord.get("rank", i) if isinstance(coord, Mapping) else getattr(coord, "rank", i)
        if any("peak_memory" in s for s in stats):
            peak[str(rank)] = max(int(s.get("peak_memory", 0)) for s in stats)
        on_host = [s for s in timed if "host_busy" in s.get("cpu", {})]
        if on_host:
            hosts.setdefault(_host(r), []).append(tuple(sum(x) for x in zip(
                *((s["seconds"], s["cpu"]["host_busy"], s["cpu"]["process"]) for s in on_host))))
        for s in timed:
            step_time[s["step"]] = max(step_time.get(s["step"], 0.0), s["seconds"])
            step_images[s["step"]] = s["images"]
            theory = s.get("theoretical_bubble", theory)
    seconds = [step_time[k] for k in sorted(step_time)]
    total = sum(seconds)
    out = RunSummary(
        steps_timed=len(seconds),
        images_per_sec=sum(step_images.values()) / total if total > 0 else math.nan,
        step_time_p50=_percentile(seconds, 0.5),
        step_time_p95=_percentile(seconds, 0.95),
        theoretical_bubble=theory,
        peak_memory_per_rank=dict(sorted(peak.items(), key=lambda kv: int(kv[0]))),
    )
    out.host_busy_cores, out.outside_ranks_cores = host_cpu(hosts)
    for stage, stats in sorted(by_stage.items()):
        if not stats:
            continue
        out.bubble_per_stage[str(stage)] = statistics.fmean(s["bubble"] for s in stats)
        t = sum(s["seconds"] for s in stats)
        phases: dict[str, float] = {}
        for s in stats:
            for k, v in s["phases"].items():
                phases[k] = phases.get(k, 0.0) + v
        out.phase_share_per_stage[str(stage)] = {k: v / t if t > 0 else math.nan for k, v in sorted(phases.items())}
        # per step of one rank of the stage (its ranks run the same work side by side)
        out.phase_seconds_per_stage[str(stage)] = {k: v / len(stats) for k, v in sorted(phases.items())}
        with_cpu = [s for s in stats if s.get("phase_cpu")]
        if with_cpu:
            cpu: dict[str, float] = {}
            for s in with_cpu:
                for k, v in s["phase_cpu"].items():
                    cpu[k] = cpu.get(k, 0.0) + v
            out.phase_cpu_seconds_per_stage[str(stage)] = {k: v / len(with_cpu) for k, v in sorted(cpu.items())}
        if stage == 0:  # only the first stage reads data
            out.data_wait_share = phases.get("data_wait", 0.0) / t if t > 0 else math.nan
        timed_cpu = [s for s in stats if s.get("cpu")]
        cpu_t = sum(s["seconds"] for s in timed_cpu)
        if cpu_t > 0:
            main = sum(s["cpu"]["main_thread"] for s in timed_cpu)
            out.cpu_share_per_stage[str(stage)] = {
                "main_thread": main / cpu_t, "other_threads": (sum(s["cpu"]["process"] for s in timed_cpu) - main) / cpu_t}
    return out


def _host(r: Any) -> str:
    try:
        return str(_get(r, "host"))
    except (KeyError, AttributeError):  # records from before ranks named their machine: one machine
        return ""


def host_cpu(hosts: Mapping[str, list[tuple[float, float, float]]]) -> tuple[float, float]:
    """(busy cores, cores outside the ranks' processes) of a typical machine of the run while its
    ranks stepped: the median over machines. On one machine every rank sees the same busy cores
    (their steps overlap), so its ranks' median reading; the ranks' own cores are the sum of theirs."""
    busy, outside = [], []
    for per_rank in hosts.values():
        per_rank = [r for r in per_rank if r[0] > 0]
        if not per_rank:
            continue
        b = statistics.median(h / t for t, h, _ in per_rank)
        busy.append(b)
        outside.append(max(0.0, b - sum(p / t for t, _, p in per_rank)))
    if not busy:
        return math.nan, math.nan
    return statistics.median(busy), statistics.median(outside)


class HistoryProgress:
    """Tail rank 0's history.jsonl (cluster.workers) into a Progress: `start()`, then `close()`."""

    def __init__(self, history: str | Path, job_id: str, progress: Any, images_per_step: int, poll_s: float = 1.0):
        self.path, self.job_id, self.progress = Path(history), job_id, progress
        self.images_per_step, self.poll_s = images_per_step, poll_s
        self._offset, self._last_step = 0, 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1  # only whole lines; the rest is still being written
        self._offset += end
        for line in chunk[:end].splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("job") != self.job_id:
                continue
            if rec.get("kind") == "step" and rec["step"] > self._last_step:  # a redone step after a restart: skip
                self._last_step = rec["step"]
                self.progress.update(rec["step"], self.images_per_step, rec["loss"], rec["lr"], seconds=rec.get("seconds"))
            elif rec.get("kind") == "eval":
                self.progress.message(f"eval at step {rec.get('step')}: top-1 {rec.get('top1', math.nan):.3f} "
                                      f"top-5 {rec.get('top5', math.nan):.3f}")

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def start(self) -> "HistoryProgress":
        self._thread = threading.Thread(target=self._loop, name="history-progress", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.poll()
        self.progress.close()
