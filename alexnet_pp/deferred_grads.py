"""Weight gradients of the fully connected layers, computed once per step instead of per micro-batch.

At micro-batch 16 the FC layers are memory-bound: each micro-batch's weight gradient writes a full
gradient tensor (fc6's is 151 MB) and adds it into the accumulated one, so a pipeline step of 8
micro-batches does 8 products and 7 full-size additions where the single-process step does one
product. Here the backward pass of a wrapped `nn.Linear` computes only the input gradient and keeps
the layer's input and output gradient; `flush()` turns the kept rows into one product per layer,
[g₁ … g_M]ᵀ[x₁ … x_M] = Σ gᵢᵀxᵢ, the same sum the single-process trainer computes for the whole
batch. This is the split of backward into an input part (B) and a weight part (W) of zero-bubble
pipeline schedules: the engine flushes right before DeepSpeed reduces gradients, so the last stage's
W work runs while the stage before it still runs its last backward pass.

Only for float32 without ZeRO: DeepSpeed's bf16 and ZeRO optimizers collect gradients during the
micro-batches, which this would bypass.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], owner: "DeferredLinear"):
        ctx.save_for_backward(x, weight)
        ctx.owner = owner
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        ctx.owner.kept.append((x.detach(), grad.detach()))
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class DeferredLinear(nn.Module):
    """An `nn.Linear`'s parameters (the same Parameter objects, under the same names) with the
    weight gradient deferred to `flush()`."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return _Linear.apply(x, self.weight, self.bias, self)
        return F.linear(x, self.weight, self.bias)

    def flush(self) -> None:
        if not self.kept:
            return
        x = torch.cat([x for x, _ in self.kept])
        g = torch.cat([g for _, g in self.kept])
        self.kept.clear()
        if self.weight.grad is None:
            self.weight.grad = g.t() @ x
        else:
            self.weight.grad.addmm_(g.t(), x)
        if self.bias is not None:
            if self.bias.grad is None:
                self.bias.grad = g.sum(0)
            else:
                self.bias.grad.add_(g.sum(0))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight gradient deferred"


class DeferredGrads:
    """Every `nn.Linear` under `modules` replaced by a DeferredLinear; `flush()` before gradients
    are read (reduced, clipped, stepped)."""

    def __init__(self, modules: list[nn.Module]):
        self.linears: list[DeferredLinear] = []
        for root in modules:
            for parent in list(root.modules()):
                for name, child in list(parent.named_children()):
                    if type(child) is nn.Linear:
                        wrapped = DeferredLinear(child)
                        setattr(parent, name, wrapped)
                        self.linears.append(wrapped)

    def flush(self) -> None:
        for linear in self.linears:
            linear.flush()
