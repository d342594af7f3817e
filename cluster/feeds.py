"""What a replica's first pipeline stage reads, in the shape DeepSpeed's engine pulls it.

Two sources behind one protocol (`TrainData`): `ShardData`, the WebDataset stream of one replica
(alexnet_pp.data), and `TensorData`, fixed in-memory global batches (benchmarks on tensors, and
equivalence tests that feed every layout the same global batches). `train_micro_batches` and
`eval_micro_batches` turn either into what `train_batch`/`eval_batch` consume: (images, labels,
dropout keys) per micro-batch, where micro-batch m of replica r in step s holds rows
[(r·M + m)·mb, (r·M + m + 1)·mb) of that step's global batch — the rows whose dropout keys the
single-process trainer would give them (alexnet_pp/dropout.py).
"""

from __future__ import annotations

import collections
import itertools
from typing import Iterator, Optional, Protocol

import torch

from alexnet_pp.config import RunConfig
from alexnet_pp.data import build_eval_loader, build_train_loader, ensure_dataset
from alexnet_pp.data.digest import batch_digest
from alexnet_pp.dropout import batch_keys
from alexnet_pp.layout import Layout
from cluster.device_feed import pinned, prefetch_to_device

Batch = tuple[torch.Tensor, torch.Tensor]


class TrainData(Protocol):
    """What the first pipeline stage reads. Replicas must agree on steps per epoch. An epoch yields
    (images, labels, digest): the digest identifies the batch's samples (alexnet_pp.data.batch_digest),
    so two ranks that read the same images independently can check they did."""

    def micro_batches_per_epoch(self) -> int: ...

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]: ...

    def eval_batches(self) -> Iterator[Batch]: ...

    def eval_batch_count(self) -> int: ...

    def skip_counts(self) -> dict[str, int]: ...


class ShardData:
    """The WebDataset stream of one data-parallel replica (alexnet_pp.data); an epoch is whole
    optimizer steps (the loader rounds a replica's share up to a multiple of M)."""

    def __init__(self, cfg: RunConfig, layout: Layout, replica: int, device=None):
        self.cfg, self.replica, self.replicas = cfg, replica, layout.dp
        self.device = device  # where batches are finished (a GPU rank's own): see _loader
        self.micro_batch, self.multiple = layout.micro_batch, layout.micro_batches
        self._train, self._eval = build_train_loader, build_eval_loader
        self._current = None
        self._actors = None  # data.augment_actors: one set of actors for the whole run
        self._eval_batches: Optional[int] = None
        self._len = len(self._loader(0))

    def _loader(self, epoch: int):
        d = self.cfg.data
        # a GPU rank's loader finishes batches on its device: uint8 crops (a quarter of float32's bytes)
        # or, with data.decode gpu/auto, the JPEGs themselves cross and are decoded there; actors finish
        # their own batches there, and a CPU rank gets its float batches from the workers as before
        on_gpu = self.device is not None and torch.device(self.device).type == "cuda"
        loader = self._train(self.cfg, replica=self.replica, num_replicas=self.replicas, epoch=epoch,
                             micro_batch=self.micro_batch, with_keys=True, batch_multiple=self.multiple,
                             device=self.device if on_gpu and d.augment_actors <= 0 else None)
        if d.augment_actors <= 0:
            return loader
        if self._actors is None:
            from cluster.augment_actors import ActorLoader

            self._actors = ActorLoader(loader, d.augment_actors, d.augment_cpus, d.augment_prefetch, self.device)
        self._actors.use(loader)
        return self._actors

    def micro_batches_per_epoch(self) -> int:
        return self._len

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Micro-batches `start`, start + 1, … of the epoch; the ones before are never decoded (resume)."""
        self._current = self._loader(epoch)
        for images, labels, keys in self._current.iter_from(start):
            yield images, labels, batch_digest(keys, labels)

    def eval_batches(self) -> Iterator[Batch]:
        loader = self._eval(self.cfg, replica=self.replica, num_replicas=self.replicas)
        for images, labels, *_ in loader:
            yield images, labels

    def eval_batch_count(self) -> int:
        if self._eval_batches is None:  # the split does not change during a run: look it up once
            per_replica = -(-ensure_dataset(self.cfg).val_samples // self.replicas)  # exact integer ceil
            self._eval_batches = max(1, -(-per_replica // self.micro_batch))
        return self._eval_batches

    def skip_counts(self) -> dict[str, int]:
        counts = getattr(self._current, "skip_counts", None)
        return dict(counts()) if callable(counts) else {}


class TensorData:
    """Fixed in-memory global batches, split as the trainer splits them: replica r, micro-batch m of a
    step gets rows [(r·M + m)·mb, (r·M + m + 1)·mb) of the step's global batch."""

    def __init__(self, batches: list[Batch], replica: int, replicas: int, micro_batches: int):
        if torch.cuda.is_available():  # as a pin_memory DataLoader would hand them over
            batches = [(pinned(x), pinned(y)) for x, y in batches]
        self.batches, self.replica, self.replicas, self.m = batches, replica, replicas, micro_batches

    def _split(self, step: int, images: torch.Tensor, labels: torch.Tensor):
        mb = labels.shape[0] // (self.replicas * self.m)
        for m in range(self.m):
            lo = (self.replica * self.m + m) * mb
            rows = [f"{step}/{i}" for i in range(lo, lo + mb)]  # a sample's identity: its place in the data
            yield images[lo : lo + mb], labels[lo : lo + mb], batch_digest(rows, labels[lo : lo + mb])

    def micro_batches_per_epoch(self) -> int:
        return len(self.batches) * self.m

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        micro_batches = (b for step, (x, y) in enumerate(self.batches) for b in self._split(step, x, y))
        return itertools.islice(micro_batches, start, None)

    def eval_batches(self) -> Iterator[Batch]:
        return ((x, y) for x, y, _ in self.epoch(0))

    def eval_batch_count(self) -> int:
        return self.micro_batches_per_epoch()

    def skip_counts(self) -> dict[str, int]:
        return {}


