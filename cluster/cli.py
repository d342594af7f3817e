"""The `alexnet-pp` command: the one parser for every entry point.

    alexnet-pp train  [--preset P] [--config Y] [--pp N --tp N --dp N | --workers N] [--setting VALUE ...]
    alexnet-pp info   …   the network's layers and the stage plan        alexnet-pp config …  the resolved YAML
    alexnet-pp data synth|ingest …                                        (dataset commands)
    alexnet-pp plan --workers 64 --batch 4096 [--device-profile FILE]    (layouts ranked by prediction)
    alexnet-pp bench lrn|data|engine|scaling|checkpoint|gpu …            (benchmarks: cluster/bench/)
    alexnet-pp export RUN_OR_CHECKPOINT model.safetensors | eval --checkpoint … | predict --checkpoint … IMAGE…
    python -m cluster.job ARGS   ≡   alexnet-pp train --distributed ARGS  (the `ray job submit` entrypoint)

A run is resolved once here: preset → YAML → settings (`--section.key VALUE`, `--name`, `--out_dir`)
→ `RunConfig`, then its `Layout` (alexnet_pp/layout.py), which every downstream piece receives.
This module sits in cluster/ because it reaches both floors: the single-process trainer
(alexnet_pp/) and the Ray job (cluster/driver.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from alexnet_pp.config import PRESETS, RunConfig, load_config, parse_override_args
from alexnet_pp.data.commands import register as register_data
from alexnet_pp.errors import ConfigError
from alexnet_pp.layout import Layout
from alexnet_pp.model import AlexNet, layer_parameter_counts
from alexnet_pp.pipeline import describe, partition
from alexnet_pp.shapes import layer_macs, layer_output_shapes
from alexnet_pp.trainer import train_single
from alexnet_pp.weights import CheckpointError
from cluster.driver import run_job
from cluster.inference import eval_config, evaluate, export, predict

RUN_COMMANDS = ("train", "info", "config", "eval")  # the commands that describe a run (and take --setting VALUE)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=tuple(PRESETS), default="demo", help="starting point (default: demo)")
    p.add_argument("--config", help="YAML file applied on top of the preset")
    p.add_argument("--pp", type=int, help="pipeline stages (= --parallel.pp)")
    p.add_argument("--tp", type=int, help="towers per stage, 1 or 2 (= --parallel.tp)")
    p.add_argument("--dp", type=int, help="data-parallel replicas (= --parallel.dp)")
    p.add_argument("--workers", type=int, help="total workers; must equal pp × tp × dp (dp is derived if unset)")


def resolve(args: argparse.Namespace, extra: Sequence[str], check_data: bool = True) -> tuple[RunConfig, Layout]:
    """The run's config and its checked layout, from parsed arguments and `--setting VALUE` pairs."""
    overrides: dict[str, str] = dict(parse_override_args(list(extra)))
    for axis in ("pp", "tp", "dp"):
        if getattr(args, axis, None) is not None:
            overrides[f"parallel.{axis}"] = str(getattr(args, axis))
    cfg = load_config(args.preset, args.config, overrides, check_data=check_data)
    workers = getattr(args, "workers", None)
    if workers is not None and "parallel.dp" not in overrides:
        cfg.parallel.dp = Layout.replicas_for(workers, cfg.parallel.pp, cfg.parallel.tp)
    return cfg, Layout.from_config(cfg, workers)


def cmd_train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    cfg, layout = resolve(args, extra)
    if args.distributed or layout.world_size > 1 or cfg.data.augment_actors:  # actors need Ray
        summary = run_job(cfg, layout, address=args.address, allow_insecure_cluster=args.allow_insecure_cluster)
        return 0 if summary.ok else 1
    print(train_single(cfg).format())
    return 0


def cmd_config(args: argparse.Namespace, extra: Sequence[str]) -> int:
    cfg, _ = resolve(args, extra)
    print(cfg.to_yaml(), end="")
    return 0


