"""A job refuses a Ray cluster that does not ask for a token, unless told to run there anyway.

The cluster is a Ray head of the test's own on 127.0.0.1 with authentication off
(tests/helpers/loopback_cluster.py), stopped by its PIDs; the jobs run as `python -m cluster.job
--address GCS` in sessions of their own.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from loopback_cluster import LoopbackCluster
from rayproc import ray_env, run_job_cli


@pytest.fixture(scope="module")
def insecure_cluster(tmp_path_factory):
    env = ray_env(tmp_path_factory.mktemp("auth"), auth=False)
    tmp = Path(tempfile.mkdtemp(prefix="rayi", dir="/tmp"))  # short: Ray's socket paths are long
    cluster = LoopbackCluster(tmp / "cluster", env, nodes={}, head_cpus=1)
    try:
        yield cluster, env
    finally:
        cluster.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_job_refuses_a_cluster_without_authentication_unless_allowed(insecure_cluster, tmp_path):
    cluster, env = insecure_cluster
    args = ["--preset", "test", "--train.max_steps", "1", "--train.batch_size", "16", "--train.threads", "1",
            "--data.synthetic_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "runs"),
            "--address", cluster.gcs]
    rc, log = run_job_cli(args, env, tmp_path / "refused.log", timeout=300)
    summary = json.loads((tmp_path / "runs" / "test" / "summary.json").read_text())
    assert rc == 1 and not summary["ok"], log[-8000:]
    assert "refusing to run on a Ray cluster without token authentication" in summary["error"], summary["error"]
    assert "--allow-insecure-cluster" in summary["error"] and "--allow-insecure-cluster" in log
    assert not (tmp_path / "runs" / "test" / "attempts.jsonl").exists()  # no worker ever started

    rc, log = run_job_cli([*args, "--allow-insecure-cluster"], env, tmp_path / "allowed.log", timeout=400)
    summary = json.loads((tmp_path / "runs" / "test" / "summary.json").read_text())
    assert rc == 0 and summary["ok"] and summary["steps"] == 1, log[-8000:]
    assert "does not ask for a token" in log and "running anyway (--allow-insecure-cluster)" in log
