"""Decoding and augmentation on uint8 HWC arrays, then one fused normalise step per batch.

Decoding uses simplejpeg (libjpeg-turbo straight into a numpy array) with exact DCT and
upsampling: 290 µs against Pillow's 440 µs per 256×256 JPEG on this machine, pixel-identical
(benchmarks/data_bench.py prints the comparison). Its fastdct/fastupsample options were no faster
here and move chroma edges by up to 77 levels, so they stay off. Other formats (PNG, CMYK JPEG)
fall back to Pillow.

Crops and flips are numpy views; the paper's PCA lighting noise adds one RGB offset per image,
so lighting and normalisation fold into a per-image, per-channel `x * scale + bias`.
"""

from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np
import torch

try:
    import simplejpeg
except ImportError:  # pragma: no cover - Pillow alone still works
    simplejpeg = None
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# ImageNet RGB covariance (pixels in [0, 1]): eigenvalues and eigenvectors (columns), as used with
# AlexNet-style lighting noise (fb.resnet.torch)
EIGVAL = np.array([0.2175, 0.0188, 0.0045], dtype=np.float32)
EIGVEC = np.array(
    [[-0.5675, 0.7192, 0.4009],
     [-0.5808, -0.0045, -0.8140],
     [-0.5836, -0.6948, 0.4203]],
    dtype=np.float32,
)
JPEG_EXTS = ("jpg", "jpeg")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")


class DecodeError(ValueError):
    pass


def _pil_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def decode(data: bytes, ext: str = "jpg") -> np.ndarray:
    """uint8 H×W×3 RGB; raises DecodeError for bytes that are no image."""
    try:
        if simplejpeg is not None and ext in JPEG_EXTS:
            try:
                return simplejpeg.decode_jpeg(data, colorspace="RGB")
            except ValueError:
                pass  # e.g. CMYK or progressive oddities: let Pillow try
        return _pil_decode(data)
    except Exception as e:  # Pillow raises many kinds for garbage
        raise DecodeError(str(e) or type(e).__name__) from None


def fit_min_side(img: np.ndarray, side: int) -> np.ndarray:
    """Upscale so the shorter side is at least `side` (shards of smaller images still work)."""
    h, w = img.shape[:2]
    if min(h, w) >= side:
        return img
    s = side / min(h, w)
    nh, nw = max(side, round(h * s)), max(side, round(w * s))
    return np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))


class SampleRandom:
    """Augmentation draws that are a function of the sample, not of the batch it lands in: for the
    sample at epoch position `pos`, a Philox stream keyed by (seed, epoch, pos). So a replica's
    stream augments every image the same way whatever its micro-batch size (every pipeline layout
    sees the single-process trainer's crops), and a resumed epoch draws what a full one would. One
    generator is re-keyed per sample (~9 µs, against ~300 µs to decode the image)."""

    def __init__(self, seed: int, epoch: int):
        self.key0 = np.uint64(((seed & 0xFFFFFFFF) << 32) | (epoch & 0xFFFFFFFF))
        self.bits = np.random.Philox(0)
        self.gen = np.random.Generator(self.bits)
        self._zeros = np.zeros(4, np.uint64)

    def at(self, pos: int) -> np.random.Generator:
        self.bits.state = {"bit_generator": "Philox",
                           "state": {"counter": self._zeros.copy(), "key": np.array([self.key0, pos], np.uint64)},
                           "buffer": self._zeros.copy(), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0}
        return self.gen


def random_crop(img: np.ndarray, side: int, rng: np.random.Generator, flip: bool) -> np.ndarray:
    h, w = img.shape[:2]
    y = int(rng.integers(h - side + 1))
    x = int(rng.integers(w - side + 1))
    crop = img[y : y + side, x : x + side]
    if flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    return crop


def center_crop(img: np.ndarray, side: int) -> np.ndarray:
    h, w = img.shape[:2]
    y, x = (h - side) // 2, (w - side) // 2
    return img[y : y + side, x : x + side]


def ten_crop(img: np.ndarray, side: int) -> list[np.ndarray]:
    """Top-left, top-right, bottom-left, bottom-right, centre; then each of them flipped."""
    h, w = img.shape[:2]
    five = [img[:side, :side], img[:side, w - side :], img[h - side :, :side], img[h - side :, w - side :],
            center_crop(img, side)]
    return five + [c[:, ::-1] for c in five]


def lighting_offset(rng: np.random.Generator, std: float) -> np.ndarray:
    """The paper's PCA colour noise: RGB offset (pixel units in [0, 1]) = V · (α ∘ λ), α ~ N(0, std)."""
    if std <= 0:
        return np.zeros(3, dtype=np.float32)
    alpha = rng.normal(0.0, std, size=3).astype(np.float32)
    return EIGVEC @ (alpha * EIGVAL)


def normalise(crops: Sequence[np.ndarray], offsets: Optional[np.ndarray] = None, shared: bool = False) -> torch.Tensor:
    """uint8 H×W×3 crops (+ per-image RGB offsets N×3 in [0,1] units) → float32 N×3×H×W,
    ((x / 255 + offset) - mean) / std. Per image: one uint8 transpose to planar, then one
    multiply and one add in float; about 3× faster here than a permuted torch copy + mul_ + add_.
    With `shared` the result is allocated in shared memory (a DataLoader worker then sends it
    without another copy)."""
    n = len(crops)
    h, w = crops[0].shape[:2]
    out = torch.empty((n, 3, h, w), dtype=torch.float32)
    if shared:
        out.share_memory_()
    buf = out.numpy()
    planar = np.empty((3, h, w), dtype=np.uint8)
    scale = (1.0 / (255.0 * STD)).reshape(3, 1, 1)
    bias = np.broadcast_to(-MEAN / STD, (n, 3)).copy()
    if offsets is not None:
        bias += np.asarray(offsets, dtype=np.float32) / STD
    bias = bias.astype(np.float32).reshape(n, 3, 1, 1)
    for i, c in enumerate(crops):
        planar[...] = c.transpose(2, 0, 1)
        np.multiply(planar, scale, out=buf[i])
        buf[i] += bias[i]
    return out
