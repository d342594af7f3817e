"""Training-stream throughput: the shard pipeline against torchvision ImageFolder + DataLoader,
and the project's tar reader against webdataset's.

    python -m benchmarks.data_bench [--workers 2] [--images 2000] [--batch 64] [--readers-only]

Both read the same JPEGs (the embedded dataset at 256 px, written as shards and, byte for byte,
as a class-folder tree) with the same transforms: random 224 crop, horizontal flip, PCA lighting
noise (std 0.1), normalisation; same batch size and worker count. The baseline needs torchvision,
which does not import beside the project's torch 2.13 CPU build: create the separate venv with
`benchmarks/setup_tv_venv.sh` and run this module with `.venv-tv/bin/python`. In the main venv the
benchmark runs without the baseline and says so.

Readers: every training sample's members read from the same shards (no decoding) by the
project's reader (tarstream.iter_samples, what the loader runs) and by `webdataset.WebDataset`'s
iterator (gopen, tarfile stream, grouping by key), passes alternating, in one process; samples/s
of each (median over the passes) and the ratio. The loader keeps its own reader only while this
shows it faster. Results are printed and saved as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from alexnet_pp.config import preset
from alexnet_pp.data import build_train_loader
from alexnet_pp.data import transforms as T
from alexnet_pp.data.dataset import write_synthetic
from alexnet_pp.data.tarstream import iter_samples
from alexnet_pp.data.shards import read_classes, read_manifest


def make_data(root: Path, images: int, size: int, classes: int) -> tuple[Path, Path]:
    shards = root / "shards"
    write_synthetic(shards, classes, -(-images // classes), 1, size, seed=0, progress=sys.stderr.isatty())
    folder = root / "folder"
    stamp = folder / ".complete"
    if not stamp.exists() or stamp.read_text() != json.dumps(read_manifest(shards, "train")["params"]):
        names = read_classes(shards)
        for e in read_manifest(shards, "train")["shards"]:
            for _, key, m in iter_samples(str(shards / e["name"])):
                d = folder / names[int(m["cls"])]
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{key}.jpg").write_bytes(m["jpg"])  # the very same JPEG bytes
        stamp.write_text(json.dumps(read_manifest(shards, "train")["params"]))
    return shards, folder


def time_epoch(loader) -> list[tuple[int, float]]:
    """[(images, seconds)] of one epoch, worker start-up included (as a training epoch pays it)."""
    n, t0 = 0, time.perf_counter()
    for batch in loader:
        n += len(batch[1])
    return [(n, time.perf_counter() - t0)]


def bench_shards(shards: Path, workers: int, batch: int, crop: int, size: int, epoch: int):
    cfg = preset("paper")
    cfg.model.image_size, cfg.model.num_classes = crop, len(read_classes(shards))
    d = cfg.data
    d.train = d.val = str(shards)
    d.stored_size, d.workers, d.color_noise, d.flip, d.shuffle_buffer = size, workers, 0.1, True, 1000
    cfg.train.batch_size = batch
    return time_epoch(build_train_loader(cfg, epoch=epoch))


class Lighting:
    """The same PCA lighting noise as alexnet_pp.data.transforms, on a C×H×W tensor in [0, 1]."""

    def __init__(self, std: float):
        self.std = std
        self.eigval = torch.from_numpy(T.EIGVAL)
        self.eigvec = torch.from_numpy(T.EIGVEC)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        alpha = torch.normal(0.0, self.std, size=(3,))
        return img + (self.eigvec @ (alpha * self.eigval)).view(3, 1, 1)


def bench_torchvision(folder: Path, workers: int, batch: int, crop: int, epoch: int):
    import torchvision
    from torchvision import transforms as tv

    tf = tv.Compose([tv.RandomCrop(crop), tv.RandomHorizontalFlip(), tv.ToTensor(), Lighting(0.1),
                     tv.Normalize(T.MEAN.tolist(), T.STD.tolist())])
    ds = torchvision.datasets.ImageFolder(str(folder), transform=tf)

    torch.manual_seed(epoch)
    return time_epoch(torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers))


def bench_decoders(shards: Path, n: int = 200) -> dict[str, float]:
    from PIL import Image

    blobs = []
    for e in read_manifest(shards, "train")["shards"]:
        blobs += [m["jpg"] for _, _, m in iter_samples(str(shards / e["name"]))]
        if len(blobs) >= n:
            break
    blobs = blobs[:n]
    import simplejpeg

    cands = {
        "pillow": lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")),
        "simplejpeg": lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB"),
        "simplejpeg_fast": lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB", fastdct=True, fastupsample=True),
    }
    out = {}
    for name, f in cands.items():
        best = min(_timed(lambda: [f(b) for b in blobs]) for _ in range(3))
        out[f"{name}_us"] = round(best / len(blobs) * 1e6, 1)
    ref = [cands["simplejpeg"](b) for b in blobs[:20]]
    out["pillow_identical"] = all(np.array_equal(cands["pillow"](b), r) for b, r in zip(blobs, ref))
    out["fast_max_abs_diff"] = int(max(np.abs(cands["simplejpeg_fast"](b).astype(int) - r).max()
                                       for b, r in zip(blobs, ref)))
    return out


def bench_readers(shards: Path, passes: int = 5) -> dict:
    """Samples/s reading all train shards' samples (members as bytes, nothing decoded)."""
    import webdataset as wds

    urls = [str(shards / e["name"]) for e in read_manifest(shards, "train")["shards"]]

    def own() -> list[str]:
        return [key for u in urls for _, key, _ in iter_samples(u)]

    def library() -> list[str]:
        ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        return [s["__key__"] for s in ds]

    readers = {"tarstream": own, "webdataset": library}
    keys = {name: f() for name, f in readers.items()}  # warm-up: files in the page cache
    if keys["tarstream"] != keys["webdataset"]:
        raise RuntimeError("the two readers disagree on the samples")
    rates: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(passes):
        for name, f in readers.items():
            t = _timed(f)
            rates[name].append(len(keys[name]) / t)
    med = {name: float(np.median(v)) for name, v in rates.items()}
    return {"samples": len(keys["tarstream"]), "shards": len(urls), "passes": passes,
            "samples_per_s": {k: round(v, 1) for k, v in med.items()},
            "passes_samples_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
            "ratio": round(med["tarstream"] / med["webdataset"], 2)}


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for both pipelines (default 2)")
    p.add_argument("--images", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=256, help="stored image side (default 256)")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per pipeline; the best counts (default 3)")
    p.add_argument("--data", default="data/bench", help="where the benchmark images go (default data/bench)")
    p.add_argument("--out", default="runs/bench/data_bench.json", help="results file")
    p.add_argument("--no-baseline", action="store_true", help="skip the torchvision baseline")
    p.add_argument("--reader-passes", type=int, default=5, help="timed passes per tar reader (default 5)")
    p.add_argument("--readers-only", action="store_true", help="only the tar reader comparison")
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # the main process only receives batches; workers do the work
    shards, folder = make_data(Path(args.data), args.images, args.size, args.classes)
    cores = len(os.sched_getaffinity(0))
    print(f"data: {args.images} JPEGs of {args.size}px ({shards}, {folder}); crop {args.crop}, batch {args.batch}, "
          f"{args.workers} workers, {cores} cores, torch {torch.__version__}")
    result = {"machine": platform.node(), "cores": cores, "torch": torch.__version__, "workers": args.workers,
              "images": args.images, "batch": args.batch, "size": args.size, "crop": args.crop}

    result["readers"] = rd = bench_readers(shards, args.reader_passes)
    print(f"{'tar reader (no decoding)':<28}{'samples/s':>10}   {rd['samples']} samples in {rd['shards']} shards, "
          f"median of {rd['passes']} passes")
    for name, label in (("tarstream", "alexnet_pp tarstream"), ("webdataset", "webdataset.WebDataset")):
        print(f"{label:<28}{rd['samples_per_s'][name]:>10.0f}   passes: {rd['passes_samples_per_s'][name]}")
    print(f"ratio tarstream / webdataset: {rd['ratio']:.2f}×")
    out = Path(args.out)
    if args.readers_only:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"saved {out}")
        return 0

    result["decoders"] = dec = bench_decoders(shards)
    print(f"decode 256px JPEG: simplejpeg {dec['simplejpeg_us']} µs, pillow {dec['pillow_us']} µs "
          f"(identical: {dec['pillow_identical']}), simplejpeg fast options {dec['simplejpeg_fast_us']} µs "
          f"(max pixel difference {dec['fast_max_abs_diff']})")

    procs = max(args.workers, 1)
    baseline_note = None
    if args.no_baseline:
        baseline_note = "skipped (--no-baseline)"
    else:
        try:
            import torchvision  # noqa: F401
        except Exception as e:  # the main venv: torchvision does not import beside torch 2.13 CPU
            baseline_note = (f"skipped: torchvision not importable here ({type(e).__name__}); "
                             "run benchmarks/setup_tv_venv.sh and use .venv-tv/bin/python")
    # epochs alternate between the pipelines so that load from elsewhere hits both alike; best epoch counts
    runs: dict[str, list[tuple[int, float]]] = {"shards": []}
    if baseline_note is None:
        runs["torchvision"] = []
    for e in range(args.epochs):
        runs["shards"] += bench_shards(shards, args.workers, args.batch, args.crop, args.size, e)
        if baseline_note is None:
            runs["torchvision"] += bench_torchvision(folder, args.workers, args.batch, args.crop, e)
    rows = {k: max(n / s for n, s in v) for k, v in runs.items()}
    result["epochs"] = {k: [round(n / s, 1) for n, s in v] for k, v in runs.items()}

    print(f"{'pipeline':<28}{'images/s':>10}{'per worker':>12}")
    for name, ips in rows.items():
        label = "shards (alexnet_pp.data)" if name == "shards" else "torchvision ImageFolder"
        print(f"{label:<28}{ips:>10.0f}{ips / procs:>12.0f}")
    result["images_per_s"] = {k: round(v, 1) for k, v in rows.items()}
    result["images_per_s_per_worker"] = {k: round(v / procs, 1) for k, v in rows.items()}
    if "torchvision" in rows:
        ratio = rows["shards"] / rows["torchvision"]
        result["ratio"] = round(ratio, 2)
        print(f"ratio shards / torchvision: {ratio:.2f}× (goal ≥ 1.5×)")
    else:
        result["baseline"] = baseline_note
        print(f"baseline {baseline_note}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
