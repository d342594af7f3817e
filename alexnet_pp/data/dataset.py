"""`ensure_dataset(cfg)`: the shards a run reads, generating the embedded dataset on first use."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..host import cores
from . import synthetic
from .formats import FORMATS, encode_image
from .shards import Encoded, manifest_complete, write_classes, write_split
from .sources import ShardList, resolve

log = logging.getLogger(__name__)

SYNTHETIC_VERSION = 2  # bump when images change: datasets on disk are regenerated
SPLITS = ("train", "val")


@dataclass
class DatasetInfo:
    train: str  # source strings as the loaders resolve them (a directory for the embedded set)
    val: str
    num_classes: int
    train_samples: int
    val_samples: int
    train_shards: list[str] = field(default_factory=list)
    val_shards: list[str] = field(default_factory=list)
    classes: Optional[list[str]] = None  # names in index order, when a classes.json is present
    synthetic: bool = False


def encode_synthetic(index: int, *, seed: int, split: str, classes: int, size: int, quality: int,
                     fmt: str = "jpeg") -> Encoded:
    img, label = synthetic.make_image(seed, split, index, classes, size)
    data, ext = encode_image(img, fmt, quality)
    return Encoded(index=index, key=f"{split}-{index:08d}", data=data, label=label, ext=ext)


def synthetic_params(classes: int, per_class: int, size: int, seed: int, quality: int, split: str,
                     max_count: int, fmt: str = "jpeg") -> dict[str, Any]:
    return {"kind": "synthetic", "version": SYNTHETIC_VERSION, "split": split, "classes": classes,
            "per_class": per_class, "size": size, "seed": seed, "quality": quality, "max_count": max_count,
            **({"format": fmt} if fmt != "jpeg" else {})}


def default_shard_count(n: int) -> int:
    # about 16 shards, so that shard shuffling has something to shuffle; 16 to 1000 samples each
    return max(16, min(1000, -(-n // 16)))


def write_synthetic(
    out: str | Path,
    classes: int,
    train_per_class: int,
    val_per_class: int,
    size: int,
    seed: int = 0,
    quality: int = 90,
    max_count: int = 0,
    max_bytes: int = 1 << 30,
    workers: int = 0,
    progress: bool = False,
    fmt: str = "jpeg",
) -> dict[str, Any]:
    """Write (or complete, or reuse) the embedded dataset's train and val shards under `out`
    (images as JPEG, or their raw pixels with fmt="raw")."""
    synthetic.class_names(classes)  # validates the class count
    if fmt not in FORMATS:
        raise ValueError(f"image format {fmt!r} not one of {', '.join(FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or cores()
    reports = {}
    with _lock(out):
        write_classes(out, synthetic.class_names(classes))
        for split, per_class in (("train", train_per_class), ("val", val_per_class)):
            n = classes * per_class
            mc = max_count or default_shard_count(n)
            params = synthetic_params(classes, per_class, size, seed, quality, split, mc, fmt)
            if manifest_complete(out, split, params):
                reports[split] = None
                continue
            log.info("writing the embedded dataset's %s split: %d images of %d px to %s", split, n, size, out)
            enc = functools.partial(encode_synthetic, seed=seed, split=split, classes=classes, size=size,
                                    quality=quality, fmt=fmt)
            reports[split] = write_split(out, split, n, enc, params, max_count=mc, max_bytes=max_bytes,
                                         workers=workers, progress=progress)
    return reports


@contextlib.contextmanager
def _lock(root: Path):
    # ranks sharing a node and a data directory must not generate the same shards at once
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_split(cfg, split: str) -> ShardList:
    d = cfg.data
    spec = getattr(d, split) or d.synthetic_dir
    # remote shards without a manifest are counted once per process, or once ever with data.count_cache
    return resolve(spec, split, skip_bad_shards=d.skip_bad_shards, count_cache=d.count_cache or None)


def ensure_dataset(cfg) -> DatasetInfo:
    """Resolve the run's train/val sources; with data.train empty, generate the embedded dataset
    under data.synthetic_dir first (reused when a complete one with the same parameters is there)."""
    d = cfg.data
    synthetic_run = not d.train
    if synthetic_run:
        write_synthetic(d.synthetic_dir, d.synthetic_classes, d.synthetic_train_per_class,
                        d.synthetic_val_per_class, d.stored_size, d.seed, progress=sys.stderr.isatty())
    tr, va = resolve_split(cfg, "train"), resolve_split(cfg, "val")
    classes = tr.classes
    if synthetic_run:
        num_classes = d.synthetic_classes
    else:
        num_classes = len(classes) if classes else cfg.model.num_classes
    return DatasetInfo(
        train=d.train or d.synthetic_dir,
        val=d.val or d.synthetic_dir,
        num_classes=num_classes,
        train_samples=tr.total,
        val_samples=va.total,
        train_shards=tr.urls,
        val_shards=va.urls,
        classes=classes,
        synthetic=synthetic_run,
    )
