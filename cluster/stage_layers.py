"""The plan that turns the network into one rank's pipeline layers.

T = 1: a rank runs whole layers (both towers), or tower halves, or pieces of a half, at a cut. T = 2: a rank holds only its
tower's half of each layer; cross-tower layers (conv3, fc6, fc7, fc8) all-gather the towers'
activations inside the tower group first. Labels and the rows' dropout keys ride along with the
activations from the first stage to the last, so the loss always sees the labels of the images that
produced its logits and every stage draws the masks the single network would.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from alexnet_pp.config import ModelConfig
from alexnet_pp.model import build_part, layer_ops
from alexnet_pp.pipeline import Partition, TowerPiece, Unit, build_unit, model_key, stage_plan
from alexnet_pp.shapes import LAYER_NAMES
from alexnet_pp.steps import EvalAccumulator, average_crops, loss_fn


class GroupRef:
    """The tower process group, which exists only once DeepSpeed's grid is built."""

    def __init__(self) -> None:
        self.group: Optional[dist.ProcessGroup] = None

    def get(self) -> dist.ProcessGroup:
        if self.group is None:
            raise RuntimeError("tower group used before the pipeline grid was built")
        return self.group


class _GatherTowers(torch.autograd.Function):
    """All-gather the towers' halves along dim 1. Backward: each tower's slice of the gradient,
    summed over towers when every tower computed a different output from the full input
    (sharded consumer), taken as is when every tower computed the same thing (replicated consumer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, tower: int, towers: int, sum_grads: bool):
        ctx.group, ctx.tower, ctx.towers, ctx.sum_grads = group, tower, towers, sum_grads
        ctx.width = x.shape[1]
        parts = [torch.empty_like(x) for _ in range(towers)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if ctx.sum_grads:
            dist.all_reduce(grad, group=ctx.group)
        start = ctx.tower * ctx.width
        return grad[:, start : start + ctx.width].contiguous(), None, None, None, None


class MemoryFormat:
    """How a stage's layers hold and compute their activations. Under `parallel.channels_last` 4-D
    activations become channels-last before every layer (a no-op once they are) and contiguous again
    when they leave the stage, since the point-to-point sends and the tower all-gather move contiguous
    tensors; under `parallel.precision bf16-mixed` the layers compute under autocast."""

    def __init__(self, channels_last: bool, stage_end: bool, autocast: Optional[torch.dtype] = None):
        self.channels_last, self.stage_end, self.autocast = channels_last, stage_end, autocast

    def compute(self, x: torch.Tensor):
        """The context a layer runs in: torch.autocast to `autocast` on x's device (parallel.precision
        bf16-mixed), as the plain step's; backward replays its casts."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=self.autocast)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def leave(self, y: torch.Tensor) -> torch.Tensor:
        return y.contiguous() if self.channels_last and self.stage_end else y


