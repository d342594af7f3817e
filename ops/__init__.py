"""Custom operators for alexnet-pp.

Local response normalisation exactly as in Krizhevsky et al. (2012)::

    b_i = a_i / (k + alpha * sum_{j=max(0, i-n//2)}^{min(C-1, i+n//2)} a_j^2) ** beta

(``alpha`` is not divided by ``n``; ``torch.nn.LocalResponseNorm(n, alpha * n,
beta, k)`` computes the same thing).  For even ``size`` the window follows
``torch.nn.LocalResponseNorm``: ``size // 2`` channels below, ``(size - 1) // 2``
above.

* :func:`lrn` -- functional form (autograd-aware).
* :class:`LRN` -- ``nn.Module`` wrapper.
* :class:`LRNFunction` -- the ``torch.autograd.Function`` (hand-written backward).
* :data:`FUSED_LRN_AVAILABLE` -- Triton imports and CUDA is available, so CUDA
  tensors use the fused GPU kernels.
* :func:`cpu_kernel_available` -- whether the fused C++ CPU kernel is usable
  (it is built on first use, so this is a function, not a constant).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import lrn_cpu
from .lrn import LRNFunction, lrn_backward, lrn_forward, select_backend

__all__ = [
    "lrn",
    "LRN",
    "LRNFunction",
    "FUSED_LRN_AVAILABLE",
    "cpu_kernel_available",
    "select_backend",
    "lrn_forward",
    "lrn_backward",
]


def _fused_available() -> bool:
    try:
        if not torch.cuda.is_available():
            return False
        from . import lrn_triton

        return lrn_triton.available()
    except Exception:  # noqa: BLE001 - never break `import ops`
        return False


FUSED_LRN_AVAILABLE: bool = _fused_available()


def cpu_kernel_available() -> bool:
    """Whether the fused C++ CPU kernel is usable (builds it on first call)."""
    return lrn_cpu.available()


def lrn(x: torch.Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75,
        k: float = 2.0, *, backend: Optional[str] = None) -> torch.Tensor:
    """Local response normalisation over dim 1 of ``x`` (``N x C x ...``).

    Uses the fused Triton kernels for CUDA tensors when available, the fused C++
    kernel for CPU float32/float64 tensors, and plain torch ops otherwise.
    ``backend`` ("auto", "triton", "cpu_ext", "torch") forces one, for testing.
    """
    if not (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad):
        # inference: no autograd node, and p = s^-beta is not stored
        return lrn_forward(x, size, alpha, beta, k, need_p=False, backend=backend)[0]
    return LRNFunction.apply(x, size, alpha, beta, k, backend)


class LRN(nn.Module):
    """``nn.Module`` form of :func:`lrn` (paper defaults: size 5, alpha 1e-4, beta 0.75, k 2)."""

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        if int(size) != size or size < 1:
            raise ValueError(f"size must be a positive integer, got {size}")
        self.size = int(size)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.k = float(k)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lrn(x, self.size, self.alpha, self.beta, self.k, backend=self.backend)

    def extra_repr(self) -> str:
        rep = f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"
        if self.backend not in (None, "auto"):
            rep += f", backend={self.backend!r}"
        return rep
