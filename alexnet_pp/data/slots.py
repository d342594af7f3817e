"""Batch buffers in shared memory that DataLoader workers fill again and again.

A DataLoader worker normally puts every batch into a new shared-memory segment, which the kernel
hands out page by page on first touch: for a float batch of 64×3×224×224 that is ~9,400 page faults
in the worker, about a third of what the rest of the work on an image costs on the development
machine. A `SlotPool` is made by the main process before the workers start: `per_worker` buffers
for each worker (worker w owns buffers w·K … w·K+K-1) and one shared state word per buffer.

- A worker `claim`s a FREE buffer of its own (→ WORKER), fills it and sends only its number
  (`Slot`); when none of its buffers is free it makes a new segment, as DataLoader would.
- The main process turns a received `Slot` into a tensor view of the buffer (`take`: → HELD) and
  hands that to the caller. Before it asks for the next batch it `reclaim`s: a HELD buffer whose
  storage is referenced by nothing but the pool (the caller has dropped every tensor and view of
  it; torch counts those on the storage) becomes FREE again.
- After the workers have stopped (`after_workers`), buffers claimed but never received are FREE.

Only a buffer that nobody outside the pool can see is ever written, so a batch the caller keeps
(a micro-batch the pipeline holds until its backward, a list of a whole epoch) never changes. The
state words have one writer per transition (worker: FREE → WORKER, main: WORKER → HELD → FREE).
Without torch's storage use count (`torch._C._storage_Use_Count`) nothing is ever reclaimed and
every batch gets a new segment, as before.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

FREE, WORKER, HELD = 0, 1, 2
_idle: dict[tuple, list["SlotPool"]] = {}
_lock = threading.Lock()
MAX_IDLE_PER_KIND = 1  # pools kept for the next loader of the same shape (a new loader per epoch)
MAX_POOL_BYTES = 1 << 30  # a loader's buffers together, at most (fewer per worker, or none, past it)


@dataclass(frozen=True)
class Slot:
    """What a worker sends instead of a batch tensor: the buffer's number and the batch's shape
    (its first elements; the last batch of an evaluation may be smaller than the buffer)."""

    index: int
    shape: tuple[int, ...]


def _use_count(t: torch.Tensor) -> Optional[int]:
    f = getattr(torch._C, "_storage_Use_Count", None)
    if f is None:
        return None
    return int(f(t.untyped_storage()._cdata))


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in a new shared-memory segment (no copy, unlike share_memory_())."""
    n = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(n * torch.empty((), dtype=dtype).element_size())
    return torch.empty((0,), dtype=dtype).set_(storage, 0, shape)


class SlotPool:
    def __init__(self, workers: int, per_worker: int, shape: tuple[int, ...], dtype: torch.dtype):
        self.workers, self.per_worker = max(1, workers), per_worker
        self.shape, self.dtype = tuple(shape), dtype
        n = self.workers * per_worker
        self.buffers = [shared_empty(self.shape, dtype) for _ in range(n)]
        self._state_t = shared_empty((n,), torch.int32)
        self._state_t.zero_()
        self.state = self._state_t.numpy()
        counts = [_use_count(b) for b in self.buffers]
        self.base = None if any(c is None for c in counts) else counts
        self.fresh = 0  # batches a worker had to put into a new segment (this process's count)

    @property
    def kind(self) -> tuple:
        return (self.workers, self.per_worker, self.shape, self.dtype)

    # ---------------------------------------------------------------- worker side
    def claim(self, worker: int) -> Optional[int]:
        lo = (worker % self.workers) * self.per_worker
        for i in range(lo, lo + self.per_worker):
            if self.state[i] == FREE:
                self.state[i] = WORKER
                return i
        self.fresh += 1
        return None

    def array(self, index: int) -> np.ndarray:
        return self.buffers[index].numpy()

    # ---------------------------------------------------------------- main side
    def take(self, slot: Slot) -> torch.Tensor:
        """The received batch: a view of the buffer (the caller's to keep)."""
        self.state[slot.index] = HELD
        n = int(np.prod(slot.shape))
        return self.buffers[slot.index].view(-1)[:n].view(slot.shape)

    def reclaim(self) -> int:
        """Free the buffers the caller no longer references; returns how many are free now."""
        if self.base is not None:
            for i in np.flatnonzero(self.state == HELD).tolist():
                if _use_count(self.buffers[i]) <= self.base[i]:
                    self.state[i] = FREE
        return int((self.state == FREE).sum())

    def after_workers(self) -> None:
        """The workers have stopped: what they claimed but never delivered is free."""
        self.state[self.state == WORKER] = FREE
        self.reclaim()


def fitting(shape: tuple[int, ...], dtype: torch.dtype, workers: int) -> int:
    """How many buffers of `shape` per worker fit in MAX_POOL_BYTES."""
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return MAX_POOL_BYTES // max(1, nbytes * max(1, workers))


def acquire(workers: int, per_worker: int, shape: tuple[int, ...], dtype: torch.dtype) -> SlotPool:
    """A pool for one pass of a loader: an idle one of the same kind (its pages already mapped),
    else a new one. Give it back with `release` when the pass ends."""
    kind = (max(1, workers), per_worker, tuple(shape), dtype)
    with _lock:
        idle = _idle.get(kind)
        pool = idle.pop() if idle else None
    if pool is None:
        pool = SlotPool(workers, per_worker, shape, dtype)
    pool.reclaim()
    return pool


def release(pool: SlotPool) -> None:
    pool.after_workers()
    with _lock:
        idle = _idle.setdefault(pool.kind, [])
        if len(idle) < MAX_IDLE_PER_KIND:
            idle.append(pool)
