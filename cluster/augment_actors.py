"""Decoding and augmentation on other nodes: Ray actors that stream finished batches to a stage-0 rank.

With `data.augment_actors N` a replica's first-stage rank does not decode: N actors (each
`data.augment_cpus` CPUs and no GPU, so Ray may place them on CPU-only nodes) each play one of the
stream's N workers (alexnet_pp.data.stream.ShardStream.worker_batches) — exactly what a local loader
with `data.workers N` computes, so the batches are the same, bit for bit, wherever they were made.
Actor a makes batches a, a + N, …; the rank asks each for its next batch ahead of time and takes
them in order, batch k from actor k mod N.

- Back-pressure: at most `data.augment_prefetch` requests wait per actor; an actor makes a batch only
  when asked, so a slow trainer never piles batches into the object store.
- What travels: to a rank with a GPU, uint8 crops N×S×S×3 and the lighting offsets (a quarter of the
  float batch), finished on its device (alexnet_pp.data.finish_batch: the same pixels as the CPU
  loader's); to a CPU rank, the finished float images, so its cores only train.
- Resume: `iter_from(k)` starts every actor at batch k; the batches before are read, not decoded.
- Skip counts travel with each batch and add up as the local loader's do.
- An actor that dies (its node lost) is restarted by Ray and resumes at the first batch not yet
  received (at most `RESTARTS` times per pass); the batches stay exactly the same.
"""

from __future__ import annotations

import collections
import copy
import logging
from collections import Counter
from typing import Iterator, Optional

import numpy as np
import torch

from alexnet_pp.data import finish_batch
from alexnet_pp.data.stream import Crops, DataError, ShardStream

log = logging.getLogger(__name__)

RESTARTS = 3  # actor deaths survived per pass before the pass fails
PLACEMENT_TIMEOUT_S = 600  # for actors waiting on CPUs the cluster does not have
RESTART_POLLS = 60  # calls to a restarting actor before it counts as gone


class AugmentWorker:
    """One stream worker of N, in its own process: makes batch after batch on request."""

    def __init__(self, stream: ShardStream, worker: int, workers: int):
        from alexnet_pp.data import native
        from alexnet_pp.host import reuse_freed_memory

        torch.set_num_threads(1)  # one core's worth of decoding per actor CPU; crops are per image
        reuse_freed_memory()
        native.load()
        self.stream, self.worker, self.workers = stream, worker, workers
        self._it: Optional[Iterator] = None

    def begin(self, epoch: int, start: int, output: str = "uint8") -> int:
        """Start epoch `epoch` at the first of this worker's batches ≥ `start`, as "uint8" crops or
        "float" finished images; returns the worker id."""
        stream = copy.copy(self.stream)
        stream.epoch, stream.start, stream.output, stream.pool = epoch, start, output, None
        self._it = stream.worker_batches(self.worker, self.workers, start)
        return self.worker

    def next(self) -> Optional[tuple]:
        """The next batch as (images, offsets, labels, keys, skips), None at the end: uint8 crops
        N×S×S×3 and offsets N×3, or float32 N×3×S×S images and None."""
        item = next(self._it, None) if self._it is not None else None
        if item is None:
            return None
        images, labels, keys, skips = item
        if isinstance(images, Crops):
            return images.images.numpy(), np.asarray(images.offsets, dtype=np.float32), labels.numpy(), keys, skips
        return images.numpy(), None, labels.numpy(), keys, skips


