"""Resolving a shard source string into a list of shard URLs with their sample counts.

A source is one of (several may be joined with `::`):
- a directory: the shards its `{split}-manifest.json` lists, else its `{split}-*.tar` files;
- a `*-manifest.json` file;
- a local path, a brace pattern (`train-{000000..000127}.tar`) or a glob (`train-*.tar`);
- a URL that webdataset's `gopen` opens: `pipe:COMMAND`, http(s), `gs:`, `ais:`, … (brace-expanded);
- such a URL naming a manifest (`https://host/d/train-manifest.json`, `pipe:aws s3 cp
  s3://b/d/train-manifest.json -`): the shards it lists, each URL being the source with the
  manifest's file name replaced by the shard's name.
Expansion is webdataset's (`shardlists.expand_urls`: braces, and `${NAME}` from $WDS_NAME).

Sample counts come from the manifests written beside the shards (shards.py), local or remote;
shards without one are counted by reading their tar headers: local files seek over the data, so
this is quick, and are counted again only when they change; remote shards must be streamed whole,
so their counts are kept for the life of the process and, given a `count_cache` file, across
processes (remote shards are taken to be immutable).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .tarstream import ShardOpenError, ShardTruncated, count_samples, is_remote

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


_MANIFEST_NAME = re.compile(r"[^/\s'\"]*-manifest\.json")


def _read_remote(url: str) -> bytes:
    from webdataset.gopen import gopen

    with gopen(url, "rb") as f:
        return f.read()


_REMOTE_MANIFESTS: dict[str, tuple[list[str], dict[str, int], Optional[list[str]]]] = {}


def _remote_manifest(part: str) -> tuple[list[str], dict[str, int], Optional[list[str]]]:
    """(shard URLs, their counts, class names or None) of a remote manifest, read once per process."""
    if part not in _REMOTE_MANIFESTS:
        (m,) = _MANIFEST_NAME.finditer(part)

        def here(name: str) -> str:  # the source with the manifest's file name replaced
            return part[: m.start()] + name + part[m.end():]

        try:
            data = json.loads(_read_remote(part))
            entries = [(here(e["name"]), int(e["count"])) for e in data.get("shards", [])]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise NoShardsError(f"cannot read the manifest {part!r}: {type(e).__name__}: {e}") from None
        if not entries:
            raise NoShardsError(f"no shards listed in {part!r}")
        if not data.get("complete", False):
            log.warning("%s describes an incomplete split (still being written?)", part)
        urls, counts = [u for u, _ in entries], dict(entries)
        try:
            names = json.loads(_read_remote(here("classes.json")))
            classes = [str(n) for n in names] if isinstance(names, list) else None
        except (OSError, ValueError):
            classes = None
        _REMOTE_MANIFESTS[part] = urls, counts, classes
    return _REMOTE_MANIFESTS[part]


def _expand_one(part: str, split: str) -> list[str]:
    if is_remote(part):
        if len(_MANIFEST_NAME.findall(part)) == 1:
            return _remote_manifest(part)[0]
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
_REMOTE_COUNTS: dict[str, tuple[int, Optional[ShardTruncated]]] = {}
_CACHE_FORMAT = 1


def _count(url: str) -> tuple[int, Optional[ShardTruncated]]:
    # a trainer builds loaders every epoch and evaluation: count each shard once per process
    # (a local one again when it changes); counting a remote shard streams all of it
    if is_remote(url):
        if url not in _REMOTE_COUNTS:
            _REMOTE_COUNTS[url] = count_samples(url)
        return _REMOTE_COUNTS[url]
    try:
        st = os.stat(url)
    except OSError:
        return count_samples(url)  # raises ShardOpenError naming it
    key = (os.path.abspath(url), st.st_size, st.st_mtime_ns)
    if key not in _COUNTS:
        _COUNTS[key] = count_samples(url)
    return _COUNTS[key]


def _read_count_cache(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
        if data.get("format") == _CACHE_FORMAT:
            return {str(k): int(v) for k, v in data["counts"].items()}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("ignoring unreadable sample-count cache %s", path)
    return {}


def _write_count_cache(path: Path, new: dict[str, int]) -> None:
    from alexnet_pp.fileio import write_atomic

    counts = {**_read_count_cache(path), **new}  # keep what other processes added meanwhile
    try:
        write_atomic(path, json.dumps({"format": _CACHE_FORMAT, "counts": counts}, indent=0) + "\n")
    except OSError as e:
        log.warning("cannot write the sample-count cache %s: %s", path, e)


def resolve(spec: str, split: str, skip_bad_shards: bool = False,
            count_cache: Optional[str | Path] = None) -> ShardList:
    """Shard URLs and sample counts for one split's source string.

    A shard that cannot be opened while counting raises ShardOpenError (naming it) unless
    skip_bad_shards, when it is kept with count 0 and listed in `problems` as kind "shard".
    `count_cache`: a JSON file keeping the counts of remote shards without a manifest across
    processes (read before counting, extended after); without it they are kept per process."""
    if not spec:
        raise NoShardsError("empty shard source")
    parts = [p.strip() for p in spec.split("::") if p.strip()]
    urls: list[str] = []
    for part in parts:
        urls.extend(_expand_one(part, split))
    if not urls:
        raise NoShardsError(f"no shards match {spec!r}")
    known: dict[str, int] = {}
    classes = None
    for part in parts:
        if part in _REMOTE_MANIFESTS:  # read by _expand_one
            _, part_counts, part_classes = _REMOTE_MANIFESTS[part]
            known.update(part_counts)
            classes = classes or part_classes
    for d in {str(Path(u).parent) for u in urls if not is_remote(u)}:
        known.update(_manifest_counts(Path(d)))
    cache_path = Path(count_cache) if count_cache else None
    cached = _read_count_cache(cache_path) if cache_path else {}
    new_counts: dict[str, int] = {}
    counts, problems = [], []
    for u in urls:
        remote = is_remote(u)
        key = u if remote else str(Path(u))
        if key in known:
            counts.append(known[key])
            continue
        if remote and key in cached:
            _REMOTE_COUNTS.setdefault(key, (cached[key], None))
        try:
            n, trunc = _count(u)
        except ShardOpenError as e:
            if not skip_bad_shards:
                raise
            log.warning("skipping shard: %s", e)
            problems.append((u, "shard", str(e)))
            counts.append(0)
            continue
        if trunc is not None:
            log.warning("shard %s is cut short: %s; using its %d whole samples", u, trunc.why, n)
            problems.append((u, "truncated", str(trunc)))
        elif remote and cache_path is not None and cached.get(key) != n:
            new_counts[key] = n
        counts.append(n)
    if cache_path is not None and new_counts:
        _write_count_cache(cache_path, new_counts)
    local = [u for u in urls if not is_remote(u)]
    if local:
        from .shards import read_classes

        classes = read_classes(Path(local[0]).parent)
    return ShardList(spec, urls, counts, classes, problems)
