"""Training-stream throughput, side by side: the project's loader (its own tar reader), the same
augmentation behind webdataset's reader, torchvision ImageFolder + DataLoader, and, where CUDA is
there, the GPU paths; plus the tar readers alone and the decode cost of each stored format.

    alexnet-pp bench data [--baseline] [--workers 2] [--images 2000] [--batch 64] [--readers-only] [--raw]

All read the same JPEGs (the embedded dataset at 256 px, written as shards and, byte for byte,
as a class-folder tree) with the same transforms: random 224 crop, horizontal flip, PCA lighting
noise (std 0.1), normalisation to float32; same batch size and worker count. Pipelines:

- `alexnet_pp shards`: build_train_loader as training runs it (float batches from the workers);
- `alexnet_pp shards, uint8`: build_train_loader(uint8=True), finish_batch on the CPU in the
  consuming process (what a CPU consumer of the uint8 path pays);
- `webdataset reader`: webdataset.WebDataset (split by worker, 1000-sample shuffle buffer) with
  the project's decode and crop kernel, batched into shared memory;
- `torchvision ImageFolder`: the baseline (Pillow decode, torchvision transforms);
- `alexnet_pp shards, raw` (with --raw): the same images stored as pixels (data ingest --format raw);
- with CUDA: `gpu: uint8 to the device` (device="cuda", data.decode cpu) and `gpu: nvJPEG decode`
  (device="cuda", data.decode gpu), the card named.

The baseline needs torchvision, which does not import beside the project's torch 2.13 CPU build:
`--baseline` sets up a separate venv for it once (`--tv-venv`, default .venv-tv: torch 2.14.1 +
torchvision 0.29.1, about 5.5 GB), runs the benchmark there and writes the report here. Without it
the benchmark runs without the baseline (unless torchvision imports here) and says so.

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
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from alexnet_pp.config import preset
from alexnet_pp.data import build_train_loader
from alexnet_pp.host import reuse_freed_memory
from alexnet_pp.data import transforms as T
from alexnet_pp.data.dataset import write_synthetic
from alexnet_pp.data.tarstream import iter_samples
from alexnet_pp.data.shards import read_classes, read_manifest

# What the loader gained with the uint8/GPU paths, the crop kernel and stored formats is imported
# where it is used, so that `PYTHONPATH=<an older checkout> python benchmarks/data_bench.py --only
# shards,torchvision` measures that checkout's loader the same way (before/after comparisons).


REPO = Path(__file__).resolve().parents[1]
# torchvision does not import beside the project's torch 2.13 CPU build; this matching pair does
TV_PACKAGES = ("torch==2.14.1", "torchvision==0.29.1")
TV_EXTRAS = ("numpy", "pillow", "simplejpeg", "webdataset==1.0.2", "pyyaml")
IN_TV_VENV = "ALEXNET_PP_IN_TV_VENV"  # set for the benchmark's re-run inside the baseline's venv


def ensure_tv_venv(venv: Path, run: Callable[..., int] = subprocess.call) -> Path:
    """The baseline's venv, set up once (a stamp file marks it done and is checked by importing):
    torch and torchvision that import together, the data path's packages, and this checkout on its
    path (a .pth file). Returns its python."""
    py = venv / "bin" / "python"
    stamp = venv / ".tv-installed"
    if stamp.exists() and run([str(py), "-c", "import torchvision, simplejpeg, alexnet_pp.data"]) == 0:
        return py
    print(f"setting up the torchvision baseline's venv in {venv} (once)", flush=True)
    steps = [] if py.exists() else [[sys.executable, "-m", "venv", str(venv)]]
    steps += [[str(py), "-m", "pip", "install", "-q", *TV_PACKAGES], [str(py), "-m", "pip", "install", "-q", *TV_EXTRAS]]
    for cmd in steps:
        if run(cmd):
            raise RuntimeError(f"setting up {venv} failed: {' '.join(cmd)}")
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "alexnet_pp_repo.pth").write_text(f"{REPO}\n")
    if run([str(py), "-c", "import torch, torchvision, alexnet_pp.data"]):
        raise RuntimeError(f"{venv}: torch and torchvision do not import together after the setup")
    stamp.touch()
    return py


def run_in_tv_venv(argv: list[str], venv: Path, run: Callable[..., int] = subprocess.call) -> dict:
    """This benchmark again inside the baseline's venv; its results come back here to be written."""
    py = ensure_tv_venv(venv, run)
    with tempfile.TemporaryDirectory(prefix="alexnet-pp-data-bench-") as tmp:
        result_file = Path(tmp) / "result.json"
        env = dict(os.environ, **{IN_TV_VENV: "1"})
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
        if run([str(py), "-m", "benchmarks.data_bench", "--result-json", str(result_file), *argv], env=env, cwd=REPO):
            raise RuntimeError(f"the data benchmark failed inside {venv}")
        return json.loads(result_file.read_text())


