"""Resolving a shard source string into a list of shard URLs with their sample counts.

A source is one of (several may be joined with `::`):
- a directory: the shards its `{split}-manifest.json` lists, else its `{split}-*.tar` files;
- a `*-manifest.json` file;
- a local path, a brace pattern (`train-{000000..000127}.tar`) or a glob (`train-*.tar`);
- a URL that webdataset's `gopen` opens: `pipe:COMMAND`, http(s), `gs:`, `ais:`, … (brace-expanded).
Expansion is webdataset's (`shardlists.expand_urls`: braces, and `${NAME}` from $WDS_NAME).

Sample counts come from the manifests written beside the shards (shards.py); shards without
one are counted by reading their tar headers (local files seek over the data, so this is quick).
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from .tarstream import ShardOpenError, ShardTruncated, count_samples

log = logging.getLogger(__name__)


class NoShardsError(ValueError):
    """A source pattern that matches no shard; the message quotes the pattern."""


@dataclass
class ShardList:
    spec: str
    urls: list[str]
    counts: list[int]
    classes: Optional[list[str]] = None
    # found while counting: (url, kind, message) of shards that are cut short or cannot be opened
    problems: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts)


def _manifest_counts(directory: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in sorted(directory.glob("*-manifest.json")):
        try:
            data = json.loads(m.read_text())
            for e in data.get("shards", []):
                out[str(directory / e["name"])] = int(e["count"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable manifest %s", m)
    return out


def _expand(pattern: str) -> list[str]:
    from webdataset.shardlists import expand_urls

    try:
        return expand_urls(pattern)
    except AssertionError as e:  # webdataset asserts that ${NAME} has a $WDS_NAME
        raise NoShardsError(f"cannot expand {pattern!r}: {e}") from None


def is_remote(url: str) -> bool:
    """A URL for webdataset's gopen (pipe:, http(s), gs:, …) rather than a local path."""
    from webdataset.gopen import gopen_schemes

    scheme = urlparse(url).scheme.lower()
    return bool(scheme) and scheme != "file" and (scheme in gopen_schemes or "://" in url)


def _expand_one(part: str, split: str) -> list[str]:
    if is_remote(part):
        return _expand(part)
    path = part[5:] if part.startswith("file:") else part
    p = Path(path).expanduser()
    if p.is_dir():
        m = p / f"{split}-manifest.json"
        if m.exists():
            return _from_manifest(m)
        found = sorted(glob.glob(str(p / f"{split}-*.tar")))
        if not found:
            raise NoShardsError(f"no shards match {str(p / f'{split}-*.tar')!r} (source {part!r})")
        return found
    if p.name.endswith("-manifest.json") and p.exists():
        return _from_manifest(p)
    out: list[str] = []
    for e in _expand(str(p)):
        if any(c in e for c in "*?["):
            out.extend(sorted(glob.glob(e)))
        else:
            out.append(e)  # a missing member of a pattern: an unopenable shard, reported when read
    if not any(os.path.exists(u) for u in out):
        raise NoShardsError(f"no shards match {part!r}")
    return out


def _from_manifest(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    if not data.get("complete", False):
        log.warning("%s describes an incomplete split (still being written?)", path)
    names = [str(path.parent / e["name"]) for e in data.get("shards", [])]
    if not names:
        raise NoShardsError(f"no shards listed in {str(path)!r}")
    return names


_COUNTS: dict[tuple, tuple[int, Optional[ShardTruncated]]] = {}


def _count(url: str) -> tuple[int, Optional[ShardTruncated]]:
    # a trainer builds loaders every epoch: count an unchanged local shard only once per process
    if is_remote(url):
        return count_samples(url)
    try:
        st = os.stat(url)
    except OSError:
        return count_samples(url)  # raises ShardOpenError naming it
    key = (os.path.abspath(url), st.st_size, st.st_mtime_ns)
    if key not in _COUNTS:
        _COUNTS[key] = count_samples(url)
    return _COUNTS[key]


def resolve(spec: str, split: str, skip_bad_shards: bool = False) -> ShardList:
    """Shard URLs and sample counts for one split's source string.

    A shard that cannot be opened while counting raises ShardOpenError (naming it) unless
    skip_bad_shards, when it is kept with count 0 and listed in `problems` as kind "shard"."""
    if not spec:
        raise NoShardsError("empty shard source")
    urls: list[str] = []
    for part in spec.split("::"):
        if part.strip():
            urls.extend(_expand_one(part.strip(), split))
    if not urls:
        raise NoShardsError(f"no shards match {spec!r}")
    known: dict[str, int] = {}
    for d in {str(Path(u).parent) for u in urls if not is_remote(u)}:
        known.update(_manifest_counts(Path(d)))
    counts, problems = [], []
    for u in urls:
        key = u if is_remote(u) else str(Path(u))
        if key in known:
            counts.append(known[key])
            continue
        try:
            n, trunc = _count(u)
        except ShardOpenError as e:
            if not skip_bad_shards:
                raise
            log.warning("skipping shard: %s", e)
            problems.append((u, "shard", str(e)))
            n, trunc = 0, None
        if trunc is not None:
            log.warning("shard %s is cut short: %s; using its %d whole samples", u, trunc.why, n)
            problems.append((u, "truncated", str(trunc)))
        counts.append(n)
    classes = None
    local = [u for u in urls if not is_remote(u)]
    if local:
        from .shards import read_classes

        classes = read_classes(Path(local[0]).parent)
    return ShardList(spec, urls, counts, classes, problems)
