"""Reused shared-memory batch buffers: reused once the caller drops a batch, never while it holds one."""

import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alexnet_pp.config import preset
from alexnet_pp.data import build_eval_loader, build_train_loader, slots

from shardsets import make_shards

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("slots")
    make_shards(r, "train", [13, 11, 17, 9], size=40, corrupt={"train-s1-3": "garbage_jpg"})
    make_shards(r, "val", [7, 6], size=40)
    return r


def cfg_for(root, workers, slots_per_worker=4, eval_crops=1):
    cfg = preset("test")
    cfg.model.image_size, cfg.model.num_classes = 32, 10
    d = cfg.data
    d.train = d.val = str(root)
    d.stored_size, d.workers, d.shuffle_buffer, d.color_noise = 40, workers, 8, 0.1
    d.batch_slots, d.eval_crops = slots_per_worker, eval_crops
    cfg.train.batch_size, cfg.train.seed = 3, 5
    return cfg


def test_a_buffer_is_free_again_only_when_no_view_of_it_is_left():
    pool = slots.SlotPool(1, 2, (4, 3), torch.float32)
    i = pool.claim(0)
    assert i == 0 and pool.state[0] == slots.WORKER
    t = pool.take(slots.Slot(i, (2, 3)))
    assert t.shape == (2, 3) and pool.state[0] == slots.HELD
    part = t[1:]
    arr = part.numpy()
    del t, part
    pool.reclaim()
    assert pool.state[0] == slots.HELD  # the numpy array still sees the buffer
    del arr
    assert pool.reclaim() == 2 and pool.state[0] == slots.FREE
    assert pool.claim(0) == 0 and pool.claim(0) == 1 and pool.claim(0) is None  # then a new segment
    pool.after_workers()  # claimed, never delivered, workers gone
    assert (pool.state == slots.FREE).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_the_caller_keeps_never_change(root, workers):
    # a whole epoch held at once: far more batches than slots, so a slot reused too early shows
    reference = list(build_train_loader(cfg_for(root, workers, 0), 0, 1, epoch=2, with_keys=True))
    kept = list(build_train_loader(cfg_for(root, workers), 0, 1, epoch=2, with_keys=True))
    assert len(kept) == len(reference) > 4 * max(workers, 1)
    for (a, la, ka), (b, lb, kb) in zip(kept, reference):
        assert ka == kb and torch.equal(la, lb) and torch.equal(a, b)


@pytest.mark.parametrize("workers", [0, 2])
def test_slots_are_reused_when_the_caller_drops_its_batches(root, workers):
    cfg = cfg_for(root, workers)
    reference = [x.clone() for x, _ in build_train_loader(cfg_for(root, workers, 0), epoch=1)]
    loader = build_train_loader(cfg, epoch=1)
    for k, (x, _) in enumerate(loader):
        assert torch.equal(x, reference[k])
    assert loader.slot_batches == len(loader) and loader.fresh_batches == 0
    # the next loader of the same shape (a new one per epoch) takes the same buffers, pages mapped
    again = build_train_loader(cfg, epoch=1)
    assert [torch.equal(x, r) for (x, _), r in zip(again, reference)] == [True] * len(reference)
    assert again.slot_batches == len(again)


def test_pools_stay_within_their_memory_budget(root, monkeypatch):
    batch_bytes = 3 * 3 * 32 * 32 * 4
    monkeypatch.setattr(slots, "MAX_POOL_BYTES", 2 * 2 * batch_bytes)  # two buffers for each of two workers
    loader = build_train_loader(cfg_for(root, 2))
    pool = loader._pool()
    assert pool.per_worker == 2
    slots.release(pool)
    ref = [x.clone() for x, _ in build_train_loader(cfg_for(root, 2, 0))]
    assert all(torch.equal(x, r) for (x, _), r in zip(loader, ref))
    assert loader.slot_batches > 0
    monkeypatch.setattr(slots, "MAX_POOL_BYTES", batch_bytes)  # not one each: no pool at all
    loader = build_train_loader(cfg_for(root, 2))
    assert loader._pool() is None
    assert sum(1 for _ in loader) == loader.fresh_batches > 0


def test_without_slots_every_batch_is_a_new_segment(root):
    loader = build_train_loader(cfg_for(root, 2, 0))
    n = sum(1 for _ in loader)
    assert loader.fresh_batches == n and loader.slot_batches == 0


@pytest.mark.parametrize("crops", [1, 10])
def test_evaluation_batches_use_slots_too_the_partial_one_included(root, crops):
    ref = [(x.clone(), k) for x, _, k in build_eval_loader(cfg_for(root, 2, 0, crops), with_keys=True)]
    loader = build_eval_loader(cfg_for(root, 2, 4, crops), with_keys=True)
    got = [(x, k) for x, _, k in loader]
    assert [k for _, k in got] == [k for _, k in ref] and len(got[-1][1]) < 3
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got, ref))
    assert loader.slot_batches == len(got)
    assert got[0][0].shape == ((3, 10, 3, 32, 32) if crops == 10 else (3, 3, 32, 32))


def test_an_abandoned_pass_gives_its_slots_back(root):
    cfg = cfg_for(root, 2)
    loader = build_train_loader(cfg)
    it = iter(loader)
    next(it)
    it.close()  # workers stopped mid-epoch, one batch still in the caller's hands
    gc.collect()
    pool = slots._idle[(2, 4, (3, 3, 32, 32), torch.float32)][-1]
    assert (pool.state != slots.WORKER).all()
    assert int(np.sum(pool.state == slots.FREE)) >= 7


def test_workers_keep_freed_memory_whatever_the_parent_did(tmp_path):
    """Decoded images are freed batch after batch; a worker must not hand the heap back and fault
    it in again, even under a parent that never called alexnet_pp.host.reuse_freed_memory."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import alexnet_pp.host as host\n"
        "from torch.utils.data import IterableDataset\n"
        "from alexnet_pp.data.loader import ShardLoader\n"
        "class Probe(IterableDataset):  # what a worker of the loader's DataLoader sees\n"
        "    def __iter__(self):\n"
        "        yield host._applied\n"
        "loader = ShardLoader.__new__(ShardLoader)\n"
        "loader.workers, loader.stream = 1, None\n"
        "loader._pin = lambda: False\n"
        "print('parent', host._applied, 'worker', list(loader._dataloader(Probe()))[0])\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert "parent False worker True" in out.stdout
