"""The data pipeline: embedded dataset, WebDataset shards, and the train/eval loaders.

    info = ensure_dataset(cfg)                      # shards ready (generated if embedded)
    train = build_train_loader(cfg, replica, dp)    # (images, labels) batches, len(train) per epoch
    val = build_eval_loader(cfg, replica, dp)

Loaders: `len(loader)` batches per epoch (equal on every replica), `loader.iter_from(k)` for the
epoch from batch k on (resuming: the batches before k are not decoded), `loader.skip_counts()`
for skipped corrupt samples by kind, `with_keys=True` to also get sample keys, and
`batch_digest(keys, labels)` to fingerprint a batch (ranks reading it independently can check
that they agree); stream.py's docstring explains splitting, epoch length, replacement of corrupt
samples and pipeline-stage alignment.

Submodules: synthetic (the embedded images), shards (writing), tarstream (reading one shard),
sources (source strings → shards), stream (epoch splitting, shuffling, skipping), transforms
(decode, crops, lighting, normalise), loader (DataLoader wrapper), digest (batch fingerprints),
ingest + commands (`alexnet-pp data synth|ingest`). Test-only helpers (small shard sets,
comparing two streams) live in tests/helpers, not here.
The loaders import torch lazily, so shard generation in worker pools stays light.
"""

from .dataset import DatasetInfo, ensure_dataset
from .digest import batch_digest

__all__ = ["DatasetInfo", "ensure_dataset", "build_train_loader", "build_eval_loader", "batch_digest"]


def build_train_loader(cfg, replica=0, num_replicas=1, epoch=0, micro_batch=None, with_keys=False, batch_multiple=1):
    from .loader import build_train_loader as build

    return build(cfg, replica, num_replicas, epoch, micro_batch, with_keys, batch_multiple)


def build_eval_loader(cfg, replica=0, num_replicas=1, micro_batch=None, with_keys=False):
    from .loader import build_eval_loader as build

    return build(cfg, replica, num_replicas, micro_batch, with_keys)


build_train_loader.__doc__ = "See alexnet_pp.data.loader.build_train_loader."
build_eval_loader.__doc__ = "See alexnet_pp.data.loader.build_eval_loader."
