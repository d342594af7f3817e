"""Small shard sets for tests: real tar files, optionally with deliberately corrupt samples."""

from __future__ import annotations

import io
import tarfile
import zlib
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from alexnet_pp.data.shards import shard_name


def jpeg_bytes(img: np.ndarray, quality: int = 95) -> bytes:
    import simplejpeg

    return simplejpeg.encode_jpeg(np.ascontiguousarray(img), quality=quality, colorspace="RGB")


def random_image(seed: int, size: int) -> np.ndarray:
    """A smooth random image (compresses to a few KB, varies per seed)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, -(-size // 4), 0), -(-size // 4), 1)[:size, :size].copy()


def write_tar(path: str | Path, members: Iterable[tuple[str, bytes]]) -> Path:
    path = Path(path)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return path


def make_shards(
    root: str | Path,
    split: str,
    counts: Sequence[int],
    size: int = 40,
    num_classes: int = 10,
    corrupt: Optional[dict[str, str]] = None,
) -> list[list[tuple[str, int]]]:
    """Shards `{split}-000000.tar`… with counts[i] samples each; returns [(key, label)] per shard.

    Keys are `{split}-s{shard}-{i}`, labels (7·shard + i) % num_classes, images random_image(crc32(key)).
    `corrupt` maps a key to a defect: "garbage_jpg", "bad_cls" ("abc"), "label_range" (999),
    "negative_label" (-1), "missing_cls", "missing_jpg"."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    corrupt = corrupt or {}
    out = []
    for s, n in enumerate(counts):
        members, listing = [], []
        for i in range(n):
            key = f"{split}-s{s}-{i}"
            label = (s * 7 + i) % num_classes
            defect = corrupt.get(key)
            jpg = b"\xff\xd8 definitely not a jpeg" if defect == "garbage_jpg" else jpeg_bytes(
                random_image(zlib.crc32(key.encode()), size))
            cls = {"bad_cls": b"abc", "label_range": b"999", "negative_label": b"-1"}.get(defect, str(label).encode())
            if defect != "missing_jpg":
                members.append((f"{key}.jpg", jpg))
            if defect != "missing_cls":
                members.append((f"{key}.cls", cls))
            listing.append((key, label))
        write_tar(root / shard_name(split, s), members)
        out.append(listing)
    return out


def truncate(path: str | Path, keep_fraction: float = 0.5) -> None:
    p = Path(path)
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep_fraction)])
