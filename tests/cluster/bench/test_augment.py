"""The augmentation-actor benchmark compares like with like: one worker limited to one CPU and one
thread, decoding itself with 0 actors and not at all with N."""

from __future__ import annotations

import argparse
from pathlib import Path

from cluster.bench.augment import run_config


def args(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(preset="test", warmup=2, steps=5, stored_size=256, data_dir=tmp_path / "data",
                              set=["train.batch_size=16"])


def test_every_run_limits_the_worker_to_one_cpu_and_only_the_actor_count_differs(tmp_path):
    base, two = run_config(args(tmp_path), 0, tmp_path), run_config(args(tmp_path), 2, tmp_path)
    for cfg in (base, two):
        assert cfg.parallel.cpus_per_worker == 1 and cfg.train.threads == 1
        assert (cfg.parallel.pp, cfg.parallel.tp, cfg.parallel.dp) == (1, 1, 1)
        assert cfg.data.workers == 0 and cfg.data.stored_size == 256 and cfg.train.max_steps == 7
        assert cfg.train.batch_size == 16  # --set reaches every run
    assert base.data.augment_actors == 0 and two.data.augment_actors == 2 and two.data.augment_cpus == 1
    assert base.name != two.name  # their run folders do not collide
