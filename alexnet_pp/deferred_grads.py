"""Weight gradients computed apart from the backward pass: once per step, or once per micro-batch.

At micro-batch 16 the FC layers are memory-bound: each micro-batch's weight gradient writes a full
gradient tensor (fc6's is 151 MB) and adds it into the accumulated one, so a pipeline step of 8
micro-batches does 8 products and 7 full-size additions where the single-process step does one
product. Here the backward pass of a wrapped `nn.Linear` (and, for the zero-bubble schedule, a
wrapped `nn.Conv2d`) computes only the input gradient and keeps the layer's input and output
gradient; `flush()` turns the kept rows into one product per layer, [g₁ … g_M]ᵀ[x₁ … x_M] = Σ gᵢᵀxᵢ,
the same sum the single-process trainer computes for the whole batch. This is the split of backward
into an input part (B) and a weight part (W) of zero-bubble pipeline schedules:

- `parallel.defer_weight_grads` (1F1B): FC layers only, one product per step, flushed right before
  DeepSpeed reduces gradients, so the last stage's W work runs while the stage before it still runs
  its last backward pass;
- `parallel.schedule: zb-h1` (cluster/zero_bubble.py): every convolution and linear map, the rows
  kept per micro-batch (`recording(key)` around its B) and flushed per micro-batch (`flush(key)`,
  the schedule's W pass), in micro-batch order, so the gradients add up in the order 1F1B adds them.

Only for float32 without ZeRO: DeepSpeed's bf16 and ZeRO optimizers collect gradients during the
micro-batches, which this would bypass.
"""

from __future__ import annotations

import contextlib
from typing import Hashable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ALL = object()  # flush(): every kept micro-batch in one product


class _Recorder:
    """Which micro-batch a backward pass belongs to; shared by the layers of one DeferredGrads."""

    def __init__(self) -> None:
        self.key: Hashable = None


class _Deferred(nn.Module):
    """A layer's parameters (the same Parameter objects, under the same names) with the weight
    gradient kept for `flush()`: the kept (input, output gradient) pairs, per micro-batch key."""

    def __init__(self, layer: nn.Module, recorder: Optional[_Recorder] = None):
        super().__init__()
        self.weight = layer.weight
        self.bias = layer.bias
        self.recorder = recorder or _Recorder()
        self.kept: dict[Hashable, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _keep(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        self.kept.setdefault(self.recorder.key, []).append((x.detach(), grad.detach()))

    def flush(self, key: Hashable = ALL) -> None:
        """Add the kept micro-batches' weight (and bias) gradients into .grad: all of them in one
        product, or those recorded under `key`."""
        if key is ALL:
            rows = [pair for pairs in self.kept.values() for pair in pairs]
            self.kept.clear()
        else:
            rows = self.kept.pop(key, [])
        if not rows:
            return
        x = rows[0][0] if len(rows) == 1 else torch.cat([x for x, _ in rows])
        g = rows[0][1] if len(rows) == 1 else torch.cat([g for _, g in rows])
        # a W pass runs outside autograd's backward, where grad mode is on: the convolution's aten
        # backward would otherwise record a graph through the weight into the gradient it adds to .grad
        with torch.no_grad():
            self._accumulate(x, g)

    def _accumulate(self, x: torch.Tensor, g: torch.Tensor) -> None:
        raise NotImplementedError

    @staticmethod
    def _add(param: torch.Tensor, grad: torch.Tensor) -> None:
        if param.grad is None:
            # in the parameter's own layout, as autograd's accumulation gives it: a convolution over
            # channels-last inputs returns a channels-last weight gradient, and DeepSpeed reads
            # gradients through flat views of contiguous buffers
            param.grad = grad if grad.stride() == param.stride() else torch.empty_like(param).copy_(grad)
        else:
            param.grad.add_(grad)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], owner: "DeferredLinear"):
        ctx.save_for_backward(x, weight)
        ctx.owner = owner
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        ctx.owner._keep(x, grad)
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class DeferredLinear(_Deferred):
    """An `nn.Linear` with the weight gradient deferred to `flush()`."""

    def __init__(self, linear: nn.Linear, recorder: Optional[_Recorder] = None):
        super().__init__(linear, recorder)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return _Linear.apply(x, self.weight, self.bias, self)
        return F.linear(x, self.weight, self.bias)

    def _accumulate(self, x: torch.Tensor, g: torch.Tensor) -> None:
        if self.weight.grad is None:
            self.weight.grad = g.t() @ x
        else:
            self.weight.grad.addmm_(g.t(), x)
        if self.bias is not None:
            self._add(self.bias, g.sum(0))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight gradient deferred"


