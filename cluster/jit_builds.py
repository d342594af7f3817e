"""Where DeepSpeed's just-in-time C++ ops are built, pinned per environment.

DeepSpeed compiles its shared-memory comm op with torch's cpp_extension on first use (30–45 s on two
cores) and reuses the build while ninja finds its log unchanged. Two things made every other run
rebuild it: ninja 1.13 (the pip wheel in the venv) and 1.11 (the system's) hash the build log
differently, and whichever came first on PATH wrote the log; and every environment shares one
~/.cache/torch_extensions folder, so a second virtualenv's include paths invalidate the first's.
`make setup` builds it (`python -m cluster.jit_builds`), so no job's workers wait for the compile.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Optional


def pin_extension_builds() -> None:
    """Prefer this interpreter's ninja and give this environment its own build folder (a user's
    TORCH_EXTENSIONS_DIR is kept). Call before DeepSpeed loads an op."""
    bindir = Path(sys.executable).parent
    path = os.environ.get("PATH", "")
    if (bindir / "ninja").exists() and not path.startswith(f"{bindir}{os.pathsep}"):
        os.environ["PATH"] = f"{bindir}{os.pathsep}{path}"
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        env_id = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path.home() / ".cache" / "torch_extensions" / f"alexnet-pp-{env_id}")


def build_cpu_comm_op() -> Optional[Path]:
    """Build DeepSpeed's shared-memory comm op now, or find it built, as a CPU worker's first
    `init_distributed` does (deepspeed.comm.torch.build_shm_op); returns the folder it is built in,
    or None where DS_ACCELERATOR names an accelerator without it. `make setup` runs it (`python -m
    cluster.jit_builds`) so that the first job does not stop its workers for the compile."""
    pin_extension_builds()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return None
    builder.load(verbose=False)
    return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / builder.NAME


if __name__ == "__main__":
    folder = build_cpu_comm_op()
    print(f"DeepSpeed's CPU comm op is built in {folder}" if folder else
          f"DS_ACCELERATOR={os.environ['DS_ACCELERATOR']}: no CPU comm op to build")
