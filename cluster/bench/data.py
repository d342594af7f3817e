"""Training-stream throughput: the shard pipeline against torchvision ImageFolder + DataLoader,
and the project's tar reader against webdataset's.

    alexnet-pp bench data [--baseline] [--workers 2] [--images 2000] [--batch 64] [--readers-only] [--out DIR]

Both read the same JPEGs (the embedded dataset at 256 px, written as shards and, byte for byte,
as a class-folder tree) with the same transforms: random 224 crop, horizontal flip, PCA lighting
noise (std 0.1), normalisation; same batch size and worker count. The baseline needs torchvision,
which does not import beside the project's torch 2.13 CPU build: `--baseline` sets up a separate
venv for it (`--tv-venv`, default .venv-tv; once, then reused) and runs the benchmark there.
Without it the benchmark runs without the baseline (unless torchvision imports here) and says so.

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
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from alexnet_pp.config import preset
from alexnet_pp.data import build_train_loader
from alexnet_pp.data import transforms as T
from alexnet_pp.data.dataset import write_synthetic
from alexnet_pp.data.tarstream import iter_samples
from alexnet_pp.data.shards import read_classes, read_manifest
from cluster.bench.report import REPO_ROOT, Column, Report, Table

# torchvision does not import beside the project's torch 2.13 CPU build; this matching pair does
TV_PACKAGES = ("torch==2.14.1", "torchvision==0.29.1")
TV_EXTRAS = ("numpy", "pillow", "simplejpeg", "webdataset==1.0.2", "tqdm", "pyyaml")
IN_TV_VENV = "ALEXNET_PP_IN_TV_VENV"  # set for the benchmark re-run inside the baseline's venv


def ensure_tv_venv(venv: Path, run: Callable[..., int] = subprocess.call) -> Path:
    """The baseline's venv, set up once (idempotent: a stamp file marks it done): torch and
    torchvision that import together, the data path's packages, and this project importable there
    (`pip install -e`, else a .pth file pointing at the repository). Returns its python."""
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
    if run([str(py), "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO_ROOT)]):
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        Path(site, "alexnet_pp_repo.pth").write_text(str(REPO_ROOT) + "\n")
    if run([str(py), "-c", "import torch, torchvision, alexnet_pp.data"]):
        raise RuntimeError(f"{venv}: torch and torchvision do not import together after the setup")
    stamp.touch()
    return py


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


def main(argv: Optional[Sequence[str]] = None, run: Callable[..., int] = subprocess.call) -> int:
    p = argparse.ArgumentParser(prog="alexnet-pp bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", action="store_true",
                   help="set up the torchvision baseline's venv if needed and run the benchmark there")
    p.add_argument("--tv-venv", default=".venv-tv", help="where the baseline's venv lives (default .venv-tv)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for both pipelines (default 2)")
    p.add_argument("--images", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=256, help="stored image side (default 256)")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per pipeline; the best counts (default 3)")
    p.add_argument("--data", default="data/bench", help="where the benchmark images go (default data/bench)")
    p.add_argument("--out", default=os.path.join("runs", "bench", "data"),
                   help="folder for data.json, .csv and .md (default runs/bench/data)")
    p.add_argument("--no-baseline", action="store_true", help="skip the torchvision baseline")
    p.add_argument("--reader-passes", type=int, default=5, help="timed passes per tar reader (default 5)")
    p.add_argument("--readers-only", action="store_true", help="only the tar reader comparison")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.baseline and not os.environ.get(IN_TV_VENV):  # run again inside the baseline's venv
        py = ensure_tv_venv(Path(args.tv_venv).absolute(), run)
        env = dict(os.environ, **{IN_TV_VENV: "1"})
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if x)
        return run([str(py), "-m", "cluster.bench", "data", *argv], env=env)

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
    report = Report("data", args.out, argv, title="Training stream: shards vs torchvision ImageFolder; tar readers")
    report.add({"part": "readers", "samples": rd["samples"], "shards": rd["shards"],
                **{f"{k}_samples_per_s": v for k, v in rd["samples_per_s"].items()},
                "ratio": rd["ratio"], "passes": rd["passes_samples_per_s"]})
    if args.readers_only:
        return _write(report, result)

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
                             "alexnet-pp bench data --baseline sets up a venv where it is")
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
    report.add({"part": "decoders", **dec})
    report.add({"part": "pipelines", **{f"{k}_images_per_s": v for k, v in result["images_per_s"].items()},
                "ratio": result.get("ratio"), "epochs": result["epochs"], "baseline": result.get("baseline")})
    return _write(report, result)


def _write(report: Report, result: dict) -> int:
    report.settings = {k: v for k, v in result.items() if not isinstance(v, dict)}
    report.tables.append(Table("Throughput (median of passes for the readers, best epoch for the pipelines)",
                               report.rows, [
        Column("part", "part"),
        Column("ours", lambda r: r.get("tarstream_samples_per_s") or r.get("shards_images_per_s"), ".0f"),
        Column("baseline", lambda r: r.get("webdataset_samples_per_s") or r.get("torchvision_images_per_s"), ".0f"),
        Column("ratio", "ratio", ".2f"), Column("note", lambda r: r.get("baseline") or "")]))
    for path in report.write():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
