"""The sample stream of one replica: which samples, in which order, cut into which batches.

How an epoch is split (training)
--------------------------------
The shard list is permuted with (seed, epoch); concatenating the shards in that order numbers the
epoch's samples 0..N-1 ("positions", counted from the manifests). With R replicas, micro-batch B
and T = epoch_samples or N samples per epoch, every replica gets L = ceil(T / (R·B)) batches
(rounded up to a multiple of `batch_multiple`, e.g. the micro-batches per optimizer step) —
the same L everywhere — and replica r owns the contiguous positions [r·L·B, (r+1)·L·B), taken
modulo N: when R·L·B > N the last positions wrap round to the start of the epoch, so a few samples
(< R·B, or < R·M·B with batch_multiple M) are seen twice and none is missed (DistributedSampler's
padding, at sample level).
Inside a replica, DataLoader worker w of W produces batches w, w+W, w+2W, … (the DataLoader
returns workers' batches round-robin, which is exactly batch order because the per-worker batch
counts never increase with w); worker w owns the contiguous slice of the replica's positions
for its batches. A slice can start or stop inside a shard: the reader seeks over the samples it
does not own. Sample-level slicing, rather than handing whole shards to workers, is what makes
"every sample once" and "equal length everywhere" hold for any shard count (WebDataset issues
#303/#188/#225: rank/worker imbalance, hangs with few shards).

Each worker shuffles its slice through a buffer (cfg.data.shuffle_buffer); its j-th batch is
the next B samples of that shuffled stream, decoded and augmented with draws keyed by each
sample's position (transforms.SampleRandom), so an image is augmented the same way whatever
batch it lands in: with one reader per replica (data.workers ≤ 1) a replica's sample stream and
its augmentation do not depend on the micro-batch size, and every pipeline layout with the same
D trains on the single-process trainer's images. A sample that turns out corrupt is skipped, counted and replaced
from the batch's own replacement run: the positions that follow the worker's slice, starting
j·B after its end (wrapping, at most one pass over the data). So every worker emits exactly its
full batches and never runs dry (only if the whole data set cannot fill a batch does it raise),
and no batch depends on what failed to decode in another. Skip counts are events: a corrupt
sample that a replacement read meets again is counted again. In resampled mode
(cfg.data.resampled) each worker instead draws shards with replacement, epoch length from
cfg.data.epoch_samples, and batch j's replacements come from shards drawn by its own generator.

Starting an epoch at batch k (resuming mid-epoch: ShardLoader.iter_from(k)) therefore needs no
decoding of batches 0..k-1: each worker reads its shuffled stream up to its first batch ≥ k
(tar-level skips — missing members, bad labels, truncation — happen there, as in a full pass,
since they come before the shuffle) and goes on exactly as a full pass would from there.

Epoch length and whole optimizer steps
--------------------------------------
With `batch_multiple` M (the micro-batches per optimizer step) L = ceil(T / (R·B)) becomes
L' = ceil(L / M)·M, so an epoch is L'/M whole steps on every replica and no micro-batch is
dropped. The epoch covers positions [0, R·L'·B); with T = N the R·L'·B − N of them past the end
(fewer than R·M·B) wrap round to the first positions of the epoch's shard order. They are the
end of the last replica's range (of the last replicas' when the data set is tiny), in its last
worker's slice, where the shuffle buffer mixes them in: the last step is a full step that
repeats samples of the epoch's start. Every sample is seen at least once per epoch; the
repeats number R·L'·B − N < R·M·B.

Determinism and pipeline-stage alignment
----------------------------------------
Everything above is a pure function of (seed, epoch, replica, num_replicas, workers, sources,
config): shard order, slices, shuffle buffer and augmentation use numpy generators seeded from
those, corruption is a property of the bytes, and the DataLoader order is fixed. So loaders
built independently for the first and the last pipeline stage of a replica yield the same
samples in the same order (`with_keys=True` shows the keys).

Evaluation
----------
No shuffle, no padding: replica r reads positions [r·N/R, (r+1)·N/R) of the split in shard order,
cut into batches of B (the last one partial), worker w taking batches w, w+W, …; corrupt samples
are skipped (their batch shrinks; a batch with nothing readable is left out).
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
from collections import Counter, deque
from dataclasses import dataclass
from itertools import islice
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import native
from . import transforms as T
from .slots import Slot, SlotPool, shared_empty
from .tarstream import ShardOpenError, ShardTruncated, iter_samples

log = logging.getLogger(__name__)

# what a skipped sample was: the keys of skip_counts()
SKIP_KINDS = ("truncated", "shard", "decode", "missing_image", "missing_cls", "bad_cls", "label_range")


class DataError(RuntimeError):
    """The data cannot fill the batches asked for (e.g. every sample is corrupt)."""


@dataclass(frozen=True)
class StreamSpec:
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    seed: int
    replica: int
    num_replicas: int
    batch: int
    image_size: int
    num_classes: int
    train: bool = True
    shuffle_buffer: int = 1000
    flip: bool = True
    color_noise: float = 0.0
    resampled: bool = False
    epoch_samples: int = 0
    skip_bad_shards: bool = False
    eval_crops: int = 1
    batch_multiple: int = 1  # training: batches per epoch rounded up to a multiple of this

    @property
    def total(self) -> int:
        return sum(self.counts)


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    return np.random.default_rng([seed, epoch, 1]).permutation(num_shards).tolist()


def segments(order: list[int], counts: tuple[int, ...], start: int, stop: int) -> list[tuple[int, int, int, int]]:
    """(shard, first, end, position of first) pieces covering epoch positions [start, stop),
    taken modulo the total."""
    sizes = [counts[k] for k in order]
    cum = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    total = cum[-1]
    out: list[tuple[int, int, int, int]] = []
    p = start
    while p < stop and total > 0:
        q = p % total
        j = bisect.bisect_right(cum, q) - 1  # the shard holding position q (empty shards skipped)
        first = q - cum[j]
        take = min(sizes[j] - first, stop - p)
        out.append((order[j], first, first + take, p))
        p += take
    return out


def worker_slice(num_batches: int, batch: int, worker: int, workers: int) -> tuple[int, int]:
    """(offset in the replica's positions, number of batches) of worker `worker`'s batches."""
    counts = [len(range(v, num_batches, workers)) for v in range(workers)]
    return batch * sum(counts[:worker]), counts[worker]


class Crops(NamedTuple):
    """A batch of uint8 crops N×S×S×3 (or the Slot holding them) and their lighting offsets N×3
    (output "uint8")."""

    images: object
    offsets: object


class Encoded(NamedTuple):
    """A batch left for the consumer to decode (output "encoded", data.decode gpu): per sample the
    JPEG bytes (or the decoded uint8 H×W×3 image, for other formats and images that needed
    upscaling), its crop box (y, x, flip), and the lighting offsets N×3."""

    payloads: list
    boxes: list
    offsets: object


class ShardStream(IterableDataset):
    """One replica's batches; each DataLoader worker runs `worker_batches` for its own id.

    Items are (images, labels, keys, skips): skips is the worker's {kind: count} since its
    previous batch, so the main process can add them up (ShardLoader.skip_counts).
    `output` picks what images are: "float" (normalised, a tensor or a Slot), "uint8" (Crops) or
    "encoded" (Encoded); `pool` is the loader's SlotPool for this pass, if any."""

    OUTPUTS = ("float", "uint8", "encoded")

    def __init__(self, spec: StreamSpec, epoch: int = 0, start: int = 0, output: str = "float"):
        super().__init__()
        if output not in self.OUTPUTS:
            raise ValueError(f"output {output!r} not one of {self.OUTPUTS}")
        if output != "float" and not spec.train:
            raise ValueError("evaluation batches are float only")
        self.spec = spec
        self.epoch = epoch
        self.start = start  # training: the epoch's first batch to yield (the ones before are fast-forwarded)
        self.output = output
        self.pool: Optional[SlotPool] = None
        if spec.total <= 0 and not spec.resampled:
            raise DataError(f"no samples in {len(spec.urls)} shard(s) (first: {spec.urls[0] if spec.urls else '-'})")

    # ------------------------------------------------------------------ sizes
    def replica_range(self) -> tuple[int, int]:
        s = self.spec
        if s.train:
            n = self.num_batches * s.batch
            return s.replica * n, (s.replica + 1) * n
        return s.replica * s.total // s.num_replicas, (s.replica + 1) * s.total // s.num_replicas

    @property
    def num_batches(self) -> int:
        s = self.spec
        if s.train:
            per_epoch = s.epoch_samples if s.epoch_samples > 0 else s.total
            n = max(1, math.ceil(per_epoch / (s.num_replicas * s.batch)))
            return -(-n // s.batch_multiple) * s.batch_multiple
        a = s.replica * s.total // s.num_replicas
        b = (s.replica + 1) * s.total // s.num_replicas
        return math.ceil((b - a) / s.batch)

    @property
    def num_samples(self) -> int:
        """Samples this replica yields per epoch (before skips in evaluation)."""
        if self.spec.train:
            return self.num_batches * self.spec.batch
        a, b = self.replica_range()
        return b - a

    def __iter__(self):
        info = get_worker_info()
        i, n = (info.id, info.num_workers) if info is not None else (0, 1)
        # DataLoader worker i plays stream worker (start + i) mod n, so that the DataLoader's
        # round robin, which begins at its worker 0, yields batches start, start + 1, … in order
        return self.worker_batches((self.start + i) % n, n, self.start)

    # ------------------------------------------------------------------ reading
    def _skip(self, url: str, key: Optional[str], kind: str, why: str = "") -> None:
        self._skips[kind] += 1
        if url not in self._logged:
            self._logged.add(url)
            what = f"sample {key!r}" if key else "the rest of the shard"
            log.warning("%s: skipping %s (%s%s); further problems in this shard are only counted",
                        url, what, kind, f": {why}" if why else "")

    def _raw(self, segs: list[tuple[int, int, int, int]]) -> Iterator[tuple[int, str, str, int, bytes, str]]:
        """(epoch position, url, key, label, image bytes, ext) of the readable samples in segs."""
        s = self.spec
        for shard, first, end, at in segs:
            url = s.urls[shard]
            seen = first
            try:
                for pos, key, members in iter_samples(url, first, end):
                    seen = pos + 1
                    ext = next((e for e in T.IMAGE_EXTS if e in members), None)
                    if ext is None:
                        self._skip(url, key, "missing_image")
                        continue
                    raw = members.get("cls")
                    if raw is None:
                        self._skip(url, key, "missing_cls")
                        continue
                    try:
                        label = int(raw.decode("ascii").strip())
                    except (UnicodeDecodeError, ValueError):
                        self._skip(url, key, "bad_cls", repr(raw[:20]))
                        continue
                    if not 0 <= label < s.num_classes:
                        self._skip(url, key, "label_range", f"{label} not in 0..{s.num_classes - 1}")
                        continue
                    yield at + pos - first, url, key, label, members[ext], ext
                if seen < end:  # a clean end of archive before the counted samples
                    self._skip(url, None, "truncated", f"{end - seen} samples fewer than counted")
            except ShardTruncated as e:
                self._skip(url, None, "truncated", e.why)
            except ShardOpenError:
                if not s.skip_bad_shards:
                    raise
                self._skip(url, None, "shard", "cannot be opened")

    def _shuffled(self, it, rng: np.random.Generator):
        size = self.spec.shuffle_buffer
        if size <= 1:
            yield from it
            return
        buf: list = []
        for x in it:
            if len(buf) < size:
                buf.append(x)
                continue
            i = int(rng.integers(size))
            yield buf[i]
            buf[i] = x
        for i in rng.permutation(len(buf)).tolist():
            yield buf[i]

    def _decoded(self, it, rng: Optional[T.SampleRandom], patience: Optional[int] = None):
        """(position, key, label, image, crop boxes, lighting offset) of the samples that decode;
        DataError after more than `patience` failures in a row. The image is the decoded uint8
        H×W×3 array (at least image_size on its shorter side); with output "encoded" a JPEG that
        needs no upscaling stays its bytes (the consumer decodes it) and only its header is read.
        Boxes are (y, x, flip): one random crop (training), the centre or ten crops (evaluation)."""
        s, side = self.spec, self.spec.image_size
        failures = 0
        for pos, url, key, label, data, ext in it:
            try:
                img, (h, w) = self._image(data, ext)
            except T.DecodeError as e:
                self._skip(url, key, "decode", str(e))
                failures += 1
                if patience is not None and failures > patience:
                    raise DataError(f"{failures} samples in a row failed to decode (last: {url} {key})")
                continue
            failures = 0
            if rng is not None:
                d = T.draw(rng.at(pos), h, w, side, s.flip, s.color_noise)
                yield pos, key, label, img, ((d.y, d.x, d.flip),), d.offset
            elif s.eval_crops == 10:
                yield pos, key, label, img, T.ten_boxes(h, w, side), None
            else:
                yield pos, key, label, img, ((*T.center_box(h, w, side), False),), None

    def _image(self, data: bytes, ext: str):
        """(decoded image or, in encoded output, JPEG bytes left for the consumer; its size after
        fit_min_side)."""
        side = self.spec.image_size
        if self.output == "encoded" and ext in T.JPEG_EXTS:
            h, w = T.jpeg_size(data)
            if T.fitted_size(h, w, side) == (h, w):
                return data, (h, w)
        img = T.fit_min_side(T.decode(data, ext), side)
        if self.output == "encoded" and not img.flags.writeable:
            img = img.copy()  # it travels as a tensor, which must own writable memory
        return img, img.shape[:2]

    def _resampled_raw(self, worker: int, workers: int, *salt: int):
        s = self.spec
        rng = np.random.default_rng([s.seed, self.epoch, s.replica, worker, workers, *(salt or (3,))])
        empty_visits = 0
        while True:
            k = int(rng.integers(len(s.urls)))
            got = False
            for x in self._raw([(k, 0, s.counts[k], 0)]):
                got = True
                yield x
            empty_visits = 0 if got else empty_visits + 1
            if empty_visits > 10 * len(s.urls) + 10:
                raise DataError(f"no readable sample in {empty_visits} shard visits")

    # ------------------------------------------------------------------ batches
    def _emit(self, samples: list) -> tuple:
        """(images, labels, keys, skips) of one batch. images: float32 normalised N×3×S×S
        (N×10×3×S×S with ten crops), Crops (output "uint8") or Encoded; a batch tensor is written
        into a slot of the loader's pool when one is free (a `slots.Slot` travels instead)."""
        s, side = self.spec, self.spec.image_size
        keys = [x[1] for x in samples]
        labels = torch.tensor([x[2] for x in samples], dtype=torch.int64)
        offsets = np.stack([x[5] for x in samples]) if s.train else None
        if self.output == "encoded":
            return self._done(Encoded([x[3] for x in samples], [x[4][0] for x in samples], offsets), labels, keys)
        n, crops = len(samples), len(samples[0][4])
        if self.output == "uint8":
            shape = (n, side, side, 3)
            images, rows = self._buffer(shape, torch.uint8)
            for i, x in enumerate(samples):
                y0, x0, flip = x[4][0]
                native.crop_into(x[3], y0, x0, side, flip, rows[i])
            return self._done(Crops(images, offsets), labels, keys)
        shape = (n, crops, 3, side, side) if crops > 1 else (n, 3, side, side)
        images, rows = self._buffer(shape, torch.float32)
        rows = rows.reshape(n * crops, 3, side, side)
        scale, bias = T.scale_bias(offsets, n)
        for i, x in enumerate(samples):
            for j, (y0, x0, flip) in enumerate(x[4]):
                native.crop_into(x[3], y0, x0, side, flip, rows[i * crops + j], scale, bias[i])
        return self._done(images, labels, keys)

    def _buffer(self, shape: tuple[int, ...], dtype: torch.dtype):
        """(what to send, numpy array to fill): a slot of the pool, else a new tensor (in shared
        memory in a DataLoader worker, which then sends it without a copy)."""
        info = get_worker_info()
        pool = self.pool
        if pool is not None and pool.dtype == dtype and int(np.prod(shape)) <= int(np.prod(pool.shape)):
            i = pool.claim(info.id if info is not None else 0)
            if i is not None:
                return Slot(i, shape), pool.array(i).reshape(-1)[: int(np.prod(shape))].reshape(shape)
        t = shared_empty(shape, dtype) if info is not None else torch.empty(shape, dtype=dtype)
        return t, t.numpy()

    def _done(self, images, labels, keys) -> tuple:
        skips = dict(self._skips)
        self._skips.clear()
        return images, labels, keys, skips

    def worker_batches(self, worker: int = 0, workers: int = 1, start: int = 0) -> Iterator[tuple]:
        """The batches of DataLoader worker `worker` of `workers` (the whole stream when 1):
        batches worker, worker + workers, … of the epoch, from the first one ≥ `start` on.
        Batches before `start` are fast-forwarded: their samples are read (the shuffle buffer
        needs them) but never decoded or augmented; what follows is bit for bit what a full
        pass yields, because no batch depends on the decoding of another (see _fill)."""
        self._skips: Counter = Counter()
        self._logged: set[str] = set()
        s = self.spec
        if not s.train:
            yield from self._eval_batches(worker, workers)
            return
        offset, nb = worker_slice(self.num_batches, s.batch, worker, workers)
        skip = len(range(worker, min(start, self.num_batches), workers))  # this worker's batches before start
        if nb - skip <= 0:
            return
        first, _ = self.replica_range()
        a, need = first + offset, nb * s.batch
        shuf = np.random.default_rng([s.seed, self.epoch, s.replica, worker, workers, 4])
        order = shard_order(len(s.urls), s.seed, self.epoch)
        if s.resampled:
            own = self._shuffled(self._resampled_raw(worker, workers), shuf)
        else:
            own = self._shuffled(self._raw(segments(order, s.counts, a, a + need)), shuf)
        deque(islice(own, skip * s.batch), maxlen=0)  # fast-forward
        aug = T.SampleRandom(s.seed, self.epoch)
        try:
            for j in range(skip, nb):
                spare = functools.partial(self._replacements, worker, workers, j, order, a + need)
                yield self._emit(self._fill(islice(own, s.batch), spare, aug, worker + j * workers, worker))
        finally:
            own.close()

    def _replacements(self, worker: int, workers: int, j: int, order: list[int], end: int):
        """Raw samples that stand in for the skipped ones of the worker's batch j: the positions
        after its slice (which ends at `end`) from j·B on, one pass over the data at most; in
        resampled mode, shards drawn by a generator of the batch's own."""
        s = self.spec
        if s.resampled:
            return self._resampled_raw(worker, workers, 5, j)
        return self._raw(segments(order, s.counts, end + j * s.batch, end + j * s.batch + s.total))

    def _fill(self, items, spare, aug: T.SampleRandom, index: int, worker: int) -> list:
        """One training batch: the decodable ones of `items` (its B samples of the shuffled slice),
        then, for the ones that were skipped, samples from `spare()`, the batch's own replacement
        run, in order. So a batch's content depends on its own samples only, never on what failed
        in the batches before it; augmentation draws are the sample's own (`aug`, keyed by position)."""
        s = self.spec
        patience = 10 * s.total + 10 if s.resampled else None
        batch = list(self._decoded(items, aug, patience))
        if len(batch) < s.batch:
            raw = spare()
            decoded = self._decoded(raw, aug, patience)
            try:
                for x in decoded:
                    batch.append(x)
                    if len(batch) == s.batch:
                        break
            finally:
                decoded.close()
                raw.close()
        if len(batch) < s.batch:
            raise DataError(
                f"replica {s.replica} worker {worker}: only {len(batch)} of batch {index}'s {s.batch} samples "
                f"readable in the whole data set; skipped so far: {dict(self._skips)}"
            )
        return batch

    def _eval_batches(self, worker: int, workers: int) -> Iterator[tuple]:
        # batch b is positions [b·B, (b+1)·B) of the replica's range, so the partial one is last
        s = self.spec
        start, end = self.replica_range()
        order = list(range(len(s.urls)))
        for b in range(worker, self.num_batches, workers):
            a = start + b * s.batch
            segs = segments(order, s.counts, a, min(a + s.batch, end))
            batch = list(self._decoded(self._raw(segs), None, s.batch + 1))
            if batch:
                yield self._emit(batch)
