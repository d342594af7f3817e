"""Checkpoint storage shared by all ranks: a half-written checkpoint is never picked up.

Layout: `<dir>/step00000040/` holds DeepSpeed's per-layer and optimizer files, one
`rank000-state.pt` per rank (RNG states), and — written last, by rank 0, after every rank has
finished — `COMPLETE.json` with the step and the data-stream position. Only directories with
that marker count; older complete ones beyond `keep` are deleted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

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

    def rank_state_path(self, tag: str, rank: int) -> Path:
        return self.root / tag / f"rank{rank:03d}-state.pt"

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
