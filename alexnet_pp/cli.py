"""The `alexnet-pp` command: train, show the network, manage datasets, print a resolved config."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from alexnet_pp.config import PRESETS, ConfigError, RunConfig, load_config, parse_override_args
from alexnet_pp.data.commands import register as register_data


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=PRESETS, default="demo", help="starting point (default: demo)")
    p.add_argument("--config", help="YAML file applied on top of the preset")
    p.add_argument("--pp", type=int, help="pipeline stages (= --parallel.pp)")
    p.add_argument("--tp", type=int, help="towers per stage, 1 or 2 (= --parallel.tp)")
    p.add_argument("--dp", type=int, help="data-parallel replicas (= --parallel.dp)")
    p.add_argument("--workers", type=int, help="total workers; must equal pp × tp × dp (dp is derived if unset)")


def resolve_config(args: argparse.Namespace, extra: Sequence[str], check_data: bool = True) -> RunConfig:
    overrides: dict[str, str] = dict(parse_override_args(list(extra)))
    for axis in ("pp", "tp", "dp"):
        if getattr(args, axis, None) is not None:
            overrides[f"parallel.{axis}"] = str(getattr(args, axis))
    workers = getattr(args, "workers", None)
    if workers is not None and "parallel.dp" not in overrides:
        probe = load_config(args.preset, args.config, {k: v for k, v in overrides.items() if k != "parallel.dp"},
                            check_data=check_data)
        per_replica = probe.parallel.pp * probe.parallel.tp
        if workers % per_replica:
            raise ConfigError(
                f"--workers {workers} is not a multiple of pp × tp = {per_replica}; "
                f"use a multiple of {per_replica} or change --pp/--tp"
            )
        overrides["parallel.dp"] = str(workers // per_replica)
    cfg = load_config(args.preset, args.config, overrides, check_data=check_data)
    if workers is not None and workers != cfg.world_size:
        raise ConfigError(f"--workers {workers} ≠ pp × tp × dp = {cfg.world_size}; change one of them")
    return cfg


def cmd_train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    cfg = resolve_config(args, extra)
    distributed = args.distributed or cfg.world_size > 1
    if distributed:
        from cluster.job import run_job

        result = run_job(cfg, address=args.address)
        return 0 if result.get("ok") else 1
    from alexnet_pp.trainer import train_single

    summary = train_single(cfg)
    last = summary.evals[-1] if summary.evals else {}
    print(
        f"done: {summary.steps} steps, {summary.images_per_sec:.1f} images/s, final loss "
        f"{summary.losses[-1]:.4f}, val top-1 {last.get('top1', float('nan')):.3f} "
        f"top-5 {last.get('top5', float('nan')):.3f}; outputs in {cfg.run_dir}"
    )
    return 0


def cmd_config(args: argparse.Namespace, extra: Sequence[str]) -> int:
    print(resolve_config(args, extra).to_yaml(), end="")
    return 0


def cmd_info(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from alexnet_pp.model import AlexNet, layer_macs, layer_output_shapes, layer_parameter_counts
    from alexnet_pp.pipeline import describe, partition, unit_names

    cfg = resolve_config(args, extra, check_data=False)  # the network only: no dataset needed
    model = AlexNet(cfg.model)
    params, macs, shapes = layer_parameter_counts(model), layer_macs(cfg.model), layer_output_shapes(cfg.model)
    print(f"{'layer':<7}{'output (both towers)':>24}{'parameters':>14}{'multiply-adds':>16}")
    for name in params:
        c, h, w = shapes[name]
        shape = f"{h}×{w}×{c}" if h > 1 else f"{c}"
        print(f"{name:<7}{shape:>24}{params[name]:>14,}{macs[name]:>16,}")
    print(f"{'total':<7}{'':>24}{sum(params.values()):>14,}{sum(macs.values()):>16,}")
    p = cfg.parallel
    print(f"\npipeline units with parallel.tp={p.tp}: {', '.join(unit_names(p.tp))}")
    if p.pp > 1:  # the counted plan; a run measures its devices first (parallel.partition=measured)
        method = "flops" if p.partition.strip() == "measured" else p.partition
        print(describe(cfg.model, partition(cfg.model, p.pp, method, tp=p.tp), tp=p.tp))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alexnet-pp",
        description="Pipeline-parallel training of the original two-tower AlexNet. "
        "Settings: --section.key VALUE (e.g. --train.lr 0.02 --model.width 0.5).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (one process, or a Ray job when pp × tp × dp > 1)")
    _add_config_args(train)
    train.add_argument("--distributed", action="store_true", help="run through the Ray engine even for 1 worker")
    train.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    train.set_defaults(func=cmd_train)
    info = sub.add_parser("info", help="print the network's layers, shapes, parameters and multiply-adds")
    _add_config_args(info)
    info.set_defaults(func=cmd_info)
    config = sub.add_parser("config", help="print the resolved configuration as YAML")
    _add_config_args(config)
    config.set_defaults(func=cmd_config)
    register_data(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if extra and args.command not in ("train", "info", "config"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command in ("train", "info", "config"):
            return args.func(args, extra)
        return args.func(args)
    except ConfigError as e:
        print(f"alexnet-pp: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
