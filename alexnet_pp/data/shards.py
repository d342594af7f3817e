"""Writing WebDataset shards: `{split}-{000000..}.tar` holding `{key}.cls` + `{key}.jpg` per sample,
written by webdataset's TarWriter.

Beside the shards: `classes.json` (class names in index order) and `{split}-manifest.json`
(generation parameters, shard names, samples per shard, total). A shard is written to
`<name>.tmp` and renamed when complete, so a file with a shard's name is always whole.

The manifest doubles as a journal: after each shard is renamed into place its entry
(name, count, bytes, first/last source index) is recorded, and `complete` becomes true only at
the end. Shard membership is cut by count and byte limits on deterministically encoded samples,
then fixed by that journal, so a resumed run rewrites a missing shard i with exactly the samples
it held before and continues after the last recorded one: no duplicates, no holes. (Encoding
is deterministic, so even without the journal a rerun cuts the same shards.) The byte limit
applies to the members; tar's final padding to 10 KiB records may add up to 10 KiB.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from alexnet_pp.fileio import write_atomic

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def manifest_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}-manifest.json"


def read_manifest(root: str | Path, split: str) -> Optional[dict[str, Any]]:
    p = manifest_path(root, split)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def write_manifest(root: str | Path, split: str, manifest: dict[str, Any]) -> None:
    write_atomic(manifest_path(root, split), json.dumps(manifest, indent=1) + "\n")


def write_classes(root: str | Path, names: Sequence[str]) -> None:
    write_atomic(Path(root) / "classes.json", json.dumps(list(names), indent=0) + "\n")


def read_classes(root: str | Path) -> Optional[list[str]]:
    try:
        names = json.loads((Path(root) / "classes.json").read_text())
    except (OSError, ValueError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


@dataclass
class Encoded:
    """One sample ready to be written (or, with `error` set, a source that could not be read)."""

    index: int
    key: str = ""
    data: bytes = b""
    label: int = -1
    ext: str = "jpg"
    source: str = ""
    error: str = ""


class ShardFile:
    """One shard being written by webdataset's TarWriter: members stream into `<name>.tmp`, renamed
    to `<name>` by close(). Members get a fixed mtime/owner/mode, so the same samples always give
    the same bytes. (Not ShardWriter: write_split cuts a shard before a sample would pass the byte
    limit and journals each shard's index range for resuming; ShardWriter cuts after the limit is
    passed and keeps no journal, so each shard is one TarWriter.)"""

    def __init__(self, path: Path):
        from webdataset import TarWriter

        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self._f = open(self.tmp, "wb")
        self._tar = TarWriter(self._f, user="", group="", mode=0o644, mtime=0, encoder=False)
        self.count = 0
        self.bytes = 1024  # the two zero blocks that end a tar

    def add(self, s: Encoded) -> None:
        self._tar.write({"__key__": s.key, s.ext: s.data, "cls": str(s.label).encode()})
        self.count += 1
        self.bytes += _sample_bytes(s)

    def close(self) -> int:
        """Finish, make it durable, rename into place; returns the file size."""
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return self.path.stat().st_size


def write_shard(path: Path, samples: Iterable[Encoded]) -> int:
    """Write one shard via a temp file and rename; returns its size in bytes."""
    f = ShardFile(path)
    for s in samples:
        f.add(s)
    return f.close()


# member overhead in a tar: a 512-byte header per member and padding to 512 bytes
def _member_bytes(n: int) -> int:
    return 512 + (n + 511) // 512 * 512


def _sample_bytes(s: Encoded) -> int:
    return _member_bytes(len(s.data)) + _member_bytes(len(str(s.label)))


@dataclass
class WriteReport:
    split: str
    total: int = 0  # samples in the split's shards
    shards: int = 0
    written: int = 0  # shards written by this run (the rest were complete already)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (source, reason) of skipped inputs


def _pool(workers: int):
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    return ctx.Pool(workers)


def _encoded_stream(encode: Callable[[int], Encoded], indices: Sequence[int], pool, chunksize: int) -> Iterator[Encoded]:
    if pool is None:
        return map(encode, indices)
    return pool.imap(encode, indices, chunksize=chunksize)


def write_split(
    root: str | Path,
    split: str,
    num_inputs: int,
    encode: Callable[[int], Encoded],
    params: dict[str, Any],
    max_count: int = 1000,
    max_bytes: int = 1 << 30,
    workers: int = 0,
    progress: bool = False,
    resume: bool = True,
) -> WriteReport:
    """Encode inputs 0..num_inputs-1 (in that order) with `encode` and write them as shards.

    `encode` must be a picklable, deterministic function of the index. With `resume`, shards
    recorded in a manifest with the same `params` are kept when present and rewritten from their
    recorded index range when missing; work continues after the last recorded shard. With other
    params the split is rewritten from scratch (old shards of the split are removed)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    old = read_manifest(root, split) if resume else None
    if old is not None and (old.get("params") != params or old.get("format") != MANIFEST_FORMAT):
        old = None
    if old is None:
        for p in root.glob(f"{split}-*.tar*"):
            p.unlink()
        manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "split": split, "params": params,
                                    "complete": False, "total": 0, "shards": []}
        write_manifest(root, split, manifest)
    else:
        manifest = old
        manifest["complete"] = False
        for p in root.glob(f"{split}-*.tar.tmp"):  # left by an interrupted run
            p.unlink()

    report = WriteReport(split)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_inputs, desc=f"{split}", unit="img", dynamic_ncols=True)

    pool = _pool(workers) if workers > 1 else None
    chunksize = 8
    try:
        # 1. recorded shards: keep, or rewrite a missing one from its recorded range
        for entry in manifest["shards"]:
            path = root / entry["name"]
            span = entry["end"] - entry["start"]
            if path.exists() and path.stat().st_size == entry["bytes"]:
                if bar:
                    bar.update(span)
                continue
            shard = ShardFile(path)
            for s in _encoded_stream(encode, range(entry["start"], entry["end"]), pool, chunksize):
                if not s.error:
                    shard.add(s)
                if bar:
                    bar.update(1)
            if shard.count != entry["count"]:
                raise RuntimeError(
                    f"{path}: rewriting gave {shard.count} samples, the manifest recorded {entry['count']}; "
                    "the inputs changed since the shard was cut — remove the output and start again"
                )
            entry["bytes"] = shard.close()
            report.written += 1
        # 2. everything after the last recorded shard, cut by count and bytes
        first = manifest["shards"][-1]["end"] if manifest["shards"] else 0
        current: Optional[ShardFile] = None
        bad_here: list[list[str]] = []  # bad inputs inside the current shard's index range

        def finish(end: int) -> None:
            nonlocal current, first, bad_here
            size = current.close()
            manifest["shards"].append({"name": current.path.name, "count": current.count, "bytes": size,
                                       "start": first, "end": end, "bad": bad_here})
            manifest["total"] = sum(e["count"] for e in manifest["shards"])
            write_manifest(root, split, manifest)  # the journal: this shard's membership is now fixed
            report.written += 1
            current, first, bad_here = None, end, []

        for s in _encoded_stream(encode, range(first, num_inputs), pool, chunksize):
            if bar:
                bar.update(1)
            if s.error:
                bad_here.append([s.source, s.error])
                continue
            if current is not None and (current.count >= max_count or current.bytes + _sample_bytes(s) > max_bytes):
                finish(s.index)
            if current is None:
                current = ShardFile(root / shard_name(split, len(manifest["shards"])))
            current.add(s)
        if current is not None:
            finish(num_inputs)
        elif bad_here and manifest["shards"]:  # trailing bad inputs: remember them on the last shard
            manifest["shards"][-1]["bad"].extend(bad_here)
            manifest["shards"][-1]["end"] = num_inputs
        elif bad_here:
            manifest["bad"] = bad_here  # no sample at all could be read
    finally:
        if pool is not None:
            pool.terminate()
        if bar:
            bar.close()

    manifest["total"] = sum(e["count"] for e in manifest["shards"])
    manifest["complete"] = True
    write_manifest(root, split, manifest)
    report.total, report.shards = manifest["total"], len(manifest["shards"])
    report.bad = [(src, why) for e in manifest["shards"] for src, why in e.get("bad", [])]
    report.bad += [(src, why) for src, why in manifest.get("bad", [])]
    return report


def manifest_complete(root: str | Path, split: str, params: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The manifest when a complete split with these params is present (all shard files whole)."""
    m = read_manifest(root, split)
    if not m or not m.get("complete") or m.get("params") != params or m.get("format") != MANIFEST_FORMAT:
        return None
    for e in m["shards"]:
        p = Path(root) / e["name"]
        if not p.exists() or p.stat().st_size != e["bytes"]:
            return None
    return m
