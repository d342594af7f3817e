"""Predicted step time, traffic and memory of one layout (P, T, D, M) from a device profile.

Per stage: its units' F, B, W at the layout's micro-batch (T = 2: each tower rank does half of a
layer's work, fc8 whole, plus the tower all-gathers and gradient all-reduces of the cross-tower
layers); per cut: the activation and gradient transfers; then the schedule is simulated
(simulate.py) and each stage ends with its gradient all-reduce over the D replicas and its
optimizer step. Ranks that must meet — the two towers at each cross-tower collective, the replicas
at the all-reduce — also wait for the slowest of them, by the profile's measured jitter (sync_wait).
Where the workers outnumber a CPU's cores, a waiting rank leaves its core to the others
(solo_rate): the towers' collectives then lengthen a pass only past its shared work, and the
replicas' meeting at the all-reduce costs nothing past the shared work of the slowest.
Bytes come from the network's shapes and parameter counts (model.py, pipeline.py).
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import astuple, dataclass, field
from typing import Callable, Optional, Sequence

import torch

from alexnet_pp.config import ModelConfig, RunConfig
from alexnet_pp.model import CROSS_TOWER
from alexnet_pp.shapes import LAYER_NAMES, layer_output_shapes
from alexnet_pp.pipeline import (SPLITTABLE, Partition, Unit, partition, pipeline_units, split_widths, stage_plan,
                                 unit_names, unit_param_counts)
from alexnet_pp.planning.profile import DeviceProfile, Link, oversubscribed
from alexnet_pp.planning.simulate import StageCost, Timeline, simulate

LABEL_BYTES = 8  # int64 label per image, sent beside the activations (cluster/stage_layers.py)
SHARDED = ("conv3", "fc6", "fc7")  # cross-tower layers whose backward all-reduces the input gradient


@dataclass(frozen=True)
class Candidate:
    pp: int
    tp: int
    dp: int
    micro_batches: int
    batch: int  # global images per optimizer step
    schedule: str = "1f1b"
    partition: str = "measured"  # as parallel.partition: measured | flops | uniform | parameters | cut points

    @property
    def workers(self) -> int:
        return self.pp * self.tp * self.dp

    @property
    def micro_batch(self) -> int:
        return self.batch // (self.dp * self.micro_batches)

    def label(self) -> str:
        return f"{self.pp}×{self.tp}×{self.dp}"

    @classmethod
    def of(cls, run: RunConfig, schedule: Optional[str] = None) -> "Candidate":
        """The layout a run configuration trains with, its `parallel.schedule` included, to print a
        prediction beside its measurement."""
        p = run.parallel
        return cls(p.pp, p.tp, p.dp, p.micro_batches, run.train.batch_size, schedule or p.schedule, p.partition)

    def check(self, cfg: ModelConfig) -> None:
        if self.tp not in (1, 2):
            raise ValueError(f"T={self.tp}: a stage holds both towers (1) or one tower per worker (2)")
        if min(self.pp, self.dp, self.micro_batches) < 1:
            raise ValueError("P, D and M must be ≥ 1")
        if self.batch % (self.dp * self.micro_batches):
            raise ValueError(f"batch {self.batch} is not divisible by D·M = {self.dp * self.micro_batches}")
        if self.pp > len(unit_names(self.tp)):
            raise ValueError(f"P={self.pp} exceeds the {len(unit_names(self.tp))} pipeline units at T={self.tp}")


@dataclass
class StagePrediction:
    stage: int
    units: list[str]
    params: int  # per worker of this stage
    # seconds per step: forward, backward, send, recv, idle; allreduce (the collective over replicas);
    # optimizer (the step and the gradient sweeps around the all-reduce, as the engine times it)
    phases: dict[str, float]
    bubble: float
    in_flight: int  # peak micro-batches whose activations the stage holds
    memory: dict[str, int]  # bytes per worker: parameters, gradients, optimizer, activations, total
    # CPU seconds per step the model charges the stage's units, forward and backward, per rank: the
    # calibrated unit times at the share of a core they were measured with, times the layout's
    # time-slicing slowdown (0 where every worker has a device); against a run's phase CPU, the
    # model's error in work, apart from its error in how the cores are shared
    cpu: dict[str, float] = field(default_factory=dict)


@dataclass
class Prediction:
    layout: Candidate
    cut: Partition  # the stage cut predicted (the engine's, for a measured partition)
    step_seconds: float
    images_per_s: float
    stages: list[StagePrediction]
    bytes_per_step: dict[str, int]  # whole job: between stages, between towers, between replicas
    memory_per_worker: int  # the largest stage's
    fits: bool
    profile: str
    timeline: Timeline = field(repr=False)
    extrapolated: bool = False  # the micro-batch lies outside the sizes the profile was measured at

    @property
    def bounds(self) -> tuple[int, ...]:
        return self.cut.bounds

    @property
    def bubble(self) -> float:
        return max(s.bubble for s in self.stages)


# --- shapes and bytes -----------------------------------------------------------------------------

def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def layer_io_elements(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(input, output) elements per image of each layer, both towers."""
    shapes = layer_output_shapes(cfg)
    out, prev = {}, 3 * cfg.image_size**2
    for name in LAYER_NAMES:
        o = _numel(shapes[name])
        out[name] = (prev, o)
        prev = o
    return out


