"""One training step and one evaluation step: the math every trainer (single process or pipeline) shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy, mean over the batch (the paper's multinomial logistic regression)."""
    return F.cross_entropy(logits.float(), labels)


def train_step(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    grad_clip: float = 0.0,
    keys: torch.Tensor | None = None,
) -> float:
    """One optimizer step; `keys`: the rows' dropout keys (alexnet_pp/dropout.py)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(images, keys), labels)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


def average_crops(logits: torch.Tensor, samples: int) -> torch.Tensor:
    """Class probabilities of `samples` images whose crops are consecutive rows of `logits`:
    the softmax averaged over each image's crops (the paper's 10-crop test)."""
    probs = F.softmax(logits.float(), dim=1)
    return probs.view(samples, logits.shape[0] // samples, -1).mean(dim=1)


def crop_averaged_probs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities; for N×C×3×S×S input (C crops, e.g. the paper's 10) the softmax is averaged."""
    n = images.shape[0]
    return average_crops(model(images.flatten(0, 1) if images.dim() == 5 else images), n)


def topk_correct(probs: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many labels are among the k most probable classes, for each k (k capped at the class count)."""
    kmax = min(max(ks), probs.shape[1])
    top = probs.topk(kmax, dim=1).indices
    hits = top == labels[:, None]
    return [int(hits[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    samples: int

    def as_dict(self) -> dict[str, float]:
        return {"top1": self.top1, "top5": self.top5, "val_loss": self.loss, "val_samples": self.samples}


class EvalAccumulator:
    """Sums hits and loss over batches (and, in the engine, over replicas) before dividing."""

    def __init__(self) -> None:
        self.hits1 = self.hits5 = self.n = 0
        self.loss_sum = 0.0

    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        h1, h5 = topk_correct(probs, labels)
        self.hits1 += h1
        self.hits5 += h5
        self.n += labels.numel()
        self.loss_sum += float(F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum"))

    def totals(self) -> list[float]:
        return [self.hits1, self.hits5, self.n, self.loss_sum]

    @staticmethod
    def result(totals: list[float]) -> EvalResult:
        h1, h5, n, loss = totals
        n = max(int(n), 1)
        return EvalResult(top1=h1 / n, top5=h5 / n, loss=loss / n, samples=int(totals[2]))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader) -> EvalResult:
    was_training = model.training
    model.eval()
    acc = EvalAccumulator()
    for images, labels, *_ in loader:
        acc.add(crop_averaged_probs(model, images), labels)
    model.train(was_training)
    return EvalAccumulator.result(acc.totals())
