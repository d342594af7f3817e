"""DeepSpeed's JIT comm op is built once per environment, not once per ninja found on PATH."""

from __future__ import annotations

import os
import shutil
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