def cut_elements(cfg: ModelConfig, tp: int) -> list[int]:
    """Elements per image one worker sends after each unit: a whole layer's output; after tower
    half 0, the layer's input and that half's output (TowerPiece); at T = 2 the worker's tower half."""
    io = layer_io_elements(cfg)
    out = []
    for u in pipeline_units(tp):
        i, o = io[u.layer]
        if tp == 2:
            out.append(o if u.layer == "fc8" else o // 2)
        elif u.tower == 0:
            out.append(i + o // 2)
        else:
            out.append(o)
    return out


def worker_param_counts(cfg: ModelConfig, tp: int) -> list[int]:
    """Parameters one worker holds of each unit (T = 2: its tower's half; fc8 on both towers)."""
    counts = unit_param_counts(cfg, tp)
    if tp == 1:
        return counts
    return [c if u.layer == "fc8" else c // 2 for u, c in zip(pipeline_units(tp), counts)]


@functools.lru_cache(maxsize=16)
def _saved_bytes(width: float, image_size: int, num_classes: int, lrn_order: str) -> tuple[int, ...]:
    from alexnet_pp.model import AlexNet
    from alexnet_pp.pipeline import pipeline_modules

    cfg = ModelConfig(width=width, image_size=image_size, num_classes=num_classes, lrn_order=lrn_order)
    model = AlexNet(cfg).train()
    params = {p.data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    per_unit = []
    n = 2
    x = torch.randn(n, 3, image_size, image_size, requires_grad=True)
    for unit in pipeline_modules(model, 1):
        total = 0

        def pack(t: torch.Tensor):
            nonlocal total
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x = unit(x)
        per_unit.append(total // n)
    return tuple(per_unit)


def saved_bytes_per_image(cfg: ModelConfig) -> list[int]:
    """Bytes autograd keeps per image for each T = 1 unit's backward (float32, measured by running
    the network on two images on the CPU: what a stage holds per micro-batch in flight)."""
    return list(_saved_bytes(cfg.width, cfg.image_size, cfg.num_classes, cfg.lrn_order))


def worker_saved_bytes(cfg: ModelConfig, tp: int) -> list[float]:
    """Per image, per unit, on one worker. T = 2 (an estimate): half a layer's T = 1 bytes, plus for
    the cross-tower layers the gathered input a tower keeps for its own backward."""
    t1 = dict(zip(unit_names(1), saved_bytes_per_image(cfg)))
    if tp == 1:
        return [float(t1[n]) for n in unit_names(1)]
    io = layer_io_elements(cfg)
    out = []
    for u in pipeline_units(2):
        whole = t1[u.layer] if u.layer not in SPLITTABLE else t1[f"{u.layer}.0"] + t1[f"{u.layer}.1"]
        if u.layer == "fc8":
            out.append(float(whole))
        else:
            extra = 4 * io[u.layer][0] / 2 if u.layer in CROSS_TOWER else 0.0
            out.append(whole / 2 + extra)
    return out


# --- compute ----------------------------------------------------------------------------------------

def unit_costs(cfg: ModelConfig, profile: DeviceProfile, micro_batch: int, tp: int) -> list[StageCost]:
    """Compute seconds (F, B, W) per pipeline unit of `tp` on one worker, without communication.
    T = 2: a tower rank runs its half of each layer — a T = 1 tower half where the profile has one,
    else half the whole layer — and all of fc8, which both towers compute."""
    profile.check_model(cfg)
    t1 = dict(zip(unit_names(1), profile.unit_seconds(micro_batch)))
    if tp == 1:
        return [StageCost(*t1[n]) for n in unit_names(1)]
    out = []
    for u in pipeline_units(2):
        if u.layer in SPLITTABLE:
            a, b = t1[f"{u.layer}.0"], t1[f"{u.layer}.1"]
            out.append(StageCost(*[(x + y) / 2 for x, y in zip(a, b)]))
        elif u.layer == "fc8":
            out.append(StageCost(*t1[u.layer]))
        else:
            out.append(StageCost(*[x / 2 for x in t1[u.layer]]))
    return out


@functools.lru_cache(maxsize=None)
def expected_max_normal(k: int) -> float:
    """E[max of k independent standard normals]: 0 for one, 0.564 for two, 1.029 for four. Cached:
    the integral takes milliseconds, and a prediction asks for it at every meeting of ranks."""
    if k <= 1:
        return 0.0
    nd = statistics.NormalDist()
    xs = [-8 + 16 * i / 4000 for i in range(4001)]
    return sum(x * k * nd.pdf(x) * nd.cdf(x) ** (k - 1) for x in xs) * 16 / 4000


def sync_wait(profile: DeviceProfile, compute_seconds: float, ranks: int) -> float:
    """Seconds `ranks` workers lose, on average, meeting at a collective after `compute_seconds` of
    compute each since they last met: the slowest arrives σ·E[max of `ranks` normals] after the mean,
    σ = sqrt(jitter · compute_seconds) (DeviceProfile.jitter). Blocking pipeline transfers meet too
    (rendezvous_wait); the simulated schedule has only their mean waits."""
    if ranks <= 1 or compute_seconds <= 0 or profile.jitter <= 0:
        return 0.0
    return expected_max_normal(ranks) * math.sqrt(profile.jitter * compute_seconds)


def rendezvous_wait(profile: DeviceProfile, schedule: str, a: StageCost, b: StageCost) -> float:
    """Seconds each blocking transfer between two neighbouring stages loses, on average, to the
    stages' jitter: DeepSpeed's 1F1B sends and receives block until both ranks reach them, which in
    the steady state each does after one forward or one backward of its own since they last met, so
    the later of two arrivals comes sync_wait after the mean. Asynchronous sends (zb-h1) do not meet."""
    if schedule != "1f1b":
        return 0.0
    since = (a.with_waits + b.with_waits) / 4
    return sync_wait(profile, since, 2)


def tower_sync_seconds(profile: DeviceProfile, units: Sequence[Unit], costs: list[StageCost],
                       idx: range) -> tuple[float, float]:
    """T = 2, one stage, per micro-batch: (forward, backward) seconds the two towers wait for each
    other at the stage's cross-tower collectives (sync_wait), each after the compute since the last."""
    fwd = bwd = 0.0
    since = 0.0
    for i in idx:  # forward: the all-gather of a cross-tower layer's input, before the layer
        if units[i].layer in CROSS_TOWER:
            fwd += sync_wait(profile, since, 2)
            since = 0.0
        since += costs[i].forward
    since = 0.0
    for i in reversed(idx):  # backward: a sharded layer's input-gradient all-reduce, after the layer
        since += costs[i].backward
        if units[i].layer in SHARDED:
            bwd += sync_wait(profile, since, 2)
            since = 0.0
    return fwd, bwd


def tower_comm_seconds(cfg: ModelConfig, profile: DeviceProfile, micro_batch: int) -> dict[str, tuple[float, float]]:
    """T = 2, per cross-tower layer: (forward all-gather of its input, backward all-reduce of the
    input gradient) seconds. The two towers of a stage are neighbouring ranks (cluster/topology.py)."""
    link = profile.link(0, 1, collective=True)
    io = layer_io_elements(cfg)
    out = {}
    for name in CROSS_TOWER:
        nbytes = profile.dtype_bytes * io[name][0] * micro_batch
        back = link.allreduce_seconds(nbytes, 2) if name in SHARDED else 0.0
        out[name] = (link.allgather_seconds(nbytes, 2), back)
    return out


def resolve_cut(cfg: ModelConfig, layout: Candidate, costs: list[StageCost]) -> Partition:
    """The cut the engine would make: `measured` balances each unit's F + B + W at the micro-batch,
    as the engine's measure_layer_costs does on rank 0 at start (costs: one worker's, from unit_costs)."""
    method = layout.partition
    if method.strip() != "measured":
        return partition(cfg, layout.pp, method, tp=layout.tp)
    if layout.tp == 1:
        weights = [c.forward + c.backward for c in costs]
    else:  # the engine times whole layers (both towers) in one process, fc8 once
        weights = [(1 if u.layer == "fc8" else 2) * (c.forward + c.backward)
                   for u, c in zip(pipeline_units(2), costs)]
    return partition(cfg, layout.pp, "measured", weights, layout.tp)


def sent_elements(cfg: ModelConfig, cut: Partition, stage: int, tp: int) -> float:
    """Elements per image stage `stage` sends on: the last unit's output, or at a cut that splits a
    tower half, the layer's input and the channels computed so far (alexnet_pp.pipeline.TowerPiece)."""
    units, io = pipeline_units(tp), layer_io_elements(cfg)
    b = cut.bounds[stage + 1]
    c = cut.splits[stage] if cut.splits else 0
    if not c:
        return cut_elements(cfg, tp)[b - 1]
    u = units[b]
    i, o = io[u.layer]
    return i + o / 2 * (u.tower + c / split_widths(cfg, tp)[b])


# --- placement of ranks (DeepSpeed's pipe, data, model order: towers fastest) ---------------------

def _rank(layout: Candidate, stage: int, tower: int, replica: int) -> int:
    return (stage * layout.dp + replica) * layout.tp + tower


def _cut_link(profile: DeviceProfile, layout: Candidate, stage: int) -> Link:
    pairs = [(_rank(layout, stage, t, d), _rank(layout, stage + 1, t, d))
             for t in range(layout.tp) for d in range(layout.dp)]
    return profile.p2p if all(profile.same_node(a, b) for a, b in pairs) else profile.inter_node  # type: ignore


def _replica_link(profile: DeviceProfile, layout: Candidate, stage: int) -> Link:
    ranks = [_rank(layout, stage, t, d) for t in range(layout.tp) for d in range(layout.dp)]
    same = all(profile.same_node(ranks[0], r) for r in ranks)
    return profile.allreduce if same else profile.inter_node  # type: ignore


# --- the prediction -------------------------------------------------------------------------------

def _reduce_local_seconds_per_param(profile: DeviceProfile, replicas: int, flat_grads: bool) -> float:
    """The engine's memory sweeps around the replicas' all-reduce: zeroing the flat gradient buffer and,
    with replicas, scaling it (parallel.flat_grads); else DeepSpeed's flatten, scale and copy back."""
    if not flat_grads:
        return profile.reduce_copy_seconds_per_param
    return profile.grad_zero_seconds_per_param + (profile.grad_scale_seconds_per_param if replicas > 1 else 0.0)


def compute_rate(profile: DeviceProfile, layout: Candidate) -> Optional[Callable[[int], float]]:
    """How fast each computing stage runs, relative to the profile's unit times, while k of the
    layout's stages compute at once — on a CPU whose cores its workers share. Each stage is T·D
    ranks computing in step, each with the profile's threads; while they need more cores than
    there are, the cores are shared evenly among them (the OS's time slicing). The cores are those
    the profile's background leaves: the cluster's own processes and every rank's other threads.
    The unit times were measured with `co_runners` others training beside, so with that sharing
    already in them. A layout with more workers than cores pays the profile's time-slicing slowdown
    all along, not only while more of them compute than the cores hold: its waiting ranks keep
    waking for transfers and take slices from the computing ones. What the two towers of a stage
    lose waiting for each other (a tower slowed by the background holds up its peer) is not here:
    it is their sync_wait at each collective, from the measured jitter, which that loss is part of."""
    if not profile.cores:
        return None
    threads = max(profile.threads, 1)
    ranks = layout.tp * layout.dp
    calibrated = _calibrated_share(profile) * _slicing(profile, layout)
    left = available_cores(profile, layout.workers)
    return lambda k: min(1.0, left / (threads * ranks * k)) / calibrated


def solo_rate(profile: DeviceProfile, layout: Candidate) -> Optional[Callable[[int], Optional[float]]]:
    """Where the layout's workers outnumber the cores: while k stages compute, the speed, relative
    to the profile's unit times, of a rank with a core to itself, if their ranks outnumber the cores.
    Then a rank waiting for its peers inside a pass (the towers' collectives) leaves its core to a
    rank that had none: measured, a two-tower rank of 1×2×2 got the same share of a core in its
    forward as a rank of 1×1×4, the towers' waits nowhere in its wall time. None (the layout, or k
    stages) where the ranks have the cores they ask for: a wait then idles its core, and stretches
    with the pass, as in DeepSpeed's cut of 2×2×1, whose first stage mostly computes alone."""
    if not oversubscribed(layout.workers, profile.threads, profile.cores):
        return None
    alone = 1.0 / (_calibrated_share(profile) * _slicing(profile, layout))
    ranks = max(profile.threads, 1) * layout.tp * layout.dp
    return lambda k: alone if ranks * k > profile.cores else None


def tail_rate(profile: DeviceProfile, layout: Candidate, busy: float = 1.0) -> float:
    """How fast the step's tail (the replicas' all-reduce, the optimizer step and the sweeps around
    them) runs relative to its measurement, on a CPU whose cores the workers share: the ranks reach
    their tails at about the same time, so all of them share the cores (the links were measured by
    two processes with a core each, the optimizer beside the co-runners). `busy`: the share of a core
    each rank keeps busy in this part of the tail when alone (Link.busy; the optimizer's 1): a
    collective over loopback also waits on its peers, and stretches only as far as the ranks' CPU
    exceeds the cores. Only the background outside the ranks competes: the ranks' other threads,
    the per-rank background, are the all-reduce's own workers here (gloo runs collectives there).
    1 where every worker has a device."""
    if not profile.cores:
        return 1.0
    threads = max(profile.threads, 1)
    left = available_cores(profile, layout.workers, per_rank=False)
    share = min(1.0, left / (max(busy, 0.05) * threads * layout.workers))
    return share / (_calibrated_share(profile) * _slicing(profile, layout))


def _slicing(profile: DeviceProfile, layout: Candidate) -> float:
    """How much more CPU the layout's work costs than calibrated: the engine's measured CPU ratio where
    the profile carries one (earlier runs at this worker count), else the time-slicing slowdown where
    the layout's workers' threads outnumber the cores."""
    if profile.cores and profile.engine_cpu_ratio > 0:
        return profile.engine_cpu_ratio
    sliced = oversubscribed(layout.workers, profile.threads, profile.cores)
    return max(profile.time_slicing_slowdown, 1.0) if sliced else 1.0


def _calibrated_share(profile: DeviceProfile) -> float:
    """The share of a core each timed process had while the profile was measured."""
    return min(1.0, profile.cores / (max(profile.threads, 1) * (profile.co_runners + 1)))


def available_cores(profile: DeviceProfile, workers: int, per_rank: bool = True) -> float:
    """The shared cores left to the ranks' computing threads once the background has its share;
    never under half the cores (a background past that is a broken measurement, not a machine).
    `per_rank`: whether the ranks' own other threads (communication, Ray's core worker) count."""
    background = profile.background_cores + (profile.background_cores_per_rank * workers if per_rank else 0.0)
    return max(profile.cores - max(background, 0.0), profile.cores / 2)


def predict(cfg: ModelConfig, profile: DeviceProfile, layout: Candidate, overlap_allreduce: bool = False,
            max_memory: Optional[int] = None, bounds: tuple[int, ...] | Partition | None = None,
            flat_grads: bool = True) -> Prediction:
    """Predict one optimizer step of `layout`. `overlap_allreduce`: each unit's gradients are
    all-reduced as soon as the last micro-batch's backward has produced them, one bucket per unit,
    the buckets queued on the link (as torch DDP does); off, the all-reduce follows the last
    backward, as DeepSpeed's pipeline engine runs it. `flat_grads`: the engine's parallel.flat_grads.
    `bounds`: a given cut (unit bounds, or a Partition that may split units) instead of the layout's."""
    layout.check(cfg)
    n, tp, M, D = layout.micro_batch, layout.tp, layout.micro_batches, layout.dp
    costs = unit_costs(cfg, profile, n, tp)
    if bounds is None:
        cut = resolve_cut(cfg, layout, costs)
    else:
        cut = bounds if isinstance(bounds, Partition) else Partition(tuple(bounds), "given")
    if cut.num_stages != layout.pp:
        raise ValueError(f"bounds {cut.bounds} do not give {layout.pp} stages")
    shares = cut.shares(cfg, tp)  # per stage: (unit, its share of the unit's work)
    plan, plan_bounds = stage_plan(cut.bounds, tp, cut.splits)
    units = pipeline_units(tp)
    tower = tower_comm_seconds(cfg, profile, n) if tp == 2 else {}
    params = worker_param_counts(cfg, tp)
    saved = worker_saved_bytes(cfg, tp)
    io = layer_io_elements(cfg)
    eb = profile.dtype_bytes

    solo = solo_rate(profile, layout)
    stage_costs, stage_units, tower_fwd, tower_bwd = [], [], [], []
    for s in range(layout.pp):
        idx = cut.stage_layers(s)  # T = 2 (tower collectives, sync) cuts between units only
        tf = sum(tower.get(units[i].layer, (0.0, 0.0))[0] for i in idx)
        tb = sum(tower.get(units[i].layer, (0.0, 0.0))[1] for i in idx)
        if tp == 2:
            wf, wb = tower_sync_seconds(profile, units, costs, idx)
            tf, tb = tf + wf, tb + wb
        fwd = sum(costs[i].forward * f for i, f in shares[s])
        bwd = sum(costs[i].backward_input * f for i, f in shares[s])
        wgt = sum(costs[i].backward_weight * f for i, f in shares[s])
        stage_costs.append(StageCost(fwd, bwd, wgt, tf, tb) if solo else StageCost(fwd + tf, bwd + tb, wgt))
        stage_units.append([u.name for u in plan[plan_bounds[s]:plan_bounds[s + 1]]])
        tower_fwd.append(tf)
        tower_bwd.append(tb)

    p2p, cut_bytes = [], []
    for s in range(layout.pp - 1):
        act = eb * sent_elements(cfg, cut, s, tp) * n
        link = _cut_link(profile, layout, s)
        meet = rendezvous_wait(profile, layout.schedule, stage_costs[s], stage_costs[s + 1])
        p2p.append((link.seconds(act) + link.seconds(LABEL_BYTES * n) + meet, link.seconds(act) + meet))
        cut_bytes.append(2 * act + LABEL_BYTES * n)

    timeline = simulate(layout.schedule, stage_costs, M, p2p, rate=compute_rate(profile, layout), solo=solo)

    stage_preds = []
    tails = []
    tail_speed = tail_rate(profile, layout)
    for s in range(layout.pp):
        p = int(sum(params[i] * f for i, f in shares[s]))
        link = _replica_link(profile, layout, s)
        ar = link.allreduce_seconds(eb * p, D)
        if overlap_allreduce and D > 1:
            ar = _exposed_allreduce(timeline, s, [StageCost(*(x * f for x in astuple(costs[i]))) for i, f in shares[s]],
                                    [eb * params[i] * f for i, f in shares[s]], link, D)
        ar /= tail_rate(profile, layout, link.busy)
        # the replicas meet once a step, after the stage's compute of all M micro-batches; where the
        # ranks outnumber the cores, one that arrives early leaves its core to the late ones, so the
        # last arrives when the shared work is done, as simulated, and the wait costs nothing more
        if solo is None:
            ar += sync_wait(profile, M * stage_costs[s].with_waits, D)
        opt = p * (profile.optimizer_seconds_per_param + _reduce_local_seconds_per_param(profile, D, flat_grads))
        opt /= tail_speed
        tails.append(ar + opt)
        in_flight = timeline.peak_in_flight(s)
        per_image = sum(saved[i] * f for i, f in shares[s]) + (eb * sent_elements(cfg, cut, s - 1, tp) if s else 0)
        act = int(in_flight * n * per_image)
        mem = {"parameters": eb * p, "gradients": eb * p, "optimizer": eb * p, "activations": act}
        mem["total"] = sum(mem.values())
        phases = {
            "forward": timeline.seconds(s, ("F",)),
            "backward": timeline.seconds(s, ("B", "W", "BW")),
            "send": timeline.seconds(s, ("send",)),
            "recv": timeline.seconds(s, ("recv",)),
            "allreduce": ar,
            "optimizer": opt,
            "tower_comm": M * (tower_fwd[s] + tower_bwd[s]),  # inside forward and backward
        }
        cpu = {}
        if profile.cores:
            per_second = M * _calibrated_share(profile) * _slicing(profile, layout)
            cpu = {"forward": per_second * sum(costs[i].forward * f for i, f in shares[s]),
                   "backward": per_second * sum(costs[i].backward * f for i, f in shares[s])}
        stage_preds.append(StagePrediction(s, stage_units[s], p, phases, timeline.bubble(s), in_flight, mem, cpu))
    timeline.tail = tails
    step = timeline.step_time
    for sp in stage_preds:
        ph = sp.phases
        ph["idle"] = max(0.0, step - sum(ph[k] for k in ("forward", "backward", "send", "recv", "allreduce", "optimizer")))

    stage_traffic = sum(cut_bytes) * M * D * tp
    tower_traffic = 0
    if tp == 2:
        for s in range(layout.pp):
            for i in cut.stage_layers(s):
                layer = units[i].layer
                if layer in CROSS_TOWER:
                    full = eb * io[layer][0] * n
                    tower_traffic += full + (2 * full if layer in SHARDED else 0)  # gather + ring all-reduce
        tower_traffic *= M * D
    replica_traffic = sum(int(2 * (D - 1) * eb * sp.params) * tp for sp in stage_preds) if D > 1 else 0
    memory = max(sp.memory["total"] for sp in stage_preds)
    cap = max_memory if max_memory is not None else profile.memory_bytes
    return Prediction(
        layout=layout, cut=cut, step_seconds=step, images_per_s=layout.batch / step, stages=stage_preds,
        bytes_per_step={"stages": int(stage_traffic), "towers": int(tower_traffic), "replicas": int(replica_traffic)},
        memory_per_worker=memory, fits=cap is None or memory <= cap, profile=profile.name, timeline=timeline,
        extrapolated=not min(profile.micro_batches) <= n <= max(profile.micro_batches),
    )


def _exposed_allreduce(timeline: Timeline, stage: int, costs: list[StageCost], grad_bytes: list[float],
                       link: Link, replicas: int) -> float:
    """All-reduce time left after the stage's last backward, when each unit's bucket starts as
    soon as the last micro-batch's backward passes that unit (units run backward last to first)."""
    last = [e for e in timeline.stages[stage] if e.kind in ("BW", "W")][-1]
    kind_cost = [(c.backward if last.kind == "BW" else c.backward_weight) for c in costs]
    total = sum(kind_cost) or 1.0
    t, free = last.start, last.start
    for c, nbytes in zip(reversed(kind_cost), reversed(grad_bytes)):
        t += (last.end - last.start) * c / total
        free = max(free, t) + link.allreduce_seconds(nbytes, replicas)
    return max(0.0, free - last.end)


def describe(pred: Prediction) -> str:
    """Per stage: units, phases in ms, bubble, memory — a prediction, labelled as one."""
    L = pred.layout
    lines = [f"predicted ({pred.profile}): P×T×D = {L.label()}, M = {L.micro_batches}, micro-batch {L.micro_batch}, "
             f"{L.schedule}: {pred.images_per_s:.1f} img/s, step {1000 * pred.step_seconds:.1f} ms"]
    for sp in pred.stages:
        ph = " ".join(f"{k} {1000 * v:.1f}" for k, v in sp.phases.items())
        lines.append(f"  stage {sp.stage} [{','.join(sp.units)}]: {ph} ms; bubble {sp.bubble:.3f}; "
                     f"{sp.in_flight} in flight; {sp.memory['total'] / 2**30:.2f} GiB")
    return "\n".join(lines)