def cmd_info(args: argparse.Namespace, extra: Sequence[str]) -> int:
    cfg, layout = resolve(args, extra, check_data=False)  # the network only: no dataset needed
    model = AlexNet(cfg.model)
    params, macs, shapes = layer_parameter_counts(model), layer_macs(cfg.model), layer_output_shapes(cfg.model)
    print(f"{'layer':<7}{'output (both towers)':>24}{'parameters':>14}{'multiply-adds':>16}")
    for name in params:
        c, h, w = shapes[name]
        shape = f"{h}×{w}×{c}" if h > 1 else f"{c}"
        print(f"{name:<7}{shape:>24}{params[name]:>14,}{macs[name]:>16,}")
    print(f"{'total':<7}{'':>24}{sum(params.values()):>14,}{sum(macs.values()):>16,}")
    print(f"\npipeline units with parallel.tp={layout.tp}: {', '.join(layout.units)}"
          + ("; a cut may also split a tower half by output channels, e.g. conv3.0[:82] | conv3.0[82:]"
             if layout.tp == 1 else ""))
    if layout.pp > 1:  # the counted plan; a run measures its devices first (parallel.partition=measured)
        method = cfg.parallel.partition.strip()
        plan = partition(cfg.model, layout.pp, "flops", tp=layout.tp) if method == "measured" else layout.partition
        print(describe(cfg.model, plan, tp=layout.tp))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    done = export(args.source, args.out)
    print(f"exported step {done['step']} of {done['checkpoint']} ({done['classes']} class names) to {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace, extra: Sequence[str]) -> int:
    result = evaluate(args.checkpoint, eval_config(args, extra), device=args.device, workers=args.workers or 1)
    print(json.dumps(result) if args.json else
          f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  loss {result['val_loss']:.4f}  "
          f"({result['val_samples']} images)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    results = predict(args.checkpoint, args.images, top=args.top)
    if args.json:
        print(json.dumps(results, indent=1))
    for r in results:
        if "error" in r:
            print(f"alexnet-pp: {r['error']}", file=sys.stderr)
        elif not args.json:
            print(r["image"] + ": " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"]))
    return 1 if any("error" in r for r in results) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alexnet-pp",
        description="Pipeline-parallel training of the original two-tower AlexNet. "
        "Settings: --section.key VALUE (e.g. --train.lr 0.02 --model.width 0.5), --name / --out_dir VALUE.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (one process, or a Ray job when pp × tp × dp > 1)")
    _add_run_args(train)
    train.add_argument("--distributed", action="store_true", help="run through the Ray engine even for 1 worker")
    train.add_argument("--address", default=None,
                       help="Ray cluster to use (default: RAY_ADDRESS, as set by `ray job submit`, else a local Ray)")
    train.add_argument("--allow-insecure-cluster", action="store_true",
                       help="run on a Ray cluster that does not ask for a token (refused otherwise)")
    train.set_defaults(func=cmd_train)
    info = sub.add_parser("info", help="print the network's layers, shapes, parameters and multiply-adds")
    _add_run_args(info)
    info.set_defaults(func=cmd_info)
    config = sub.add_parser("config", help="print the resolved configuration as YAML")
    _add_run_args(config)
    config.set_defaults(func=cmd_config)
    export = sub.add_parser("export", help="a checkpoint (or a run's newest) as one safetensors file with its "
                            "config and class names: AlexNet.from_pretrained(FILE) loads it")
    export.add_argument("source", help="run directory, checkpoint root or checkpoint directory")
    export.add_argument("out", help="the .safetensors file to write")
    export.set_defaults(func=cmd_export)
    evaluate = sub.add_parser("eval", help="top-1 / top-5 of a checkpoint or exported model on the val split")
    _add_run_args(evaluate)
    evaluate.add_argument("--checkpoint", required=True, help="exported file, run or checkpoint directory")
    evaluate.add_argument("--device", default="cuda" if _cuda() else "cpu")
    evaluate.add_argument("--json", action="store_true", help="one JSON line")
    evaluate.set_defaults(func=cmd_eval)
    pred = sub.add_parser("predict", help="top classes and probabilities of image files")
    pred.add_argument("--checkpoint", required=True, help="exported file, run or checkpoint directory")
    pred.add_argument("images", nargs="+", help="JPEG or PNG files of any size")
    pred.add_argument("--top", type=int, default=5)
    pred.add_argument("--json", action="store_true", help="print JSON for machines")
    pred.set_defaults(func=cmd_predict)
    register_data(sub)
    # its own parser (alexnet_pp/planning/cli_plan.py) takes every argument after the word
    sub.add_parser("plan", add_help=False,
                   help="rank (P, T, D, M) layouts for a worker count by predicted images/s (plan --help)")
    sub.add_parser("bench", add_help=False,  # cluster/bench/cli.py parses what follows the word
                   help="benchmarks: lrn, data, engine, scaling, checkpoint, gpu (bench --help)")
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def parse(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace, list[str]]:
    parser = build_parser()
    args, extra = parser.parse_known_args(list(argv))
    if extra and args.command not in RUN_COMMANDS:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return parser, args, extra


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:
        from alexnet_pp.planning.cli_plan import main_plan

        return main_plan(argv[1:])
    if argv[:1] == ["bench"]:
        from cluster.bench.cli import main_bench

        return main_bench(argv[1:])
    _, args, extra = parse(argv)
    try:
        if args.command in RUN_COMMANDS:
            return args.func(args, extra)
        return args.func(args)
    except ConfigError as e:
        print(f"alexnet-pp: configuration error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"alexnet-pp: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
