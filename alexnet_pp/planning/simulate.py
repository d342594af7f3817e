"""One optimizer step of a pipeline schedule, simulated event by event.

Each stage runs its own list of operations in order, as a rank of the engine does. An operation
starts when its stage is free and its input is there:

- `F` (forward) of micro-batch m on stage s needs F(m) of stage s − 1, plus the activation's transfer;
- `B` (input gradient) / `BW` (whole backward) of m needs the backward of m on stage s + 1, plus the
  gradient's transfer; on the last stage it needs only its own F(m);
- `W` (weight gradient) of m needs this stage's B(m).

Two communication models:

- `blocking` (the `1f1b` default): DeepSpeed's TrainSchedule instruction stream, with its sends and
  receives where DeepSpeed issues them (an activation is sent at the start of the *next* step, after
  the stage has received the gradient it waits for). A send and its receive are a rendezvous — both
  block until the peer has reached the matching instruction, then take the transfer time, as gloo's
  and NCCL's blocking send/recv do. Time spent blocked shows as `send` / `recv` events, the way the
  engine's instruction timer sees it.
- `async`: transfers overlap compute (isend/irecv posted ahead): the consumer may start at the
  producer's end plus the transfer time. `zb-h1` and `gpipe` use it; `1f1b` can, for the textbook
  schedule.

Stages that share a CPU's cores slow each other down: with `rate`, every computing stage runs at
rate(k) of its full speed while k stages compute (a stage blocked on a transfer does not count),
so all stages are simulated on one clock and a compute's end moves whenever k changes.

The optimizer step and the gradient all-reduce after the last backward are a per-stage `tail`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

SCHEDULES = ("1f1b", "zb-h1", "gpipe")
COMPUTE = ("F", "B", "W", "BW")


@dataclass(frozen=True)
class StageCost:
    """Seconds of one micro-batch's forward, input-gradient and weight-gradient work on one stage."""

    forward: float
    backward_input: float
    backward_weight: float = 0.0
    # of the forward and the backward (its input-gradient part), seconds the stage's ranks wait for
    # their peers inside the pass (the towers' collectives): no core's work, so with `solo` (simulate)
    # the other ranks' computes take the cores meanwhile
    forward_wait: float = 0.0
    backward_wait: float = 0.0

    @property
    def backward(self) -> float:
        return self.backward_input + self.backward_weight

    @property
    def with_waits(self) -> float:
        """Seconds from one micro-batch's forward start to its backward end, the waits inside included."""
        return self.forward + self.forward_wait + self.backward + self.backward_wait


@dataclass(frozen=True)
class Event:
    start: float
    end: float
    kind: str  # F, B, W, BW (B and W in one), send, recv
    micro_batch: int

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Timeline:
    schedule: str
    comm: str
    micro_batches: int
    stages: list[list[Event]]
    tail: list[float] = field(default_factory=list)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage_end(self, stage: int) -> float:
        return max((e.end for e in self.stages[stage]), default=0.0)

    @property
    def makespan(self) -> float:
        """Seconds from the first forward to the last backward or transfer of any stage."""
        return max(self.stage_end(s) for s in range(self.num_stages))

    @property
    def step_time(self) -> float:
        """The optimizer step's wall time: every stage's schedule, then its tail (all-reduce and
        optimizer), and the step ends when the slowest stage ends (the engine syncs on the loss)."""
        tail = self.tail or [0.0] * self.num_stages
        return max(self.stage_end(s) + tail[s] for s in range(self.num_stages))

    def seconds(self, stage: int, kinds: Sequence[str]) -> float:
        return sum(e.seconds for e in self.stages[stage] if e.kind in kinds)

    def busy(self, stage: int) -> float:
        return self.seconds(stage, COMPUTE)

    def idle(self, stage: int) -> float:
        return self.makespan - self.busy(stage)

    def bubble(self, stage: int) -> float:
        """The stage's idle share of the schedule (the engine's definition: time not computing,
        blocked transfers included, over the schedule without the optimizer step)."""
        span = self.makespan
        return self.idle(stage) / span if span > 0 else 0.0

    def bubbles(self) -> list[float]:
        return [self.bubble(s) for s in range(self.num_stages)]

    def peak_in_flight(self, stage: int) -> int:
        """Most micro-batches whose activations this stage holds at once: forwards done whose
        backward (its weight part, where split) is not."""
        held = peak = 0
        for e in self.stages[stage]:
            if e.kind == "F":
                held += 1
                peak = max(peak, held)
            elif e.kind in ("BW", "W"):
                held -= 1
        return peak


