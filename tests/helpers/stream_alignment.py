"""Checking that two streams deliver the same samples in the same order.

The first pipeline stage consumes images and the last stage labels of the same batches, from
loaders built independently on different ranks; `first_misalignment` compares two such streams
(items (images, labels, keys), e.g. from build_train_loader(..., with_keys=True)) batch by batch.
"""

from __future__ import annotations

from itertools import zip_longest
from typing import Iterable, Optional

import torch

_END = object()


def first_misalignment(a: Iterable, b: Iterable, compare_images: bool = True) -> Optional[str]:
    """None when both streams have the same batches (keys, labels and, optionally, images);
    otherwise a description of the first difference."""
    for i, (x, y) in enumerate(zip_longest(a, b, fillvalue=_END)):
        if x is _END or y is _END:
            return f"batch {i}: stream {'a' if x is _END else 'b'} ended first"
        (xi, xl, xk), (yi, yl, yk) = x[:3], y[:3]
        if list(xk) != list(yk):
            j = next((j for j, (p, q) in enumerate(zip(xk, yk)) if p != q), min(len(xk), len(yk)))
            return f"batch {i}: keys differ at {j}: {list(xk)[j:j + 1]} vs {list(yk)[j:j + 1]}"
        if not torch.equal(xl, yl):
            return f"batch {i}: labels differ"
        if compare_images and not torch.equal(xi, yi):
            return f"batch {i}: images differ"
    return None
