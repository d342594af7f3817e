"""The plan that turns the model's TowerLayers into one rank's pipeline layers.

T = 1: a rank runs whole layers (both towers). T = 2: a rank holds only its tower's half of each
layer; cross-tower layers (conv3, fc6, fc7, fc8) all-gather the towers' activations inside the
tower group first. Labels ride along with the activations from the first stage to the last, so
the loss always sees the labels of the images that produced its logits.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from alexnet_pp.model import AlexNet, TowerLayer
from alexnet_pp.pipeline import TowerHalf, model_key, stage_modules


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


def _first_input(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Images as the first layer takes them: multi-crop evaluation's crops become batch rows, and
    float32 images meet bf16/fp16 weights in the weights' precision (DeepSpeed moves, never casts)."""
    if x.dim() == 5:
        x = x.flatten(0, 1)
    dtype = next(module.parameters()).dtype
    return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x


class StageLayer(nn.Module):
    """A pipeline unit holding both towers (a whole TowerLayer, or one TowerHalf) as a pipeline
    layer: (x, labels) → (y, labels)."""

    def __init__(self, layer: nn.Module, first: bool):
        super().__init__()
        self.layer = layer
        self.first = first

    def model_parameters(self):
        """(key in the single model's state_dict, parameter) of what this layer holds."""
        if isinstance(self.layer, TowerHalf):
            yield from self.layer.model_parameters()
            return
        for t, part in enumerate(self.layer.parts):
            for leaf, p in part.named_parameters():
                yield model_key(self.layer.name, t, leaf), p

    def forward(self, inputs):
        x, labels = inputs
        if self.first:
            x = _first_input(x, self.layer)
        return self.layer(x), labels


class TowerShard(nn.Module):
    """Tower `tower`'s half of a TowerLayer, communicating with the other tower where the layer crosses.

    Dropout masks are drawn for the full (two-tower) width from a generator both towers advance in
    step, and each tower keeps its slice: neurons stay independent, and a run is reproducible.
    """

    def __init__(self, layer: TowerLayer, tower: int, group: GroupRef, first: bool, dropout_seed: int):
        super().__init__()
        self.name = layer.name
        self.connect = layer.connect
        self.replicated = len(layer.parts) == 1  # fc8: one part, computed by both towers
        self.part = layer.parts[0 if self.replicated else tower]
        self.post = layer.post
        self.pad = layer.pad
        self.flatten = layer.flatten
        self.dropout = layer.dropout
        self.tower = tower
        self.group = group
        self.first = first
        self.generator = torch.Generator().manual_seed(dropout_seed) if layer.dropout else None

    def model_parameters(self):
        for leaf, p in self.part.named_parameters():
            yield model_key(self.name, None if self.replicated else self.tower, leaf), p

    def forward(self, inputs):
        x, labels = inputs
        if self.first:
            x = _first_input(x, self.part)
        if self.connect == "both":
            x = _GatherTowers.apply(x, self.group.get(), self.tower, 2, not self.replicated)
        if self.flatten:
            x = torch.flatten(x, 1)
        if any(self.pad):
            x = F.pad(x, self.pad)
        y = self.part(x)
        for op in self.post:
            y = op(y)
        if self.dropout and self.training:
            y = self._dropout(y)
        return y, labels

    def _dropout(self, y: torch.Tensor) -> torch.Tensor:
        n, width = y.shape
        keep = torch.empty(n, 2 * width).bernoulli_(1 - self.dropout, generator=self.generator)
        mine = keep[:, self.tower * width : (self.tower + 1) * width].to(y.device, y.dtype)
        return y * mine / (1 - self.dropout)


def stage_layers(model: AlexNet, tp: int, tower: int, group: GroupRef, seed: int, replica: int,
                 bounds: tuple[int, ...]) -> tuple[list[nn.Module], tuple[int, ...]]:
    """Every pipeline layer of the network as this rank would run it (DeepSpeed keeps its stage's
    slice), and the stage bounds over them. T = 1: alexnet_pp.pipeline's stage modules (whole
    layers, tower halves only at a cut). T = 2: whole layers, this rank's tower of each."""
    if tp == 1:
        modules, bounds = stage_modules(model, bounds, 1)
        return [StageLayer(m, first=i == 0) for i, m in enumerate(modules)], bounds
    layers = [
        TowerShard(layer, tower, group, first=i == 0, dropout_seed=seed * 1_000_003 + replica * 101 + i)
        for i, layer in enumerate(model.layers())
    ]
    return layers, bounds


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
    from alexnet_pp.steps import loss_fn

    logits, labels = outputs
    return loss_fn(logits, labels)


def eval_stats(outputs, _labels_from_loader) -> torch.Tensor:
    """[loss sum, top-1 hits, top-5 hits, samples] of a (possibly padded, multi-crop) eval micro-batch.
    Padding rows carry label -1 and count nowhere."""
    from alexnet_pp.steps import EvalAccumulator, average_crops

    logits, labels = outputs
    probs = average_crops(logits, labels.shape[0])
    valid = labels >= 0
    acc = EvalAccumulator()
    if valid.any():
        acc.add(probs[valid], labels[valid])
    hits1, hits5, n, loss = acc.totals()
    return torch.tensor([loss, hits1, hits5, n], dtype=torch.float32)
