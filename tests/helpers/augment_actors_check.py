"""Run in a child process with a Ray environment (rayproc.ray_env): the augmentation actors' batches
against the local loader's, printed as one JSON line for tests/cluster/test_augment_actors.py.

    python augment_actors_check.py SHARD_DIR
"""

from __future__ import annotations

import json
import sys

import ray
import torch

from alexnet_pp.config import preset
from alexnet_pp.data import build_train_loader
from cluster.augment_actors import ActorLoader


def cfg_for(root: str, workers: int):
    cfg = preset("test")
    cfg.model.image_size, cfg.model.num_classes = 32, 10
    d = cfg.data
    d.train = d.val = root
    d.stored_size, d.workers, d.shuffle_buffer, d.color_noise = 40, workers, 6, 0.3
    cfg.train.batch_size, cfg.train.seed = 4, 9
    return cfg


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]
                                    for x, y in zip(a, b))


def main() -> None:
    root = sys.argv[1]
    ray.init(address="local", num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    cfg = cfg_for(root, workers=2)
    local = build_train_loader(cfg, 0, 1, epoch=3, micro_batch=1, with_keys=True)
    expected = list(local)
    skips_local = local.skip_counts()
    local.set_epoch(3)
    expected_from_3 = list(local.iter_from(3))

    actors = ActorLoader(build_train_loader(cfg, 0, 1, epoch=3, micro_batch=1, with_keys=True), actors=2, cpus=1, prefetch=2)
    got = list(actors)
    out = {"batches": len(expected), "same_epoch": same(got, expected), "epoch_after": actors.epoch,
           "skips_local": skips_local, "skips_actors": actors.skip_counts()}
    actors.loader.set_epoch(3)
    out["same_from_3"] = same(list(actors.iter_from(3)), expected_from_3)

    actors.loader.set_epoch(3)  # an actor killed after two batches: Ray restarts it, it resumes in place
    it = actors.iter_from(0)
    got = [next(it), next(it)]
    ray.kill(actors.actors[1], no_restart=False)
    got += list(it)
    out["same_after_kill"] = same(got, expected)
    out["restarts"] = actors.restarts
    actors.close()

    # what a GPU rank gets: uint8 crops finished on its device (here the CPU), the same pixels
    crops = ActorLoader(build_train_loader(cfg, 0, 1, epoch=3, micro_batch=1, with_keys=True), actors=2, cpus=1,
                        output="uint8")
    out["same_from_uint8"] = same(list(crops), expected)
    crops.close()

    wrong = cfg_for(root, workers=2)
    try:
        ActorLoader(build_train_loader(wrong, 0, 2, with_keys=True), actors=0)
    except ValueError as e:
        out["zero_actors"] = str(e)
    print(json.dumps(out))
    ray.shutdown()


if __name__ == "__main__":
    main()