def _first_input(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Images as the first layer takes them: multi-crop evaluation's crops become batch rows, and
    float32 images meet bf16/fp16 weights in the weights' precision (DeepSpeed moves, never casts)."""
    if x.dim() == 5:
        x = x.flatten(0, 1)
    dtype = next(module.parameters()).dtype
    return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x


class StageLayer(nn.Module):
    """A pipeline unit of the T = 1 network (a whole layer, a tower half, a piece of one) as a pipeline layer:
    (x, labels, dropout keys) → (y, labels, dropout keys). Builds only the parts it holds."""

    def __init__(self, cfg: ModelConfig, unit: Unit, seed: int, first: bool,
                 memory: MemoryFormat = MemoryFormat(False, False)):
        super().__init__()
        self.layer = build_unit(cfg, unit, seed)
        self.first, self.memory = first, memory

    def model_parameters(self):
        """(key in the single model's state_dict, parameter) of what this layer holds."""
        if isinstance(self.layer, TowerPiece):
            yield from self.layer.model_parameters()
            return
        for t, part in enumerate(self.layer.parts):
            for leaf, p in part.named_parameters():
                yield model_key(self.layer.name, t, leaf), p

    def forward(self, inputs):
        x, labels, keys = inputs
        if self.first:
            x = _first_input(x, self.layer)
        with self.memory.compute(x):
            y = self.layer(self.memory.enter(x), keys)
        return self.memory.leave(y), labels, keys


class TowerShard(nn.Module):
    """Tower `tower`'s share of a layer on a tower-parallel rank: the layer's own `TowerOps` over this
    tower's part, after all-gathering the towers' activations where the layer crosses towers. Dropout
    masks come from the rows' keys and this tower's neuron offset, as in the single network."""

    def __init__(self, cfg: ModelConfig, name: str, tower: int, group: GroupRef, seed: int, first: bool,
                 memory: MemoryFormat = MemoryFormat(False, False)):
        super().__init__()
        self.ops = layer_ops(cfg)[LAYER_NAMES.index(name)]
        self.replicated = name == "fc8"  # one part, computed by both towers
        self.part = build_part(cfg, name, None if self.replicated else tower, seed)
        self.tower, self.group, self.first, self.memory = tower, group, first, memory

    @property
    def name(self) -> str:
        return self.ops.name

    def model_parameters(self):
        for leaf, p in self.part.named_parameters():
            yield model_key(self.name, None if self.replicated else self.tower, leaf), p

    def forward(self, inputs):
        x, labels, keys = inputs
        if self.first:
            x = _first_input(x, self.part)
        if self.ops.connect == "both":
            x = _GatherTowers.apply(x, self.group.get(), self.tower, 2, not self.replicated)
        x = self.memory.enter(self.ops.input(x, self.tower, both_towers=False))
        with self.memory.compute(x):
            y = self.ops.forward(self.part, self.tower, x, keys, self.training)
        return self.memory.leave(y), labels, keys


def rank_layers(cfg: ModelConfig, tp: int, tower: int, group: GroupRef, seed: int,
                cut: Partition, channels_last: bool = False,
                autocast: Optional[torch.dtype] = None) -> tuple[list, tuple[int, ...]]:
    """Every pipeline layer of the network as this rank would run it, as DeepSpeed LayerSpecs (the
    engine builds only its own stage's, so a rank allocates only its stage's and tower's parameters),
    and the stage bounds over them. T = 1: whole layers, tower halves or their pieces only at a cut.
    T = 2: whole layers, this rank's tower of each."""
    from deepspeed.pipe import LayerSpec  # deepspeed picks its accelerator at import: inside the worker

    plan, bounds = stage_plan(cut.bounds, 1, cut.splits) if tp == 1 else (LAYER_NAMES, cut.bounds)

    def spec(i: int, unit) -> LayerSpec:
        memory = MemoryFormat(channels_last, stage_end=i + 1 in bounds, autocast=autocast)
        if tp == 1:
            return LayerSpec(StageLayer, cfg, unit, seed, i == 0, memory)
        return LayerSpec(TowerShard, cfg, unit, tower, group, seed, i == 0, memory)

    return [spec(i, unit) for i, unit in enumerate(plan)], bounds


def mark_norm_ownership(module: nn.Module, tp: int, tower: int) -> None:
    """DeepSpeed's gradient-norm sums a parameter on every rank only if it is marked `model_parallel`
    (else only on model-parallel rank 0, i.e. stage 0). Every stage's parameters are its own, tower
    halves are distinct, and fc8 — replicated on both towers — must count once."""
    for sub in module.modules():
        if isinstance(sub, TowerShard):
            for p in sub.part.parameters():
                p.model_parallel = not (sub.replicated and tower != 0)
        elif isinstance(sub, StageLayer):
            for p in sub.parameters():
                p.model_parallel = True


def pipeline_loss(outputs, _labels_from_loader):
    """Loss on the last stage, from the labels carried with the activations."""
    logits, labels, _keys = outputs
    return loss_fn(logits, labels)


def eval_stats(outputs, _labels_from_loader) -> torch.Tensor:
    """[loss sum, top-1 hits, top-5 hits, samples] of a (possibly padded, multi-crop) eval micro-batch.
    Padding rows carry label -1 and count nowhere."""
    logits, labels, _keys = outputs
    probs = average_crops(logits, labels.shape[0])
    valid = labels >= 0
    acc = EvalAccumulator()
    if valid.any():
        acc.add(probs[valid], labels[valid])
    hits1, hits5, n, loss = acc.totals()
    return torch.tensor([loss, hits1, hits5, n], dtype=torch.float32)