# --- per-stage operation orders -------------------------------------------------------------------

def _ds_step_to_micro_batch(step: int, stage: int, stages: int) -> tuple[int, bool]:
    """DeepSpeed TrainSchedule._step_to_micro_batch: (micro-batch, is_forward) of a step."""
    even_step, even_stage = step % 2 == 0, stage % 2 == 0
    if even_step and even_stage:
        return step // 2 - stage // 2, True
    if not even_step and not even_stage:
        return (step - 1) // 2 - stage // 2, True
    if even_step and not even_stage:
        return step // 2 - stages + (stage + 1) // 2, False
    return (step - 1) // 2 - stages + 1 + stage // 2, False


def deepspeed_1f1b_order(stages: int, micro_batches: int, stage: int) -> list[tuple[str, int]]:
    """The instructions DeepSpeed's TrainSchedule gives `stage`, as (kind, micro-batch): kinds F, BW,
    sendA, recvA (activations), sendG, recvG (gradients). Loads and the optimizer step are left out."""
    ops: list[tuple[str, int]] = []
    valid = lambda m: 0 <= m < micro_batches  # noqa: E731
    first, last = stage == 0, stage == stages - 1
    prev = -1
    for step in range(2 * (micro_batches + stages - 1)):
        mb, forward = _ds_step_to_micro_batch(step, stage, stages)
        if forward:
            if valid(prev) and not first:
                ops.append(("sendG", prev))
            if valid(mb) and not first:
                ops.append(("recvA", mb))
        else:
            if valid(mb) and not last:
                ops.append(("recvG", mb))
            if valid(prev) and not last:
                ops.append(("sendA", prev))
        if valid(mb):
            ops.append(("F" if forward else "BW", mb))
        prev = mb
    return ops


def zb_h1_order(stages: int, micro_batches: int, stage: int) -> list[tuple[str, int]]:
    """ZB-H1 (Qi et al. 2024), as torch.distributed.pipelining builds it for one stage per rank:
    1F1B's warm-up and order of F and B, and each stage s runs its first s steady-state steps
    without W, so the deferred weight gradients fill the cool-down's idle slots; every stage then
    holds at most P micro-batches' state, the peak of 1F1B's first stage. A W that directly follows
    its own micro-batch's B runs with it as one backward pass (BW), as in 1F1B: the first stage never
    delays a W, so it keeps no layer inputs and output gradients for later."""
    warm = min(stages - stage - 1, micro_batches)
    ops: list[tuple[str, int]] = [("F", m) for m in range(warm)]
    fwd, bwd, wgt = warm, 0, 0
    for k in range(micro_batches):  # steady (F, B[, W]) then cool-down (B[, W])
        if fwd < micro_batches:
            ops.append(("F", fwd))
            fwd += 1
        if bwd < micro_batches:
            ops.append(("B", bwd))
            bwd += 1
        if k >= stage and wgt < bwd:
            ops.append(("W", wgt))
            wgt += 1
    ops += [("W", m) for m in range(wgt, micro_batches)]
    fused: list[tuple[str, int]] = []
    for kind, m in ops:
        if kind == "W" and fused and fused[-1] == ("B", m):
            fused[-1] = ("BW", m)
        else:
            fused.append((kind, m))
    return fused


def gpipe_order(stages: int, micro_batches: int, stage: int) -> list[tuple[str, int]]:
    """All forwards, then all backwards: every stage holds all M micro-batches' activations."""
    return [("F", m) for m in range(micro_batches)] + [("BW", m) for m in range(micro_batches)]


