"""In-memory global batches for benchmarks: the same images for every layout and baseline of a run.

`global_batches` makes `steps` global batches from a seed, cycling through `distinct` of them (the
values do not change the timing, and a few batches keep the host memory small); `SyntheticBatches`
is the data factory a run's ranks call with their rank (cluster.spawn.run_local, or the Ray job's
`run_job(data_factory=…)`): a first-stage rank gets its replica's share as cluster.feeds.TensorData,
later stages None (their inputs arrive from the stage before). Nothing big travels to the workers:
each first-stage rank generates the batches itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from alexnet_pp.layout import Layout
from cluster.feeds import TensorData


def global_batches(steps: int, batch: int, image_size: int, classes: int, distinct: int = 2,
                   seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    made = [(torch.randn(batch, 3, image_size, image_size, generator=g),
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(max(1, min(distinct, steps)))]
    return [made[i % len(made)] for i in range(steps)]  # the same tensors again, not copies


class OneEvalBatch(TensorData):
    """TensorData whose evaluation (the engine evaluates once, after the last step) is one
    micro-batch: a benchmark times training, not the evaluation."""

    def eval_batch_count(self) -> int:
        return 1


@dataclass(frozen=True)
class SyntheticBatches:
    """rank → what that rank's first stage reads (None on later stages)."""

    layout: Layout
    steps: int
    batch: int
    image_size: int
    classes: int
    distinct: int = 2
    seed: int = 0

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return global_batches(self.steps, self.batch, self.image_size, self.classes, self.distinct, self.seed)

    def __call__(self, rank: int) -> Optional[TensorData]:
        coord = self.layout.coord(rank)
        if coord.stage != 0:
            return None
        return OneEvalBatch(self.batches(), coord.replica, self.layout.dp, self.layout.micro_batches)
