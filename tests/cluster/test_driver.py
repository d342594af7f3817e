"""What the driver ships to a cluster with the job's code."""

from __future__ import annotations

import json
import subprocess
import sys

from cluster.driver import CODE_ROOT


def test_the_code_shipped_to_a_cluster_leaves_out_what_no_worker_reads(tmp_path):
    """A driver joining a cluster, and `ray job submit --working-dir` with the README's excludes,
    ship the repository without WORKING_DIR_EXCLUDES: the packages, not the benchmark records in
    docs/, the venv, data, runs or git history. Zipped by Ray's own packaging, in a subprocess
    (importing Ray here would fix its auth mode for the whole session)."""
    script = ("import json, sys, zipfile; from pathlib import Path; "
              "from ray._private.runtime_env.packaging import create_package; "
              "from cluster.driver import CODE_ROOT, WORKING_DIR_EXCLUDES; "
              "create_package(str(CODE_ROOT), Path(sys.argv[1]), include_gitignore=True, "
              "excludes=WORKING_DIR_EXCLUDES); "
              "print(json.dumps(zipfile.ZipFile(sys.argv[1]).namelist()))")
    pkg = tmp_path / "pkg.zip"
    r = subprocess.run([sys.executable, "-c", script, str(pkg)], cwd=CODE_ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"pyproject.toml", "alexnet_pp/config.py", "cluster/job.py", "ops/lrn.py"} <= set(names)
    assert [n for n in names if n.split("/")[0] in ("docs", "data", "runs", ".git") or n.startswith(".venv")] == []