def make_data(root: Path, images: int, size: int, classes: int, raw: bool = False) -> tuple[Path, Path, Path]:
    shards = root / "shards"
    write_synthetic(shards, classes, -(-images // classes), 1, size, seed=0, progress=sys.stderr.isatty())
    raw_shards = root / "shards-raw"
    if raw:  # the same images as pixels, as `data synth --format raw` writes them
        write_synthetic(raw_shards, classes, -(-images // classes), 1, size, seed=0, progress=sys.stderr.isatty(),
                        fmt="raw")
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
    return shards, folder, raw_shards


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (DataLoader workers are
    joined when an epoch ends): the work an epoch cost, whatever else the machine was running."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_epoch(loader, consume=None) -> list[tuple[int, float, float]]:
    """[(images, seconds, CPU seconds)] of one epoch, worker start-up included (as a training
    epoch pays it); `consume(batch)` is the consumer's share of the work, if any."""
    n, c0, t0 = 0, _cpu_seconds(), time.perf_counter()
    it = iter(loader)
    for batch in it:
        if consume is not None:
            consume(batch)
        n += len(batch[-1])
    dt = time.perf_counter() - t0
    del it  # the workers end (and count as children) before the CPU time is read
    return [(n, dt, _cpu_seconds() - c0)]


def shard_cfg(shards: Path, workers: int, batch: int, crop: int, size: int, decode: str = "cpu"):
    cfg = preset("paper")
    cfg.model.image_size, cfg.model.num_classes = crop, len(read_classes(shards))
    d = cfg.data
    d.train = d.val = str(shards)
    d.stored_size, d.workers, d.color_noise, d.flip, d.shuffle_buffer = size, workers, 0.1, True, 1000
    d.decode = decode
    cfg.train.batch_size = batch
    return cfg


def bench_shards(shards: Path, workers: int, batch: int, crop: int, size: int, epoch: int):
    return time_epoch(build_train_loader(shard_cfg(shards, workers, batch, crop, size), epoch=epoch))


def bench_shards_uint8(shards: Path, workers: int, batch: int, crop: int, size: int, epoch: int):
    """uint8 crops from the workers, normalised in this process (finish_batch on the CPU)."""
    from alexnet_pp.data import finish_batch

    loader = build_train_loader(shard_cfg(shards, workers, batch, crop, size), epoch=epoch, uint8=True)
    return time_epoch(loader, lambda b: finish_batch(b[0], b[1], "cpu"))


def bench_gpu(shards: Path, workers: int, batch: int, crop: int, size: int, epoch: int, decode: str):
    """Float batches made on the GPU: uint8 crops finished there (decode cpu) or JPEGs decoded there."""
    loader = build_train_loader(shard_cfg(shards, workers, batch, crop, size, decode), epoch=epoch, device="cuda")
    assert loader.decode == decode, (loader.decode, decode)
    (n, dt, cpu), = time_epoch(loader)
    t0 = time.perf_counter()
    torch.cuda.synchronize()
    return [(n, dt + time.perf_counter() - t0, cpu)]


class _WdsAugment:
    """webdataset sample → (decoded image, draw, label) with the loader's decode and draws (a
    generator per worker: webdataset has no sample positions)."""

    def __init__(self, crop: int, seed: int):
        self.crop, self.seed, self.rng = crop, seed, None

    def __call__(self, sample):
        if self.rng is None:
            info = torch.utils.data.get_worker_info()
            self.rng = np.random.default_rng([self.seed, info.id if info else 0])
        img = T.fit_min_side(T.decode(sample["jpg"]), self.crop)
        d = T.draw(self.rng, img.shape[0], img.shape[1], self.crop, True, 0.1)
        return img, d, int(sample["cls"])


def _wds_collate(crop: int):
    from alexnet_pp.data import native
    from alexnet_pp.data.slots import shared_empty

    def collate(samples):
        n = len(samples)
        out = shared_empty((n, 3, crop, crop), torch.float32)
        rows = out.numpy()
        scale, bias = T.scale_bias(np.stack([d.offset for _, d, _ in samples]), n)
        for i, (img, d, _) in enumerate(samples):
            native.crop_into(img, d.y, d.x, crop, d.flip, rows[i], scale, bias[i])
        return out, torch.tensor([lab for _, _, lab in samples])

    return collate


def bench_webdataset(shards: Path, workers: int, batch: int, crop: int, epoch: int):
    """The same decode and augmentation behind webdataset's reader, shuffling and batching."""
    import webdataset as wds

    urls = [str(shards / e["name"]) for e in read_manifest(shards, "train")["shards"]]
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=epoch, nodesplitter=None,
                         workersplitter=wds.split_by_worker, empty_check=False)
          .shuffle(1000).map(_WdsAugment(crop, epoch)).batched(batch, collation_fn=_wds_collate(crop)))
    return time_epoch(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))


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


