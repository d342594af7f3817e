"""Writing files that readers on other processes or nodes may open at any moment.

`write_atomic` writes beside the target and renames over it: a reader sees the old file or the new
one, never half of either. Every file the project rewrites in place (manifests, class lists, worker
records, Prometheus target lists, checkpoint markers) goes through it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes, durable: bool = False) -> None:
    """Replace `path` with `data` atomically. `durable`: fsync before the rename, for markers that
    must survive a crash of the machine (a checkpoint's completion marker)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique per process and thread, so concurrent writers never share a temporary file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
