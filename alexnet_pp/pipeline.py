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
- explicit cut points, e.g. `"5"` (stage 0 = layers 0-4) or `"3,6"` for three stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from alexnet_pp.config import ConfigError, ModelConfig
from alexnet_pp.model import LAYER_NAMES, layer_macs, layer_output_shapes

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


def layer_costs(cfg: ModelConfig) -> list[float]:
    """Relative training cost of each layer (the `flops` partition's weights)."""
    macs = layer_macs(cfg)
    shapes = layer_output_shapes(cfg)
    costs = []
    for name in LAYER_NAMES:
        c, h, w = shapes[name]
        pointwise = _POINTWISE_COST.get(name, 1) * c * h * w
        costs.append(3.0 * macs[name] + pointwise)
    return costs


def layer_param_counts(cfg: ModelConfig) -> list[int]:
    from alexnet_pp.model import Widths, spatial_sizes

    w, s = Widths.of(cfg.width), spatial_sizes(cfg.image_size)
    flat = 2 * w.conv5 * s["pool5"] ** 2
    per_tower = [
        3 * 121 * w.conv1 + w.conv1,
        w.conv1 * 25 * w.conv2 + w.conv2,
        2 * w.conv2 * 9 * w.conv3 + w.conv3,
        w.conv3 * 9 * w.conv4 + w.conv4,
        w.conv4 * 9 * w.conv5 + w.conv5,
        flat * w.fc + w.fc,
        2 * w.fc * w.fc + w.fc,
    ]
    return [2 * n for n in per_tower] + [2 * w.fc * cfg.num_classes + cfg.num_classes]


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
                        seed: int = 0) -> list[float]:
    """Seconds of forward + backward of each layer (best of `reps`), as a training step runs it: the
    first layer computes no input gradient."""
    import time

    import torch

    from alexnet_pp.model import AlexNet

    gen = torch.Generator().manual_seed(seed)
    model = AlexNet(cfg).to(device).train()
    x = torch.randn(micro_batch, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    costs = []
    for i, layer in enumerate(model.layers()):
        best = float("inf")
        for _ in range(reps + 1):  # one warm-up
            xi = x.detach().requires_grad_(i > 0)
            sync()
            t0 = time.perf_counter()
            y = layer(xi)
            y.backward(torch.ones_like(y))
            sync()
            best = min(best, time.perf_counter() - t0)
        costs.append(best)
        x = y.detach()
    return costs


def partition(cfg: ModelConfig, num_stages: int, method: str = "flops", costs: list[float] | None = None) -> Partition:
    """Cut the layers into stages. `measured` balances `costs` (from measure_layer_costs); without
    them — before any worker has measured — it plans with the FLOP estimate."""
    n = len(LAYER_NAMES)
    if not 1 <= num_stages <= n:
        raise ConfigError(f"parallel.pp={num_stages}: the network has {n} layers, so use 1 to {n} stages")
    method = method.strip()
    if method == "measured":
        bounds = _balanced(list(costs) if costs is not None else layer_costs(cfg), num_stages)
    elif method == "flops":
        bounds = _balanced(layer_costs(cfg), num_stages)
    elif method == "parameters":
        bounds = _balanced([float(x) for x in layer_param_counts(cfg)], num_stages)
    elif method == "uniform":
        bounds = tuple(round(s * n / num_stages) for s in range(num_stages + 1))
    else:
        try:
            cuts = [int(x) for x in method.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(
                f"parallel.partition={method!r}: use flops, uniform, parameters, or cut points like '5' or '3,6'"
            ) from None
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


def describe(cfg: ModelConfig, part: Partition, costs: list[float] | None = None) -> str:
    """A table of each stage's layers and its share of compute (measured `costs` if given, else
    counted) and parameters."""
    basis = "measured time" if costs is not None else "compute"
    costs, params = list(costs) if costs is not None else layer_costs(cfg), layer_param_counts(cfg)
    total_c, total_p = sum(costs), sum(params)
    lines = [f"pipeline partition ({part.method}), {part.num_stages} stage(s):"]
    for s in range(part.num_stages):
        layers = list(part.stage_layers(s))
        c = sum(costs[i] for i in layers)
        p = sum(params[i] for i in layers)
        names = ",".join(LAYER_NAMES[i] for i in layers)
        lines.append(f"  stage {s}: {names:<34} {basis} {100 * c / total_c:5.1f}%  parameters {100 * p / total_p:5.1f}%")
    return "\n".join(lines)
