"""Epoch splitting over replicas × workers, equal lengths, determinism, resampling, evaluation."""

from collections import Counter

import pytest
import torch

from alexnet_pp.config import preset
from alexnet_pp.data import build_eval_loader, build_train_loader
from alexnet_pp.data.stream import segments, worker_slice

from shardsets import make_shards

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

UNEVEN = [5, 9, 3, 11, 4]  # 32 samples in 5 shards of different sizes


def shard_cfg(root, workers=0, batch=8, stored=40, image=32, buffer=6):
    cfg = preset("test")
    cfg.model.image_size, cfg.model.num_classes = image, 10
    d = cfg.data
    d.train = d.val = str(root)
    d.stored_size, d.workers, d.shuffle_buffer = stored, workers, buffer
    cfg.train.batch_size, cfg.train.seed = batch, 5
    return cfg


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    root = tmp_path_factory.mktemp("uneven")
    listing = make_shards(root, "train", UNEVEN, size=40)
    make_shards(root, "val", [4, 7, 2], size=40)
    return root, [k for shard in listing for k, _ in shard]


def keys_of(loader):
    return [k for _, _, keys in loader for k in keys]


def worker_keys(loader, workers):
    """Each worker's stream run in this process (what the DataLoader's workers do)."""
    return [[k for _, _, keys, _ in loader.stream.worker_batches(w, workers) for k in keys] for w in range(workers)]


def test_segments_wrap_and_worker_slices():
    assert segments([2, 0, 1], (3, 2, 4), 0, 9) == [(2, 0, 4, 0), (0, 0, 3, 4), (1, 0, 2, 7)]
    assert segments([2, 0, 1], (3, 2, 4), 6, 12) == [(0, 2, 3, 6), (1, 0, 2, 7), (2, 0, 3, 9)]  # wraps
    assert segments([0, 1], (0, 3), 0, 2) == [(1, 0, 2, 0)]  # empty shards are skipped
    assert [worker_slice(5, 4, w, 2) for w in range(2)] == [(0, 3), (12, 2)]
    assert [worker_slice(1, 4, w, 3) for w in range(3)] == [(0, 1), (4, 0), (4, 0)]


@pytest.mark.parametrize("replicas,workers", [(1, 1), (2, 2), (4, 3), (3, 2)])
def test_every_sample_once_per_epoch_over_replicas_and_workers(uneven, replicas, workers):
    root, all_keys = uneven
    cfg = shard_cfg(root, workers=workers, batch=8 * replicas if replicas != 3 else 6)
    loaders = [build_train_loader(cfg, r, replicas, epoch=1) for r in range(replicas)]
    assert len({len(ld) for ld in loaders}) == 1  # the same length everywhere
    seen = Counter()
    for ld in loaders:
        per_worker = worker_keys(ld, workers)
        assert sum(len(k) for k in per_worker) == len(ld) * ld.batch_size
        for ks in per_worker:
            seen.update(ks)
    total = len(loaders[0]) * loaders[0].batch_size * replicas
    assert set(seen) == set(all_keys)  # nothing missed
    if total == len(all_keys):
        assert all(v == 1 for v in seen.values())
    else:  # padding wraps round: fewer than replicas × batch extra samples, each seen twice
        assert sum(seen.values()) == total and 0 < total - len(all_keys) < replicas * loaders[0].batch_size
        assert max(seen.values()) == 2


def test_dataloader_workers_give_batches_in_round_robin_order(uneven):
    root, all_keys = uneven
    cfg = shard_cfg(root, workers=2, batch=4)  # 8 batches: 4 per worker
    ld = build_train_loader(cfg, 0, 1, epoch=2, with_keys=True)
    got = [list(k) for _, _, k in ld]
    assert len(got) == len(ld) == 8 and all(len(k) == 4 for k in got)
    ld.set_epoch(2)  # iterating moved it on
    ws = [list(ld.stream.worker_batches(w, 2)) for w in range(2)]
    want = [list(b[2]) for pair in zip(*ws) for b in pair]
    assert got == want
    assert sorted(k for b in got for k in b) == sorted(all_keys)
    cfg.data.workers = 3  # 8 batches over 3 workers: 3, 3, 2
    assert len(keys_of(build_train_loader(cfg, 0, 1, epoch=2, with_keys=True))) == 32


def test_uneven_replica_lengths_with_workers_through_the_dataloader(uneven):
    root, all_keys = uneven
    cfg = shard_cfg(root, workers=2, batch=15)  # 32 samples, 3 replicas × 5: 3 batches each, 45 slots
    seen = Counter()
    for r in range(3):
        ld = build_train_loader(cfg, r, 3, with_keys=True)
        batches = list(ld)
        assert len(batches) == len(ld) == 3 and all(len(b[1]) == 5 for b in batches)
        seen.update(k for b in batches for k in b[2])
    assert set(seen) == set(all_keys) and sum(seen.values()) == 45


def test_deterministic_and_new_order_each_epoch(uneven):
    root, all_keys = uneven
    cfg = shard_cfg(root, workers=0, batch=8)
    a = list(build_train_loader(cfg, epoch=3, with_keys=True))
    b = list(build_train_loader(cfg, epoch=3, with_keys=True))
    for x, y in zip(a, b):
        assert x[2] == y[2] and torch.equal(x[1], y[1]) and torch.equal(x[0], y[0])
    e4 = keys_of(build_train_loader(cfg, epoch=4, with_keys=True))
    e3 = [k for _, _, ks in a for k in ks]
    assert e3 != e4 and sorted(e3) == sorted(e4) == sorted(all_keys)
    assert e3 != all_keys  # shuffled, not file order
    cfg.train.seed = 6
    assert keys_of(build_train_loader(cfg, epoch=3, with_keys=True)) != e3


