"""Where a rank's step time goes: every pipeline instruction timed under one of `PHASES`.

The phase list is the one the metrics (cluster/metrics.py), the run summary and the dashboard use.
`InstructionTimer` wraps DeepSpeed's instruction table on one engine instance (the class stays
untouched); `step_stats` turns one step's phase seconds into the bubble: the share of the pipeline
schedule (the step minus its optimizer work) this rank spent neither computing nor loading data.
"""

from __future__ import annotations

import resource
import sys
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
    peak_memory: int = 0  # bytes: this rank's peak so far (peak_memory_bytes)
    # CPU seconds of this step: the thread that runs the schedule ("main_thread") and the whole process
    # ("process": with communication, data and runtime threads); against `seconds`, how much of a core it got
    cpu: dict[str, float] = field(default_factory=dict)
    # the schedule thread's CPU seconds inside each phase: against `phases`, the work a phase cost apart
    # from the time it waited for a core (a CPU whose cores the ranks share) or for a peer
    phase_cpu: dict[str, float] = field(default_factory=dict)


def step_stats(step: int, epoch: int, loss: float, lr: float, images: int, seconds: float,
               phases: dict[str, float], theoretical_bubble: float, **extra) -> StepStats:
    """Fill in the idle phase and the bubble from the timed phases of one step."""
    pipe_time = seconds - phases.get("optimizer", 0.0)
    busy = sum(phases.get(p, 0.0) for p in COMPUTE_PHASES)
    phases = {**phases, "idle": max(0.0, pipe_time - busy)}
    bubble = phases["idle"] / pipe_time if pipe_time > 0 else 0.0
    extra.setdefault("peak_memory", peak_memory_bytes())
    return StepStats(step, epoch, loss, lr, images, seconds, phases, bubble, theoretical_bubble, **extra)


@dataclass(frozen=True)
class InstructionEvent:
    """One executed pipeline instruction: perf_counter seconds (one clock for every process of a machine)."""

    name: str  # DeepSpeed's (or zb-h1's) instruction class
    phase: str
    start: float
    end: float
    buffer_id: Optional[int] = None


@dataclass(frozen=True)
class InFlight:
    """The pipeline instruction a rank is executing: its name, arguments, step and start time."""

    name: str
    kwargs: dict
    step: Optional[int]
    started: float  # time.monotonic()

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in sorted(self.kwargs.items()))
        where = f"step {self.step}" if self.step is not None else "evaluation"
        return f"pipeline instruction {self.name}({args}) of {where}"


def reset_peak_memory() -> None:
    """Start `peak_memory_bytes` afresh (on Linux without CUDA: the resident set's high-water mark,
    through /proc/self/clear_refs), so a schedule's peak is its own, not the set-up's."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_bytes() -> int:
    """This process's peak memory since reset_peak_memory (or its start): the CUDA memory it allocated on
    its device when it uses a GPU, else its peak resident set (Linux: VmHWM; elsewhere getrusage's
    ru_maxrss, KiB on Linux, bytes on macOS)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class InstructionTimer:
    """Wraps the engine's instruction table (an instance copy; DeepSpeed's class stays untouched).
    `before` runs extra work ahead of an instruction, timed under its own phase: name → (fn, phase).
    The instructions of the last step `take()` closed are kept in `last_step` (the measured timeline),
    and the calling thread's CPU seconds per phase in `last_cpu`.

    It also knows where the rank is: `in_flight` is the instruction running now (None between
    instructions), `failed_in` the one that raised last; the engine sets `step` (the optimizer step
    being run, None during evaluation) so both can name it (cluster/faults.py reports them)."""

    def __init__(self, engine, before: Optional[dict[str, tuple[Callable[[], None], str]]] = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.last_cpu: dict[str, float] = {}
        self.step: Optional[int] = None
        self.in_flight: Optional[InFlight] = None
        self.failed_in: Optional[InFlight] = None
        self.events: list[InstructionEvent] = []
        self.last_step: list[InstructionEvent] = []
        table = dict(type(engine)._INSTRUCTION_MAP)
        for cmd_type, fn in list(table.items()):
            timed = self._timed(fn, INSTRUCTION_PHASE.get(cmd_type.__name__, "other"), cmd_type.__name__)
            if before and cmd_type.__name__ in before:
                timed = self._preceded(timed, *before[cmd_type.__name__])
            table[cmd_type] = self._tracked(timed, cmd_type.__name__)
        engine._INSTRUCTION_MAP = table

    def _tracked(self, run: Callable, name: str) -> Callable:
        def tracked(engine, **kwargs):
            self.in_flight = InFlight(name, dict(kwargs), self.step, time.monotonic())
            try:
                return run(engine, **kwargs)
            except BaseException:
                self.failed_in = self.in_flight
                raise
            finally:
                self.in_flight = None

        return tracked

    def _preceded(self, run: Callable, extra: Callable[[], None], phase: str) -> Callable:
        def both(engine, **kwargs):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                extra()
            finally:
                self.seconds[phase] += time.perf_counter() - t0
                self.cpu[phase] += time.thread_time() - c0
            return run(engine, **kwargs)

        return both

    def _timed(self, fn: Callable, phase: str, name: str) -> Callable:
        def run(engine, **kwargs):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(engine, **kwargs)
            finally:
                t1 = time.perf_counter()
                self.seconds[phase] += t1 - t0
                self.cpu[phase] += time.thread_time() - c0
                self.events.append(InstructionEvent(name, phase, t0, t1, kwargs.get("buffer_id")))

        return run

    def take(self) -> dict[str, float]:
        """The phase seconds since the last call; the instructions since then become `last_step`, and
        the CPU seconds per phase `last_cpu`."""
        out = dict(self.seconds)
        self.seconds.clear()
        self.last_cpu = dict(self.cpu)
        self.cpu.clear()
        self.last_step, self.events = self.events, []
        return out
