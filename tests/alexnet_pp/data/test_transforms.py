"""Decoding, crops, flips, PCA lighting noise and normalisation: exact pixels where noise is off."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_pp.config import preset
from alexnet_pp.data import build_eval_loader, build_train_loader
from alexnet_pp.data import transforms as T
from alexnet_pp.data.shards import Encoded, write_split

from shardsets import jpeg_bytes

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def textured(seed, size):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def expected(img):
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(T.MEAN).view(3, 1, 1)) / torch.tensor(T.STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("tf")
    data = {i: jpeg_bytes(textured(i, 40), quality=90) for i in range(12)}

    def enc(i):
        return Encoded(index=i, key=f"k{i:02d}", data=data[i], label=i % 4)

    write_split(r, "train", 12, enc, {"t": 1}, max_count=5)
    write_split(r, "val", 6, enc, {"t": 1}, max_count=5)
    return r, {f"k{i:02d}": T.decode(d) for i, d in data.items()}


def cfg_for(root, image, **data):
    cfg = preset("test")
    cfg.model.image_size, cfg.model.num_classes = image, 4
    cfg.data.train = cfg.data.val = str(root)
    cfg.data.stored_size, cfg.data.workers = 40, 0
    for k, v in data.items():
        setattr(cfg.data, k, v)
    cfg.train.batch_size = 4
    return cfg


def test_decoders_agree_and_fall_back_to_pillow():
    img = textured(1, 24)
    jpg = jpeg_bytes(img)
    with Image.open(io.BytesIO(jpg)) as im:
        assert np.array_equal(T.decode(jpg), np.asarray(im.convert("RGB")))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    assert np.array_equal(T.decode(buf.getvalue(), "png"), img)
    buf = io.BytesIO()
    Image.fromarray(img[..., 0]).save(buf, "JPEG")  # greyscale JPEG → 3 channels
    assert T.decode(buf.getvalue()).shape == (24, 24, 3)
    with pytest.raises(T.DecodeError):
        T.decode(b"\xff\xd8 garbage")


def test_noise_off_gives_exact_pixels(root):
    r, decoded = root
    # training crop = the whole stored image when the sizes match; no flip, no noise
    for images, labels, keys in build_train_loader(cfg_for(r, 40, color_noise=0.0, flip=False), with_keys=True):
        for img, key in zip(images, keys):
            assert torch.allclose(img, expected(decoded[key]), atol=1e-5)
    for images, labels, keys in build_eval_loader(cfg_for(r, 32), with_keys=True):
        for img, key in zip(images, keys):
            assert torch.allclose(img, expected(decoded[key][4:36, 4:36]), atol=1e-5)


def test_random_crops_flips_and_lighting_noise(root):
    r, decoded = root
    flips = 0
    for images, _, keys in build_train_loader(cfg_for(r, 40, color_noise=0.0, flip=True), with_keys=True):
        for img, key in zip(images, keys):
            plain = expected(decoded[key])
            assert torch.allclose(img, plain, atol=1e-5) or torch.allclose(img, plain.flip(-1), atol=1e-5)
            flips += not torch.allclose(img, plain, atol=1e-5)
    assert 0 < flips < 12
    # lighting: one RGB offset per image, the same at every pixel, along the PCA basis
    for images, _, keys in build_train_loader(cfg_for(r, 40, color_noise=0.5, flip=False), with_keys=True):
        for img, key in zip(images, keys):
            diff = (img - expected(decoded[key])) * torch.tensor(T.STD).view(3, 1, 1)
            offset = diff.mean(dim=(1, 2))
            assert torch.allclose(diff, offset.view(3, 1, 1).expand_as(diff), atol=1e-4)
            alpha_lambda = np.linalg.solve(T.EIGVEC, offset.numpy())
            assert np.abs(alpha_lambda / T.EIGVAL).max() < 5 * 0.5 and np.abs(offset.numpy()).max() > 1e-4
    # random crops land anywhere
    corners = set()
    for images, _, keys in build_train_loader(cfg_for(r, 32, color_noise=0.0, flip=False), with_keys=True):
        for img, key in zip(images, keys):
            full = expected(decoded[key])
            hits = [(y, x) for y in range(9) for x in range(9)
                    if torch.allclose(img, full[:, y:y + 32, x:x + 32], atol=1e-5)]
            assert len(hits) == 1
            corners.add(hits[0])
    assert len(corners) > 3


def test_ten_crop_shapes_and_content(root):
    r, decoded = root
    img = textured(3, 40)
    crops = T.ten_crop(img, 32)
    assert [c.shape for c in crops] == [(32, 32, 3)] * 10
    assert np.array_equal(crops[0], img[:32, :32]) and np.array_equal(crops[3], img[8:, 8:])
    assert np.array_equal(crops[1], img[:32, 8:]) and np.array_equal(crops[2], img[8:, :32])
    assert np.array_equal(crops[4], img[4:36, 4:36])
    for i in range(5):
        assert np.array_equal(crops[5 + i], crops[i][:, ::-1])
    batches = list(build_eval_loader(cfg_for(r, 32, eval_crops=10), with_keys=True))
    assert [b[0].shape for b in batches] == [(4, 10, 3, 32, 32), (2, 10, 3, 32, 32)]
    for images, _, keys in batches:
        for img10, key in zip(images, keys):
            assert torch.allclose(img10[4], expected(decoded[key][4:36, 4:36]), atol=1e-5)
            for i in range(5):
                assert torch.equal(img10[5 + i], img10[i].flip(-1))


def test_small_images_are_upscaled_to_the_crop():
    small = textured(5, 20)
    out = T.fit_min_side(small, 32)
    assert out.shape == (32, 32, 3)
    assert T.fit_min_side(textured(5, 50), 32).shape == (50, 50, 3)