def test_loader_moves_to_the_next_epoch_by_itself(uneven):
    root, _ = uneven
    cfg = shard_cfg(root, workers=0, batch=8)
    ld = build_train_loader(cfg, epoch=0, with_keys=True)
    first, second = keys_of(ld), keys_of(ld)
    assert ld.epoch == 2
    assert second == keys_of(build_train_loader(cfg, epoch=1, with_keys=True)) != first
    ld.set_epoch(0)
    assert keys_of(ld) == first


def test_zero_workers_equals_one_worker(uneven):
    root, _ = uneven
    k0 = keys_of(build_train_loader(shard_cfg(root, workers=0), epoch=1, with_keys=True))
    k1 = keys_of(build_train_loader(shard_cfg(root, workers=1), epoch=1, with_keys=True))
    assert k0 == k1


def test_epoch_samples_and_resampled_mode(uneven):
    root, all_keys = uneven
    cfg = shard_cfg(root, workers=0, batch=4)
    cfg.data.epoch_samples = 20
    lds = [build_train_loader(cfg, r, 2) for r in range(2)]
    assert [len(ld) for ld in lds] == [5, 5]  # ceil(20 / (2 replicas × micro-batch 2))
    cfg.data.resampled = True
    ld = build_train_loader(cfg, 1, 2, epoch=0, with_keys=True)
    keys = keys_of(ld)
    assert len(keys) == len(ld) * 2 == 10 and set(keys) <= set(all_keys)
    assert keys == keys_of(build_train_loader(cfg, 1, 2, epoch=0, with_keys=True))
    assert keys != keys_of(build_train_loader(cfg, 1, 2, epoch=1, with_keys=True))


def test_eval_loader_disjoint_parts_partial_last_batch(uneven):
    root, _ = uneven
    cfg = shard_cfg(root, workers=2, batch=6)  # val: 13 samples
    parts = []
    for r in range(2):
        ld = build_eval_loader(cfg, r, 2, micro_batch=3, with_keys=True)
        batches = list(ld)
        assert len(batches) == len(ld)
        sizes = [len(b[1]) for b in batches]
        assert sizes[:-1] == [3] * (len(sizes) - 1) and 0 < sizes[-1] <= 3
        parts.append([k for b in batches for k in b[2]])
        assert batches[0][0].shape[1:] == (3, 32, 32)
    assert not set(parts[0]) & set(parts[1])
    assert len(parts[0]) + len(parts[1]) == 13
    assert parts[0] + parts[1] == [f"val-s{s}-{i}" for s, n in enumerate([4, 7, 2]) for i in range(n)]
    again = [k for b in build_eval_loader(cfg, 0, 2, micro_batch=3, with_keys=True) for k in b[2]]
    assert again == parts[0]


def test_pipe_sources_stream_like_files(uneven):
    root, all_keys = uneven
    cfg = shard_cfg(root, workers=2, batch=8)
    cfg.data.train = f"pipe:cat {root}/train-{{000000..000004}}.tar"
    piped = keys_of(build_train_loader(cfg, epoch=1, with_keys=True))
    cfg.data.train = str(root / "train-{000000..000004}.tar")
    assert piped == keys_of(build_train_loader(cfg, epoch=1, with_keys=True))
    assert sorted(piped) == sorted(all_keys)


def test_batch_multiple_rounds_epochs_to_whole_steps(uneven):
    root, all_keys = uneven
    cfg = shard_cfg(root, workers=0, batch=10)  # 32 samples / micro 5 over 2 replicas: 4 batches each
    lds = [build_train_loader(cfg, r, 2, micro_batch=5, batch_multiple=3, with_keys=True) for r in range(2)]
    assert [len(ld) for ld in lds] == [6, 6]
    seen = [k for ld in lds for k in keys_of(ld)]
    assert len(seen) == 60 and set(seen) == set(all_keys)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("replicas,micro,workers", [(1, 3, 1), (2, 5, 2), (3, 2, 1), (4, 1, 3)])
def test_batch_multiple_gives_whole_steps_with_every_sample(uneven, replicas, micro, workers, m):
    """Any M: whole optimizer steps, the same on every replica, every sample at least once and
    fewer than replicas × M × micro seen twice (also where M does not divide a replica's share)."""
    root, all_keys = uneven
    cfg = shard_cfg(root, workers=workers)
    lds = [build_train_loader(cfg, r, replicas, epoch=2, micro_batch=micro, batch_multiple=m) for r in range(replicas)]
    share = -(-len(all_keys) // (replicas * micro))  # batches per replica without rounding
    n = len(lds[0])
    assert all(len(ld) == n for ld in lds) and n % m == 0 and share <= n < share + m
    seen = Counter(k for ld in lds for ks in worker_keys(ld, workers) for k in ks)
    assert set(seen) == set(all_keys)
    assert sum(seen.values()) == replicas * n * micro and sum(seen.values()) - len(all_keys) < replicas * m * micro
    assert max(seen.values()) <= 1 + (replicas * n * micro - 1) // len(all_keys)


def test_batch_multiple_not_dividing_the_share_through_the_dataloader(uneven):
    root, all_keys = uneven
    cfg = shard_cfg(root, workers=2)
    lds = [build_train_loader(cfg, r, 2, micro_batch=3, batch_multiple=4, with_keys=True) for r in range(2)]
    assert [len(ld) for ld in lds] == [8, 8]  # ceil(32 / 6) = 6 batches, rounded up to 2 steps of 4
    seen = Counter(k for ld in lds for k in keys_of(ld))
    assert set(seen) == set(all_keys) and sum(seen.values()) == 48