def train_micro_batches(data: TrainData, layout: Layout, replica: int, seed: int, epoch: int,
                        first_step: int, skip_steps: int, device) -> Iterator[tuple[tuple, int]]:
    """Epoch `epoch`'s micro-batches from step `skip_steps` of the epoch on (the skipped ones are not
    decoded), as ((images, labels, dropout keys), digest) with the tensors on `device`. The first one
    belongs to global step `first_step` (0-based), which keys its dropout masks."""
    m, mb = layout.micro_batches, layout.micro_batch
    digests: collections.deque[int] = collections.deque()

    def keyed():
        for k, (images, labels, digest) in enumerate(data.epoch(epoch, skip_steps * m)):
            step, i = first_step + k // m, k % m
            digests.append(digest)
            yield images, labels, batch_keys(seed, step, (replica * m + i) * mb, labels.shape[0])

    for batch in prefetch_to_device(keyed(), device):  # reads one ahead: the digests queue in order
        yield batch, digests.popleft()


def eval_micro_batches(data: TrainData, layout: Layout, n: int, blank_images: torch.Tensor) -> Iterator:
    """Exactly n micro-batches of exactly micro_batch rows for `eval_batch`: short batches are padded
    with label −1 (counted nowhere), and a replica whose share ran out first sends blank ones."""
    mb = layout.micro_batch
    template = None
    produced = 0
    no_keys = torch.zeros(mb, dtype=torch.int64)  # no dropout in evaluation
    for images, labels in data.eval_batches():
        for lo in range(0, labels.shape[0], mb):
            x, y = images[lo : lo + mb], labels[lo : lo + mb]
            template = x
            if y.shape[0] < mb:
                pad = mb - y.shape[0]
                x = torch.cat([x, x[:1].expand(pad, *x.shape[1:])])
                y = torch.cat([y, torch.full((pad,), -1, dtype=y.dtype)])
            produced += 1
            yield (x, y, no_keys), y
    while produced < n:
        x = torch.zeros(mb, *template.shape[1:]) if template is not None else blank_images
        y = torch.full((mb,), -1, dtype=torch.long)
        produced += 1
        yield (x, y, no_keys), y


def no_data() -> Iterator:
    """What later stages pass to the engine: their inputs arrive from the previous stage."""
    return itertools.repeat((None, None))

