"""Checkpoints shared by all ranks, readable by any layout; a half-written one is never picked up.

Layout: `<dir>/step00000040/` holds one safetensors file per part of the network, keyed by the
paper's layer names (`towers.0.conv1.safetensors`, …, `fc8.safetensors`: weights and SGD momentum,
alexnet_pp/weights.py), each written by the one rank that owns it, and — written last, by rank 0,
after every rank has finished — `COMPLETE.json` with the step, the data-stream position, the LR
schedule's state, the seed (which with the step fixes the dropout masks), the model config and the
layout that wrote it. Only directories with that marker count; older complete ones beyond `keep`
are deleted. Any (P, T, D) resumes any checkpoint: each rank reads the parts it holds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from alexnet_pp.config import RunConfig
from alexnet_pp.fileio import write_atomic
from alexnet_pp.layout import Layout
from alexnet_pp.weights import MOMENTUM, CheckpointError, check_model_compatible, check_shapes, part_of, read_parts, write_part

log = logging.getLogger(__name__)

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


def held_parameters(module) -> list[tuple[str, torch.nn.Parameter, bool]]:
    """(state-dict key, parameter, whether this rank writes it) of every parameter a rank's pipeline
    stage holds. fc8 at T = 2 is held by both towers and written by tower 0."""
    out = []
    for layer in module.forward_funcs:
        for key, p in layer.model_parameters():
            out.append((key, p, not (getattr(layer, "replicated", False) and getattr(layer, "tower", 0) != 0)))
    return out


class EngineCheckpoints:
    """Save and resume one rank's share of the network and its optimizer state, layout-free.

    Saving: every rank of replica 0 writes the parts it owns (in parallel, one file each), then rank 0
    marks the checkpoint complete. Resuming: `load_weights` before DeepSpeed wraps the module (so bf16
    master weights start from the saved float32 values), `load_state` after it (momentum, schedule,
    data position). Momentum is saved and restored for float32 without ZeRO, where the optimizer is
    plain SGD; with bf16/fp16 or ZeRO the weights resume and momentum restarts (the log says so).
    """

    def __init__(self, cfg: RunConfig, layout: Layout, rank: int):
        self.store = CheckpointStore(checkpoint_dir(cfg), cfg.checkpoint.keep)
        self.resume_enabled = cfg.checkpoint.resume
        self.model_cfg = dataclasses.asdict(cfg.model)
        self.seed, self.precision = cfg.train.seed, cfg.parallel.precision
        self.layout, self.rank = layout, rank
        self.coord = layout.coord(rank)
        self._loaded: Optional[tuple[dict[str, torch.Tensor], dict[str, Any], Path]] = None

    def latest(self) -> Optional[tuple[int, str, dict[str, Any]]]:
        return self.store.latest() if self.resume_enabled else None

    # --- saving ---------------------------------------------------------------------------------

    def save(self, engine, module, schedule, position: dict[str, int], guard=None) -> float:
        """Write a checkpoint on every rank (a collective); returns its seconds. With a `guard`
        (cluster/faults.py) a failed write stops every rank together and leaves no partial checkpoint."""
        t0 = time.perf_counter()
        tag = tag_for(position["step"])
        directory = self.store.root / tag
        sgd = plain_sgd(engine.optimizer)
        try:
            if self.coord.replica == 0:  # replicas hold the same values: one of them writes
                directory.mkdir(parents=True, exist_ok=True)
                for part, tensors in self._parts(module, sgd).items():
                    write_part(directory, part, tensors)
        except OSError as e:
            if guard is None:
                raise
            guard.failed(e, getattr(e, "filename", None))
        self._agree(guard)
        if self.rank == 0:
            lay = self.layout
            try:
                self.store.mark_complete(tag, {
                    **position, "schedule": schedule.state_dict(), "seed": self.seed, "model": self.model_cfg,
                    "precision": self.precision, "optimizer_state": sgd is not None, "layout": list(lay.shape),
                    "micro_batches": lay.micro_batches, "bounds": list(lay.partition.bounds),
                    "splits": list(lay.partition.splits), "cut": lay.partition.cut_points(lay.tp),
                    "units": list(lay.units)})
                self.store.prune()
            except OSError as e:
                if guard is None:
                    raise
                guard.failed(e, None)
        self._agree(guard)
        return time.perf_counter() - t0

    def _parts(self, module, sgd) -> dict[str, dict[str, torch.Tensor]]:
        """part name → its tensors (weights, and momentum when the optimizer keeps it) that this rank writes."""
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, p, writes in held_parameters(module):
            if not writes:
                continue
            part, leaf = part_of(key)
            parts.setdefault(part, {})[leaf] = p
            buf = sgd.state.get(p, {}).get("momentum_buffer") if sgd is not None else None
            if buf is not None:
                parts[part][MOMENTUM + leaf] = buf
        return parts

    @staticmethod
    def _agree(guard) -> None:
        if guard is None:
            dist.barrier()
        else:
            guard.agree()  # all_reduce of the failures: a barrier that raises on every rank together

    # --- resuming -------------------------------------------------------------------------------

    def load_weights(self, module) -> Optional[dict[str, Any]]:
        """Copy the newest complete checkpoint's weights into this rank's parameters; its marker, or None."""
        latest = self.latest()
        if latest is None:
            return None
        _, tag, info = latest
        directory = self.store.root / tag
        check_model_compatible(info.get("model", {}), self.model_cfg, directory)
        held = held_parameters(module)
        found = read_parts(directory, [k for k, _, _ in held], momentum=info.get("optimizer_state", False))
        check_shapes(found, {k: p.shape for k, p, _ in held}, directory)
        with torch.no_grad():
            for key, p, _ in held:
                p.copy_(found[key])
        self._loaded = (found, info, directory)
        return info

    def load_state(self, engine, module, schedule) -> Optional[dict[str, Any]]:
        """After DeepSpeed wrapped the module: momentum and schedule; the data position and the layout
        that wrote the checkpoint, or None when nothing was resumed."""
        if self._loaded is None:
            return None
        found, info, directory = self._loaded
        sgd = plain_sgd(engine.optimizer)
        if sgd is not None and info.get("optimizer_state"):
            for key, p, _ in held_parameters(module):
                sgd.state[p]["momentum_buffer"] = found[MOMENTUM + key].to(p.device, p.dtype).clone()
        elif self.rank == 0:
            log.warning("%s: SGD momentum not restored (saved: %s; this run's optimizer: %s); it restarts from "
                        "zero", directory, info.get("optimizer_state"), type(engine.optimizer).__name__)
        schedule.load_state_dict(info["schedule"])
        self._loaded = None
        return {"step": info["step"], "epoch": info["epoch"], "step_in_epoch": info["step_in_epoch"],
                "layout": tuple(info.get("layout", ())), "micro_batches": info.get("micro_batches")}



def plain_sgd(optimizer) -> Optional[torch.optim.SGD]:
    """The optimizer when it is the plain SGD whose state is per parameter (float32, no ZeRO)."""
    return optimizer if isinstance(optimizer, torch.optim.SGD) else None


__all__ = ["CheckpointError", "CheckpointStore", "EngineCheckpoints", "MARKER", "checkpoint_dir", "tag_for"]
