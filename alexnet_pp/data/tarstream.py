"""Reading samples out of one tar shard: a small streaming tar parser.

Why not `tarfile` or webdataset's tar iterator: the loader addresses samples by their position in
a shard (it splits an epoch at sample granularity, see stream.py), must skip the samples before a
position cheaply (seek over member data in local files), and must tell a shard that cannot be
opened at all from one that is cut short after some samples; and it reads about 4× as many
samples per second as `webdataset.WebDataset`'s iterator (`python -m benchmarks.data_bench
--readers-only` prints both; docs/DATA.md). Shards are opened with webdataset's `gopen`.
A sample is a run of consecutive members sharing a key (WebDataset convention: key = path up to
the first dot of the file name).
"""

from __future__ import annotations

import os
import subprocess
from typing import Iterator, Optional
from urllib.parse import urlparse

BLOCK = 512


class ShardOpenError(OSError):
    """A shard that cannot be opened or is not a tar file; the message names it."""


class ShardTruncated(Exception):
    """The shard ended (or broke) before its end-of-archive marker; `position` samples came out whole."""

    def __init__(self, url: str, position: int, why: str):
        super().__init__(f"{url}: {why} after {position} samples")
        self.url, self.position, self.why = url, position, why


def is_remote(url: str) -> bool:
    """A URL for one of webdataset's gopen handlers (pipe:, http(s), gs:, …) rather than a local
    path (or `file:` URL): its scheme has a handler, or it looks like `scheme://…`."""
    from webdataset.gopen import gopen_schemes

    scheme = urlparse(url).scheme.lower()
    return bool(scheme) and scheme != "file" and (scheme in gopen_schemes or "://" in url)


class _ReadError(Exception):
    """Reading failed: the command behind a pipe exited with an error, or the file read failed."""


