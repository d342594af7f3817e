"""Rank → (stage, tower, replica): the P × T × D layout of a job, checked before any worker starts.

The order of ranks is DeepSpeed's `PipeModelDataParallelTopology(num_pp=P, num_mp=T, num_dp=D)`
(axes pipe, data, model; model varies fastest), so the two towers of a stage are neighbouring ranks
and Ray's PACK placement puts them on the same node.
"""

from __future__ import annotations

from dataclasses import dataclass

from alexnet_pp.config import ConfigError, RunConfig, micro_batch_size
from alexnet_pp.pipeline import Partition, partition


@dataclass(frozen=True)
class Coord:
    rank: int
    stage: int
    tower: int
    replica: int

    def label(self) -> str:
        return f"rank {self.rank} (stage {self.stage}, tower {self.tower}, replica {self.replica})"

    def labels(self) -> dict[str, str]:
        return {"stage": str(self.stage), "tower": str(self.tower), "replica": str(self.replica)}


@dataclass(frozen=True)
class Topology:
    pp: int
    tp: int
    dp: int
    micro_batch: int
    micro_batches: int
    partition: Partition

    @property
    def world_size(self) -> int:
        return self.pp * self.tp * self.dp

    def coord(self, rank: int) -> Coord:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        tower = rank % self.tp
        replica = (rank // self.tp) % self.dp
        stage = rank // (self.tp * self.dp)
        return Coord(rank, stage, tower, replica)

    def rank_of(self, stage: int, tower: int, replica: int) -> int:
        return (stage * self.dp + replica) * self.tp + tower

    def coords(self) -> list[Coord]:
        return [self.coord(r) for r in range(self.world_size)]

    def theoretical_bubble(self) -> float:
        """GPipe/1F1B idle fraction with equal stages: (P − 1) / (M + P − 1)."""
        return (self.pp - 1) / (self.micro_batches + self.pp - 1)


def build_topology(cfg: RunConfig, workers: int | None = None) -> Topology:
    """Validate the layout; every message says what to change."""
    p = cfg.parallel
    if p.tp not in (1, 2):
        raise ConfigError(f"parallel.tp={p.tp}: a stage holds 1 device with both towers or 2 with one tower each")
    world = p.pp * p.tp * p.dp
    if workers is not None and workers != world:
        raise ConfigError(f"{workers} workers ≠ pp × tp × dp = {p.pp} × {p.tp} × {p.dp} = {world}")
    if p.zero_stage > 0 and p.dp < 2:
        raise ConfigError("parallel.zero_stage=1 shards optimizer state over replicas: it needs parallel.dp ≥ 2")
    part = partition(cfg.model, p.pp, p.partition, tp=p.tp)
    return Topology(p.pp, p.tp, p.dp, micro_batch_size(cfg), p.micro_batches, part)
