"""The measured pipeline cut, corrected by the engine's own stage times before training starts.

`parallel.partition: measured` first cuts where unit timings balance (alexnet_pp/pipeline.py:
`measure_layer_costs`, rank 0 timing one unit at a time while the other ranks wait). A running
pipeline is not that: its P·T·D workers share the cores and the memory bus (fc6 and fc7, memory-bound
at small micro-batches, slow down more than the convolutions), DeepSpeed copies every stage's inputs,
and at P = 2 one unit more or less on a stage was a 5–15% imbalance, so a noisy unit timing that moved
the cut by one unit moved the bubble by 10 points (600 vs 682 ms per micro-batch on two stages). Cuts
may now fall inside a tower half (alexnet_pp/pipeline.py), so the unit timings' own error decides.

So the first cut is checked on the engine itself: before the first step it runs its training
schedule on synthetic micro-batches without the instructions that reduce gradients and step the
optimizer (`WithoutOptimizerStep`; weights, momentum, LR schedule and DeepSpeed's step counters stay
untouched, the gradients are dropped), once to warm up and then timed, as many passes as give every
rank at least 8 micro-batches to time. Each pass starts as a step does, with no gradients (the
first micro-batch's gradients are assigned, the others added), and ends with the weight gradients
1F1B defers to the step's end (`parallel.defer_weight_grads`: one product per FC layer, spread over
the pass's micro-batches), so the check times what a training step computes. Each rank's live cost
per micro-batch is the median over micro-batches and passes of its forward + backward (+ W)
instruction seconds; a stage's is the median over its ranks. `recut` scales each stage's unit costs
to its live cost and balances again; the engine is rebuilt on the new cut when that promises a
slowest stage at least `min_gain` shorter, and checked the same way, at most `rounds` times, keeping
the best balanced cut seen. Every rank computes the same cut from the same gathered numbers.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from alexnet_pp.config import ModelConfig
from alexnet_pp.dropout import batch_keys
from alexnet_pp.pipeline import Partition, partition

COMPUTE = ("ForwardPass", "BackwardPass", "BackwardWeightPass")
OPTIMIZER_STEP = ("ReduceTiedGrads", "ReduceGrads", "OptimizerStep")


class WithoutOptimizerStep:
    """A training schedule (`schedule`) minus its gradient reduction and optimizer step; what the
    engine's `_exec_schedule` needs of a PipeSchedule."""

    def __init__(self, schedule) -> None:
        self.schedule = schedule

    def num_pipe_buffers(self) -> int:
        return self.schedule.num_pipe_buffers()

    def __iter__(self):
        for cmds in self.schedule:
            yield [c for c in cmds if type(c).__name__ not in OPTIMIZER_STEP]


def recut(cfg: ModelConfig, costs: list[float], cut: Partition, live: list[float], tp: int,
          min_gain: float = 0.015) -> Partition:
    """The cut balancing the unit costs scaled, per stage, to the stages' live costs (a unit split
    between two stages by each stage's factor for its share); `cut` itself unless the new cut's
    slowest stage is predicted at least `min_gain` shorter than the live one."""
    planned = cut.stage_costs(cfg, costs, tp)
    scaled = [0.0] * len(costs)
    for s, held in enumerate(cut.shares(cfg, tp)):
        for i, share in held:
            scaled[i] += costs[i] * share * (live[s] / planned[s] if planned[s] > 0 else 1.0)
    new = partition(cfg, len(live), "measured", scaled, tp=tp)
    if new != cut and max(new.stage_costs(cfg, scaled, tp)) < (1 - min_gain) * max(live):
        return new
    return cut


def micro_batch_costs(events: Iterable[dict], micro_batches: int) -> list[float]:
    """Per micro-batch, the seconds of its compute instructions (the k-th ForwardPass, BackwardPass
    and BackwardWeightPass belong to micro-batch k in every schedule here)."""
    per_kind: dict[str, list[float]] = {k: [] for k in COMPUTE}
    for e in events:
        if e["name"] in per_kind:
            per_kind[e["name"]].append(e["end"] - e["start"])
    out = [0.0] * micro_batches
    for seconds in per_kind.values():
        for k, t in enumerate(seconds[:micro_batches]):
            out[k] += t
    return out


