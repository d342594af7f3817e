"""Fused Triton GPU kernels for LRN (forward and backward).

Importing this module never imports Triton; :func:`available` does, lazily,
and only when CUDA is available (or ``TRITON_INTERPRET=1`` is set, which runs
the same kernels on CPU tensors through Triton's interpreter -- used to test the
kernel logic on machines without a GPU).

Layout: the dense input is viewed as ``(N, C, S)`` with strides
``(stride_n, stride_c, stride_s)``; contiguous NCHW has ``stride_s == 1`` and
channels-last has ``stride_c == 1``.  One program handles a
``BLOCK_C x BLOCK_S`` tile (a block of channels at a block of spatial positions
of one sample); the channel window is ``size`` shifted tile loads (neighbouring
channel rows come from L1/L2) summed in registers.  The flattened grid walks
channel blocks fastest, so programs that share halo rows run together.

The GPU path saves ``s`` (float32) for backward rather than ``p = s^-beta``:
the backward needs ``s_j^(-beta-1)`` at every neighbour ``j``, which is then
three loads (``g_j, a_j, s_j``) and a couple of MUFU ops instead of a second
window sum per neighbour::

    grad_i = g_i s_i^-beta - 2 alpha beta a_i * sum_{j = i-hi}^{i+lo} g_j a_j s_j^(-beta-1)

All arithmetic is float32; inputs may be float32, float16 or bfloat16 and the
output / input-gradient keep the input dtype.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Optional

import torch

from .memory_layout import empty_in_layout

__all__ = ["available", "forward", "backward", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_lock = threading.Lock()
_kernels = None  # (fwd_kernel, bwd_kernel) once compiled
_tried = False
_error: Optional[str] = None


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` (kernels run on CPU tensors, for testing)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """True when Triton imports and there is a device to run on (CUDA, or the interpreter)."""
    global _kernels, _tried, _error
    if _tried:
        return _kernels is not None
    with _lock:
        if not _tried:
            try:
                if not (torch.cuda.is_available() or interpreting()):
                    raise RuntimeError("CUDA is not available")
                from . import _lrn_triton_kernels as kern

                _kernels = (kern.lrn_fwd_kernel, kern.lrn_bwd_kernel)
            except Exception as exc:  # noqa: BLE001 - ImportError, old Triton, no driver...
                _kernels = None
                _error = str(exc)
            _tried = True
    return _kernels is not None


def last_error() -> Optional[str]:
    return _error


def _pow_mode(beta: float) -> int:
    return {0.75: 0, 0.5: 1, 1.0: 2}.get(beta, 3)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _geometry(x: torch.Tensor, layout: int):
    """(C, S, stride_n, stride_c, stride_s) of the dense (N, C, S) view; layout 1 = channels-last."""
    c = int(x.shape[1])
    s = 1
    for d in x.shape[2:]:
        s *= int(d)
    if layout == 1:
        return c, s, c * s, 1, c
    return c, s, c * s, s, 1


def _config(layout: int, c: int, s: int):
    """Tile shape: ~2K elements, contiguous dimension along the tile's fast axis."""
    if layout == 1:  # channels innermost: cover the channels in one (or a few) tiles
        block_c = min(_next_pow2(c), 256)
        block_s = max(1, min(_next_pow2(s), 2048 // block_c))
    else:  # spatial innermost: long rows, a few channels
        block_s = min(_next_pow2(s), 256)
        block_c = max(1, min(_next_pow2(c), 2048 // block_s))
    num_warps = 8 if block_c * block_s >= 2048 else 4
    return block_c, block_s, num_warps


def _grid(x: torch.Tensor, layout: int):
    c, s, sn, sc, ss = _geometry(x, layout)
    block_c, block_s, num_warps = _config(layout, c, s)
    n_cb = triton_cdiv(c, block_c)
    n_sb = triton_cdiv(s, block_s)
    grid = (n_cb * n_sb * int(x.shape[0]),)
    return c, s, sn, sc, ss, block_c, block_s, num_warps, n_cb, n_sb, grid


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _on_device(x: torch.Tensor):
    """Launch on x's GPU (Triton uses the current device), not whichever is current."""
    if x.is_cuda:
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def forward(x: torch.Tensor, layout: int, size: int, alpha: float, beta: float, k: float,
            need_saved: bool = True):
    """Fused forward on a dense tensor in ``layout``: returns ``(y, s or None)``."""
    if not available():
        raise RuntimeError(f"Triton LRN kernels unavailable: {_error}")
    fwd, _ = _kernels
    y = empty_in_layout(x, layout, x.dtype)
    sbuf = empty_in_layout(x, layout, torch.float32) if need_saved else None
    if x.numel() == 0:
        return y, sbuf
    c, s, sn, sc, ss, bc, bs, nw, n_cb, n_sb, grid = _grid(x, layout)
    with _on_device(x):
        fwd[grid](x, y, sbuf if sbuf is not None else y, c, s, sn, sc, ss, n_cb, n_sb,
                  float(alpha), float(beta), float(k),
                  LO=size // 2, HI=(size - 1) // 2, POW_MODE=_pow_mode(beta),
                  SAVE_S=need_saved, BLOCK_C=bc, BLOCK_S=bs, num_warps=nw)
    return y, sbuf


def backward(x: torch.Tensor, sbuf: torch.Tensor, g: torch.Tensor, layout: int, size: int,
             alpha: float, beta: float, k: float) -> torch.Tensor:
    """Fused backward: ``x``, ``sbuf`` and ``g`` dense in ``layout``; returns grad in x.dtype."""
    if not available():
        raise RuntimeError(f"Triton LRN kernels unavailable: {_error}")
    _, bwd = _kernels
    gi = empty_in_layout(x, layout, x.dtype)
    if x.numel() == 0:
        return gi
    if g.dtype != x.dtype:
        g = g.to(x.dtype)
    c, s, sn, sc, ss, bc, bs, nw, n_cb, n_sb, grid = _grid(x, layout)
    with _on_device(x):
        bwd[grid](x, sbuf, g, gi, c, s, sn, sc, ss, n_cb, n_sb,
                  float(-2.0 * alpha * beta), float(beta),
                  LO=size // 2, HI=(size - 1) // 2, POW_MODE=_pow_mode(beta),
                  BLOCK_C=bc, BLOCK_S=bs, num_warps=nw)
    return gi
