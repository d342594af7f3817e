"""The data pipeline: embedded dataset, WebDataset shards, and the train/eval loaders.

    info = ensure_dataset(cfg)                      # shards ready (generated if embedded)
    train = build_train_loader(cfg, replica, dp)    # (images, labels) batches, len(train) per epoch
    val = build_eval_loader(cfg, replica, dp)

Training batches are float32 normalised images by default; `build_train_loader(..., uint8=True)`
yields uint8 crops + lighting offsets for `finish_batch(images, offsets, device)` to normalise on the
consumer's device, and `device=…` does that (or, with data.decode gpu, JPEG decoding too) in the
loader (loader.py's docstring).

Loaders: `len(loader)` batches per epoch (equal on every replica), `loader.iter_from(k)` for the
epoch from batch k on (resuming: the batches before k are not decoded), `loader.skip_counts()`
for skipped corrupt samples by kind, `with_keys=True` to also get sample keys, and
`batch_digest(keys, labels)` to fingerprint a batch (ranks reading it independently can check
that they agree); stream.py's docstring explains splitting, epoch length, replacement of corrupt
samples and pipeline-stage alignment.

Submodules: synthetic (the embedded images), shards (writing), tarstream (reading one shard),
sources (source strings → shards), stream (epoch splitting, shuffling, skipping), transforms
(decode, draws, lighting, normalise), native (the crop kernel), slots (reused batch buffers),
augment (the same augmentation as torch ops on any device), gpu_decode (nvJPEG through torchvision),
loader (DataLoader wrapper), digest (batch fingerprints), formats (JPEG or raw pixels in a
shard), ingest + commands (`alexnet-pp data synth|ingest`). Test-only helpers (small shard sets,
comparing two streams) live in tests/helpers, not here.
The loaders import torch lazily, so shard generation in worker pools stays light.
"""

from .dataset import DatasetInfo, ensure_dataset
from .digest import batch_digest

__all__ = ["DatasetInfo", "ensure_dataset", "build_train_loader", "build_eval_loader", "batch_digest",
           "finish_batch", "augment_batch"]


def build_train_loader(cfg, replica=0, num_replicas=1, epoch=0, micro_batch=None, with_keys=False, batch_multiple=1,
                       uint8=False, device=None):
    from .loader import build_train_loader as build

    return build(cfg, replica, num_replicas, epoch, micro_batch, with_keys, batch_multiple, uint8, device)


def finish_batch(images_u8, offsets, device=None, non_blocking=True):
    from .augment import finish_batch as finish

    return finish(images_u8, offsets, device, non_blocking)


def augment_batch(images, boxes, offsets, side, device=None, channels_last_input=False):
    from .augment import augment_batch as augment

    return augment(images, boxes, offsets, side, device, channels_last_input)


def build_eval_loader(cfg, replica=0, num_replicas=1, micro_batch=None, with_keys=False):
    from .loader import build_eval_loader as build

    return build(cfg, replica, num_replicas, micro_batch, with_keys)


build_train_loader.__doc__ = "See alexnet_pp.data.loader.build_train_loader."
finish_batch.__doc__ = "See alexnet_pp.data.augment.finish_batch."
augment_batch.__doc__ = "See alexnet_pp.data.augment.augment_batch."
build_eval_loader.__doc__ = "See alexnet_pp.data.loader.build_eval_loader."