def pass_costs(events: Iterable[dict], micro_batches: int, step_end_seconds: float = 0.0) -> list[float]:
    """Per micro-batch, the seconds of one pass: its compute instructions plus an equal share of the
    work the step does once at its end for all of them (1F1B's deferred weight gradients)."""
    return [t + step_end_seconds / micro_batches for t in micro_batch_costs(events, micro_batches)]


def timed_passes(micro_batches: int, least_samples: int = 8) -> int:
    """Timed passes of the live check: at least two, and at least `least_samples` micro-batches."""
    return max(2, math.ceil(least_samples / micro_batches))


def synthetic_micro_batches(cfg: ModelConfig, micro_batch: int, seed: int):
    """What a first stage's `train_batch` reads, ((images, labels, dropout keys), labels), made up."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(micro_batch, 3, cfg.image_size, cfg.image_size, generator=g)
    y = torch.randint(0, cfg.num_classes, (micro_batch,), generator=g)
    return itertools.repeat(((x, y, batch_keys(seed, 0, 0, micro_batch)), y))


def _drop_grads(engine, module) -> None:
    engine.optimizer.zero_grad(set_to_none=True)  # DeepSpeed's bf16/fp16/ZeRO wrappers keep their own copies
    for p in module.parameters():
        p.grad = None


def live_costs(engine, timer, module, cfg: ModelConfig, micro_batch: int, stage: int, stages: int,
               seed: int, step_end: Optional[Callable[[], None]] = None) -> list[float]:
    """Seconds per micro-batch of every stage, measured on the running engine (module docstring).
    `step_end`: the work a training step does after its schedule's last backward pass and before
    it reduces gradients (1F1B's deferred weight gradients), timed with each pass."""
    engine.set_dataiterator(synthetic_micro_batches(cfg, micro_batch, seed))
    engine.module.train()  # what train_batch sets up before its schedule
    engine.total_loss = engine.total_additional_losses = None
    engine._compute_loss = True
    samples: list[float] = []
    timer.take()
    for i in range(timed_passes(engine.micro_batches) + 1):
        _drop_grads(engine, module)
        engine._exec_schedule(WithoutOptimizerStep(engine._train_schedule()))
        start = time.perf_counter()
        if step_end is not None:
            step_end()
        ended = time.perf_counter() - start
        timer.take()
        if i > 0:  # the first pass allocates, exchanges shapes and faults pages in
            samples += pass_costs([{"name": e.name, "start": e.start, "end": e.end} for e in timer.last_step],
                                  engine.micro_batches, ended)
    _drop_grads(engine, module)
    engine.set_dataiterator(None)
    engine.total_loss = engine.total_additional_losses = None
    mine = statistics.median(samples)
    gathered: list[Optional[tuple[int, float]]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (stage, mine))
    return [statistics.median(t for s, t in gathered if s == k) for k in range(stages)]


def settle_cut(cfg: ModelConfig, costs: list[float], cut: Partition, tp: int,
               measure: Callable[[], list[float]], rebuild: Callable[[Partition], None],
               rounds: int = 2, min_gain: float = 0.015) -> tuple[Partition, dict[Partition, list[float]]]:
    """Measure the engine on `cut`, re-cut and `rebuild` while a new cut promises `min_gain`, at
    most `rounds` times; end on the best balanced cut tried: the least slowest stage relative to the
    mean of its stages, since a shared machine's speed drifts between the cuts' timings and would
    make an absolute comparison pick the cut timed in the faster moment. Returns it and the live
    stage costs of every cut tried."""
    tried: dict[Partition, list[float]] = {}
    current = cut
    for _ in range(rounds + 1):
        tried[current] = measure()
        proposal = recut(cfg, costs, current, tried[current], tp, min_gain)
        if proposal == current or proposal in tried or len(tried) > rounds:
            break
        rebuild(proposal)
        current = proposal
    best = min(tried, key=lambda c: max(tried[c]) * len(tried[c]) / sum(tried[c]))
    if best != current:
        rebuild(best)
    return best, tried
