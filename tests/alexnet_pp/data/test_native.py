"""The crop kernel: bit for bit the numpy reference (transforms.normalise), flipped or not."""

import numpy as np
import pytest
import torch

from alexnet_pp.data import native
from alexnet_pp.data import transforms as T


def image(seed, h, w):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_the_kernel_builds_here():
    assert native.available(), native.last_error()


@pytest.mark.parametrize("flip", [False, True])
def test_float_crops_equal_the_numpy_reference_bit_for_bit(flip):
    rng = np.random.default_rng(1)
    imgs = [image(i, 37 + i, 41 + 2 * i) for i in range(6)]
    offsets = rng.normal(0, 0.05, size=(6, 3)).astype(np.float32)
    side = 29
    boxes = [(int(rng.integers(img.shape[0] - side + 1)), int(rng.integers(img.shape[1] - side + 1))) for img in imgs]
    crops = [img[y:y + side, x:x + side][:, ::-1] if flip else img[y:y + side, x:x + side]
             for img, (y, x) in zip(imgs, boxes)]
    ref = T.normalise(crops, offsets).numpy()
    scale, bias = T.scale_bias(offsets, 6)
    for use_kernel in (True, False):
        out = np.full((6, 3, side, side), np.nan, np.float32)
        for i, (img, (y, x)) in enumerate(zip(imgs, boxes)):
            if use_kernel:
                native.crop_into(img, y, x, side, flip, out[i], scale, bias[i])
            else:
                native._crop_numpy(img, y, x, side, flip, out[i], scale, bias[i])
        assert np.array_equal(out, ref), use_kernel


@pytest.mark.parametrize("flip", [False, True])
def test_uint8_crops_are_the_pixels(flip):
    img = image(3, 50, 60)
    out = np.zeros((32, 32, 3), np.uint8)
    native.crop_into(img, 7, 11, 32, flip, out)
    want = img[7:39, 11:43]
    assert np.array_equal(out, want[:, ::-1] if flip else want)


def test_bad_boxes_and_rows_are_refused():
    img = image(4, 40, 40)
    with pytest.raises(ValueError, match="crop"):
        native.crop_into(img, 9, 0, 32, False, np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 crop"):
        native.crop_into(img, 0, 0, 32, False, np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="float crop"):
        native.crop_into(img, 0, 0, 32, False, np.zeros((3, 32, 32), np.float32))


def test_a_non_contiguous_row_takes_the_numpy_path():
    img = image(5, 40, 40)
    out = np.zeros((2, 32, 32, 3), np.uint8)[:, :, :, :]
    view = out.transpose(0, 2, 1, 3)[0]  # not C-contiguous
    native.crop_into(img, 1, 2, 32, True, view)
    assert np.array_equal(view, img[1:33, 2:34][:, ::-1])
    assert torch.equal(torch.from_numpy(out[0].transpose(1, 0, 2).copy()), torch.from_numpy(img[1:33, 2:34][:, ::-1].copy()))
