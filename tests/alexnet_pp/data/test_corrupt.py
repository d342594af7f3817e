"""Corrupt input is skipped and counted; batches stay full; training never hangs."""

import logging

import pytest
import torch

from alexnet_pp.config import preset
from alexnet_pp.data import build_eval_loader, build_train_loader
from alexnet_pp.data.shards import Encoded, write_split
from alexnet_pp.data.stream import DataError
from alexnet_pp.data.tarstream import ShardOpenError

from shardsets import jpeg_bytes, make_shards, random_image, truncate

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

DEFECTS = {
    "train-s0-1": "garbage_jpg",
    "train-s1-2": "bad_cls",
    "train-s1-3": "label_range",
    "train-s2-0": "missing_cls",
    "train-s2-4": "negative_label",
    "train-s3-5": "missing_jpg",
}
KIND = {"garbage_jpg": "decode", "bad_cls": "bad_cls", "label_range": "label_range", "missing_cls": "missing_cls",
        "negative_label": "label_range", "missing_jpg": "missing_image"}


def shard_cfg(root, workers=0, batch=4):
    cfg = preset("test")
    cfg.model.image_size, cfg.model.num_classes = 32, 10
    d = cfg.data
    d.train = d.val = str(root)
    d.stored_size, d.workers, d.shuffle_buffer = 40, workers, 5
    cfg.train.batch_size = batch
    return cfg


@pytest.fixture(scope="module")
def corrupt_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    make_shards(root, "train", [6, 6, 6, 6, 6], size=40, corrupt=DEFECTS)
    truncate(root / "train-000004.tar", 0.5)  # no manifest: found while counting
    make_shards(root, "val", [5, 5], size=40, corrupt={"val-s0-2": "garbage_jpg", "val-s1-1": "bad_cls"})
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_are_skipped_counted_and_replaced(corrupt_root, workers, caplog):
    cfg = shard_cfg(corrupt_root, workers=workers)
    caplog.set_level(logging.WARNING, logger="alexnet_pp.data")
    loaders = [build_train_loader(cfg, r, 2, with_keys=True) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1])
    got = []
    for ld in loaders:
        batches = list(ld)
        assert len(batches) == len(ld) and all(len(b[1]) == 2 for b in batches)
        for images, labels, keys in batches:
            assert torch.isfinite(images).all() and int(labels.min()) >= 0 and int(labels.max()) < 10
            got += keys
    assert not set(got) & set(DEFECTS)
    counts = {}
    for ld in loaders:
        for k, v in ld.skip_counts().items():
            counts[k] = counts.get(k, 0) + v
    assert set(counts) == set(KIND.values()) | {"truncated"}
    if workers == 0:  # logged once per shard, naming the key (worker processes log in their own process)
        per_shard = {}
        for r in caplog.records:
            shard = r.getMessage().split(":", 1)[0]
            per_shard[shard] = per_shard.get(shard, 0) + 1
        assert any("train-s1-2" in r.getMessage() for r in caplog.records)
        assert all(n <= 2 for n in per_shard.values())  # once per loader (two replicas read each shard at most)


def test_counts_from_workers_are_aggregated(corrupt_root):
    single = build_train_loader(shard_cfg(corrupt_root, workers=0), epoch=0)
    multi = build_train_loader(shard_cfg(corrupt_root, workers=2), epoch=0)
    list(single), list(multi)
    assert sum(multi.skip_counts().values()) >= len(DEFECTS)
    assert set(multi.skip_counts()) == set(single.skip_counts())


def test_eval_skips_without_replacing(corrupt_root):
    ld = build_eval_loader(shard_cfg(corrupt_root, workers=2), with_keys=True)
    keys = [k for _, _, ks in ld for k in ks]
    assert len(keys) == 8 and "val-s0-2" not in keys and "val-s1-1" not in keys
    assert ld.skip_counts() == {"decode": 1, "bad_cls": 1}


def _manifest_shards(root, n_shards=3, per=4):
    def enc(i):
        return Encoded(index=i, key=f"k{i:03d}", data=jpeg_bytes(random_image(i, 40)), label=i % 10)

    write_split(root, "train", n_shards * per, enc, {"t": 1}, max_count=per)
    write_split(root, "val", 4, enc, {"t": 1}, max_count=per)


def test_truncated_shard_with_manifest_is_found_while_reading(tmp_path):
    _manifest_shards(tmp_path)
    truncate(tmp_path / "train-000001.tar", 0.6)
    ld = build_train_loader(shard_cfg(tmp_path, workers=0, batch=4), with_keys=True)
    batches = list(ld)
    assert len(batches) == 3 and all(len(b[1]) == 4 for b in batches)
    assert ld.skip_counts().get("truncated", 0) >= 1


@pytest.mark.parametrize("workers", [0, 2])
def test_unopenable_shard_is_an_error_naming_it_unless_skipped(tmp_path, workers):
    _manifest_shards(tmp_path)
    (tmp_path / "train-000002.tar").write_bytes(b"\0garbage" * 7)
    cfg = shard_cfg(tmp_path, workers=workers, batch=4)
    with pytest.raises(ShardOpenError, match="train-000002.tar"):
        list(build_train_loader(cfg))
    cfg.data.skip_bad_shards = True
    ld = build_train_loader(cfg)
    batches = list(ld)
    assert len(batches) == 3 and all(len(b[1]) == 4 for b in batches)
    assert ld.skip_counts().get("shard", 0) >= 1


def test_a_loader_that_failed_has_stopped_its_workers_while_the_error_is_still_held(tmp_path):
    """The error's traceback keeps the worker iterator alive; its workers must be stopped anyway, or
    its finaliser runs in the next forked worker and deadlocks there (a hang seen in this suite)."""
    import multiprocessing

    _manifest_shards(tmp_path)
    (tmp_path / "train-000002.tar").write_bytes(b"\0garbage" * 7)
    with pytest.raises(ShardOpenError) as error:
        list(build_train_loader(shard_cfg(tmp_path, workers=2, batch=4)))
    assert error.traceback  # still held here
    assert not multiprocessing.active_children()


def test_all_samples_bad_raises_instead_of_hanging(tmp_path):
    make_shards(tmp_path, "train", [3, 3], size=40, corrupt={f"train-s{s}-{i}": "garbage_jpg"
                                                             for s in range(2) for i in range(3)})
    make_shards(tmp_path, "val", [2], size=40)
    cfg = shard_cfg(tmp_path, workers=0, batch=2)
    with pytest.raises(DataError, match="readable"):
        list(build_train_loader(cfg))
    cfg.data.resampled, cfg.data.epoch_samples = True, 4
    with pytest.raises(DataError):
        list(build_train_loader(cfg))