class _Source:
    """A readable byte stream for a shard URL, opened with webdataset's `gopen`: a local path,
    `file:`, `pipe:COMMAND`, http(s) (curl with retries), `gs:` (gsutil), `ais:`, `hf:`, … and any
    scheme registered in `webdataset.gopen_schemes` (URLs are rewritten by GOPEN_REWRITE, as there).
    Pipes come back as gopen's `Pipe`. Its own read checks the command's exit status after every
    read and drops the data of the read that meets a failure, so a command that wrote a whole
    broken shard and exited before the first read lost all of it. So the pipe's output is read
    directly and its exit status judged where the output ends: every byte the command wrote is
    read, then a non-zero status is a `_ReadError`."""

    def __init__(self, url: str):
        from webdataset.gopen import Pipe, gopen

        self.url = url
        # a local path is made absolute, so that a colon in it (`run:3/train.tar`) is no scheme
        target = url if is_remote(url) or url.startswith("file:") else os.path.abspath(url)
        try:
            self.f = gopen(target, "rb", bufsize=1 << 20)
        except (OSError, ValueError) as e:  # ValueError: a scheme without handler, WDS_SECURE
            raise ShardOpenError(f"cannot open shard {url}: {getattr(e, 'strerror', None) or e}") from None
        self.pipe: Optional[Pipe] = self.f if isinstance(self.f, Pipe) else None
        try:
            self.seekable = self.pipe is None and self.f.seekable()
        except (OSError, ValueError):
            self.seekable = False

    def read(self, n: int) -> bytes:
        if n <= 0:
            return b""
        f = self.pipe.stream if self.pipe is not None else self.f
        try:
            data = f.read(n)
            if len(data) == n or self.seekable:
                return data
            parts = [data]  # a pipe or socket may return short reads before EOF
            got = len(data)
            while got < n:
                more = f.read(n - got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
        except (OSError, ValueError) as e:
            raise _ReadError(str(e)) from None
        if got < n and self.pipe is not None:  # the command's output ended
            self._check_exit()
        return b"".join(parts)

    def _check_exit(self) -> None:
        pipe = self.pipe
        try:
            pipe.status = pipe.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # output closed, command still running: judged by its data
            return
        if pipe.status not in pipe.ignore_status and not pipe.ignore_errors:
            raise _ReadError(f"command exited with status {pipe.status}")

    def skip(self, n: int) -> bool:
        """Skip n bytes; False when the stream ended first (only detectable when reading)."""
        if self.seekable:
            try:
                self.f.seek(n, os.SEEK_CUR)
            except (OSError, ValueError) as e:
                raise _ReadError(str(e)) from None
            return True
        while n > 0:
            chunk = self.read(min(n, 1 << 20))
            if not chunk:
                return False
            n -= len(chunk)
        return True

    def close(self) -> Optional[int]:
        """Close; for a pipe, the command's exit status. A command still running is killed: the
        reader stopped early on purpose, so that is no error (a read that met the end of the output
        has already given the command its time to exit, `_check_exit`)."""
        if self.pipe is None:
            try:
                self.f.close()
            except OSError:
                pass
            return None
        proc = self.pipe.proc
        if proc.poll() is None:
            proc.kill()
        try:
            self.pipe.stream.close()  # closed here, so Pipe.close (also run by __del__) does nothing
        except OSError:
            pass
        self.pipe.status = proc.wait()
        return self.pipe.status


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    s = field.split(b"\0", 1)[0].strip()
    return int(s, 8) if s else 0


def _checksum_ok(block: bytes) -> bool:
    try:
        want = _octal(block[148:156])
    except ValueError:
        return False
    got = sum(block[:148]) + 8 * 32 + sum(block[156:])
    return want == got


def _pax_path(data: bytes) -> Optional[str]:
    i = 0
    while i < len(data):
        sp = data.find(b" ", i)
        if sp < 0:
            break
        length = int(data[i:sp])
        rec = data[sp + 1 : i + length - 1]
        k, _, v = rec.partition(b"=")
        if k == b"path":
            return v.decode("utf-8", "replace")
        i += length
    return None


def split_name(name: str) -> Optional[tuple[str, str]]:
    """(key, extension) per WebDataset: the key runs to the first dot of the file name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:
        return None
    return name[:dot], name[dot + 1 :].lower()


def iter_samples(
    url: str, start: int = 0, stop: Optional[int] = None, read_data: bool = True
) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Yield (position, key, {extension: bytes}) for samples start <= position < stop of a shard
    (with read_data=False the member data is skipped and the values are empty).

    Raises ShardOpenError when the shard cannot be opened or does not start with a tar header,
    ShardTruncated when it breaks off before its end-of-archive marker (samples before the break
    have been yielded; the sample being read at the break is lost)."""
    src = _Source(url)
    position = 0  # index of the sample being assembled
    key: Optional[str] = None
    members: dict[str, bytes] = {}
    long_name: Optional[str] = None
    first = True
    clean_end = False
    try:
        while stop is None or position < stop:
            block = src.read(BLOCK)
            if first:
                if len(block) < BLOCK or not _checksum_ok(block):
                    rc = src.close()
                    why = "empty or unreadable" if not block else "not a tar file"
                    if rc:
                        why += f" (command exited with status {rc})"
                    raise ShardOpenError(f"cannot open shard {url}: {why}")
                first = False
            if len(block) < BLOCK:
                raise ShardTruncated(url, position, "unexpected end of data")
            if block.count(0) == BLOCK:
                clean_end = True
                break
            if not _checksum_ok(block):
                raise ShardTruncated(url, position, "corrupt tar header")
            size = _octal(block[124:136])
            kind = block[156:157]
            pad = (-size) % BLOCK
            if kind in (b"L", b"x"):  # GNU long name / pax extended header for the next member
                data = src.read(size)
                if len(data) < size or not src.skip(pad):
                    raise ShardTruncated(url, position, "unexpected end of data")
                long_name = data.rstrip(b"\0").decode("utf-8", "replace") if kind == b"L" else _pax_path(data)
                continue
            name = long_name
            long_name = None
            if name is None:
                name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                if block[257:262] == b"ustar":
                    prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
                    if prefix:
                        name = prefix + "/" + name
            parts = split_name(name) if kind in (b"0", b"\0", b"7") else None
            if parts is not None and parts[0] != key:
                if key is not None:
                    if position >= start:
                        yield position, key, members
                    position += 1
                    if stop is not None and position >= stop:
                        break
                key, members = parts[0], {}
            if parts is None or position < start or not read_data:
                if parts is not None:
                    members.setdefault(parts[1], b"")
                if not src.skip(size + pad):
                    raise ShardTruncated(url, position, "unexpected end of data")
                continue
            data = src.read(size + pad)
            if len(data) < size + pad:
                raise ShardTruncated(url, position, "unexpected end of data")
            members.setdefault(parts[1], data[:size])  # a duplicate extension keeps the first
        else:
            clean_end = True  # stopped at `stop` on purpose
        if key is not None and (stop is None or position < stop) and clean_end:
            if position >= start:
                yield position, key, members
    except _ReadError as e:
        if first:
            raise ShardOpenError(f"cannot open shard {url}: {e}") from None
        raise ShardTruncated(url, position, f"read error: {e}") from None
    finally:
        src.close()


def count_samples(url: str) -> tuple[int, Optional[ShardTruncated]]:
    """Whole samples in a shard, reading headers only; the truncation found, if any."""
    n = 0
    try:
        for _ in iter_samples(url, read_data=False):
            n += 1
    except ShardTruncated as e:
        return n, e
    return n, None
