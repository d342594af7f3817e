"""A per-batch fingerprint of which samples a rank holds, to check that ranks reading the same
batch independently (the two towers of stage 0, or the first and last pipeline stages) agree."""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence


def batch_digest(keys: Sequence[str], labels: Iterable) -> int:
    """A 63-bit digest (fits a signed int64 tensor for all_gather) of a batch's sample keys and
    labels in order. Two ranks get the same value when they hold the same samples in the same
    order with the same labels, and (but for a 2⁻⁶³ chance) a different one otherwise: another
    order, a sample shifted in or out, another label. Deterministic across processes and
    machines (no Python hash). `labels`: a tensor, array or sequence of ints. A few µs per batch."""
    labels = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    keys = list(keys)
    if len(keys) != len(labels):
        raise ValueError(f"{len(keys)} keys but {len(labels)} labels")
    h = hashlib.blake2b(digest_size=8, person=b"alexnet-batch")
    for key, label in zip(keys, labels):
        k = key.encode("utf-8")
        h.update(len(k).to_bytes(4, "little") + k + int(label).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") >> 1
