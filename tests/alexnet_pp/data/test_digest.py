"""batch_digest: a cheap fingerprint of a batch's keys and labels, equal exactly when ranks agree."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alexnet_pp.config import preset
from alexnet_pp.data import batch_digest, build_train_loader

from shardsets import make_shards

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

REPO = Path(__file__).resolve().parents[3]

KEYS = ["train-s0-1", "train-s0-2", "train-s1-0", "train-s1-1"]
LABELS = [3, 1, 4, 1]


def test_equal_for_the_same_batch_whatever_the_label_container():
    d = batch_digest(KEYS, LABELS)
    assert d == batch_digest(tuple(KEYS), torch.tensor(LABELS)) == batch_digest(KEYS, np.array(LABELS))
    assert 0 <= d < 2**63 and torch.tensor([d], dtype=torch.int64).item() == d  # all_gather-able
    assert batch_digest([], []) == batch_digest([], torch.zeros(0, dtype=torch.int64))


def test_differs_for_any_disagreement():
    d = batch_digest(KEYS, LABELS)
    others = [
        (KEYS[1:] + KEYS[:1], LABELS[1:] + LABELS[:1]),  # moved on by one sample
        ([KEYS[1], KEYS[0]] + KEYS[2:], [LABELS[1], LABELS[0]] + LABELS[2:]),  # two swapped
        (KEYS, [3, 1, 4, 2]),  # one label
        (KEYS[:3], LABELS[:3]),  # one short
        (["train-s0-1train-s0-2"] + KEYS[2:], [3] + LABELS[2:]),  # keys run together
        (KEYS, [3, 1, 4, 1 + 2**32]),
    ]
    assert len({d} | {batch_digest(k, lab) for k, lab in others}) == len(others) + 1
    with pytest.raises(ValueError, match="4 keys but 3 labels"):
        batch_digest(KEYS, LABELS[:3])


def test_same_value_in_another_process():
    code = ("from alexnet_pp.data import batch_digest\n"
            f"print(batch_digest({KEYS!r}, {LABELS!r}))\n")
    env = {**os.environ, "PYTHONHASHSEED": "4321", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == batch_digest(KEYS, LABELS)


def test_towers_loaders_agree_batch_by_batch(tmp_path):
    make_shards(tmp_path, "train", [6, 5, 7], size=40, corrupt={"train-s1-2": "garbage_jpg"})
    make_shards(tmp_path, "val", [2], size=40)
    cfg = preset("test")
    cfg.model.image_size, cfg.model.num_classes = 32, 10
    cfg.data.train = cfg.data.val = str(tmp_path)
    cfg.data.stored_size, cfg.data.workers, cfg.data.shuffle_buffer = 40, 0, 4
    cfg.train.batch_size = 4

    def digests(replica, epoch):
        return [batch_digest(k, y) for _, y, k in build_train_loader(cfg, replica, 2, epoch=epoch, with_keys=True)]

    tower_a, tower_b = digests(1, 3), digests(1, 3)
    assert tower_a == tower_b and len(set(tower_a)) == len(tower_a)
    assert all(x != y for x, y in zip(tower_a, digests(0, 3)))
    assert tower_a != digests(1, 4)
