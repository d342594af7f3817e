"""Run a job's ranks as local processes without Ray: the same PipelineWorker, another launcher.

Tests and benchmarks use it to compare layouts quickly; `cluster.job` is the real entry point.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch.multiprocessing as mp

from alexnet_pp.config import RunConfig
from alexnet_pp.layout import Layout


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cfg_dict: dict, layout: Layout, data_factory, out_dir: str,
               keep: bool, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from alexnet_pp.config import from_dict
    from cluster.callbacks import load_callbacks
    from cluster.engine import PipelineWorker, init_process_group_from_env

    cfg = from_dict(cfg_dict)
    out = Path(out_dir) / f"rank{rank}.pkl"
    try:
        init_process_group_from_env(cfg.parallel.collective_timeout_s)
        worker = PipelineWorker(cfg, layout, data=data_factory(rank) if data_factory else None, keep_parameters=keep,
                                callbacks=load_callbacks(cfg.callbacks))  # as on Ray workers
        result = worker.run()
        payload: Any = {"ok": True, "result": result}
    except BaseException as e:  # reported to the parent, which raises
        payload = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    out.write_bytes(pickle.dumps(payload))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# Ranks fork from a server that has imported torch once, where a spawned rank spent seconds of CPU
# importing it again: tests and benchmarks start hundreds. Not DeepSpeed: it fixes its accelerator at
# import, from DS_ACCELERATOR, which each rank sets for itself.
PRELOAD = ["torch"]


def start_ranks(fn: Callable[..., None], args: tuple, nprocs: int, join: bool = False):
    """`nprocs` processes of `fn(rank, *args)` with this process's environment of now, as
    torch.multiprocessing.spawn starts them: with join, once all have ended (a rank's exception raised
    here); else their process context."""
    mp.get_context("forkserver").set_forkserver_preload(PRELOAD)
    return mp.start_processes(_in_environment, args=(dict(os.environ), fn, *args), nprocs=nprocs, join=join,
                              start_method="forkserver")


def _in_environment(rank: int, env: dict, fn: Callable[..., None], *args: Any) -> None:
    """A forked rank has the fork server's environment, from when it started: take the parent's."""
    os.environ.clear()
    os.environ.update(env)
    fn(rank, *args)


def run_local(cfg: RunConfig, data_factory: Optional[Callable[[int], Any]] = None, keep_parameters: bool = False,
              threads: int = 1, layout: Optional[Layout] = None) -> list:
    """Run all pp × tp × dp ranks as processes on this machine; returns each rank's RankResult."""
    layout = layout or Layout.from_config(cfg)
    world = layout.world_size
    with tempfile.TemporaryDirectory(prefix="alexnet-pp-spawn-") as tmp:
        ctx = start_ranks(_rank_main, (world, free_port(), cfg.to_dict(), layout, data_factory, tmp,
                                       keep_parameters, threads), world)
        while not ctx.join():
            pass
        results, failures = [], []
        for r in range(world):
            path = Path(tmp) / f"rank{r}.pkl"
            if not path.exists():
                failures.append((1, f"rank {r} exited without a result"))
                continue
            payload = pickle.loads(path.read_bytes())
            if payload["ok"]:
                results.append(payload["result"])
            else:  # a peer's crash shows up on the others as a closed connection: name the cause first
                secondary = "closed by peer" in payload["error"] or "Connection reset" in payload["error"]
                failures.append((int(secondary), f"rank {r} failed: {payload['error']}\n{payload['traceback']}"))
        if failures:
            raise RuntimeError("\n".join(text for _, text in sorted(failures, key=lambda f: f[0])))
    return results
