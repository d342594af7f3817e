"""What a job checks before any worker starts: where it writes, and whom it runs for.

- `check_writable(cfg)`: the run directory and the checkpoint directory accept a file. A job that
  cannot write its checkpoints would otherwise train until its first checkpoint and fail there.
  A `ConfigError`, like every setting that cannot run (exit code 2, nothing started).
- `check_cluster_auth(allow_insecure)`: a cluster the job joins (`--address`, or the cluster of
  `ray job submit`) must ask for Ray's token. Whether it does is asked of the cluster itself: one
  gRPC call to its GCS without a token, which a token-auth cluster answers UNAUTHENTICATED. The
  client's own RAY_AUTH_MODE says nothing about the cluster: a client with a token is let into a
  cluster without authentication just the same. A local Ray the job starts itself on 127.0.0.1 is
  not checked. `--allow-insecure-cluster` runs anyway, with a warning.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from alexnet_pp.config import RunConfig
from alexnet_pp.errors import ConfigError

log = logging.getLogger(__name__)


class InsecureClusterError(RuntimeError):
    """The cluster does not ask for a token and the job was not told to run there anyway."""


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


def cluster_requires_token(gcs_address: str, timeout_s: float = 10.0) -> bool:
    """True when the GCS at `gcs_address` refuses a call without a token, False when it answers it."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(gcs_address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                return True
            raise
    return False


def check_cluster_auth(allow_insecure: bool) -> None:
    """For a cluster this process joined (ray.init done): refuse one without token authentication."""
    import ray

    try:
        gcs = ray.get_runtime_context().gcs_address
        protected = cluster_requires_token(gcs)
        reason = "" if protected else f"its GCS at {gcs} answered a call that carried no token"
    except Exception as e:  # a Ray Client connection, TLS, an unreachable GCS: unknown is not safe
        protected, reason = False, f"its authentication could not be checked ({type(e).__name__}: {e})"
    if protected:
        return
    if allow_insecure:
        log.warning("the Ray cluster does not ask for a token (%s); running anyway (--allow-insecure-cluster): "
                    "anyone who reaches it can run code on its machines", reason)
        return
    raise InsecureClusterError(
        f"refusing to run on a Ray cluster without token authentication: {reason}, so anyone who reaches "
        "it can run code on its machines. Start every node with RAY_AUTH_MODE=token (README, 'Run on several "
        "machines'), or pass --allow-insecure-cluster to run there anyway")
