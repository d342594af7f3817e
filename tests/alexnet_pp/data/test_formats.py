"""Stored image formats: `--format raw` shards hold the pixels ingest would have compressed, and
the loaders read them without decoding, to the same images as their pixels give."""

import argparse
import copy

import numpy as np
import pytest
import torch
import webdataset as wds

from alexnet_pp.config import preset
from alexnet_pp.data import build_eval_loader, build_train_loader
from alexnet_pp.data import transforms as T
from alexnet_pp.data.commands import register
from alexnet_pp.data.formats import encode_image
from alexnet_pp.data.ingest import load_image
from alexnet_pp.data.shards import read_manifest
from alexnet_pp.data.tarstream import iter_samples

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def run(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from PIL import Image

    src = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(3)
    for c, name in enumerate(["a", "b"]):
        d = src / "train" / name
        d.mkdir(parents=True)
        for i in range(5):
            img = rng.integers(0, 256, (48 + 8 * i, 40, 3), dtype=np.uint8)
            Image.fromarray(img).save(d / f"{i}.jpg", quality=95)
    return src


def test_raw_member_round_trip_and_bad_members():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    data, ext = encode_image(img, "raw")
    assert ext == "npy" and np.array_equal(T.decode(data, "npy"), img)
    assert np.array_equal(np.load(__import__("io").BytesIO(data)), img)  # numpy's own format
    for bad in (data[:-1], b"\x93NUMPY garbage", encode_image(img, "jpeg")[0], _npy(img.astype(np.float32)),
                _npy(img[..., 0])):
        with pytest.raises(T.DecodeError):
            T.decode(bad, "npy")
    with pytest.raises(ValueError, match="not one of"):
        encode_image(img, "png")


def _npy(a):
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_ingest_raw_stores_the_pixels_and_the_loaders_read_them(tree, tmp_path):
    raw, jpeg = tmp_path / "raw", tmp_path / "jpeg"
    common = ["--size", "32", "--workers", "1", "--quiet", "--shard-samples", "4"]
    assert run(["data", "ingest", str(tree), str(raw), "--format", "raw"] + common) == 0
    assert run(["data", "ingest", str(tree), str(jpeg)] + common) == 0
    assert read_manifest(raw, "train")["params"]["format"] == "raw"
    index = {k: rel for k, _, rel in (l.split("\t") for l in (raw / "train-index.tsv").read_text().splitlines())}
    pixels = {}
    for e in read_manifest(raw, "train")["shards"]:
        for _, key, m in iter_samples(str(raw / e["name"])):
            assert set(m) == {"npy", "cls"}
            pixels[key] = T.decode(m["npy"], "npy")
            assert np.array_equal(pixels[key], load_image(tree / "train" / index[key], 32))
    assert len(pixels) == 10
    # webdataset's own decoders read the members as numpy arrays too
    ds = wds.WebDataset(str(raw / "train-{000000..000002}.tar"), shardshuffle=False, empty_check=False).decode()
    assert all(np.array_equal(s["npy"], pixels[s["__key__"]]) for s in ds)
    # the loader: same samples and draws as on the JPEG shards; pixels are the stored ones
    cfg = preset("test")
    cfg.model.image_size, cfg.model.num_classes = 28, 2
    d = cfg.data
    d.train = d.val = str(raw)
    d.stored_size, d.workers, d.color_noise, d.flip = 32, 0, 0.0, False
    cfg.train.batch_size = 5
    cfg_jpeg = copy.deepcopy(cfg)
    cfg_jpeg.data.train = cfg_jpeg.data.val = str(jpeg)
    n = 0
    for (x, _, keys), (_, _, keys_jpeg) in zip(build_train_loader(cfg, with_keys=True),
                                                build_train_loader(cfg_jpeg, with_keys=True)):
        assert keys == keys_jpeg
        for img, key in zip(x, keys):
            full = torch.from_numpy(pixels[key].copy()).permute(2, 0, 1).float() / 255
            full = (full - torch.from_numpy(T.MEAN).view(3, 1, 1)) / torch.from_numpy(T.STD).view(3, 1, 1)
            assert any(torch.allclose(img, full[:, y:y + 28, x0:x0 + 28], atol=1e-5) for y in range(5) for x0 in range(5))
            n += 1
    assert n == 10


def test_synth_raw(tmp_path):
    out = tmp_path / "syn"
    assert run(["data", "synth", str(out), "--classes", "2", "--train-per-class", "3", "--val-per-class", "1",
                "--size", "20", "--format", "raw", "--workers", "1", "--quiet"]) == 0
    (_, key, members), *_ = iter_samples(str(out / "train-000000.tar"))
    assert T.decode(members["npy"], "npy").shape == (20, 20, 3)
    cfg = preset("test")
    cfg.model.image_size, cfg.model.num_classes = 16, 2
    cfg.data.train = cfg.data.val = str(out)
    cfg.data.stored_size, cfg.data.workers, cfg.train.batch_size = 20, 0, 2
    assert sum(len(l) for _, l in build_eval_loader(cfg)) == 2
