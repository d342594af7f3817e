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
conv4, fc6, fc7) are split into their towers' halves, each its own pipeline layer (`TowerHalf`):
2 stages need that finer cut, since conv3 alone is ~14% of a step and the best whole-layer cut of
the paper network leaves the stages 57/43 apart. With T = 2 each rank already holds one tower, and
layers stay whole.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from alexnet_pp.config import ModelConfig
from alexnet_pp.deferred_grads import DeferredGrads
from alexnet_pp.errors import ConfigError
from alexnet_pp.model import AlexNet, TowerLayer, TowerOps, build_part, layer_ops
from alexnet_pp.shapes import LAYER_NAMES, layer_macs, layer_output_shapes, layer_param_counts

# Layers whose towers' halves can run in different stages: input and output share their spatial size,
# so half 0 hands on [input | its output] as one tensor.
SPLITTABLE = ("conv3", "conv4", "fc6", "fc7")


@dataclass(frozen=True)
class Unit:
    """One pipeline layer: a whole layer (`tower` None) or one tower's half of it."""

    layer: str
    tower: Optional[int] = None

    @property
    def name(self) -> str:
        return self.layer if self.tower is None else f"{self.layer}.{self.tower}"


def pipeline_units(tp: int = 1) -> tuple[Unit, ...]:
    units: list[Unit] = []
    for name in LAYER_NAMES:
        units += [Unit(name, 0), Unit(name, 1)] if tp == 1 and name in SPLITTABLE else [Unit(name)]
    return tuple(units)


def unit_names(tp: int = 1) -> tuple[str, ...]:
    return tuple(u.name for u in pipeline_units(tp))


def model_key(layer: str, tower: Optional[int], leaf: str) -> str:
    """The single model's state_dict key of a parameter (`leaf`: weight or bias)."""
    return f"fc8.{leaf}" if layer == "fc8" else f"towers.{tower}.{layer}.{leaf}"