def compute_order(schedule: str, stages: int, micro_batches: int, stage: int) -> list[tuple[str, int]]:
    if schedule == "1f1b":
        return [op for op in deepspeed_1f1b_order(stages, micro_batches, stage) if op[0] in COMPUTE]
    if schedule == "zb-h1":
        return zb_h1_order(stages, micro_batches, stage)
    if schedule == "gpipe":
        return gpipe_order(stages, micro_batches, stage)
    raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


# --- simulation ---------------------------------------------------------------------------------

P2P = Union[float, Sequence[Union[float, tuple[float, float]]]]
Rate = Callable[[int], float]  # k stages computing at once → the speed of each (1: full speed)
Solo = Callable[[int], Optional[float]]  # k stages computing → a rank's speed alone on a core, None: no one to take it


def _per_cut(p2p_seconds: P2P, cuts: int) -> list[tuple[float, float]]:
    """(activation seconds, gradient seconds) of each cut between stage c and c + 1."""
    if isinstance(p2p_seconds, (int, float)):
        return [(float(p2p_seconds), float(p2p_seconds))] * cuts
    out = [(float(x), float(x)) if isinstance(x, (int, float)) else (float(x[0]), float(x[1])) for x in p2p_seconds]
    if len(out) != cuts:
        raise ValueError(f"{len(out)} transfer times for {cuts} cuts between stages")
    return out


def _cost(c: StageCost, kind: str) -> float:
    return {"F": c.forward, "B": c.backward_input, "W": c.backward_weight, "BW": c.backward}[kind]


def _wait(c: StageCost, kind: str) -> float:
    return {"F": c.forward_wait, "B": c.backward_wait, "W": 0.0, "BW": c.backward_wait}[kind]


def _end(op: list) -> float:
    """When a running operation ends: its work done at the current speed, and not before its floor."""
    return max(op[3], op[4])


def simulate(schedule: str, stage_costs: Sequence[StageCost], micro_batches: int, p2p_seconds: P2P = 0.0,
             tail_seconds: Optional[Sequence[float]] = None, comm: Optional[str] = None,
             rate: Optional[Rate] = None, solo: Optional[Solo] = None) -> Timeline:
    """Simulate one optimizer step. `p2p_seconds`: one transfer time for every cut and direction,
    or per cut a time or an (activation, gradient) pair. `comm`: blocking | async (default blocking
    for 1f1b, async otherwise). `rate`: the speed of each computing stage while k stages compute at
    once (stages sharing cores); None: every stage computes at full speed on its own device.
    `solo`: while k stages compute, the speed of one rank alone on a core where their ranks
    outnumber the cores (else None). A waiting rank then leaves its core to a rank that had none, so
    a pass that starts among k such stages takes the longer of its work at the shared speed and its
    work alone plus its waits; otherwise a pass's waits stretch with its work."""
    costs = [c if isinstance(c, StageCost) else StageCost(*c) for c in stage_costs]
    stages = len(costs)
    if stages < 1 or micro_batches < 1:
        raise ValueError("need at least one stage and one micro-batch")
    comm = comm or ("blocking" if schedule == "1f1b" else "async")
    cuts = _per_cut(p2p_seconds, stages - 1)
    if comm == "blocking":
        if schedule != "1f1b":
            raise ValueError("blocking transfers are modelled for DeepSpeed's 1f1b stream only")
        orders = [deepspeed_1f1b_order(stages, micro_batches, s) for s in range(stages)]
    elif comm == "async":
        orders = [compute_order(schedule, stages, micro_batches, s) for s in range(stages)]
    else:
        raise ValueError(f"comm={comm!r}: use blocking or async")
    timeline = Timeline(schedule, comm, micro_batches, _run(orders, costs, cuts, comm, rate, solo))
    timeline.tail = list(tail_seconds) if tail_seconds is not None else [0.0] * stages
    if len(timeline.tail) != stages:
        raise ValueError(f"{len(timeline.tail)} tail times for {stages} stages")
    return timeline


_MATCH = {"sendA": ("recvA", 1), "recvA": ("sendA", -1), "sendG": ("recvG", -1), "recvG": ("sendG", 1)}


