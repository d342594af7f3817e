"""DeepSpeed's JIT comm op is built once per environment, not once per ninja found on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.jit_builds import pin_extension_builds


def test_this_interpreters_ninja_comes_first_and_the_build_folder_is_this_environments(monkeypatch):
    bindir = Path(sys.executable).parent
    if not (bindir / "ninja").exists():
        pytest.skip("no ninja beside this interpreter")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    pin_extension_builds()
    assert Path(shutil.which("ninja")).parent == bindir
    first = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    pin_extension_builds()  # idempotent: PATH is not prefixed twice, the folder stays
    assert os.environ["PATH"].count(str(bindir)) == 1
    assert Path(os.environ["TORCH_EXTENSIONS_DIR"]) == first
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", "/some/other/venv")
    pin_extension_builds()
    assert Path(os.environ["TORCH_EXTENSIONS_DIR"]) != first  # another venv, another folder


def test_a_users_extension_folder_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    pin_extension_builds()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path)


def test_the_op_setup_builds_is_the_one_deepspeeds_init_loads_without_compiling_again():
    """`make setup` runs `python -m cluster.jit_builds`; a worker's DeepSpeed (build_shm_op, what
    init_distributed calls on a CPU accelerator) then loads that build: the library is not written
    again. Both in fresh processes, as setup and a worker are."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env["DS_ACCELERATOR"] = "cpu"
    setup = subprocess.run([sys.executable, "-m", "cluster.jit_builds"], env=env, capture_output=True, text=True,
                           timeout=600)
    assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
    folder = Path(setup.stdout.strip().splitlines()[-1].rsplit(" ", 1)[1])
    [lib] = folder.glob("*.so")
    built = lib.stat().st_mtime_ns
    worker = ("import os; from cluster.jit_builds import pin_extension_builds; pin_extension_builds(); "
              "from deepspeed.comm.torch import build_shm_op; assert build_shm_op() is not None; "
              "print('folder', os.environ['TORCH_EXTENSIONS_DIR'])")
    load = subprocess.run([sys.executable, "-c", worker], env=env, capture_output=True, text=True, timeout=600)
    assert load.returncode == 0, load.stdout[-3000:] + load.stderr[-3000:]
    assert "built successfully" in load.stdout and lib.stat().st_mtime_ns == built
    assert f"folder {folder.parent}" in load.stdout  # the worker looked where setup built
