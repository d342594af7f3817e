"""Train and eval loaders: a torch DataLoader over a ShardStream, plus epoch and skip bookkeeping."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader

from .dataset import ensure_dataset, resolve_split
from .stream import DataError, ShardStream, StreamSpec


class ShardLoader:
    """Iterating yields one epoch of (images, labels) — or (images, labels, keys) with with_keys;
    `iter_from(k)` the same epoch from batch k on, without decoding the batches before it.

    `len(loader)` is the number of batches per epoch, equal on every replica for training.
    After a complete training epoch the loader moves on to the next epoch by itself, so
    re-iterating (e.g. DeepSpeed's RepeatingLoader) gives a new order; `set_epoch` sets it."""

    def __init__(self, stream: ShardStream, workers: int, with_keys: bool = False,
                 initial_skips: Optional[dict[str, int]] = None):
        self.stream = stream
        self.workers = workers
        self.with_keys = with_keys
        self._skips: Counter = Counter(initial_skips or {})

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch = epoch

    def __len__(self) -> int:
        return self.stream.num_batches

    @property
    def num_samples(self) -> int:
        return self.stream.num_samples

    @property
    def batch_size(self) -> int:
        return self.stream.spec.batch

    def skip_counts(self) -> dict[str, int]:
        """Samples skipped so far, by kind (stream.SKIP_KINDS), over all worker processes."""
        return dict(self._skips)

    def _dataloader(self, stream: ShardStream) -> DataLoader:
        kw = {}
        if self.workers > 0:
            kw["prefetch_factor"] = 2
        return DataLoader(stream, batch_size=None, num_workers=self.workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=False, **kw)

    def __iter__(self) -> Iterator[tuple]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[tuple]:
        """The current epoch from batch `start` on: batches start, start + 1, …, len(self) - 1,
        exactly those (same samples, same augmentation, same skipped and replaced samples) that
        iterating the whole epoch yields there. The samples of batches before `start` are read
        but not decoded or augmented (resuming mid-epoch costs reading, not decoding). Like a
        full pass, it moves the loader on to the next epoch when it completes. Training only."""
        n_batches = len(self)
        if not 0 <= start <= n_batches:
            raise ValueError(f"start batch {start} not in 0..{n_batches}")
        if start and not self.stream.spec.train:
            raise ValueError("evaluation has no start batch")
        # workers are forked per iteration, so they see the current epoch
        stream = copy.copy(self.stream)
        stream.start = start
        n = start
        for images, labels, keys, skips in self._dataloader(stream):
            self._skips.update(skips)
            n += 1
            yield (images, labels, keys) if self.with_keys else (images, labels)
        if self.stream.spec.train:
            if n != n_batches:  # cannot happen by construction; a silent short epoch would desync stages
                raise DataError(f"epoch {self.epoch}: {n - start} batches from batch {start} "
                                f"instead of {n_batches - start}")
            self.stream.epoch += 1


def _spec(cfg, split: str, train: bool, replica: int, num_replicas: int, batch: int,
          batch_multiple: int = 1) -> tuple[StreamSpec, Counter]:
    if not 0 <= replica < num_replicas:
        raise ValueError(f"replica {replica} not in 0..{num_replicas - 1}")
    if batch < 1:
        raise ValueError(f"micro-batch must be ≥ 1, got {batch}")
    if not cfg.data.train:
        ensure_dataset(cfg)
    shards = resolve_split(cfg, split)
    d = cfg.data
    spec = StreamSpec(
        urls=tuple(shards.urls), counts=tuple(shards.counts), seed=cfg.train.seed, replica=replica,
        num_replicas=num_replicas, batch=batch, image_size=cfg.model.image_size,
        num_classes=cfg.model.num_classes, train=train, shuffle_buffer=d.shuffle_buffer, flip=d.flip,
        color_noise=d.color_noise, resampled=d.resampled and train, epoch_samples=d.epoch_samples if train else 0,
        skip_bad_shards=d.skip_bad_shards, eval_crops=int(d.eval_crops), batch_multiple=max(1, batch_multiple),
    )
    return spec, Counter(kind for _, kind, _ in shards.problems)


def build_train_loader(cfg, replica: int = 0, num_replicas: int = 1, epoch: int = 0,
                       micro_batch: Optional[int] = None, with_keys: bool = False,
                       batch_multiple: int = 1) -> ShardLoader:
    """Replica `replica` of `num_replicas`' training batches (micro_batch defaults to
    cfg.train.batch_size // num_replicas). Yields float32 N×3×S×S normalised images and int64 labels.
    `batch_multiple` rounds len(loader) up to a multiple (e.g. parallel.micro_batches, so that an
    epoch is whole optimizer steps); the extra batches wrap round to the epoch's first samples."""
    batch = micro_batch if micro_batch is not None else cfg.train.batch_size // num_replicas
    spec, problems = _spec(cfg, "train", True, replica, num_replicas, batch, batch_multiple)
    return ShardLoader(ShardStream(spec, epoch), cfg.data.workers, with_keys, problems)


def build_eval_loader(cfg, replica: int = 0, num_replicas: int = 1, micro_batch: Optional[int] = None,
                      with_keys: bool = False) -> ShardLoader:
    """The val split once, replica parts disjoint; images N×3×S×S (centre crop) or N×10×3×S×S
    (cfg.data.eval_crops == 10). The last batch may be partial."""
    batch = micro_batch if micro_batch is not None else cfg.train.batch_size // num_replicas
    spec, problems = _spec(cfg, "val", False, replica, num_replicas, batch)
    return ShardLoader(ShardStream(spec, 0), cfg.data.workers, with_keys, problems)
