"""What a rank's training loop tells the outside: steps, evaluations, checkpoints.

The engine calls every callback it was given; the Prometheus exporter (cluster/metrics.py) and the
Ray worker's history log (cluster/workers.py) are callbacks. Code that wants
to watch or steer a run subclasses `Callback`; `RunConfig.callbacks` names extra ones to load on
every worker ("package.module:Class", comma-separated; each is constructed without arguments).
"""

from __future__ import annotations

import importlib
from typing import Any, Iterable, Optional

from alexnet_pp.errors import ConfigError


class Callback:
    """Override what you need. An exception raised here fails the rank (and names it)."""

    def on_step(self, stats: Any, coord: Any) -> None:
        """After every optimizer step: a cluster.timing.StepStats and the rank's Coord."""

    def on_eval(self, metrics: dict[str, Any], coord: Any) -> None:
        """After every evaluation (a collective: every rank calls it): step, top1, top5, val_loss, …"""

    def on_checkpoint(self, step: int, seconds: float, coord: Any) -> None:
        """After a checkpoint every rank finished writing."""

    def on_stuck(self, record: Optional[dict[str, Any]], coord: Any) -> None:
        """From a watchdog thread, not the training loop: the rank has been in one pipeline instruction
        for more than half of parallel.collective_timeout_s (rank, stage, tower, instruction, step,
        seconds; cluster/faults.py), refreshed while it lasts; None once that instruction ended."""


class Callbacks(Callback):
    """Several callbacks as one."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = [c for c in callbacks if c is not None]

    def on_step(self, stats, coord) -> None:
        for c in self.callbacks:
            c.on_step(stats, coord)

    def on_eval(self, metrics, coord) -> None:
        for c in self.callbacks:
            c.on_eval(metrics, coord)

    def on_checkpoint(self, step, seconds, coord) -> None:
        for c in self.callbacks:
            c.on_checkpoint(step, seconds, coord)

    def on_stuck(self, record, coord) -> None:
        for c in self.callbacks:
            c.on_stuck(record, coord)


def load_callbacks(spec: str) -> list[Callback]:
    """Instances of the classes named in `spec` ("pkg.mod:Class,pkg.mod:Other")."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        module, _, name = item.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(f"callbacks: cannot load {item!r} ({type(e).__name__}: {e}); give "
                              "'package.module:Class' importable on every worker") from e
        out.append(cls())
    return out
