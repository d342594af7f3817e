"""Checkpoint storage shared by all ranks: a half-written checkpoint is never picked up.

Layout: `<dir>/step00000040/` holds DeepSpeed's per-layer and optimizer files and — written last,
by rank 0, after every rank has finished — `COMPLETE.json` with the step, the data-stream position
and the layout. Only directories with
that marker count; older complete ones beyond `keep` are deleted.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from alexnet_pp.config import RunConfig
from alexnet_pp.layout import Layout
from alexnet_pp.fileio import write_atomic

MARKER = "COMPLETE.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


class CheckpointStore:
    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = max(1, keep)

    def complete(self) -> list[tuple[int, str]]:
        """(step, tag) of complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for d in self.root.iterdir():
            marker = d / MARKER
            if d.is_dir() and marker.is_file():
                try:
                    found.append((int(json.loads(marker.read_text())["step"]), d.name))
                except (ValueError, KeyError, json.JSONDecodeError):
                    continue  # a marker we cannot read is not a complete checkpoint
        return sorted(found)

    def latest(self) -> Optional[tuple[int, str, dict[str, Any]]]:
        done = self.complete()
        if not done:
            return None
        step, tag = done[-1]
        return step, tag, json.loads((self.root / tag / MARKER).read_text())

    def mark_complete(self, tag: str, info: dict[str, Any]) -> None:
        # atomic and durable: the marker is either absent or whole, also after a crash
        write_atomic(self.root / tag / MARKER, json.dumps(info, indent=1), durable=True)

    def prune(self) -> None:
        done = self.complete()
        for _, tag in done[: -self.keep]:
            shutil.rmtree(self.root / tag, ignore_errors=True)
        # leftovers of interrupted saves, older than the newest complete checkpoint
        if done:
            newest = done[-1][1]
            for d in self.root.iterdir():
                if d.is_dir() and d.name.startswith("step") and d.name < newest and not (d / MARKER).exists():
                    shutil.rmtree(d, ignore_errors=True)


def checkpoint_dir(cfg: RunConfig) -> Path:
    """Where a run's checkpoints live: checkpoint.dir, else run_dir/checkpoints."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else cfg.run_dir / "checkpoints"


class EngineCheckpoints:
    """Save and resume one rank's DeepSpeed pipeline engine in the run's CheckpointStore.

    Every rank writes its layers' and optimizer files; rank 0 marks the checkpoint complete once all
    have finished (barriers on both sides), with the step, the data-stream position and the layout.
    The dropout masks need no state: they are a function of (seed, step, sample) (alexnet_pp/dropout.py).
    """

    def __init__(self, cfg: RunConfig, layout: Layout, rank: int):
        self.store = CheckpointStore(checkpoint_dir(cfg), cfg.checkpoint.keep)
        self.resume_enabled = cfg.checkpoint.resume
        self.method = cfg.parallel.partition.strip()
        self.layout, self.rank = layout, rank

    def latest(self) -> Optional[tuple[int, str, dict[str, Any]]]:
        return self.store.latest() if self.resume_enabled else None

    def resume_bounds(self) -> Optional[tuple[int, ...]]:
        """The stage cuts of the checkpoint this run will resume from, if any. Measured cuts can differ
        from one start to the next; an explicit method that now cuts differently is an error."""
        latest = self.latest()
        if latest is None or "bounds" not in latest[2]:
            return None
        units = list(self.layout.units)
        if latest[2].get("units", units) != units:
            raise CheckpointError(
                f"checkpoint {self.store.root / latest[1]} holds pipeline units {latest[2]['units']}, but this "
                f"layout runs {units}; resume with the layout that wrote it or use another checkpoint.dir")
        bounds = tuple(latest[2]["bounds"])
        if len(bounds) != self.layout.pp + 1:
            return None  # another layout: resume() says what is wrong
        if self.method != "measured" and bounds != self.layout.partition.bounds:
            raise CheckpointError(
                f"checkpoint {self.store.root / latest[1]} cut the pipeline at {list(bounds)}, but "
                f"parallel.partition={self.method!r} now cuts at {list(self.layout.partition.bounds)}; resume "
                f"with --parallel.partition {','.join(map(str, bounds[1:-1]))} or use another checkpoint.dir")
        return bounds

    def save(self, engine, schedule, position: dict[str, int]) -> float:
        """Write a checkpoint on every rank (a collective); returns its seconds."""
        import torch.distributed as dist

        t0 = time.perf_counter()
        tag = tag_for(position["step"])
        client = {"position": position, "schedule": schedule.state_dict()}
        engine.save_checkpoint(str(self.store.root), tag=tag, client_state=client, save_latest=False)
        dist.barrier()
        if self.rank == 0:
            lay = self.layout
            self.store.mark_complete(tag, {**position, "world": lay.world_size, "layout": list(lay.shape),
                                           "bounds": list(lay.partition.bounds), "units": list(lay.units),
                                           "zero_stage": lay.zero_stage})
            self.store.prune()
        dist.barrier()
        return time.perf_counter() - t0

    def resume(self, engine, schedule) -> Optional[dict[str, int]]:
        """Load the newest complete checkpoint into the engine; its data-stream position, or None."""
        latest = self.latest()
        if latest is None:
            return None
        _, tag, info = latest
        if info.get("layout") not in (None, list(self.layout.shape)) and not self._replicas_changed_only(info):
            raise CheckpointError(
                f"checkpoint {self.store.root / tag} was written by layout (P, T, D) = {tuple(info['layout'])}; "
                f"this job is {self.layout.shape}. Use the same layout or another checkpoint.dir")
        _, client = engine.load_checkpoint(str(self.store.root), tag=tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
        schedule.load_state_dict(client["schedule"])
        return client["position"]

    def _replicas_changed_only(self, info: dict[str, Any]) -> bool:
        """Another D, same P, T and cuts, ZeRO stage 0 on both sides: DeepSpeed wrote each stage's layer
        and optimizer files once, from replica 0, named by stage and tower only, and every replica loads
        them, so any D resumes (parallel.elastic relies on it). ZeRO-1 shards optimizer state per replica."""
        return (list(info["layout"][:2]) == [self.layout.pp, self.layout.tp] and
                info.get("zero_stage", 0) == 0 and self.layout.zero_stage == 0)


class CheckpointError(RuntimeError):
    """A checkpoint that this run cannot resume; the message names it and what differs."""
