"""Pipeline-stage alignment: independently built loaders of one replica yield identical batches."""

import json
import os
import subprocess
import sys

import pytest
import torch

from alexnet_pp.config import preset
from alexnet_pp.data import build_train_loader

from shardsets import make_shards
from stream_alignment import first_misalignment

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def shard_cfg(root, workers):
    cfg = preset("test")
    cfg.model.image_size, cfg.model.num_classes = 32, 10
    d = cfg.data
    d.train = d.val = str(root)
    d.stored_size, d.workers, d.shuffle_buffer, d.color_noise = 40, workers, 8, 0.1
    cfg.train.batch_size, cfg.train.seed = 6, 11
    return cfg


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("align")
    make_shards(r, "train", [7, 4, 9, 5], size=40,
                corrupt={"train-s0-3": "garbage_jpg", "train-s2-2": "bad_cls", "train-s3-0": "missing_cls"})
    make_shards(r, "val", [3], size=40)
    return r


def shifted(batches):
    """The same samples, moved on by one: what a stage that lost a sample would see."""
    items = [(img, lab, key) for images, labels, keys in batches for img, lab, key in zip(images, labels, keys)]
    items = items[1:] + items[:1]
    n = len(batches[0][2])
    return [(torch.stack([x[0] for x in items[i:i + n]]), torch.stack([x[1] for x in items[i:i + n]]),
             [x[2] for x in items[i:i + n]]) for i in range(0, len(items), n)]


def test_two_loaders_for_one_replica_are_aligned_and_a_shift_is_caught(root):
    cfg = shard_cfg(root, workers=2)
    first_stage = list(build_train_loader(cfg, 1, 2, epoch=3, with_keys=True))
    last_stage = list(build_train_loader(cfg, 1, 2, epoch=3, with_keys=True))
    assert len(first_stage) > 1
    assert first_misalignment(first_stage, last_stage) is None
    # the check is not vacuous: a stream moved on by one sample, another replica, another epoch,
    # one swapped label and a missing batch are all reported
    assert "keys differ at 0" in first_misalignment(first_stage, shifted(last_stage))
    other = list(build_train_loader(cfg, 0, 2, epoch=3, with_keys=True))
    assert first_misalignment(first_stage, other) is not None
    later = list(build_train_loader(cfg, 1, 2, epoch=4, with_keys=True))
    assert first_misalignment(first_stage, later) is not None
    images, labels, keys = last_stage[0]
    swapped = labels.clone()
    swapped[0], swapped[1] = labels[1] + 1, labels[0]
    assert first_misalignment(first_stage, [(images, swapped, keys)] + last_stage[1:]) == "batch 0: labels differ"
    assert "ended first" in first_misalignment(first_stage, last_stage[:-1])


def test_alignment_holds_across_processes(root):
    """A rank in another process (another PYTHONHASHSEED) builds the same stream."""
    cfg = shard_cfg(root, workers=2)
    here = [list(k) for _, _, k in build_train_loader(cfg, 0, 2, epoch=1, with_keys=True)]
    code = (
        "import json, sys\n"
        "from alexnet_pp.config import preset\n"
        "from alexnet_pp.data import build_train_loader\n"
        "cfg = preset('test'); cfg.model.image_size, cfg.model.num_classes = 32, 10\n"
        f"cfg.data.train = cfg.data.val = {str(root)!r}\n"
        "cfg.data.stored_size, cfg.data.workers, cfg.data.shuffle_buffer, cfg.data.color_noise = 40, 2, 8, 0.1\n"
        "cfg.train.batch_size, cfg.train.seed = 6, 11\n"
        "print(json.dumps([list(k) for _, _, k in build_train_loader(cfg, 0, 2, epoch=1, with_keys=True)]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here
