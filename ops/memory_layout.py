"""Dense memory layouts the LRN kernels read and write (shared by the CPU and GPU paths)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

LAYOUT_CONTIGUOUS = 0  # N, C, spatial... row-major
LAYOUT_CHANNELS_LAST = 1  # N, spatial..., C row-major (channels innermost)


def strides_of(shape: Sequence[int], layout: int) -> tuple:
    """Row-major strides of ``shape`` in ``layout`` (channels-last = channels innermost)."""
    if layout == LAYOUT_CONTIGUOUS:
        order = list(range(len(shape)))
    else:
        order = [0, *range(2, len(shape)), 1]
    strides = [0] * len(shape)
    acc = 1
    for d in reversed(order):
        strides[d] = acc
        acc *= max(int(shape[d]), 1)
    return tuple(strides)


def empty_in_layout(like: torch.Tensor, layout: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A fresh (non-view) tensor shaped like ``like`` in the given dense layout."""
    return torch.empty_strided(like.shape, strides_of(like.shape, layout),
                               dtype=dtype or like.dtype, device=like.device)
