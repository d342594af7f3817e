"""Augmentation actors (cluster/augment_actors.py) make the local loader's batches, bit for bit, resume
mid-epoch, survive a killed actor, and count skipped samples; run on a real local Ray instance in a
child process (the test process never imports Ray)."""

import json
import subprocess
import sys

import pytest

from rayproc import REPO, ray_env
from shardsets import make_shards

pytestmark = pytest.mark.e2e


def test_actors_make_the_local_loaders_batches_resume_and_survive_a_killed_actor(tmp_path):
    make_shards(tmp_path / "shards", "train", [9, 7, 8], size=40, corrupt={"train-s1-2": "garbage_jpg"})
    make_shards(tmp_path / "shards", "val", [4], size=40)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / "augment_actors_check.py"), str(tmp_path / "shards")],
                          env=ray_env(tmp_path / "auth"), capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["batches"] >= 8  # past what two requests ahead per actor hold when one is killed
    assert out["same_epoch"] and out["same_from_3"] and out["same_after_kill"] and out["same_from_uint8"]
    assert out["restarts"] == 1
    assert out["epoch_after"] == 4  # a complete pass moves on to the next epoch, as the local loader does
    assert out["skips_actors"] == out["skips_local"] and sum(out["skips_local"].values()) >= 1
    assert "must be ≥ 1" in out["zero_actors"]
