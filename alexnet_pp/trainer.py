"""The single-process trainer: the reference every distributed layout must reproduce."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Optional, TextIO

import torch

from alexnet_pp.config import RunConfig
from alexnet_pp.dropout import batch_keys
from alexnet_pp.host import configure_host
from alexnet_pp.model import AlexNet
from alexnet_pp.optim import LRSchedule, build_optimizer
from alexnet_pp.progress import Progress
from alexnet_pp.steps import evaluate, train_step
from alexnet_pp.summary import RunSummary
from alexnet_pp.weights import export_file

log = logging.getLogger(__name__)


def setup_process(cfg: RunConfig) -> None:
    """Threads, allocator and seeds: everything that makes a run repeatable and fast."""
    configure_host(cfg.train.threads, cfg.train.keep_freed_memory)
    torch.manual_seed(cfg.train.seed)  # the weights and dropout masks have their own seeds; this is for the rest


def total_steps(cfg: RunConfig, steps_per_epoch: int) -> int:
    steps = max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps > 0 else steps


def eval_interval(cfg: RunConfig, steps_per_epoch: int) -> int:
    return max(1, round(cfg.train.eval_every * steps_per_epoch))


def train_single(cfg: RunConfig, stream: Optional[TextIO] = None, save: bool = True) -> RunSummary:
    """Train on one process with the config's data, recipe and schedule; evaluate on the held-out split."""
    from alexnet_pp.data import build_eval_loader, build_train_loader, ensure_dataset

    setup_process(cfg)
    info = ensure_dataset(cfg)
    model = AlexNet(cfg.model, seed=cfg.train.seed)
    optimizer = build_optimizer(model.parameters(), cfg.train)
    steps_per_epoch = len(build_train_loader(cfg, epoch=0))
    total = total_steps(cfg, steps_per_epoch)
    every = eval_interval(cfg, steps_per_epoch)
    schedule = LRSchedule(optimizer, cfg.train, steps_per_epoch, total)
    progress = Progress(total, cfg.train.log_every, stream, desc=cfg.name)
    progress.message(
        f"{cfg.name}: {sum(p.numel() for p in model.parameters()):,} parameters, {info.train_samples} train / "
        f"{info.val_samples} val samples, {steps_per_epoch} steps/epoch, {total} steps"
    )
    summary = RunSummary(run_dir=str(cfg.run_dir))
    t0 = time.perf_counter()
    step, epoch, images_seen = 0, 0, 0
    while step < total:
        for images, labels in build_train_loader(cfg, epoch=epoch):
            keys = batch_keys(cfg.train.seed, step, 0, labels.shape[0])  # the masks every layout draws
            loss = train_step(model, images, labels, optimizer, cfg.train.grad_clip, keys)
            step += 1
            schedule.after_step(step)
            summary.losses.append(loss)
            summary.loss_steps.append(step)
            images_seen += labels.numel()
            progress.update(step, labels.numel(), loss, schedule.lr)
            if step % every == 0 or step == total:
                result = evaluate(model, build_eval_loader(cfg))
                schedule.after_eval(result.top1)
                summary.evals.append({"step": step, **result.as_dict()})
                progress.message(
                    f"step {step}: val top-1 {result.top1:.3f} top-5 {result.top5:.3f} loss {result.loss:.4f}"
                )
            if step >= total:
                break
        epoch += 1
    summary.wall_seconds = time.perf_counter() - t0
    summary.steps = summary.steps_timed = step
    summary.images_per_sec = images_seen / summary.wall_seconds if summary.wall_seconds > 0 else float("nan")
    progress.close()
    if save:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        # the exported-model format (alexnet_pp/weights.py): AlexNet.from_pretrained reads it
        export_file(cfg.run_dir / "model.safetensors", model.state_dict(), dataclasses.asdict(cfg.model), info.classes,
                    {"step": step, "stored_size": cfg.data.stored_size})
        summary.write(cfg.run_dir / "summary.json")
        (cfg.run_dir / "config.yaml").write_text(cfg.to_yaml())
    return summary
