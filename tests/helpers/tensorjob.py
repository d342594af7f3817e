"""Engine runs on fixed in-memory global batches, the same for every layout (cluster.feeds.TensorData):
what the fault and elastic tests compare runs with."""

from __future__ import annotations

from pathlib import Path

import torch

from alexnet_pp.config import load_config
from alexnet_pp.weights import join_pieces
from cluster.feeds import TensorData


def tensor_cfg(tmp_path: Path, pp: int, tp: int, dp: int, m: int, **extra):
    """The test preset at (P, T, D, M), batch 16, checkpoints under tmp_path/ckpt."""
    overrides = {"model.dropout": "0.5", "parallel.pp": pp, "parallel.tp": tp, "parallel.dp": dp,
                 "parallel.micro_batches": m, "parallel.partition": "uniform", "train.batch_size": 16,
                 "train.epochs": 2, "train.eval_every": 100, "train.schedule": "constant", "train.lr": "0.05",
                 "checkpoint.dir": str(tmp_path / "ckpt"), "out_dir": str(tmp_path / "runs")}
    overrides.update({k: str(v) for k, v in extra.items()})
    return load_config("test", overrides=overrides)


def make_batches(n: int, batch: int = 16, size: int = 64, classes: int = 10):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def tensor_data(batches, tp: int, dp: int, m: int, rank: int) -> TensorData:
    """Rank `rank`'s share of the global batches (functools.partial it for cluster.spawn.run_local)."""
    return TensorData(batches, replica=(rank // tp) % dp, replicas=dp, micro_batches=m)


def gathered(results) -> dict[str, torch.Tensor]:
    """Every rank's parameters, named by the single model's state_dict keys (pieces joined)."""
    return join_pieces({key: value for res in results for key, value in res.parameters.items()})
