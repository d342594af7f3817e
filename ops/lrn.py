"""Local response normalisation (Krizhevsky et al. 2012) with a hand-written backward.

Per spatial position, over channels ``i = 0..C-1``::

    s_i = k + alpha * sum_{j = max(0, i - lo)}^{min(C-1, i + hi)} a_j^2
    b_i = a_i * s_i^(-beta)

with ``lo = size // 2`` and ``hi = (size - 1) // 2``.  For odd ``size`` this is
the paper's symmetric window ``i - size//2 .. i + size//2``; for even ``size`` it
is the window ``torch.nn.LocalResponseNorm`` uses (one more channel below ``i``
than above).  ``alpha`` is *not* divided by ``size`` (torch's module divides,
so ``torch.nn.LocalResponseNorm(size, alpha * size, beta, k)`` is equivalent).

Backward (``g`` = upstream gradient, ``p_i = s_i^-beta``)::

    grad_a_i = g_i p_i - 2 alpha beta a_i * sum_{j : i in W(j)} g_j a_j p_j / s_j

where ``{j : i in W(j)} = i - hi .. i + lo`` (the mirrored window; the same
window for odd ``size``).

Three backends compute exactly this:

* ``"triton"`` -- fused GPU kernels (:mod:`ops.lrn_triton`), used for CUDA
  float32/float16/bfloat16 tensors when Triton is importable;
* ``"cpu_ext"`` -- fused C++ kernels (:mod:`ops.lrn_cpu`), used for CPU
  float32/float64 tensors when the extension builds;
* ``"torch"`` -- plain torch ops (shifted in-place slice adds), the fallback for
  everything else (any device, any floating dtype).

All backends save only the input and ``p = s^-beta`` for backward and recompute
``s`` from the input there (a short window sum).  Inputs are ``N x C x ...``
(channels at dim 1; 2-D ``N x C`` is accepted too).  Dense contiguous and dense
channels-last (channels innermost) inputs are processed in place; any other
strides are copied to contiguous first.  Outputs and input gradients come back
in the processed layout.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from . import lrn_cpu
from .memory_layout import LAYOUT_CHANNELS_LAST, LAYOUT_CONTIGUOUS
from .memory_layout import empty_in_layout as _empty

__all__ = ["LRNFunction", "lrn_forward", "lrn_backward", "select_backend", "BACKENDS"]

BACKENDS = ("auto", "triton", "cpu_ext", "torch")

_LOW_PRECISION = (torch.float16, torch.bfloat16)



# --------------------------------------------------------------------------- helpers
def _check(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"lrn expects a tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"lrn expects an N x C x ... tensor (dim >= 2), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"lrn expects a floating point tensor, got {x.dtype}")
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, got {size}")
    for name, v in (("alpha", alpha), ("beta", beta), ("k", k)):
        if not math.isfinite(float(v)):
            raise ValueError(f"{name} must be finite, got {v}")


def _layout_of(x: torch.Tensor) -> int:
    """Dense layout the kernels can use directly, or -1 (needs a copy)."""
    if x.is_contiguous():
        return LAYOUT_CONTIGUOUS
    if x.movedim(1, -1).is_contiguous():
        return LAYOUT_CHANNELS_LAST
    return -1


def _to_layout(t: torch.Tensor, layout: int) -> torch.Tensor:
    """``t`` itself if already dense in ``layout``, else a copy that is."""
    if layout == LAYOUT_CONTIGUOUS:
        return t.contiguous()
    if t.movedim(1, -1).is_contiguous():
        return t
    out = _empty(t, layout)
    out.copy_(t)
    return out


def _prepare(x: torch.Tensor):
    """Return ``(x_dense, layout)``; copies to contiguous only for strided inputs."""
    layout = _layout_of(x)
    if layout < 0:
        return x.contiguous(), LAYOUT_CONTIGUOUS
    return x, layout


def _kernel_dims(x: torch.Tensor, layout: int):
    """(N, C, S) as the C kernels see it: layout 1 is N*S rows of C channels."""
    n, c = int(x.shape[0]), int(x.shape[1])
    s = 1
    for d in x.shape[2:]:
        s *= int(d)
    if layout == LAYOUT_CHANNELS_LAST:
        return n * s, c, 1
    return n, c, s


def select_backend(x: torch.Tensor, backend: Optional[str] = None) -> str:
    """Which backend ``lrn`` would use for ``x`` (``backend`` forces one)."""
    if backend not in (None, "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown LRN backend {backend!r}; choose from {BACKENDS}")
        if backend == "triton":
            from . import lrn_triton

            on_device = x.is_cuda or lrn_triton.interpreting()
            if not (on_device and lrn_triton.available() and x.dtype in lrn_triton.SUPPORTED_DTYPES):
                raise RuntimeError("the triton LRN backend needs a CUDA float32/16/bf16 tensor "
                                   "and an importable Triton")
        if backend == "cpu_ext":
            dtype_ok = x.dtype in lrn_cpu.SUPPORTED_DTYPES or x.dtype in _LOW_PRECISION
            if not (x.device.type == "cpu" and dtype_ok and lrn_cpu.available()):
                raise RuntimeError("the cpu_ext LRN backend needs a CPU floating point tensor "
                                   f"and a built extension ({lrn_cpu.last_error()})")
        return backend
    if x.is_cuda:
        from . import lrn_triton

        if x.dtype in lrn_triton.SUPPORTED_DTYPES and lrn_triton.available():
            return "triton"
        return "torch"
    if x.device.type == "cpu":
        if x.dtype in lrn_cpu.SUPPORTED_DTYPES and lrn_cpu.available():
            return "cpu_ext"
        if x.dtype in _LOW_PRECISION and lrn_cpu.available():
            return "cpu_ext"  # computed in float32, see lrn_forward
    return "torch"


# --------------------------------------------------------------------------- torch fallback
def _window_sum_(t: torch.Tensor, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
    """out[:, i] = sum_{j = i - lo}^{i + hi} t[:, j] (clipped), via shifted in-place adds."""
    c = t.shape[1]
    out.copy_(t)
    for d in range(1, lo + 1):
        if d >= c:
            break
        out[:, d:].add_(t[:, : c - d])
    for d in range(1, hi + 1):
        if d >= c:
            break
        out[:, : c - d].add_(t[:, d:])
    return out


def _neg_pow_(s: torch.Tensor, beta: float) -> torch.Tensor:
    """s <- s^-beta in place (cheap special cases for common beta)."""
    if beta == 0.75:
        root = torch.sqrt(s)
        return s.mul_(root).rsqrt_()
    if beta == 0.5:
        return s.rsqrt_()
    if beta == 1.0:
        return s.reciprocal_()
    return s.pow_(-beta)


def _scale(x: torch.Tensor, size: int, alpha: float, k: float) -> torch.Tensor:
    """s = k + alpha * window-sum of x^2 (x dense; s gets x's layout)."""
    sq = x * x
    s = torch.empty_like(sq)
    _window_sum_(sq, size // 2, (size - 1) // 2, s)
    del sq
    return s.mul_(alpha).add_(k)


def _torch_forward(x, size, alpha, beta, k, need_p):
    p = _neg_pow_(_scale(x, size, alpha, k), beta)
    y = x * p
    return y, (p if need_p else None)


def _torch_backward(x, p, g, size, alpha, beta, k):
    s = _scale(x, size, alpha, k)
    gp = g * p
    t = gp * x
    t.div_(s)
    del s
    ws = torch.empty_like(t)
    _window_sum_(t, (size - 1) // 2, size // 2, ws)  # mirrored window
    del t
    return gp.addcmul_(x, ws, value=-2.0 * alpha * beta)


# --------------------------------------------------------------------------- dispatch
def lrn_forward(x: torch.Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75,
                k: float = 2.0, need_p: bool = True, backend: Optional[str] = None):
    """Forward pass without autograd: returns ``(y, x_saved, p, layout, backend)``.

    ``x_saved`` is the dense tensor the kernels read (``x`` itself unless ``x``
    needed a copy or an upcast) and ``p = s^-beta`` (``None`` unless
    ``need_p``); pass them to :func:`lrn_backward`.
    """
    _check(x, size, alpha, beta, k)
    size, alpha, beta, k = int(size), float(alpha), float(beta), float(k)
    backend = select_backend(x, backend)
    if backend == "triton":
        from . import lrn_triton

        xd, layout = _prepare(x)
        # the GPU kernels save s (float32) rather than p, see ops.lrn_triton
        y, p = lrn_triton.forward(xd, layout, size, alpha, beta, k, need_p)
        return y, xd, p, layout, backend
    if backend == "cpu_ext":
        out_dtype = x.dtype
        xd, layout = _prepare(x)
        if xd.dtype in _LOW_PRECISION:
            xd = xd.float()
        y = _empty(xd, layout)
        p = _empty(xd, layout) if need_p else None
        if x.numel():
            n, c, s = _kernel_dims(xd, layout)
            lrn_cpu.forward(xd, y, p, layout, n, c, s, size, alpha, beta, k)
        if out_dtype != xd.dtype:
            y = y.to(out_dtype)
        return y, xd, p, layout, backend
    # torch fallback: low-precision inputs are computed in float32
    out_dtype = x.dtype
    xd, layout = _prepare(x)
    if xd.dtype in _LOW_PRECISION:
        xd = xd.float()
    y, p = _torch_forward(xd, size, alpha, beta, k, need_p)
    if out_dtype != xd.dtype:
        y = y.to(out_dtype)
    return y, xd, p, layout, backend


def lrn_backward(g: torch.Tensor, x: torch.Tensor, p: torch.Tensor, layout: int, backend: str,
                 size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0,
                 out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Input gradient for upstream gradient ``g`` (see module docstring for the math)."""
    out_dtype = out_dtype or x.dtype
    size, alpha, beta, k = int(size), float(alpha), float(beta), float(k)
    if backend == "triton":
        from . import lrn_triton

        gi = lrn_triton.backward(x, p, _to_layout(g, layout), layout, size, alpha, beta, k)
        return gi if gi.dtype == out_dtype else gi.to(out_dtype)
    g = _to_layout(g.to(x.dtype), layout)
    if backend == "cpu_ext":
        gi = _empty(x, layout)
        if x.numel():
            n, c, s = _kernel_dims(x, layout)
            lrn_cpu.backward(x, p, g, gi, layout, n, c, s, size, alpha, beta, k)
    else:
        gi = _torch_backward(x, p, g, size, alpha, beta, k)
    return gi if gi.dtype == out_dtype else gi.to(out_dtype)


class LRNFunction(torch.autograd.Function):
    """``LRNFunction.apply(x, size=5, alpha=1e-4, beta=0.75, k=2.0, backend=None)``.

    Hand-written backward; saves only the (dense) input and ``p = s^-beta``.
    Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, size=5, alpha=1e-4, beta=0.75, k=2.0, backend=None):
        need_p = bool(ctx.needs_input_grad[0])
        y, xd, p, layout, used = lrn_forward(x, size, alpha, beta, k, need_p=need_p,
                                             backend=backend)
        if need_p:
            ctx.save_for_backward(xd, p)
        ctx.hparams = (int(size), float(alpha), float(beta), float(k))
        ctx.layout = layout
        ctx.backend = used
        ctx.in_dtype = x.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        xd, p = ctx.saved_tensors
        size, alpha, beta, k = ctx.hparams
        gi = lrn_backward(g, xd, p, ctx.layout, ctx.backend, size, alpha, beta, k,
                          out_dtype=ctx.in_dtype)
        return gi, None, None, None, None, None