class ActorLoader:
    """A ShardLoader's training epochs made by Ray actors: the same `len`, `iter_from`, `skip_counts`
    and epoch bookkeeping, the batches finished on `device` (default CPU)."""

    def __init__(self, loader, actors: int, cpus: float = 1.0, prefetch: int = 2, device=None,
                 with_keys: bool = True, output: Optional[str] = None):
        import ray

        if actors < 1:
            raise ValueError(f"data.augment_actors must be ≥ 1 here, got {actors}")
        if not ray.is_initialized():
            raise DataError("data.augment_actors needs a Ray cluster: run the job through `alexnet-pp train "
                            "--distributed` or `ray job submit -- python -m cluster.job`, or set data.augment_actors 0")
        self.loader = loader
        self.stream: ShardStream = loader.stream
        self.n, self.prefetch, self.cpus = actors, max(1, prefetch), cpus
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # a device finishes uint8 crops at a quarter of the bytes; a CPU rank would spend its own time on
        # that, so the actors send finished float images to it
        self.output = output or ("float" if self.device.type == "cpu" else "uint8")
        self.with_keys = with_keys
        self._skips: Counter = Counter(loader.skip_counts())
        self.restarts = 0
        remote = ray.remote(num_cpus=cpus, num_gpus=0, max_restarts=RESTARTS, max_task_retries=0)(AugmentWorker)
        base = copy.copy(self.stream)
        base.pool = None
        self.actors = [remote.remote(base, a, actors) for a in range(actors)]

    def use(self, loader) -> None:
        """Make `loader`'s epoch next, with its skip counts (a new local loader per epoch counts afresh)."""
        self.loader, self.stream = loader, loader.stream
        self._skips = Counter(loader.skip_counts())

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def __len__(self) -> int:
        return len(self.loader)

    def skip_counts(self) -> dict[str, int]:
        return dict(self._skips)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[tuple]:
        import ray

        n_batches, epoch = len(self), self.stream.epoch
        if not 0 <= start <= n_batches:
            raise ValueError(f"start batch {start} not in 0..{n_batches}")
        try:
            ray.get([a.begin.remote(epoch, start, self.output) for a in self.actors], timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise DataError(f"{self.n} augmentation actor(s) of {self.cpus:g} CPU(s) each not running after "
                            f"{PLACEMENT_TIMEOUT_S} s: the cluster has no room for them (data.augment_actors, "
                            "data.augment_cpus)") from None
        pending: list[collections.deque] = [collections.deque() for _ in self.actors]

        def ask(a: int) -> None:
            while len(pending[a]) < self.prefetch:
                pending[a].append(self.actors[a].next.remote())

        for a in range(self.n):
            ask(a)
        for k in range(start, n_batches):
            a = k % self.n
            while True:
                try:
                    item = ray.get(pending[a].popleft())
                    break
                except _actor_lost() as e:
                    self._restart(a, epoch, k, e)
                    pending[a].clear()
                    ask(a)
            ask(a)
            if item is None:
                raise DataError(f"epoch {epoch}: augmentation actor {a} ended before batch {k} of {n_batches}")
            images, offsets, labels, keys, skips = item
            self._skips.update(skips)
            images = torch.from_numpy(images.copy())  # the object store's arrays are read-only
            if offsets is not None:
                images = finish_batch(images.permute(0, 3, 1, 2), torch.from_numpy(offsets), self.device)
            labels = torch.from_numpy(labels.copy())
            yield (images, labels, keys) if self.with_keys else (images, labels)
        self.stream.epoch += 1

    def _restart(self, a: int, epoch: int, k: int, error: Exception) -> None:
        """Actor `a` died: Ray restarts it (fresh state); it begins again at batch k, its next one."""
        import ray

        self.restarts += 1
        if self.restarts > RESTARTS:
            raise DataError(f"augmentation actor {a} died {self.restarts} times in this run; last: {error}") from error
        log.warning("augmentation actor %d died at batch %d of epoch %d (%s); resuming it there", a, k, epoch,
                    type(error).__name__)
        # the restarted actor answers once its process is up again; calls before that fail fast
        for _ in range(RESTART_POLLS):
            try:
                ray.get(self.actors[a].begin.remote(epoch, k, self.output), timeout=PLACEMENT_TIMEOUT_S)
                return
            except _actor_lost():
                continue
            except ray.exceptions.GetTimeoutError:
                break
        raise DataError(f"augmentation actor {a} did not come back after dying at batch {k}") from error


def _actor_lost() -> tuple[type, ...]:
    """What ray.get raises for a task of an actor that died or is being restarted."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return RayActorError, ActorUnavailableError
