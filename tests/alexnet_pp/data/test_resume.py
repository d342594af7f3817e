"""Starting an epoch at batch k (resuming mid-epoch): the full epoch's tail, without decoding the head."""

import pytest
import torch

from alexnet_pp.config import preset
from alexnet_pp.data import build_eval_loader, build_train_loader
from alexnet_pp.data import transforms as T
from alexnet_pp.data.tarstream import iter_samples

from shardsets import make_shards

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

COUNTS = [7, 6, 9, 5, 8]  # 35 samples
DEFECTS = {  # decode failures and tar-level skips, early and late in the shards
    "train-s0-1": "garbage_jpg", "train-s1-4": "garbage_jpg", "train-s2-0": "garbage_jpg",
    "train-s3-2": "garbage_jpg", "train-s4-6": "garbage_jpg", "train-s2-5": "bad_cls", "train-s4-1": "missing_cls",
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("resume")
    make_shards(r, "train", COUNTS, size=40, corrupt=DEFECTS)
    make_shards(r, "val", [5], size=40)
    return r


def cfg_for(root, workers=0, resampled=False):
    cfg = preset("test")
    cfg.model.image_size, cfg.model.num_classes = 32, 10
    d = cfg.data
    d.train = d.val = str(root)
    d.stored_size, d.workers, d.shuffle_buffer, d.color_noise = 40, workers, 5, 0.1
    if resampled:
        d.resampled, d.epoch_samples = True, 30
    cfg.train.batch_size, cfg.train.seed = 6, 3
    return cfg


def same(a, b):
    return len(a) == len(b) and all(
        x[2] == y[2] and torch.equal(x[1], y[1]) and torch.equal(x[0], y[0]) for x, y in zip(a, b))


@pytest.mark.parametrize("resampled", [False, True])
def test_tail_equals_the_full_epoch_bit_for_bit(root, resampled):
    cfg = cfg_for(root, resampled=resampled)
    full = list(build_train_loader(cfg, 1, 2, epoch=4, with_keys=True))
    assert len(full) == (5 if resampled else 6)
    for k in range(len(full) + 1):
        ld = build_train_loader(cfg, 1, 2, epoch=4, with_keys=True)
        assert same(list(ld.iter_from(k)), full[k:]), k
        assert ld.epoch == 5


@pytest.mark.parametrize("workers,starts", [(2, [1, 2, 5]), (3, [1, 4])])
def test_tail_with_dataloader_workers(root, workers, starts):
    cfg = cfg_for(root, workers=workers)
    full = list(build_train_loader(cfg, 0, 2, epoch=1, with_keys=True))
    for k in starts:
        assert same(list(build_train_loader(cfg, 0, 2, epoch=1, with_keys=True).iter_from(k)), full[k:]), k


def test_skipped_batches_are_never_decoded(root, monkeypatch):
    cfg = cfg_for(root)
    key_of = {m["jpg"]: key for u in sorted(root.glob("train-*.tar")) for _, key, m in iter_samples(str(u))
              if "jpg" in m}
    full = list(build_train_loader(cfg, 0, 2, epoch=2, with_keys=True))
    decoded = []
    real = T.decode

    def counting(data, ext="jpg"):
        decoded.append(key_of[data])
        return real(data, ext)

    monkeypatch.setattr(T, "decode", counting)
    k = 4
    tail = list(build_train_loader(cfg, 0, 2, epoch=2, with_keys=True).iter_from(k))
    assert same(tail, full[k:])
    head_only = {key for b in full[:k] for key in b[2]} - {key for b in full[k:] for key in b[2]}
    assert head_only and not head_only & set(decoded)
    good = [key for key in decoded if key not in DEFECTS]
    assert len(good) == sum(len(b[2]) for b in tail)  # one decode per sample yielded, none for the head
    decoded.clear()
    list(build_train_loader(cfg, 0, 2, epoch=2).iter_from(0))
    assert len([key for key in decoded if key not in DEFECTS]) == sum(len(b[2]) for b in full)


def test_next_epoch_after_a_resumed_one_is_whole(root):
    cfg = cfg_for(root)
    ld = build_train_loader(cfg, 0, 2, epoch=0, with_keys=True)
    list(ld.iter_from(3))
    assert same(list(ld), list(build_train_loader(cfg, 0, 2, epoch=1, with_keys=True)))


def test_start_batch_bounds(root):
    cfg = cfg_for(root)
    ld = build_train_loader(cfg, 0, 2)
    with pytest.raises(ValueError, match="start batch"):
        list(ld.iter_from(len(ld) + 1))
    with pytest.raises(ValueError, match="evaluation"):
        list(build_eval_loader(cfg).iter_from(1))
