"""Converting an image-folder tree (one folder per class) into shards.

Every image: shorter side resized to `size`, centre-cropped to size×size, stored as JPEG or, with
`fmt="raw"` (`--format raw`), as its uint8 pixels (formats.py: faster to read, larger on disk).
The order is fixed up front: classes and files sorted, then (by default) permuted with a seed so
that each shard holds a mix of classes (shards written in class order would make a shuffle
buffer's batches nearly single-class). That plan is written as `{split}-index.tsv`
(key, label, source path) and its hash goes into the manifest's parameters; shard membership is
then cut and journalled by shards.write_split, so an interrupted ingest resumes without
duplicates or holes. Unreadable images are skipped, counted and listed; they never stop the run.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .formats import FORMATS, encode_image
from .shards import Encoded, WriteReport, read_classes, write_classes, write_split

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff", ".gif"}


def _is_class_tree(d: Path) -> bool:
    return d.is_dir() and any(p.is_dir() for p in d.iterdir())


def find_splits(src: Path, split: Optional[str] = None) -> dict[str, Path]:
    """{split: folder of class folders}: SRC/train and SRC/val when present, else SRC itself."""
    if split:
        return {split: src}
    found = {s: src / s for s in ("train", "val") if _is_class_tree(src / s)}
    return found or {"train": src}


def list_images(root: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """(path relative to root, label) sorted by class, then path."""
    out = []
    for label, name in enumerate(classes):
        d = root / name
        if not d.is_dir():
            continue
        files = sorted(p.relative_to(root).as_posix() for p in d.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        out.extend((f, label) for f in files)
    return out


def load_image(path: Path, size: int) -> np.ndarray:
    """uint8 size×size×3: shorter side resized to `size`, centre crop."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that still covers `size`
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size)))


class FileEncoder:
    """Picklable encoder for write_split: index → Encoded, reading the plan lazily per process
    (only the plan's path travels to the pool, not a million file names per task)."""

    def __init__(self, plan_path: Path, root: Path, size: int, quality: int, fmt: str = "jpeg"):
        self.plan_path, self.root, self.size, self.quality, self.fmt = plan_path, root, size, quality, fmt
        self._plan: Optional[list[tuple[str, int, str]]] = None

    def __getstate__(self):
        return {**self.__dict__, "_plan": None}

    def __call__(self, index: int) -> Encoded:
        if self._plan is None:
            self._plan = read_plan(self.plan_path)
        key, label, rel = self._plan[index]
        try:
            img = load_image(self.root / rel, self.size)
            data, ext = encode_image(img, self.fmt, self.quality)
        except Exception as e:  # any unreadable file is skipped and listed, never fatal
            return Encoded(index=index, source=rel, error=f"{type(e).__name__}: {e}")
        return Encoded(index=index, key=key, data=data, label=label, ext=ext, source=rel)


def read_plan(path: Path) -> list[tuple[str, int, str]]:
    out = []
    for line in path.read_text().splitlines():
        key, label, rel = line.split("\t", 2)
        out.append((key, int(label), rel))
    return out


@dataclass
class IngestReport:
    classes: list[str]
    splits: dict[str, WriteReport]


def ingest(
    src: str | Path,
    out: str | Path,
    size: int = 256,
    quality: int = 90,
    max_count: int = 1000,
    max_bytes: int = 1 << 30,
    workers: int = 0,
    split: Optional[str] = None,
    shuffle_seed: Optional[int] = 0,
    progress: bool = True,
    fmt: str = "jpeg",
) -> IngestReport:
    from ..host import cores

    if fmt not in FORMATS:
        raise ValueError(f"image format {fmt!r} not one of {', '.join(FORMATS)}")
    src, out = Path(src).resolve(), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"no such folder: {src}")
    out.mkdir(parents=True, exist_ok=True)
    splits = find_splits(src, split)
    classes = read_classes(out)
    first = splits.get("train") or next(iter(splits.values()))
    if classes is None:
        classes = sorted(p.name for p in first.iterdir() if p.is_dir())
        if not classes:
            raise ValueError(f"{first} holds no class folders")
    for name, root in splits.items():
        extra = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in classes)
        if extra:
            raise ValueError(f"{root}: class folders not in the class index ({out / 'classes.json'}): "
                             f"{', '.join(extra[:10])}{' …' if len(extra) > 10 else ''}")
    write_classes(out, classes)

    reports = {}
    for name, root in splits.items():
        files = list_images(root, classes)
        order = np.arange(len(files))
        if shuffle_seed is not None:
            order = np.random.default_rng([shuffle_seed, 7]).permutation(len(files))
        plan = "".join(f"{name}-{i:08d}\t{files[i][1]}\t{files[i][0]}\n" for i in order.tolist())
        plan_path = out / f"{name}-index.tsv"
        if not plan_path.exists() or plan_path.read_text() != plan:
            plan_path.write_text(plan)
        params = {"kind": "ingest", "source": str(root), "size": size, "quality": quality,
                  **({"format": fmt} if fmt != "jpeg" else {}),
                  "shuffle_seed": shuffle_seed, "max_count": max_count, "max_bytes": max_bytes,
                  "classes": len(classes), "plan_sha256": hashlib.sha256(plan.encode()).hexdigest()}
        log.info("%s: %d images in %d classes from %s", name, len(files), len(classes), root)
        reports[name] = write_split(out, name, len(files), FileEncoder(plan_path, root, size, quality, fmt), params,
                                    max_count=max_count, max_bytes=max_bytes, workers=workers or cores(),
                                    progress=progress)
    return IngestReport(classes, reports)
