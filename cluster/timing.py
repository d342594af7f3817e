"""Where a rank's step time goes: every pipeline instruction timed under one of `PHASES`.

The phase list is the one the metrics (cluster/metrics.py), the run summary and the dashboard use.
`InstructionTimer` wraps DeepSpeed's instruction table on one engine instance (the class stays
untouched); `step_stats` turns one step's phase seconds into the bubble: the share of the pipeline
schedule (the step minus its optimizer work) this rank spent neither computing nor loading data.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

PHASES = ("forward", "backward", "backward_weight", "send", "recv", "idle", "data_wait", "optimizer")
COMPUTE_PHASES = ("forward", "backward", "backward_weight", "data_wait")  # a stage's busy time

# DeepSpeed's pipeline instructions (deepspeed.runtime.pipe.schedule) → phase
INSTRUCTION_PHASE = {
    "ForwardPass": "forward",
    "BackwardPass": "backward",
    "BackwardWeightPass": "backward_weight",  # zb-h1's W pass (cluster/zero_bubble.py)
    "LoadMicroBatch": "data_wait",
    "SendActivation": "send",
    "SendGrad": "send",
    "RecvActivation": "recv",
    "RecvGrad": "recv",
    "WaitSends": "send",  # zb-h1: the step's asynchronous sends complete
    "ReduceGrads": "optimizer",
    "ReduceTiedGrads": "optimizer",
    "OptimizerStep": "optimizer",
}


@dataclass
class StepStats:
    """One optimizer step as one rank saw it."""

    step: int
    epoch: int
    loss: float
    lr: float
    images: int  # images in this optimizer step, whole job
    seconds: float
    phases: dict[str, float]
    bubble: float  # this rank's idle share of the pipeline schedule (excluding the optimizer step)
    theoretical_bubble: float
    total_steps: Optional[int] = None  # the run's planned steps
    skip_counts: dict[str, int] = field(default_factory=dict)  # data samples skipped this epoch, by kind


def step_stats(step: int, epoch: int, loss: float, lr: float, images: int, seconds: float,
               phases: dict[str, float], theoretical_bubble: float, **extra) -> StepStats:
    """Fill in the idle phase and the bubble from the timed phases of one step."""
    pipe_time = seconds - phases.get("optimizer", 0.0)
    busy = sum(phases.get(p, 0.0) for p in COMPUTE_PHASES)
    phases = {**phases, "idle": max(0.0, pipe_time - busy)}
    bubble = phases["idle"] / pipe_time if pipe_time > 0 else 0.0
    return StepStats(step, epoch, loss, lr, images, seconds, phases, bubble, theoretical_bubble, **extra)


@dataclass(frozen=True)
class InstructionEvent:
    """One executed pipeline instruction: perf_counter seconds (one clock for every process of a machine)."""

    name: str  # DeepSpeed's (or zb-h1's) instruction class
    phase: str
    start: float
    end: float
    buffer_id: Optional[int] = None


class InstructionTimer:
    """Wraps the engine's instruction table (an instance copy; DeepSpeed's class stays untouched).
    `before` runs extra work ahead of an instruction, timed under its own phase: name → (fn, phase).
    The instructions of the last step `take()` closed are kept in `last_step` (the measured timeline)."""

    def __init__(self, engine, before: Optional[dict[str, tuple[Callable[[], None], str]]] = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.events: list[InstructionEvent] = []
        self.last_step: list[InstructionEvent] = []
        table = dict(type(engine)._INSTRUCTION_MAP)
        for cmd_type, fn in list(table.items()):
            timed = self._timed(fn, INSTRUCTION_PHASE.get(cmd_type.__name__, "other"), cmd_type.__name__)
            if before and cmd_type.__name__ in before:
                timed = self._preceded(timed, *before[cmd_type.__name__])
            table[cmd_type] = timed
        engine._INSTRUCTION_MAP = table

    def _preceded(self, run: Callable, extra: Callable[[], None], phase: str) -> Callable:
        def both(engine, **kwargs):
            t0 = time.perf_counter()
            try:
                extra()
            finally:
                self.seconds[phase] += time.perf_counter() - t0
            return run(engine, **kwargs)

        return both

    def _timed(self, fn: Callable, phase: str, name: str) -> Callable:
        def run(engine, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(engine, **kwargs)
            finally:
                t1 = time.perf_counter()
                self.seconds[phase] += t1 - t0
                self.events.append(InstructionEvent(name, phase, t0, t1, kwargs.get("buffer_id")))

        return run

    def take(self) -> dict[str, float]:
        """The phase seconds since the last call; the instructions since then become `last_step`."""
        out = dict(self.seconds)
        self.seconds.clear()
        self.last_step, self.events = self.events, []
        return out
