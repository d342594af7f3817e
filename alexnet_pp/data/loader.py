"""Train and eval loaders: a torch DataLoader over a ShardStream, plus epoch and skip bookkeeping.

What a training loader yields (build_train_loader):

- default: float32 N×3×S×S normalised images, made in the workers (crop, flip, lighting and
  normalisation in one pass per image, native.crop_into) into reused shared-memory batches (slots.py);
- `uint8=True`: uint8 crops N×3×S×S (a channels-last view of N×S×S×3) and the lighting offsets
  N×3; `augment.finish_batch(images, offsets, device)` makes the float batch on the device;
- `device=…`: float32 normalised images on that device: uint8 crops travel and are finished there,
  or, with data.decode gpu (auto: when available), JPEG bytes travel and are decoded, cropped and
  normalised there (gpu_decode.py). Labels stay on the CPU.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader

from alexnet_pp.host import reuse_freed_memory

from . import gpu_decode, native, slots
from .augment import augment_batch, finish_batch
from .dataset import ensure_dataset, resolve_split
from .stream import Crops, DataError, Encoded, ShardStream, StreamSpec


class ShardLoader:
    """Iterating yields one epoch of (images, labels) — or (images, labels, keys) with with_keys;
    `iter_from(k)` the same epoch from batch k on, without decoding the batches before it.

    `len(loader)` is the number of batches per epoch, equal on every replica for training.
    After a complete training epoch the loader moves on to the next epoch by itself, so
    re-iterating (e.g. DeepSpeed's RepeatingLoader) gives a new order; `set_epoch` sets it."""

    def __init__(self, stream: ShardStream, workers: int, with_keys: bool = False,
                 initial_skips: Optional[dict[str, int]] = None, uint8: bool = False, device=None,
                 decode: str = "cpu", batch_slots: int = 4):
        if uint8 and device is not None:
            raise ValueError("uint8=True yields CPU crops for the caller to finish; device=… finishes them here")
        self.stream = stream
        self.workers = workers
        self.with_keys = with_keys
        self.uint8 = uint8
        self.device = torch.device(device) if device is not None else None
        self.decode = gpu_decode.resolve(decode, self.device, workers) if stream.spec.train else "cpu"
        if self.decode == "gpu":
            stream.output = "encoded"
        elif uint8 or self.device is not None:
            stream.output = "uint8"
        self.batch_slots = max(0, batch_slots)
        self._decoder: Optional[gpu_decode.DeviceDecoder] = None
        self._skips: Counter = Counter(initial_skips or {})
        self.slot_batches = 0  # batches that came in a reused shared-memory slot …
        self.fresh_batches = 0  # … and in a new segment (every one when slots are off)
        native.load()  # build the crop kernel here, once, before workers start

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

    def _pin(self) -> bool:
        return torch.cuda.is_available()

    def _pool(self) -> Optional[slots.SlotPool]:
        """The pass's reused batch buffers: not when batches are pinned (the pin thread copies each
        out of its segment at once) nor for encoded batches; as many per worker as fit in
        slots.MAX_POOL_BYTES (ten 224 px crops of 128 images are 770 MB a batch: none)."""
        if self.batch_slots == 0 or self._pin() or self.stream.output == "encoded":
            return None
        s, side = self.stream.spec, self.stream.spec.image_size
        if self.stream.output == "uint8":
            shape, dtype = (s.batch, side, side, 3), torch.uint8
        else:
            shape, dtype = (s.batch * (s.eval_crops if not s.train else 1), 3, side, side), torch.float32
        per_worker = min(self.batch_slots, slots.fitting(shape, dtype, self.workers))
        return slots.acquire(self.workers, per_worker, shape, dtype) if per_worker > 0 else None

    def _dataloader(self, stream: ShardStream) -> DataLoader:
        kw = {}
        if self.workers > 0:
            kw["prefetch_factor"] = 2
            kw["worker_init_fn"] = _worker_init
        return DataLoader(stream, batch_size=None, num_workers=self.workers,
                          pin_memory=self._pin(), persistent_workers=False, **kw)

    def _finish(self, images, pool):
        """What the caller gets for one received batch: (images,) or (images, offsets)."""
        if isinstance(images, Encoded):
            side = self.stream.spec.image_size
            return (augment_batch(self._decoder(images.payloads), [tuple(b) for b in images.boxes],
                                  images.offsets, side, self.device),)
        offsets = None
        if isinstance(images, Crops):
            images, offsets = images
        if isinstance(images, slots.Slot):
            images = pool.take(images)
            self.slot_batches += 1
        else:
            self.fresh_batches += 1
        if offsets is None:
            return (images,)
        crops = images.permute(0, 3, 1, 2)  # N×S×S×3 → N×3×S×S, channels-last strides
        if self.device is not None:
            return (finish_batch(crops, offsets, self.device),)
        return crops, offsets

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
        pool = stream.pool = self._pool()
        if self.decode == "gpu" and self._decoder is None:
            self._decoder = gpu_decode.DeviceDecoder(self.device)
        batches = iter(self._dataloader(stream))
        try:
            for images, labels, keys, skips in batches:
                self._skips.update(skips)
                n += 1
                out = self._finish(images, pool) + ((labels, keys) if self.with_keys else (labels,))
                del images
                yield out
                del out  # the caller's references alone decide which slots are free again
                if pool is not None:
                    pool.reclaim()
        finally:
            # Stop the workers here and now, before their slots are counted free. On an error, the
            # exception's traceback keeps the iterator alive; left to its finaliser, it would run in
            # the next forked worker (CPython collects garbage after fork) and deadlock on a queue lock.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del batches
            if pool is not None:
                slots.release(pool)
        if self.stream.spec.train:
            if n != n_batches:  # cannot happen by construction; a silent short epoch would desync stages
                raise DataError(f"epoch {self.epoch}: {n - start} batches from batch {start} "
                                f"instead of {n_batches - start}")
            self.stream.epoch += 1


def _worker_init(worker_id: int) -> None:
    """A worker decodes a batch of images into fresh arrays and frees them again, batch after
    batch: glibc would give the freed heap top back and fault it in again (about 30 page faults
    per 256 px image here). Workers keep freed memory, as trainers do (alexnet_pp/host.py)."""
    reuse_freed_memory()


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
                       batch_multiple: int = 1, uint8: bool = False, device=None) -> ShardLoader:
    """Replica `replica` of `num_replicas`' training batches (micro_batch defaults to
    cfg.train.batch_size // num_replicas). Yields float32 N×3×S×S normalised images and int64 labels
    (then the keys, with_keys). `batch_multiple` rounds len(loader) up to a multiple (e.g.
    parallel.micro_batches, so that an epoch is whole optimizer steps); the extra batches wrap round
    to the epoch's first samples.

    uint8=True: (uint8 crops N×3×S×S, lighting offsets N×3 float32, labels[, keys]) instead;
    `finish_batch(crops, offsets, device)` turns them into the default's images on any device.
    device=…: the default's images made on that device (uint8 crops or, with data.decode gpu/auto
    and a CUDA device, JPEG bytes cross to it). The same images, bit for bit, on CPU devices."""
    batch = micro_batch if micro_batch is not None else cfg.train.batch_size // num_replicas
    spec, problems = _spec(cfg, "train", True, replica, num_replicas, batch, batch_multiple)
    d = cfg.data
    return ShardLoader(ShardStream(spec, epoch), d.workers, with_keys, problems, uint8=uint8, device=device,
                       decode=d.decode, batch_slots=d.batch_slots)


def build_eval_loader(cfg, replica: int = 0, num_replicas: int = 1, micro_batch: Optional[int] = None,
                      with_keys: bool = False) -> ShardLoader:
    """The val split once, replica parts disjoint; images N×3×S×S (centre crop) or N×10×3×S×S
    (cfg.data.eval_crops == 10). The last batch may be partial."""
    batch = micro_batch if micro_batch is not None else cfg.train.batch_size // num_replicas
    spec, problems = _spec(cfg, "val", False, replica, num_replicas, batch)
    return ShardLoader(ShardStream(spec, 0), cfg.data.workers, with_keys, problems,
                       batch_slots=cfg.data.batch_slots)
