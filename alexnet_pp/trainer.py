"""The single-process trainer: the reference every distributed layout must reproduce."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, TextIO

import torch

from alexnet_pp.config import RunConfig
from alexnet_pp.host import configure_host
from alexnet_pp.model import AlexNet
from alexnet_pp.optim import LRSchedule, build_optimizer
from alexnet_pp.progress import Progress
from alexnet_pp.steps import evaluate, train_step

log = logging.getLogger(__name__)


def setup_process(cfg: RunConfig) -> None:
    """Threads, allocator and seeds: everything that makes a run repeatable and fast."""
    configure_host(cfg.train.threads, cfg.train.keep_freed_memory)
    torch.manual_seed(cfg.train.seed)


def total_steps(cfg: RunConfig, steps_per_epoch: int) -> int:
    steps = max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps > 0 else steps


def eval_interval(cfg: RunConfig, steps_per_epoch: int) -> int:
    return max(1, round(cfg.train.eval_every * steps_per_epoch))


@dataclass
class RunSummary:
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "images_per_sec": round(self.images_per_sec, 2),
            "final_loss": self.losses[-1] if self.losses else None,
            "losses": self.losses,
            "evals": self.evals,
        }


def train_single(cfg: RunConfig, stream: Optional[TextIO] = None, save: bool = True) -> RunSummary:
    """Train on one process with the config's data, recipe and schedule; evaluate on the held-out split."""
    from alexnet_pp.data import build_eval_loader, build_train_loader, ensure_dataset

    setup_process(cfg)
    info = ensure_dataset(cfg)
    model = AlexNet(cfg.model)
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
    summary = RunSummary()
    t0 = time.perf_counter()
    step, epoch = 0, 0
    while step < total:
        for images, labels in build_train_loader(cfg, epoch=epoch):
            loss = train_step(model, images, labels, optimizer, cfg.train.grad_clip)
            step += 1
            schedule.after_step(step)
            summary.losses.append(loss)
            summary.images += labels.numel()
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
    summary.seconds = time.perf_counter() - t0
    summary.steps = step
    progress.close()
    if save:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cfg.run_dir / "model.pt")
        (cfg.run_dir / "summary.json").write_text(json.dumps(summary.as_dict(), indent=1))
        (cfg.run_dir / "config.yaml").write_text(cfg.to_yaml())
    return summary
