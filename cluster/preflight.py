"""What a job checks before any worker starts: where it writes.

- `check_writable(cfg)`: the run directory and the checkpoint directory accept a file. A job that
  cannot write its checkpoints would otherwise train until its first checkpoint and fail there.
  A `ConfigError`, like every setting that cannot run (exit code 2, nothing started).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from alexnet_pp.config import RunConfig
from alexnet_pp.errors import ConfigError

log = logging.getLogger(__name__)


def _probe_write(directory: Path, what: str, setting: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(probe, "wb") as f:
            f.write(b"alexnet-pp")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"{what} {directory} is not writable ({type(e).__name__}: {e}); the job would fail when it first "
            f"writes there. Point {setting} at a directory this user can write (on a cluster: storage every "
            "node shares)") from e


def check_writable(cfg: RunConfig) -> None:
    """The run directory and the checkpoint directory accept a file (`cfg` with absolute paths)."""
    from cluster.checkpoint import checkpoint_dir

    _probe_write(Path(cfg.run_dir), "the run directory", "--out_dir")
    _probe_write(checkpoint_dir(cfg), "the checkpoint directory", "--checkpoint.dir")
