"""Every layout a number of workers can run, ranked by predicted throughput."""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

from alexnet_pp.config import ModelConfig
from alexnet_pp.pipeline import unit_names
from alexnet_pp.planning.costmodel import Candidate, Prediction, predict
from alexnet_pp.planning.profile import DeviceProfile
from alexnet_pp.planning.simulate import SCHEDULES


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(workers: int, batch: int, schedules: Sequence[str] = ("1f1b",), partition: str = "measured",
                      min_micro_batch: int = 1) -> Iterator[Candidate]:
    """Every (P, T, D, M) with P·T·D = workers, P at most the pipeline units at T, and the batch
    splitting into D·M whole micro-batches of at least `min_micro_batch`. One stage has no
    pipeline schedule to choose, so P = 1 comes once, under the first schedule."""
    for s in schedules:
        if s not in SCHEDULES:
            raise ValueError(f"unknown schedule {s!r}; use one of {', '.join(SCHEDULES)}")
    for tp in (1, 2):
        if workers % tp:
            continue
        for pp in range(1, len(unit_names(tp)) + 1):
            if (workers // tp) % pp:
                continue
            dp = workers // (tp * pp)
            if batch % dp:
                continue
            for m in _divisors(batch // dp):
                if batch // (dp * m) < min_micro_batch:
                    continue
                for schedule in schedules[:1] if pp == 1 else schedules:
                    yield Candidate(pp, tp, dp, m, batch, schedule, partition)


def rank_layouts(model_cfg: ModelConfig, profile: DeviceProfile, workers: int, batch: int,
                 schedules: Sequence[str] = ("1f1b",), max_memory: Optional[int] = None,
                 partition: str = "measured", min_micro_batch: int = 1,
                 overlap_allreduce: bool = False) -> list[Prediction]:
    """Predictions for every candidate layout: those that fit in memory first (`max_memory` bytes
    per worker, else the profile's device memory), fastest first; ties go to less memory."""
    preds = [predict(model_cfg, profile, layout, overlap_allreduce=overlap_allreduce, max_memory=max_memory)
             for layout in candidate_layouts(workers, batch, schedules, partition, min_micro_batch)]
    if not preds:
        raise ValueError(f"no layout of {workers} workers splits batch {batch} into whole micro-batches")
    return sorted(preds, key=lambda p: (not p.fits, -p.images_per_s, p.memory_per_worker))


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def format_table(preds: Sequence[Prediction], top: Optional[int] = None) -> str:
    """A text table of predictions in the given order; every number in it is predicted."""
    head = (f"{'#':>3} {'P×T×D':>8} {'M':>4} {'mb':>4} {'schedule':>8} {'img/s (pred)':>13} {'step ms':>9} "
            f"{'bubble':>6} {'GiB/worker':>10} {'stage MB':>9} {'tower MB':>9} {'replica MB':>10} {'fits':>4}")
    lines = [head, "-" * len(head)]
    for i, p in enumerate(preds[:top] if top else preds, 1):
        L, b = p.layout, p.bytes_per_step
        lines.append(
            f"{i:>3} {L.label():>8} {L.micro_batches:>4} {str(L.micro_batch) + ('*' if p.extrapolated else ''):>4} "
            f"{L.schedule:>8} {p.images_per_s:>13.1f} "
            f"{1000 * p.step_seconds:>9.2f} {p.bubble:>6.3f} {p.memory_per_worker / 2**30:>10.2f} "
            f"{_mb(b['stages']):>9} {_mb(b['towers']):>9} {_mb(b['replicas']):>10} {'yes' if p.fits else 'NO':>4}")
    if top and len(preds) > top:
        lines.append(f"... {len(preds) - top} more layouts")
    if any(p.extrapolated for p in (preds[:top] if top else preds)):
        lines.append("* micro-batch outside the sizes the profile was measured at: its unit times are extrapolated")
    return "\n".join(lines)