class TowerHalf(nn.Module):
    """Tower `tower`'s half of a layer. Half 0 returns [input | tower 0's output]; half 1 reads that
    and returns the layer's output [tower 0 | tower 1]. The tower's share is the layer's own
    `TowerOps.forward` (dropout included), so a split layer computes exactly what the whole one does."""

    def __init__(self, ops: TowerOps, part: nn.Module, tower: int):
        super().__init__()
        if ops.name not in SPLITTABLE:
            raise ValueError(f"{ops.name} cannot be split by tower (its output size differs from its input's)")
        self.ops, self.part, self.tower = ops, part, tower
        width = part.in_channels if isinstance(part, nn.Conv2d) else part.in_features
        self.in_width = 2 * width if ops.connect == "own" else width

    @property
    def name(self) -> str:
        return self.ops.name

    def forward(self, x: torch.Tensor, keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        ops = self.ops
        if self.tower == 0:
            if ops.flatten:
                x = torch.flatten(x, 1)
            return torch.cat([x, ops.forward(self.part, 0, ops.input(x, 0), keys, self.training)], dim=1)
        x, y0 = x[:, : self.in_width], x[:, self.in_width :]
        return torch.cat([y0, ops.forward(self.part, 1, ops.input(x, 1), keys, self.training)], dim=1)

    def model_parameters(self):
        for leaf, p in self.part.named_parameters():
            yield model_key(self.name, self.tower, leaf), p


def stage_plan(bounds: tuple[int, ...], tp: int = 1) -> tuple[list[Unit], tuple[int, ...]]:
    """The modules a cut pipeline runs — whole layers (`tower` None) or tower halves — and the stage
    bounds over them: a layer's two halves are fused back into the whole layer wherever both land in
    one stage, since a split costs a concatenation and a slice and is only worth it at a cut."""
    units = pipeline_units(tp)
    if bounds[-1] != len(units):
        raise ValueError(f"bounds {bounds} do not cover the {len(units)} pipeline units")
    stage_of = [s for s in range(len(bounds) - 1) for _ in range(bounds[s], bounds[s + 1])]
    plan: list[Unit] = []
    counts = [0] * (len(bounds) - 1)
    i = 0
    while i < len(units):
        u = units[i]
        whole = u.tower is None or (u.tower == 0 and stage_of[i] == stage_of[i + 1])
        plan.append(Unit(u.layer) if whole else u)
        counts[stage_of[i]] += 1
        i += 2 if whole and u.tower == 0 else 1
    return plan, (0, *itertools.accumulate(counts))


def unit_module(unit: Unit, ops: TowerOps, parts: list[nn.Module]) -> nn.Module:
    """A planned unit as a module over the given parts (both towers' for a whole layer, else one)."""
    return TowerLayer(ops, parts) if unit.tower is None else TowerHalf(ops, parts[0], unit.tower)


def build_unit(cfg: ModelConfig, unit: Unit, seed: int) -> nn.Module:
    """One planned unit built from scratch with only the parts it holds (the same weights as
    `AlexNet(cfg, seed)`'s)."""
    ops = layer_ops(cfg)[LAYER_NAMES.index(unit.layer)]
    if unit.layer == "fc8":
        return TowerLayer(ops, [build_part(cfg, "fc8", None, seed)])
    towers = range(2) if unit.tower is None else (unit.tower,)
    return unit_module(unit, ops, [build_part(cfg, unit.layer, t, seed) for t in towers])


def pipeline_modules(model: AlexNet, tp: int = 1) -> list[nn.Module]:
    """The model's layers as pipeline units, sharing the model's parameters: every unit its own
    module (a stage per unit fuses nothing)."""
    return stage_modules(model, tuple(range(len(pipeline_units(tp)) + 1)), tp)[0]


def stage_modules(model: AlexNet, bounds: tuple[int, ...], tp: int = 1) -> tuple[list[nn.Module], tuple[int, ...]]:
    """`stage_plan` as modules sharing `model`'s parameters."""
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


@dataclass(frozen=True)
class Partition:
    bounds: tuple[int, ...]  # stage s holds layers bounds[s] .. bounds[s+1]-1
    method: str

    @property
    def num_stages(self) -> int:
        return len(self.bounds) - 1

    def stage_layers(self, stage: int) -> range:
        return range(self.bounds[stage], self.bounds[stage + 1])


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


def _cut_point(item: str, names: tuple[str, ...], method: str) -> int:
    item = item.strip()
    if item.isdigit():
        return int(item)
    if item in names:
        return names.index(item)
    if f"{item}.0" in names:  # a split layer's name: the stage starts at its first half
        return names.index(f"{item}.0")
    raise ConfigError(
        f"parallel.partition={method!r}: use measured, flops, uniform, parameters, or cut points — unit "
        f"indices like '5' or '3,6', or the names of the units that start a stage: {', '.join(names[1:])}"
    )


def partition(cfg: ModelConfig, num_stages: int, method: str = "flops", costs: list[float] | None = None,
              tp: int = 1) -> Partition:
    """Cut the pipeline units into stages. `measured` balances `costs` (from measure_layer_costs);
    without them — before any worker has measured — it plans with the FLOP estimate."""
    names = unit_names(tp)
    n = len(names)
    if not 1 <= num_stages <= n:
        raise ConfigError(f"parallel.pp={num_stages}: the network has {n} pipeline units with "
                          f"parallel.tp={tp}; use at most {n} stages")
    method = method.strip()
    if method == "measured":
        if costs is not None and len(costs) != n:
            raise ValueError(f"{len(costs)} measured costs for {n} pipeline units")
        bounds = _balanced(list(costs) if costs is not None else layer_costs(cfg, tp), num_stages)
    elif method == "flops":
        bounds = _balanced(layer_costs(cfg, tp), num_stages)
    elif method == "parameters":
        bounds = _balanced([float(x) for x in unit_param_counts(cfg, tp)], num_stages)
    elif method == "uniform":
        bounds = tuple(round(s * n / num_stages) for s in range(num_stages + 1))
    else:
        cuts = [_cut_point(x, names, method) for x in method.split(",") if x.strip()]
        bounds = (0, *cuts, n)
        if len(cuts) != num_stages - 1:
            raise ConfigError(
                f"parallel.partition={method!r} gives {len(cuts) + 1} stages but parallel.pp={num_stages}; "
                f"give {num_stages - 1} cut point(s)"
            )
        if any(b >= a for a, b in zip(bounds[1:], bounds)) or bounds != tuple(sorted(set(bounds))):
            raise ConfigError(
                f"parallel.partition={method!r}: cut points must increase strictly between 1 and {n - 1}"
            )
    return Partition(bounds=tuple(bounds), method=method)


def _fused_names(held: list[str]) -> list[str]:
    """"conv3.0", "conv3.1" → "conv3": both halves in one stage run as the whole layer."""
    out: list[str] = []
    for name in held:
        if name.endswith(".1") and out and out[-1] == name[:-2] + ".0":
            out[-1] = name[:-2]
        else:
            out.append(name)
    return out


def describe(cfg: ModelConfig, part: Partition, costs: list[float] | None = None, tp: int = 1) -> str:
    """A table of each stage's units and its share of compute (measured `costs` if given, else
    counted) and parameters."""
    basis = "measured time" if costs is not None else "compute"
    costs, params = list(costs) if costs is not None else layer_costs(cfg, tp), unit_param_counts(cfg, tp)
    names = unit_names(tp)
    total_c, total_p = sum(costs), sum(params)
    lines = [f"pipeline partition ({part.method}), {part.num_stages} stage(s):"]
    for s in range(part.num_stages):
        layers = list(part.stage_layers(s))
        c = sum(costs[i] for i in layers)
        p = sum(params[i] for i in layers)
        held = ",".join(_fused_names([names[i] for i in layers]))
        lines.append(f"  stage {s}: {held:<44} {basis} {100 * c / total_c:5.1f}%  parameters {100 * p / total_p:5.1f}%")
    return "\n".join(lines)
