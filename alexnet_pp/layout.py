"""The parallel layout of a run, checked once: P × T × D ranks, M micro-batches, the stage cuts.

`Layout.from_config(cfg)` owns every layout check (degrees, worker count, batch split, ZeRO,
precision, partition), each with one message that says what to change. The command line builds it
once per job; the driver hands it to every worker, which never re-derives it (a measured partition
replaces only the cuts: `with_bounds`).

Rank order is DeepSpeed's `PipeModelDataParallelTopology(num_pp=P, num_mp=T, num_dp=D)` (axes pipe,
data, model; model varies fastest), so the two towers of a stage are neighbouring ranks and a PACK
placement puts them on one node. Nothing here communicates: this is arithmetic on the config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from alexnet_pp.config import RunConfig
from alexnet_pp.errors import ConfigError
from alexnet_pp.pipeline import Partition, partition, unit_names


@dataclass(frozen=True)
class Coord:
    """Where one rank sits in the layout."""

    rank: int
    stage: int
    tower: int
    replica: int

    def label(self) -> str:
        return f"rank {self.rank} (stage {self.stage}, tower {self.tower}, replica {self.replica})"

    def labels(self) -> dict[str, str]:
        return {"stage": str(self.stage), "tower": str(self.tower), "replica": str(self.replica)}


@dataclass(frozen=True)
class Layout:
    pp: int
    tp: int
    dp: int
    micro_batches: int
    micro_batch: int  # rows per micro-batch on one replica
    partition: Partition
    precision: str = "fp32"
    zero_stage: int = 0

    # --- construction: the one place a layout is checked ---------------------------------------

    @classmethod
    def from_config(cls, cfg: RunConfig, workers: Optional[int] = None) -> "Layout":
        p, t = cfg.parallel, cfg.train
        if p.tp not in (1, 2):
            raise ConfigError(f"parallel.tp={p.tp}: a stage holds 1 device with both towers or 2 with one tower each")
        for name in ("pp", "dp", "micro_batches"):
            if getattr(p, name) < 1:
                raise ConfigError(f"parallel.{name} must be ≥ 1")
        world = p.pp * p.tp * p.dp
        if workers is not None and workers != world:
            raise ConfigError(f"{workers} workers ≠ pp × tp × dp = {p.pp} × {p.tp} × {p.dp} = {world}; "
                              "change one of them")
        per_replica, rem = divmod(t.batch_size, p.dp * p.micro_batches)
        if rem or per_replica < 1:
            raise ConfigError(
                f"train.batch_size ({t.batch_size}) must equal micro_batch × parallel.micro_batches "
                f"({p.micro_batches}) × parallel.dp ({p.dp}) for a whole micro_batch ≥ 1; "
                f"pick a batch_size divisible by {p.dp * p.micro_batches}"
            )
        if p.zero_stage > 0 and p.dp < 2:
            raise ConfigError("parallel.zero_stage=1 shards optimizer state over replicas: it needs parallel.dp ≥ 2")
        if p.elastic_wait_s < 0:
            raise ConfigError("parallel.elastic_wait_s must be ≥ 0 (seconds to wait for a lost node's replacement)")
        if p.elastic and p.zero_stage > 0:
            raise ConfigError("parallel.elastic needs parallel.zero_stage=0: with ZeRO-1 a checkpoint keeps no "
                              "optimizer state, so a restart on fewer replicas would lose the momentum")
        if p.precision == "fp16" and p.gpus_per_worker <= 0:  # bf16 also runs on CPUs (DeepSpeed's CPU accelerator)
            raise ConfigError("parallel.precision=fp16 needs GPUs (parallel.gpus_per_worker > 0); use bf16 or fp32")
        if p.cpus_per_worker <= 0 and p.gpus_per_worker <= 0:
            raise ConfigError("parallel.cpus_per_worker must be > 0 (or give each worker a GPU)")
        if p.activation_checkpoint_interval < 0:
            raise ConfigError("parallel.activation_checkpoint_interval must be ≥ 0 (0: off)")
        if p.schedule == "zb-h1":  # W passes write .grad themselves, after the backward pass (cluster/zero_bubble.py)
            unsupported = [why for why, on in (
                (f"parallel.precision={p.precision} (DeepSpeed's bf16/fp16 optimizers read gradients in the "
                 "backward pass)", p.precision in ("bf16", "fp16")),
                ("parallel.precision=bf16-mixed (W passes run outside the forward's autocast)",
                 p.precision == "bf16-mixed"),
                (f"parallel.zero_stage={p.zero_stage} (ZeRO reads gradients in the backward pass)", p.zero_stage > 0),
                ("parallel.activation_checkpoint_interval > 0 (recomputation would run inside the B pass)",
                 p.activation_checkpoint_interval > 0),
                ("parallel.defer_weight_grads (zb-h1 already computes every weight gradient in its own W pass)",
                 p.defer_weight_grads)) if on]
            if unsupported:
                raise ConfigError("parallel.schedule=zb-h1 runs float32 without ZeRO, activation checkpointing or "
                                  f"deferred FC gradients; not with {'; '.join(unsupported)}. Change these or use "
                                  "parallel.schedule=1f1b")
        part = partition(cfg.model, p.pp, p.partition, tp=p.tp)
        return cls(p.pp, p.tp, p.dp, p.micro_batches, per_replica, part, p.precision, p.zero_stage)

    @staticmethod
    def replicas_for(workers: int, pp: int, tp: int) -> int:
        """D for a worker count (`--workers` without `--dp`)."""
        per_replica = pp * tp
        if workers < 1 or workers % per_replica:
            raise ConfigError(f"--workers {workers} is not a multiple of pp × tp = {per_replica}; "
                              f"use a multiple of {per_replica} or change --pp/--tp")
        return workers // per_replica

    def with_bounds(self, bounds: tuple[int, ...], splits: tuple[int, ...] = ()) -> "Layout":
        """The same layout cut elsewhere (measured costs, or the cuts a checkpoint was written with)."""
        return replace(self, partition=Partition(tuple(bounds), self.partition.method, tuple(splits)))

    def with_cut(self, cut: Partition) -> "Layout":
        return self.with_bounds(cut.bounds, cut.splits)

    # --- ranks ------------------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return self.pp * self.tp * self.dp

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.pp, self.tp, self.dp)

    @property
    def units(self) -> tuple[str, ...]:
        """The pipeline units the stages are cut from (tower halves with T = 1)."""
        return unit_names(self.tp)

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

    def describe(self) -> str:
        return (f"(P, T, D) = ({self.pp}, {self.tp}, {self.dp}), {self.world_size} workers, micro-batch "
                f"{self.micro_batch} × {self.micro_batches}")
