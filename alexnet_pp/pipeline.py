"""The network as a pipeline layer list, and where to cut it into stages.

Nothing here communicates: this is the plan (which layers go to which stage, and why), printed at
start so a user sees each stage's share of compute and parameters. cluster/ executes the plan.

Partition methods (`parallel.partition`):
- `measured` (default): time each layer's forward + backward on the device that will run it, at the
  run's micro-batch size, and balance those times. Counted FLOPs mislead on CPUs: conv1 (11×11,
  stride 4, 3 input channels) and the fully-connected layers at small micro-batches run far below
  the machine's peak, so their time share is not their FLOP share.
- `flops`: balance each stage's training compute (forward + backward ≈ 3 × forward multiply-adds,
  plus the pointwise LRN/pool/ReLU work) without measuring. DeepSpeed's own default, `parameters`,
  puts the convolutions (most of the compute, 3% of the parameters) together on stage 0.
- `uniform`: the same number of layers per stage.
- `parameters`: balance parameter counts (DeepSpeed's default), kept for comparison.
- explicit cut points: unit indices or names, e.g. `"conv3.1"` (stage 1 starts at tower 1's half of
  conv3) or `"3,6"` for three stages.

Pipeline units: with T = 1 the layers whose input and output have the same spatial size (conv3,
conv4, fc6, fc7) are split into their towers' halves, each its own pipeline layer (`TowerPiece`):
2 stages need that finer cut, since conv3 alone is ~14% of a step and the best whole-layer cut of
the paper network leaves the stages 57/43 apart. Even a tower half is 5–10% of a step, so the
balancing methods (`measured`, `flops`) then move each cut into a half where that balances the
stages better: stage s − 1 computes the half's first c output channels (neurons), stage s the rest
(`Partition.splits`; written `conv3.0[40:]` as a cut point). With T = 2 each rank already holds one
tower, and layers stay whole.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
import torch.nn as nn

from alexnet_pp.config import ModelConfig
from alexnet_pp.deferred_grads import DeferredGrads
from alexnet_pp.errors import ConfigError
from alexnet_pp.model import AlexNet, TowerLayer, TowerOps, build_part, layer_ops, part_shape
from alexnet_pp.shapes import LAYER_NAMES, layer_macs, layer_output_shapes, layer_param_counts

# Layers whose towers' halves can run in different stages: input and output share their spatial size,
# so half 0 hands on [input | its output] as one tensor.
SPLITTABLE = ("conv3", "conv4", "fc6", "fc7")


@dataclass(frozen=True)
class Unit:
    """One pipeline layer: a whole layer (`tower` None), one tower's half of it, or a piece of that half,
    the output channels (neurons) `channels` = (lo, hi) of the tower's part, hi None for the rest."""

    layer: str
    tower: Optional[int] = None
    channels: Optional[tuple[int, Optional[int]]] = None

    @property
    def name(self) -> str:
        base = self.layer if self.tower is None else f"{self.layer}.{self.tower}"
        if self.channels is None:
            return base
        lo, hi = self.channels
        return f"{base}[{lo or ''}:{'' if hi is None else hi}]"


def pipeline_units(tp: int = 1) -> tuple[Unit, ...]:
    units: list[Unit] = []
    for name in LAYER_NAMES:
        units += [Unit(name, 0), Unit(name, 1)] if tp == 1 and name in SPLITTABLE else [Unit(name)]
    return tuple(units)


def unit_names(tp: int = 1) -> tuple[str, ...]:
    return tuple(u.name for u in pipeline_units(tp))


def model_key(layer: str, tower: Optional[int], leaf: str, rows: Optional[tuple[int, int]] = None) -> str:
    """The single model's state_dict key of a parameter (`leaf`: weight or bias); with `rows`, the key
    of those rows of it, e.g. "towers.0.conv3[0:40].weight" (alexnet_pp/weights.py joins pieces)."""
    part = "fc8" if layer == "fc8" else f"towers.{tower}.{layer}"
    return f"{part}{'' if rows is None else f'[{rows[0]}:{rows[1]}]'}.{leaf}"


def part_width(cfg: ModelConfig, layer: str) -> int:
    """Output channels (neurons) of one tower's part of `layer`."""
    return part_shape(cfg, layer)[1][1]