def _first_images(shards: Path, n: int) -> list[bytes]:
    blobs = []
    for e in read_manifest(shards, "train")["shards"]:
        blobs += [m["jpg"] for _, _, m in iter_samples(str(shards / e["name"]))]
        if len(blobs) >= n:
            break
    return blobs[:n]


def bench_formats(shards: Path, n: int = 200) -> dict[str, dict[str, float]]:
    """Bytes and decode time per image of each stored format (data ingest --format/--quality),
    from the same pixels; the best of 3 passes."""
    from alexnet_pp.data.formats import encode_image

    pixels = [T.decode(b) for b in _first_images(shards, n)]  # the stored images, as ingest would see them
    out = {}
    for name, fmt, quality in (("jpeg q90", "jpeg", 90), ("jpeg q75", "jpeg", 75), ("jpeg q50", "jpeg", 50),
                               ("raw", "raw", 0)):
        members = [encode_image(p, fmt, quality) for p in pixels]
        best = min(_timed(lambda: [T.decode(data, ext) for data, ext in members]) for _ in range(3))
        out[name] = {"bytes": round(sum(len(d) for d, _ in members) / len(members)),
                     "decode_us": round(best / len(members) * 1e6, 1)}
    return out


def bench_decoders(shards: Path, n: int = 200) -> dict[str, float]:
    from PIL import Image

    blobs = _first_images(shards, n)
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


