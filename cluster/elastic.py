"""Elastic data parallelism (`parallel.elastic`): a job that lost a node goes on with fewer replicas.

Ray Train restarts a failed worker group with the same number of workers, so a job whose lost node
is never replaced waits for it. With `parallel.elastic` the driver runs each worker group without
Ray Train's own restarts and restarts it itself, up to `parallel.max_failures` times:

1. it waits up to `parallel.elastic_wait_s` for the cluster to fit the whole job again (the node
   came back, or another joined): then the job goes on as it was;
2. otherwise it takes the largest D' < D that fits the cluster now and divides M × D, and runs
   M' = M × D / D' micro-batches per replica: the micro-batch and the global batch stay, so the
   optimizer sees the same batch size and learning-rate schedule. The driver says so in its log,
   and the run summary lists the change (`replica_changes`).

"Fits" is asked of Ray itself: a placement group of the job's bundles with the worker group's PACK
strategy, removed again at once. The new group resumes from the newest complete checkpoint, which
is layout-free (cluster/checkpoint.py: parts keyed by layer names), so any D loads it. With ZeRO-1
the optimizer state is not saved (only float32 plain SGD keeps its momentum), so elastic refuses it.

What changes with D: each replica reads its own part of an epoch (docs/DATA.md), so from the resume
point on the samples of the epoch in progress are those a D'-replica run would have read at that
position; the losses after the change are not those of an uninterrupted D-replica run. Replicas are
never added back while the job runs.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

from alexnet_pp.config import RunConfig
from alexnet_pp.layout import Layout

log = logging.getLogger(__name__)

SMALLER_WAIT_S = 10.0  # how long a smaller worker group may take to be placed before trying a smaller one


@dataclass
class ReplicaChange:
    start: int  # the driver's worker-group start (1-based) that ran with the new layout
    replicas: tuple[int, int]  # D → D'
    micro_batches: tuple[int, int]  # M → M'
    global_batch: int

    def describe(self) -> str:
        (d0, d1), (m0, m1) = self.replicas, self.micro_batches
        return (f"replicas {d0} → {d1}, micro-batches per replica {m0} → {m1}; global batch {self.global_batch} "
                "kept")


def smaller_replica_counts(layout: Layout) -> list[int]:
    """D' < D, largest first, for which M × D / D' is a whole number of micro-batches."""
    total = layout.micro_batches * layout.dp
    return [d for d in range(layout.dp - 1, 0, -1) if total % d == 0]


def with_replicas(cfg: RunConfig, layout: Layout, replicas: int) -> tuple[RunConfig, Layout]:
    """The same job on `replicas` replicas with the global batch kept (the layout checked again)."""
    cfg = copy.deepcopy(cfg)
    cfg.parallel.micro_batches = layout.micro_batches * layout.dp // replicas
    cfg.parallel.dp = replicas
    return cfg, Layout.from_config(cfg)


def fits(cfg: RunConfig, layout: Layout, timeout_s: float) -> bool:
    """Whether the cluster can place the job's workers within `timeout_s` (a probe, removed at once)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    p = cfg.parallel
    bundle: dict[str, float] = {"CPU": p.cpus_per_worker}
    if p.gpus_per_worker > 0:
        bundle["GPU"] = p.gpus_per_worker
    pg = placement_group([dict(bundle) for _ in range(layout.world_size)], strategy="PACK")
    try:
        return bool(pg.wait(timeout_seconds=max(1, int(round(timeout_s)))))
    finally:
        remove_placement_group(pg)


def next_layout(cfg: RunConfig, layout: Layout) -> Optional[tuple[RunConfig, Layout]]:
    """What to restart with after a failure: the same layout once it fits again within
    parallel.elastic_wait_s, else the largest smaller D' that fits now, else None."""
    if fits(cfg, layout, cfg.parallel.elastic_wait_s):
        return cfg, layout
    for replicas in smaller_replica_counts(layout):
        smaller = with_replicas(cfg, layout, replicas)
        if fits(*smaller, min(SMALLER_WAIT_S, cfg.parallel.elastic_wait_s)):
            return smaller
    return None


def run_elastic(cfg: RunConfig, layout: Layout, fit_once: Callable[[RunConfig, Layout, int], Any],
                describe: Callable[[BaseException, Layout], str],
                say: Callable[[str], None] = print) -> tuple[Any, RunConfig, Layout, list[ReplicaChange]]:
    """Run worker groups until one finishes: `fit_once(cfg, layout, start)` runs one (no restarts of
    its own) and raises when it fails. Returns its result, the config and layout it ended with and
    the replica changes on the way; raises the last failure once parallel.max_failures restarts
    are spent or nothing fits any more."""
    changes: list[ReplicaChange] = []
    budget = cfg.parallel.max_failures
    start = 1
    while True:
        try:
            return fit_once(cfg, layout, start), cfg, layout, changes
        except Exception as e:
            if start > budget:
                raise
            say(f"elastic: worker group {start} failed ({describe(e, layout).splitlines()[0]}); waiting up to "
                f"{cfg.parallel.elastic_wait_s:g} s for the cluster to fit {layout.world_size} workers again")
            chosen = next_layout(cfg, layout)
            if chosen is None:
                say("elastic: the cluster cannot place even one replica of the pipeline; giving up")
                raise
            new_cfg, new_layout = chosen
            if new_layout.dp != layout.dp:
                change = ReplicaChange(start + 1, (layout.dp, new_layout.dp),
                                       (layout.micro_batches, new_layout.micro_batches), cfg.train.batch_size)
                changes.append(change)
                say(f"elastic: a node was lost and not replaced within parallel.elastic_wait_s = "
                    f"{cfg.parallel.elastic_wait_s:g} s; restarting from the newest complete checkpoint with "
                    f"{change.describe()} ({new_layout.describe()})")
            else:
                say(f"elastic: the cluster fits the job again; restarting with {new_layout.describe()}")
            cfg, layout = new_cfg, new_layout
            start += 1