def _conv_backward(conv: "DeferredConv2d", g: torch.Tensor, x: torch.Tensor, mask: tuple[bool, bool, bool]):
    """torch's own convolution backward (the kernel autograd runs for nn.Conv2d), for the outputs in
    `mask`: (input, weight, bias)."""
    bias_sizes = [conv.out_channels] if conv.bias is not None else None
    return torch.ops.aten.convolution_backward(g, x, conv.weight, bias_sizes, conv.stride, conv.padding,
                                               conv.dilation, False, [0, 0], conv.groups, list(mask))


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], owner: "DeferredConv2d"):
        ctx.save_for_backward(x)
        ctx.owner = owner
        return F.conv2d(x, weight, bias, owner.stride, owner.padding, owner.dilation, owner.groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        owner = ctx.owner
        owner._keep(x, grad)
        grad_x = _conv_backward(owner, grad, x, (True, False, False))[0] if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class DeferredConv2d(_Deferred):
    """An `nn.Conv2d` with the weight gradient deferred to `flush()`."""

    def __init__(self, conv: nn.Conv2d, recorder: Optional[_Recorder] = None):
        super().__init__(conv, recorder)
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("deferred convolutions take numeric zero padding")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return _Conv2d.apply(x, self.weight, self.bias, self)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _accumulate(self, x: torch.Tensor, g: torch.Tensor) -> None:
        _, grad_w, grad_b = _conv_backward(self, g, x, (False, True, self.bias is not None))
        self._add(self.weight, grad_w)
        if self.bias is not None:
            self._add(self.bias, grad_b)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, weight gradient deferred")


class DeferredGrads:
    """Every `nn.Linear` (and with `convolutions`, every `nn.Conv2d`) under `modules` replaced by its
    deferred form; `flush()` before gradients are read (reduced, clipped, stepped)."""

    def __init__(self, modules: list[nn.Module], convolutions: bool = False):
        self.recorder = _Recorder()
        self.layers: list[_Deferred] = []
        kinds = {nn.Linear: DeferredLinear, **({nn.Conv2d: DeferredConv2d} if convolutions else {})}
        for root in modules:
            for parent in list(root.modules()):
                for name, child in list(parent.named_children()):
                    if type(child) in kinds:
                        wrapped = kinds[type(child)](child, self.recorder)
                        setattr(parent, name, wrapped)
                        self.layers.append(wrapped)

    @property
    def linears(self) -> list[DeferredLinear]:
        return [layer for layer in self.layers if isinstance(layer, DeferredLinear)]

    @contextlib.contextmanager
    def recording(self, key: Hashable) -> Iterator[None]:
        """Backward passes inside keep their rows under `key` (a micro-batch's pipeline buffer)."""
        previous, self.recorder.key = self.recorder.key, key
        try:
            yield
        finally:
            self.recorder.key = previous

    def pending(self) -> set:
        """The keys whose weight gradients are not flushed yet."""
        return {key for layer in self.layers for key in layer.kept}

    def flush(self, key: Hashable = ALL) -> None:
        for layer in self.layers:
            layer.flush(key)

    def discard(self) -> None:
        """Forget every kept row (backward passes whose gradients are not wanted)."""
        for layer in self.layers:
            layer.kept.clear()
