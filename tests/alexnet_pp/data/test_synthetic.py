"""The embedded dataset and ensure_dataset: determinism, disjoint splits, reuse, regeneration."""

import json

import numpy as np
import pytest

from alexnet_pp.config import preset
from alexnet_pp.data import build_eval_loader, build_train_loader, ensure_dataset
from alexnet_pp.data import synthetic


def small_cfg(tmp_path, classes=4, train=12, val=4, stored=40, image=32):
    cfg = preset("test")
    cfg.model.num_classes = classes
    cfg.model.image_size = image
    d = cfg.data
    d.synthetic_dir = str(tmp_path / "syn")
    d.synthetic_classes, d.synthetic_train_per_class, d.synthetic_val_per_class = classes, train, val
    d.stored_size, d.workers, d.shuffle_buffer = stored, 0, 16
    cfg.train.batch_size = 8
    return cfg


def test_images_are_a_pure_function_of_seed_split_index():
    a, la = synthetic.make_image(3, "train", 17, 10, 48)
    b, lb = synthetic.make_image(3, "train", 17, 10, 48)
    c, _ = synthetic.make_image(3, "val", 17, 10, 48)
    d, _ = synthetic.make_image(4, "train", 17, 10, 48)
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    assert la == lb == 17 % 10
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)


def test_thousand_classes_are_distinct_combinations():
    parts = {synthetic.class_parts(c) for c in range(synthetic.MAX_CLASSES)}
    assert len(parts) == 1000
    names = synthetic.class_names(1000)
    assert len(set(names)) == 1000
    # few classes differ in shape, colour and texture at once
    small = [synthetic.class_parts(c) for c in range(10)]
    for k in range(3):
        assert len({p[k] for p in small}) == 10
    with pytest.raises(ValueError):
        synthetic.class_names(1001)


def test_classes_differ_on_average():
    # mean colour of class 0 (red) and class 7 (blue) images must differ clearly
    red = np.mean([synthetic.make_image(0, "train", i * 10, 10, 40)[0].reshape(-1, 3).mean(0) for i in range(6)], 0)
    blue = np.mean([synthetic.make_image(0, "train", i * 10 + 7, 10, 40)[0].reshape(-1, 3).mean(0) for i in range(6)], 0)
    assert red[0] - red[2] > blue[0] - blue[2] + 10


def test_ensure_dataset_generates_reuses_and_regenerates(tmp_path):
    cfg = small_cfg(tmp_path)
    info = ensure_dataset(cfg)
    assert info.synthetic and info.num_classes == 4
    assert (info.train_samples, info.val_samples) == (48, 16)
    root = tmp_path / "syn"
    man = json.loads((root / "train-manifest.json").read_text())
    assert man["complete"] and man["total"] == 48 and sum(e["count"] for e in man["shards"]) == 48
    assert json.loads((root / "classes.json").read_text()) == synthetic.class_names(4)
    assert not list(root.glob("*.tmp"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in root.glob("*.tar")}
    info2 = ensure_dataset(cfg)  # reused: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in root.glob("*.tar")} == mtimes
    assert info2.train_shards == info.train_shards
    cfg.data.synthetic_train_per_class = 6  # different parameters: regenerated
    info3 = ensure_dataset(cfg)
    assert info3.train_samples == 24 and info3.val_samples == 16


def test_loaders_shapes_and_learnable_labels(tmp_path):
    cfg = small_cfg(tmp_path)
    loader = build_train_loader(cfg)
    assert len(loader) == 6  # 48 samples / batch 8
    seen = 0
    for images, labels in loader:
        assert images.shape == (8, 3, 32, 32) and str(images.dtype) == "torch.float32"
        assert str(labels.dtype) == "torch.int64" and int(labels.max()) < 4
        seen += 8
    assert seen == 48
    ev = list(build_eval_loader(cfg))
    assert sum(len(lab) for _, lab in ev) == 16
