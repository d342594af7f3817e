"""`alexnet-pp data synth OUT` and `alexnet-pp data ingest SRC OUT`: writing shard datasets.

`register(subparsers)` adds the `data` command group to the CLI's argparse subparsers; each
command's `func(args)` returns the exit status.
"""

from __future__ import annotations

import argparse
import sys

from .formats import FORMATS
from .shards import WriteReport


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024)."""
    t = text.strip().upper().rstrip("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def _summary(reports: dict[str, WriteReport | None], out) -> None:
    for split, r in reports.items():
        if r is None:
            print(f"{split}: complete already, nothing to do", file=out)
            continue
        kept = r.shards - r.written
        print(f"{split}: {r.total} samples in {r.shards} shards ({r.written} written, {kept} already complete)",
              file=out)


def cmd_synth(args: argparse.Namespace) -> int:
    from .dataset import write_synthetic

    reports = write_synthetic(
        args.out, args.classes, args.train_per_class, args.val_per_class, args.size, args.seed,
        quality=args.quality, max_count=args.shard_samples, max_bytes=args.shard_bytes, workers=args.workers,
        progress=not args.quiet, fmt=args.format,
    )
    _summary(reports, sys.stdout)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from .ingest import ingest

    try:
        report = ingest(
            args.src, args.out, size=args.size, quality=args.quality, max_count=args.shard_samples,
            max_bytes=args.shard_bytes, workers=args.workers, split=args.split,
            shuffle_seed=None if args.no_shuffle else args.shuffle_seed, progress=not args.quiet,
            fmt=args.format,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"alexnet-pp data ingest: {e}", file=sys.stderr)
        return 2
    print(f"{len(report.classes)} classes → {args.out}/classes.json")
    _summary(report.splits, sys.stdout)
    bad = [(split, src, why) for split, r in report.splits.items() for src, why in r.bad]
    if bad:
        print(f"skipped {len(bad)} unreadable image(s):")
        for split, src, why in bad:
            print(f"  {split}: {src}: {why}")
    return 0


def _common(p: argparse.ArgumentParser, samples: int) -> None:
    p.add_argument("--format", choices=FORMATS, default="jpeg",
                   help="how images are stored: jpeg ({key}.jpg, --quality) or raw ({key}.npy, uint8 pixels: "
                        "nothing to decode, 6-10x the bytes); python -m benchmarks.data_bench prints both's "
                        "cost (default jpeg)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--shard-samples", type=int, default=samples,
                   help=f"samples per shard at most (default {samples or 'by dataset size'})")
    p.add_argument("--shard-bytes", type=_size, default=1 << 30, help="bytes per shard at most, e.g. 500M (default 1G)")
    p.add_argument("--workers", type=int, default=0, help="encoding processes (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(subparsers) -> argparse.ArgumentParser:
    data = subparsers.add_parser("data", help="write datasets as WebDataset shards (synth, ingest)")
    sub = data.add_subparsers(dest="data_command", required=True)

    s = sub.add_parser("synth", help="write the embedded synthetic dataset (train and val) as shards")
    s.add_argument("out", help="output folder")
    s.add_argument("--classes", type=int, default=10, help="number of classes, up to 1000 (default 10)")
    s.add_argument("--train-per-class", type=int, default=1000, help="train images per class (default 1000)")
    s.add_argument("--val-per-class", type=int, default=100, help="val images per class (default 100)")
    s.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    s.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    _common(s, 0)
    s.set_defaults(func=cmd_synth)

    i = sub.add_parser("ingest", help="convert an image-folder tree (one folder per class) into shards")
    i.add_argument("src", help="folder with train/ and val/ class folders, or one split's class folders")
    i.add_argument("out", help="output folder")
    i.add_argument("--size", type=int, default=256, help="shorter side resized to this, then centre-cropped square (256)")
    i.add_argument("--split", default=None, help="treat SRC as this one split (default: SRC/train and SRC/val, "
                   "or SRC as 'train')")
    i.add_argument("--shuffle-seed", type=int, default=0, help="seed of the fixed sample order across shards")
    i.add_argument("--no-shuffle", action="store_true", help="keep sorted class/file order in the shards")
    _common(i, 1000)
    i.set_defaults(func=cmd_ingest)
    return data


def main(argv=None) -> int:
    """`python -m alexnet_pp.data.commands synth|ingest …` without the full CLI."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="alexnet-pp")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
