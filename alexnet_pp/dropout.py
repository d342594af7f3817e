"""Dropout as a function of the image, not of the process.

Each kept/dropped decision is a hash of (seed, step, the sample's global index in the step's batch,
layer, neuron) — a counter-based generator with no state to carry. So the single-process trainer and
every pipeline/tower/replica layout draw the same mask for the same image, recomputing a forward
(activation checkpointing) draws it again, and two replicas never share masks because their samples
have different global indices. A batch carries one int64 key per row (`sample_keys`); layers
combine it with their own index and the neuron index (`keep_mask`).

All arithmetic is on non-negative int64 values below 2**32 with multipliers below 2**31, so no
product overflows and CPU and GPU give the same bits.
"""

from __future__ import annotations

from typing import Optional

import torch

_M32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche (xorshift-multiply rounds) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    x = x ^ (x >> 13)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def sample_keys(seed: int, step: int, indices: torch.Tensor) -> torch.Tensor:
    """One key per row: `indices` are the rows' global positions in optimizer step `step`'s batch."""
    base = _mix(torch.tensor([seed & _M32], dtype=torch.int64))
    base = _mix(base ^ (step & _M32))
    return _mix(base ^ (indices.to(torch.int64) & _M32))


def batch_keys(seed: int, step: int, start: int, rows: int) -> torch.Tensor:
    """Keys of rows start .. start + rows − 1 of step `step`'s global batch."""
    return sample_keys(seed, step, torch.arange(start, start + rows, dtype=torch.int64))


def random_keys(rows: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Keys from torch's global generator, for a network called without keys (plain `model(x)`)."""
    return torch.randint(0, 2**32, (rows,), dtype=torch.int64, device=device)


def keep_mask(keys: torch.Tensor, layer: int, neuron_start: int, width: int, p: float) -> torch.Tensor:
    """Bool (rows × width): which of neurons neuron_start .. neuron_start + width − 1 survive dropout p."""
    row = _mix(keys.to(torch.int64) ^ ((layer + 1) * 0x9E3779B1 & _M32))
    neurons = torch.arange(neuron_start, neuron_start + width, dtype=torch.int64, device=keys.device)
    u = _mix(row[:, None] ^ neurons[None, :])
    return u >= int(p * 2**32)


def dropout(y: torch.Tensor, keys: torch.Tensor, layer: int, neuron_start: int, p: float) -> torch.Tensor:
    """Inverted dropout of a (rows × width) slice whose first neuron is `neuron_start` of the layer."""
    keep = keep_mask(keys.to(y.device), layer, neuron_start, y.shape[1], p)
    return y * keep.to(y.dtype) * (1.0 / (1.0 - p))