def main(argv=None, run: Callable[..., int] = subprocess.call) -> dict:
    """The results (settings and `rows`: pipelines, tar readers, stored formats); `alexnet-pp bench
    data` writes them as data.json, .csv and .md."""
    p = argparse.ArgumentParser(prog="alexnet-pp bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", action="store_true",
                   help="set up the torchvision baseline's venv if needed (once, ~5.5 GB) and run the benchmark there")
    p.add_argument("--tv-venv", default=str(REPO / ".venv-tv"), help="the baseline's venv (default .venv-tv)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for both pipelines (default 2)")
    p.add_argument("--images", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=256, help="stored image side (default 256)")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per pipeline; the best counts (default 3)")
    p.add_argument("--data", default="data/bench", help="where the benchmark images go (default data/bench)")
    p.add_argument("--no-baseline", action="store_true", help="skip the torchvision baseline")
    p.add_argument("--reader-passes", type=int, default=5, help="timed passes per tar reader (default 5)")
    p.add_argument("--readers-only", action="store_true", help="only the tar reader comparison")
    p.add_argument("--raw", action="store_true", help="also time the loader on the images stored raw "
                   "(writes a second shard set, ~200 KB per image)")
    p.add_argument("--only", default="", help="comma-separated pipelines to time (default all): "
                   "shards,uint8,webdataset,torchvision,raw,gpu_uint8,gpu_decode")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.baseline and not os.environ.get(IN_TV_VENV):
        return run_in_tv_venv([a for a in argv if a != "--baseline"], Path(args.tv_venv).absolute(), run)

    torch.set_num_threads(1)  # the main process only receives batches; workers do the work
    reuse_freed_memory()  # as every trainer does (alexnet_pp/host.py); workers of both sides inherit it
    shards, folder, raw_shards = make_data(Path(args.data), args.images, args.size, args.classes, args.raw)
    cores = len(os.sched_getaffinity(0))
    print(f"data: {args.images} JPEGs of {args.size}px ({shards}, {folder}); crop {args.crop}, batch {args.batch}, "
          f"{args.workers} workers, {cores} cores, torch {torch.__version__}")
    result = {"machine": platform.node(), "cores": cores, "torch": torch.__version__, "workers": args.workers,
              "images": args.images, "batch": args.batch, "size": args.size, "crop": args.crop}
    try:
        from alexnet_pp.data import native

        result["crop_kernel"] = native.available()
    except ImportError:  # an older checkout
        result["crop_kernel"] = None
    try:
        result["load_average"] = list(os.getloadavg())
    except OSError:
        pass

    result["readers"] = rd = bench_readers(shards, args.reader_passes)
    print(f"{'tar reader (no decoding)':<34}{'samples/s':>10}   {rd['samples']} samples in {rd['shards']} shards, "
          f"median of {rd['passes']} passes")
    for name, label in (("tarstream", "alexnet_pp tarstream"), ("webdataset", "webdataset.WebDataset")):
        print(f"{label:<34}{rd['samples_per_s'][name]:>10.0f}   passes: {rd['passes_samples_per_s'][name]}")
    print(f"ratio tarstream / webdataset: {rd['ratio']:.2f}×")
    result["rows"] = [{"kind": "tar reader (no decoding)", "name": n, "samples_per_s": round(v, 1)}
                      for n, v in rd["samples_per_s"].items()]
    if args.readers_only:
        return result

    result["decoders"] = dec = bench_decoders(shards)
    print(f"decode 256px JPEG: simplejpeg {dec['simplejpeg_us']} µs, pillow {dec['pillow_us']} µs "
          f"(identical: {dec['pillow_identical']}), simplejpeg fast options {dec['simplejpeg_fast_us']} µs "
          f"(max pixel difference {dec['fast_max_abs_diff']})")
    try:
        result["formats"] = fm = bench_formats(shards)
    except ImportError:  # an older checkout
        fm = {}
    if fm:
        print(f"{'stored format (data ingest --format)':<38}{'bytes/image':>12}{'decode µs/image':>17}")
    for name, r in fm.items():
        print(f"{name:<38}{r['bytes']:>12}{r['decode_us']:>17}")

    procs = max(args.workers, 1)
    baseline_note = None
    if args.no_baseline:
        baseline_note = "skipped (--no-baseline)"
    else:
        try:
            import torchvision  # noqa: F401
        except Exception as e:  # the main venv: torchvision does not import beside torch 2.13 CPU
            baseline_note = (f"skipped: torchvision not importable here ({type(e).__name__}); "
                             "alexnet-pp bench data --baseline sets up a venv where it is")
    a = (args.workers, args.batch, args.crop)
    pipelines = {
        "shards": ("alexnet_pp shards", lambda e: bench_shards(shards, *a, args.size, e)),
        "uint8": ("alexnet_pp shards, uint8", lambda e: bench_shards_uint8(shards, *a, args.size, e)),
        "webdataset": ("webdataset reader", lambda e: bench_webdataset(shards, *a, e)),
    }
    if baseline_note is None:
        pipelines["torchvision"] = ("torchvision ImageFolder", lambda e: bench_torchvision(folder, *a, e))
    if args.raw:
        pipelines["raw"] = ("alexnet_pp shards, raw", lambda e: bench_shards(raw_shards, *a, args.size, e))
    gpu_note = None
    if torch.cuda.is_available():
        from alexnet_pp.data import gpu_decode

        card = torch.cuda.get_device_name()
        result["gpu"] = card
        pipelines["gpu_uint8"] = ("gpu: uint8 to the device", lambda e: bench_gpu(shards, *a, args.size, e, "cpu"))
        ok, why = gpu_decode.available("cuda")
        if ok:
            pipelines["gpu_decode"] = ("gpu: nvJPEG decode", lambda e: bench_gpu(shards, *a, args.size, e, "gpu"))
        else:
            gpu_note = f"gpu decode skipped: {why}"
    else:
        gpu_note = "gpu paths skipped: CUDA is not available"
    if args.only:
        keep = set(args.only.split(","))
        pipelines = {k: v for k, v in pipelines.items() if k in keep}
    # epochs alternate between the pipelines so that load from elsewhere hits all alike; best epoch counts
    runs: dict[str, list[tuple[int, float, float]]] = {k: [] for k in pipelines}
    for e in range(args.epochs):
        for name, (_, f) in pipelines.items():
            runs[name] += f(e)
    rows = {k: max(n / s for n, s, _ in v) for k, v in runs.items()}
    cpu_us = {k: min(c / n for n, _, c in v) * 1e6 for k, v in runs.items()}  # all processes, per image
    result["epochs"] = {k: [round(n / s, 1) for n, s, _ in v] for k, v in runs.items()}
    result["epochs_cpu_us_per_image"] = {k: [round(c / n * 1e6, 1) for n, _, c in v] for k, v in runs.items()}

    base = rows.get("torchvision")
    print(f"{'pipeline (' + str(args.workers) + ' workers)':<34}{'images/s':>10}{'per worker':>12}"
          f"{'× ImageFolder' if base else '':>15}{'CPU µs/image':>14}{'× ImageFolder' if base else '':>15}")
    for name, ips in rows.items():
        label = pipelines[name][0] + (f" ({result['gpu']})" if name.startswith("gpu") else "")
        ratio = f"{ips / base:>14.2f}×" if base else ""
        cpu_ratio = f"{cpu_us['torchvision'] / cpu_us[name]:>14.2f}×" if base else ""
        print(f"{label:<34}{ips:>10.0f}{ips / procs:>12.0f}{ratio}{cpu_us[name]:>14.0f}{cpu_ratio}")
    print("(images/s: best epoch, wall clock; CPU µs/image: least over the epochs, workers and consumer "
          "together, which other jobs on the machine do not inflate)")
    result["images_per_s"] = {k: round(v, 1) for k, v in rows.items()}
    result["images_per_s_per_worker"] = {k: round(v / procs, 1) for k, v in rows.items()}
    result["cpu_us_per_image"] = {k: round(v, 1) for k, v in cpu_us.items()}
    if base and "shards" in rows:
        ratio = rows["shards"] / base
        result["ratio"] = round(ratio, 2)
        result["ratios"] = {k: round(v / base, 2) for k, v in rows.items()}
        result["cpu_ratios"] = {k: round(cpu_us["torchvision"] / v, 2) for k, v in cpu_us.items()}
        print(f"ratio shards / torchvision: {ratio:.2f}× (goal ≥ 2×, and ≥ 1200 images/s per worker); "
              f"by CPU time {result['cpu_ratios']['shards']:.2f}×")
    elif baseline_note:
        result["baseline"] = baseline_note
        print(f"baseline {baseline_note}")
    if gpu_note:
        result["gpu_note"] = gpu_note
        print(gpu_note)
    result["rows"] += [{"kind": "stored format (data ingest --format)", "name": n, "bytes_per_image": r["bytes"],
                        "decode_us_per_image": r["decode_us"]} for n, r in fm.items()]
    result["rows"] += [{"kind": f"pipeline ({args.workers} workers)", "name": pipelines[n][0], "images_per_s": round(v, 1),
                        "images_per_s_per_worker": round(v / procs, 1), "cpu_us_per_image": round(cpu_us[n], 1),
                        "x_imagefolder": round(v / base, 2) if base else None,
                        "x_imagefolder_by_cpu_time": round(cpu_us["torchvision"] / cpu_us[n], 2) if base else None}
                       for n, v in rows.items()]
    return result


if __name__ == "__main__":
    _ap = argparse.ArgumentParser(add_help=False)
    _ap.add_argument("--result-json", help=argparse.SUPPRESS)  # the re-run inside the baseline's venv
    _known, _rest = _ap.parse_known_args()
    if _known.result_json:
        Path(_known.result_json).write_text(json.dumps(main(_rest), default=str))
        sys.exit(0)
    from cluster.bench.cli import main_bench

    sys.exit(main_bench(["data", *_rest]))