def slice_part(part: nn.Module, lo: int, hi: int) -> nn.Module:
    """Output channels [lo, hi) of a convolution or linear map, as a module of its own (a copy)."""
    if isinstance(part, nn.Conv2d):
        piece = nn.Conv2d(part.in_channels, hi - lo, part.kernel_size, stride=part.stride, padding=part.padding,
                          device="meta")
    else:
        piece = nn.Linear(part.in_features, hi - lo, device="meta")
    piece = piece.to_empty(device=part.weight.device)
    with torch.no_grad():
        piece.weight.copy_(part.weight[lo:hi])
        piece.bias.copy_(part.bias[lo:hi])
    return piece


class TowerPiece(nn.Module):
    """Tower `tower`'s half of a layer, or output channels [lo, lo + part's width) of it. A split layer
    carries [layer input | the outputs computed so far] from piece to piece, in output order (tower 0's
    channels, then tower 1's); the last piece returns the layer's output [tower 0 | tower 1]. Each
    piece is the layer's own `TowerOps.forward` (dropout by neuron index included), so a split layer
    computes what the whole one does: the same values, up to the order of the input gradient's sum."""

    def __init__(self, ops: TowerOps, part: nn.Module, tower: int, lo: int = 0, width: Optional[int] = None):
        super().__init__()
        if ops.name not in SPLITTABLE:
            raise ValueError(f"{ops.name} cannot be split by tower (its output size differs from its input's)")
        self.ops, self.part, self.tower, self.lo = ops, part, tower, lo
        conv = isinstance(part, nn.Conv2d)
        out = part.out_channels if conv else part.out_features
        width = out if width is None else width
        self.rows = None if (lo, out) == (0, width) else (lo, lo + out)
        in_width = part.in_channels if conv else part.in_features
        self.in_width = 2 * in_width if ops.connect == "own" else in_width
        self.first, self.last = (tower, lo) == (0, 0), tower == 1 and lo + out == width
        self.offset = tower * width + lo  # the piece's first neuron in the layer's output (dropout masks)

    @property
    def name(self) -> str:
        return self.ops.name

    def forward(self, x: torch.Tensor, keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        ops = self.ops
        if self.first:
            if ops.flatten:
                x = torch.flatten(x, 1)
            inputs, done = x, x[:, :0]
        else:
            inputs, done = x[:, : self.in_width], x[:, self.in_width :]
        y = ops.forward(self.part, self.tower, ops.input(inputs, self.tower), keys, self.training, self.offset)
        return torch.cat([done, y] if self.last else [inputs, done, y], dim=1)

    def model_parameters(self):
        for leaf, p in self.part.named_parameters():
            yield model_key(self.name, self.tower, leaf, self.rows), p


def stage_pieces(bounds: Sequence[int], splits: Sequence[int] = ()) -> list[list[tuple[int, Optional[tuple[int, Optional[int]]]]]]:
    """Per stage, (unit index, the output channels (lo, hi) of it the stage runs; None: all of it).
    `splits[s - 1]` = c > 0: stage s − 1 also runs the first c channels of unit `bounds[s]` and
    stage s the rest (hi None)."""
    splits = tuple(splits) or (0,) * (len(bounds) - 2)
    out = []
    for s in range(len(bounds) - 1):
        held: list[tuple[int, Optional[tuple[int, Optional[int]]]]] = [(i, None) for i in range(bounds[s], bounds[s + 1])]
        if s > 0 and splits[s - 1]:
            held[0] = (bounds[s], (splits[s - 1], None))
        if s < len(bounds) - 2 and splits[s]:
            held.append((bounds[s + 1], (0, splits[s])))
        out.append(held)
    return out


def stage_plan(bounds: tuple[int, ...], tp: int = 1, splits: Sequence[int] = ()) -> tuple[list[Unit], tuple[int, ...]]:
    """The modules a cut pipeline runs — whole layers (`tower` None), tower halves, pieces of a half
    (`stage_pieces`) — and the stage bounds over them. A layer's two halves are fused back into the
    whole layer wherever both land whole in one stage, since a split costs a concatenation and a
    slice and is only worth it at a cut."""
    units = pipeline_units(tp)
    if bounds[-1] != len(units):
        raise ValueError(f"bounds {bounds} do not cover the {len(units)} pipeline units")
    plan: list[Unit] = []
    counts = []
    for held in stage_pieces(bounds, splits):
        fused: list[Unit] = []
        for i, channels in held:
            u, prev = replace(units[i], channels=channels), fused[-1] if fused else None
            if (prev is not None and prev.layer == u.layer and (prev.tower, u.tower) == (0, 1)
                    and prev.channels is None and u.channels is None):
                fused[-1] = Unit(u.layer)
            else:
                fused.append(u)
        plan += fused
        counts.append(len(fused))
    return plan, (0, *itertools.accumulate(counts))


def unit_module(unit: Unit, ops: TowerOps, parts: list[nn.Module], width: Optional[int] = None) -> nn.Module:
    """A planned unit as a module over the given parts (both towers' for a whole layer, else one: the
    piece's own part for a piece of a half, `width` the whole half's)."""
    if unit.tower is None:
        return TowerLayer(ops, parts)
    lo = unit.channels[0] if unit.channels else 0
    return TowerPiece(ops, parts[0], unit.tower, lo, width)


def build_unit(cfg: ModelConfig, unit: Unit, seed: int) -> nn.Module:
    """One planned unit built from scratch with only the parts it holds (the same weights as
    `AlexNet(cfg, seed)`'s)."""
    ops = layer_ops(cfg)[LAYER_NAMES.index(unit.layer)]
    if unit.layer == "fc8":
        return TowerLayer(ops, [build_part(cfg, "fc8", None, seed)])
    towers = range(2) if unit.tower is None else (unit.tower,)
    parts = [build_part(cfg, unit.layer, t, seed) for t in towers]
    width = part_width(cfg, unit.layer)
    if unit.channels is not None:
        lo, hi = unit.channels
        parts = [slice_part(parts[0], lo, width if hi is None else hi)]
    return unit_module(unit, ops, parts, width)


def pipeline_modules(model: AlexNet, tp: int = 1) -> list[nn.Module]:
    """The model's layers as pipeline units, sharing the model's parameters: every unit its own
    module (a stage per unit fuses nothing)."""
    return stage_modules(model, tuple(range(len(pipeline_units(tp)) + 1)), tp)[0]


def stage_modules(model: AlexNet, bounds: tuple[int, ...], tp: int = 1) -> tuple[list[nn.Module], tuple[int, ...]]:
    """`stage_plan` as modules sharing `model`'s parameters (cuts between units only: a piece of a
    half holds rows of a parameter, which cannot share the model's)."""
    plan, bounds = stage_plan(bounds, tp)
    by_name = {layer.name: layer for layer in model.layers()}
    modules = []
    for u in plan:
        layer = by_name[u.layer]
        modules.append(layer if u.tower is None else unit_module(u, layer.ops, [layer.parts[u.tower]]))
    return modules, bounds


# Pointwise work per output element, in multiply-add equivalents, measured relative to the
# convolutions on CPU (LRN: square, window sum, pow, divide; pooling: 9 reads).
_POINTWISE_COST = {"conv1": 40, "conv2": 40, "conv5": 9}


def split_widths(cfg: ModelConfig, tp: int = 1) -> list[int]:
    """Per pipeline unit, the output channels a cut may divide it by (a tower half), else 0."""
    return [part_width(cfg, u.layer) if u.tower is not None else 0 for u in pipeline_units(tp)]


@dataclass(frozen=True)
class Partition:
    bounds: tuple[int, ...]  # stage s holds units bounds[s] .. bounds[s+1]-1
    method: str
    splits: tuple[int, ...] = ()  # per cut s ≥ 1: channels of unit bounds[s] that stage s − 1 runs (0: none)

    def __post_init__(self) -> None:
        if not any(self.splits):  # an unsplit cut has one form, so equal cuts compare equal
            object.__setattr__(self, "splits", ())

    @property
    def num_stages(self) -> int:
        return len(self.bounds) - 1

    def stage_layers(self, stage: int) -> range:
        """The units stage `stage` starts or runs whole (not the piece of a split unit it ends with)."""
        return range(self.bounds[stage], self.bounds[stage + 1])

    def shares(self, cfg: ModelConfig, tp: int = 1) -> list[list[tuple[int, float]]]:
        """Per stage, (unit index, the share of that unit's work it runs): 1 but at a split cut."""
        widths = split_widths(cfg, tp)
        return [[(i, 1.0 if ch is None else ((ch[1] or widths[i]) - ch[0]) / widths[i]) for i, ch in held]
                for held in stage_pieces(self.bounds, self.splits)]

    def stage_costs(self, cfg: ModelConfig, weights: Sequence[float], tp: int = 1) -> list[float]:
        """Each stage's sum of per-unit `weights`, a split unit's in proportion to its channels."""
        return [sum(weights[i] * share for i, share in held) for held in self.shares(cfg, tp)]

    def cut_points(self, tp: int = 1) -> str:
        """The `parallel.partition` value that gives this cut, e.g. "3" or "conv3.0[52:]"."""
        names, splits = unit_names(tp), self.splits or (0,) * (self.num_stages - 1)
        return ",".join(f"{names[b]}[{c}:]" if c else str(b) for b, c in zip(self.bounds[1:-1], splits))


def _per_unit(per_layer: list[float], tp: int) -> list[float]:
    whole = dict(zip(LAYER_NAMES, per_layer))
    return [whole[u.layer] / (1 if u.tower is None else 2) for u in pipeline_units(tp)]


def layer_costs(cfg: ModelConfig, tp: int = 1) -> list[float]:
    """Relative training cost of each pipeline unit (the `flops` partition's weights)."""
    macs = layer_macs(cfg)
    shapes = layer_output_shapes(cfg)
    costs = []
    for name in LAYER_NAMES:
        c, h, w = shapes[name]
        pointwise = _POINTWISE_COST.get(name, 1) * c * h * w
        costs.append(3.0 * macs[name] + pointwise)
    return _per_unit(costs, tp)


def unit_param_counts(cfg: ModelConfig, tp: int = 1) -> list[int]:
    return [int(n) for n in _per_unit([float(n) for n in layer_param_counts(cfg)], tp)]


def _balanced(weights: list[float], parts: int) -> tuple[int, ...]:
    """Contiguous split minimising the largest part (exact, by dynamic programming: 8 layers)."""
    n = len(weights)
    prefix = [0.0]
    for x in weights:
        prefix.append(prefix[-1] + x)
    INF = float("inf")
    best = [[INF] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for i in range(p, n + 1):
            for j in range(p - 1, i):
                cost = max(best[p - 1][j], prefix[i] - prefix[j])
                if cost < best[p][i]:
                    best[p][i], cut[p][i] = cost, j
    bounds = [n]
    i = n
    for p in range(parts, 0, -1):
        i = cut[p][i]
        bounds.append(i)
    return tuple(reversed(bounds))


def measure_layer_costs(cfg: ModelConfig, micro_batch: int, device: str = "cpu", reps: int = 3,
                        seed: int = 0, tp: int = 1, defer_weight_grads: bool = False) -> list[float]:
    """Seconds of forward + backward of each pipeline unit (best of `reps`), as a training step runs
    it: the first computes no input gradient; with `defer_weight_grads` the FC weight gradients are
    computed as the engine does (deferred_grads.py), counted in full per micro-batch."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(micro_batch, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    costs = []
    for i, unit in enumerate(pipeline_units(tp)):
        layer = build_unit(cfg, unit, seed).to(device).train()  # one unit at a time: never the whole network
        flush = DeferredGrads([layer]).flush if defer_weight_grads else (lambda: None)
        best = float("inf")
        for _ in range(reps + 1):  # one warm-up
            xi = x.detach().requires_grad_(i > 0)
            sync()
            t0 = time.perf_counter()
            y = layer(xi)
            y.backward(torch.ones_like(y))
            flush()
            sync()
            best = min(best, time.perf_counter() - t0)
        costs.append(best)
        x = y.detach()
        del layer
    return costs


def _split_cuts(weights: list[float], bounds: tuple[int, ...], widths: list[int],
                min_piece: int = 16) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Move each cut into a tower half where that lowers the larger of the two stages beside it (a
    piece costing its share of the half's channels, at least 1/`min_piece` of them), cut by cut until
    none moves, from the best whole-unit cut. Returns the bounds and the splits."""
    n = len(weights)
    prefix = list(itertools.accumulate(weights, initial=0.0))
    cuts = [(b, 0) for b in bounds[1:-1]]

    def at(cut: tuple[int, int]) -> float:
        u, c = cut
        return prefix[u] + (weights[u] * c / widths[u] if c else 0.0)

    for _ in range(4 * len(cuts)):
        moved = False
        for s, cut in enumerate(cuts):
            left = at(cuts[s - 1] if s else (0, 0))
            nxt = cuts[s + 1] if s + 1 < len(cuts) else (n, 0)
            right = at(nxt)
            first = (cuts[s - 1][0] if s else 0) + 1

            def worst(c: tuple[int, int]) -> float:
                return max(at(c) - left, right - at(c))

            best, best_cost = cut, worst(cut)
            for u in range(first, nxt[0]):
                smallest = max(1, widths[u] // min_piece)
                for cand in [(u, 0)] + ([(u, c) for c in range(smallest, widths[u] - smallest + 1)] if widths[u] else []):
                    if worst(cand) < best_cost * (1 - 1e-9):
                        best, best_cost = cand, worst(cand)
            moved |= best != cut
            cuts[s] = best
        if not moved:
            break
    return (0, *[u for u, _ in cuts], n), tuple(c for _, c in cuts)


def _cut_point(item: str, names: tuple[str, ...], method: str) -> tuple[int, int]:
    """A cut point as (unit index, channels of that unit the stage before runs)."""
    item = item.strip()
    if item.endswith(":]") and "[" in item:  # "conv3.0[52:]": the stage starts at channel 52 of conv3.0
        name, _, c = item[:-2].partition("[")
        if name in names and c.isdigit():
            return names.index(name), int(c)
    if item.isdigit():
        return int(item), 0
    if item in names:
        return names.index(item), 0
    if f"{item}.0" in names:  # a split layer's name: the stage starts at its first half
        return names.index(f"{item}.0"), 0
    raise ConfigError(
        f"parallel.partition={method!r}: use measured, flops, uniform, parameters, or cut points — unit "
        f"indices like '5' or '3,6', the names of the units that start a stage ({', '.join(names[1:])}), or a "
        "tower half's name with the channel the stage starts at, like 'conv3.0[52:]'"
    )


def partition(cfg: ModelConfig, num_stages: int, method: str = "flops", costs: list[float] | None = None,
              tp: int = 1) -> Partition:
    """Cut the pipeline units into stages. `measured` balances `costs` (from measure_layer_costs);
    without them — before any worker has measured — it plans with the FLOP estimate. The balancing
    methods (`measured`, `flops`) cut inside a tower half where that balances better."""
    names = unit_names(tp)
    n = len(names)
    if not 1 <= num_stages <= n:
        raise ConfigError(f"parallel.pp={num_stages}: the network has {n} pipeline units with "
                          f"parallel.tp={tp}; use at most {n} stages")
    method = method.strip()
    splits: tuple[int, ...] = ()
    widths = split_widths(cfg, tp)
    if method in ("measured", "flops"):
        if costs is not None and len(costs) != n:
            raise ValueError(f"{len(costs)} measured costs for {n} pipeline units")
        weights = list(costs) if method == "measured" and costs is not None else layer_costs(cfg, tp)
        bounds, splits = _split_cuts(weights, _balanced(weights, num_stages), widths)
    elif method == "parameters":
        bounds = _balanced([float(x) for x in unit_param_counts(cfg, tp)], num_stages)
    elif method == "uniform":
        bounds = tuple(round(s * n / num_stages) for s in range(num_stages + 1))
    else:
        points = [_cut_point(x, names, method) for x in method.split(",") if x.strip()]
        bounds, splits = (0, *[u for u, _ in points], n), tuple(c for _, c in points)
        if len(points) != num_stages - 1:
            raise ConfigError(
                f"parallel.partition={method!r} gives {len(points) + 1} stages but parallel.pp={num_stages}; "
                f"give {num_stages - 1} cut point(s)"
            )
        if any(b >= a for a, b in zip(bounds[1:], bounds)) or bounds != tuple(sorted(set(bounds))):
            raise ConfigError(
                f"parallel.partition={method!r}: cut points must increase strictly between 1 and {n - 1}"
            )
        for u, c in points:
            if c and not 0 < c < widths[u]:
                raise ConfigError(
                    f"parallel.partition={method!r}: {names[u]} "
                    + (f"has {widths[u]} output channels; split it at 1 to {widths[u] - 1}" if widths[u] else
                       "cannot be split by channels; only tower halves can (parallel.tp=1: conv3, conv4, fc6, fc7)"))
    return Partition(bounds=tuple(bounds), method=method, splits=tuple(splits))


def describe(cfg: ModelConfig, part: Partition, costs: list[float] | None = None, tp: int = 1) -> str:
    """A table of each stage's units and its share of compute (measured `costs` if given, else
    counted) and parameters."""
    basis = "measured time" if costs is not None else "compute"
    costs, params = list(costs) if costs is not None else layer_costs(cfg, tp), unit_param_counts(cfg, tp)
    plan, plan_bounds = stage_plan(part.bounds, tp, part.splits)
    total_c, total_p = sum(costs), sum(params)
    stage_c, stage_p = part.stage_costs(cfg, costs, tp), part.stage_costs(cfg, params, tp)
    lines = [f"pipeline partition ({part.method}), {part.num_stages} stage(s):"]
    for s in range(part.num_stages):
        held = ",".join(u.name for u in plan[plan_bounds[s]:plan_bounds[s + 1]])
        lines.append(f"  stage {s}: {held:<44} {basis} {100 * stage_c[s] / total_c:5.1f}%  "
                     f"parameters {100 * stage_p[s] / total_p:5.1f}%")
    return "\n".join(lines)