def _run(orders: list[list[tuple[str, int]]], costs: list[StageCost], cuts: list[tuple[float, float]],
         comm: str, rate: Optional[Rate], solo: Optional[Solo] = None) -> list[list[Event]]:
    """Every stage's operations on one clock. At each instant: start what can start (a compute whose
    input is there; with blocking transfers, a send and its receive once both ranks reach them), then
    advance to the next end — of a compute, a transfer or, async, an input's arrival. Computes
    progress at rate(k) while k stages compute, so their ends move when k changes."""
    stages = len(orders)
    pos = [0] * stages
    free_since = [0.0] * stages  # when the stage finished its last operation
    # [kind, micro-batch, start, end of its work at the current speed, floor of its end]: it ends at
    # the later of the two (_end); a transfer's two are the same
    running: list[Optional[list]] = [None] * stages
    done: dict[tuple[str, int, int], float] = {}
    events: list[list[Event]] = [[] for _ in range(stages)]
    now, speed = 0.0, 1.0

    def arrival(s: int, kind: str, mb: int) -> Optional[float]:
        """Async: when the input of (kind, mb) is on stage s; None while its producer has not run."""
        if kind == "F":
            if s == 0:
                return 0.0
            t = done.get(("F", s - 1, mb))
            return None if t is None else t + cuts[s - 1][0]
        if kind in ("B", "BW"):
            if s == stages - 1:
                return done.get(("F", s, mb))
            t = done.get(("B", s + 1, mb), done.get(("BW", s + 1, mb)))
            return None if t is None else t + cuts[s][1]
        return done.get(("B", s, mb))  # W

    def next_op(s: int) -> Optional[tuple[str, int]]:
        return orders[s][pos[s]] if pos[s] < len(orders[s]) and running[s] is None else None

    remaining = sum(len(o) for o in orders)
    while remaining:
        arrivals = []
        started = True
        while started:
            started = False
            for s in range(stages):
                op = next_op(s)
                if op is None:
                    continue
                kind, mb = op
                if kind in COMPUTE:
                    if comm == "async":
                        t = arrival(s, kind, mb)
                        if t is None:
                            continue
                        if t > now:
                            arrivals.append(t)
                            continue
                    work, wait = _cost(costs[s], kind), _wait(costs[s], kind)
                    alone = solo(1 + sum(r is not None and r[0] in COMPUTE for r in running)) if solo else None
                    if alone is None:
                        work, wait = work + wait, 0.0
                        floor = now
                    else:
                        floor = now + work / alone + wait
                    running[s] = [kind, mb, now, now + work / speed, floor]
                    started = True
                    continue
                other_kind, step = _MATCH[kind]
                peer = s + step
                if next_op(peer) != (other_kind, mb):
                    continue  # the peer has not reached the matching instruction yet
                cut = min(s, peer)
                end = now + (cuts[cut][0] if kind in ("sendA", "recvA") else cuts[cut][1])
                running[s], running[peer] = [kind, mb, now, end, end], [other_kind, mb, now, end, end]
                started = True
        computing = [s for s in range(stages) if running[s] is not None and running[s][0] in COMPUTE]
        new_speed = rate(len(computing)) if rate is not None and computing else 1.0
        if new_speed != speed:  # the computes in progress finish their remaining work at the new speed
            for s in computing:
                r = running[s]
                if r[3] > now:
                    r[3] = now + (r[3] - now) * speed / new_speed
            speed = new_speed
        ends = [_end(r) for r in running if r is not None] + arrivals
        if not ends:
            raise RuntimeError("schedule deadlocks: an operation waits for one that never runs")
        now = min(ends)
        for s in range(stages):
            r = running[s]
            if r is None or _end(r) > now:
                continue
            kind, mb, start, end = r[0], r[1], r[2], _end(r)
            if kind in COMPUTE:
                events[s].append(Event(start, end, kind, mb))
                done[(kind, s, mb)] = end
            else:  # a blocked transfer shows from when the rank reached the instruction
                events[s].append(Event(free_since[s], end, "send" if kind.startswith("send") else "recv", mb))
            free_since[s] = end
            running[s] = None
            pos[s] += 1
            remaining -= 1
    return events
