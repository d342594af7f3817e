"""Decoding, augmentation draws and normalisation constants for uint8 H×W×3 images.

Decoding uses simplejpeg (libjpeg-turbo straight into a numpy array) with exact DCT and
upsampling: 290 µs against Pillow's 440 µs per 256×256 JPEG on this machine, pixel-identical
(benchmarks/data_bench.py prints the comparison). Its fastdct/fastupsample options were no faster
here and move chroma edges by up to 77 levels, so they stay off. Other formats (PNG, CMYK JPEG)
fall back to Pillow.

An image's augmentation is a `Draw` (crop corner, flip, PCA lighting offset) taken from the
sample's own generator (`SampleRandom`); the paper's PCA lighting noise adds one RGB offset per
image, so lighting and normalisation fold into a per-image, per-channel `x * scale + bias`
(`scale_bias`). The loader applies a draw in one pass per image (native.crop_into, straight into
the batch); `augment.py` applies the same draws with torch ops on any device. `normalise` is the
numpy reference both are tested against.

Raw shards (`data ingest --format raw`) store `{key}.npy`: the uint8 H×W×3 pixels in numpy's
format, read without decoding.
"""

from __future__ import annotations

import ast
import functools
import io
from typing import NamedTuple, Optional, Sequence

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
RAW_EXTS = ("npy",)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "npy")


class DecodeError(ValueError):
    pass


def _pil_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@functools.lru_cache(maxsize=64)
def _npy_shape(header: bytes) -> tuple[int, ...]:
    h = ast.literal_eval(header.decode("latin1"))
    shape = tuple(h["shape"])
    if np.dtype(h["descr"]) != np.uint8 or h["fortran_order"] or len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"not uint8 H×W×3 pixels: {h}")
    return shape


def decode_raw(data: bytes) -> np.ndarray:
    """A `.npy` member holding uint8 H×W×3 pixels, as a read-only array over the bytes (no copy);
    the header is parsed once per distinct header (they repeat in a shard set of one size)."""
    try:
        if data[:6] != b"\x93NUMPY":
            raise ValueError("not a .npy member")
        wide = data[6] >= 2
        start = (12 if wide else 10) + int.from_bytes(data[8:12] if wide else data[8:10], "little")
        shape = _npy_shape(bytes(data[12 if wide else 10:start]))
        if len(data) - start != shape[0] * shape[1] * 3:
            raise ValueError(f"{len(data) - start} bytes of pixels for {shape}")
        return np.frombuffer(data, np.uint8, offset=start).reshape(shape)
    except Exception as e:
        raise DecodeError(f"bad .npy member: {e}") from None


def decode(data: bytes, ext: str = "jpg") -> np.ndarray:
    """uint8 H×W×3 RGB; raises DecodeError for bytes that are no image."""
    if ext in RAW_EXTS:
        return decode_raw(data)
    try:
        if simplejpeg is not None and ext in JPEG_EXTS:
            try:
                return simplejpeg.decode_jpeg(data, colorspace="RGB")
            except ValueError:
                pass  # e.g. CMYK or progressive oddities: let Pillow try
        return _pil_decode(data)
    except Exception as e:  # Pillow raises many kinds for garbage
        raise DecodeError(str(e) or type(e).__name__) from None


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) from a JPEG's header, without decoding it; DecodeError when unreadable."""
    try:
        if simplejpeg is not None:
            try:
                h, w = simplejpeg.decode_jpeg_header(data)[:2]
                return int(h), int(w)
            except ValueError:
                pass
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                raise ValueError(f"{im.format}, not JPEG")
            w, h = im.size
            return h, w
    except Exception as e:
        raise DecodeError(str(e) or type(e).__name__) from None


def fitted_size(h: int, w: int, side: int) -> tuple[int, int]:
    """(height, width) of an h×w image after fit_min_side."""
    if min(h, w) >= side:
        return h, w
    s = side / min(h, w)
    return max(side, round(h * s)), max(side, round(w * s))


def fit_min_side(img: np.ndarray, side: int) -> np.ndarray:
    """Upscale so the shorter side is at least `side` (shards of smaller images still work)."""
    h, w = img.shape[:2]
    nh, nw = fitted_size(h, w, side)
    if (nh, nw) == (h, w):
        return img
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


class Draw(NamedTuple):
    """One image's augmentation: the crop's top-left corner, a horizontal flip, and the PCA
    lighting offset (RGB, pixel units in [0, 1])."""

    y: int
    x: int
    flip: bool
    offset: np.ndarray


def draw(rng: np.random.Generator, h: int, w: int, side: int, flip: bool, color_noise: float) -> Draw:
    """The training draws for an h×w image (after fit_min_side), in the generator's order:
    crop row, crop column, flip (only when flips are on), lighting noise."""
    y = int(rng.integers(h - side + 1))
    x = int(rng.integers(w - side + 1))
    f = bool(flip and rng.random() < 0.5)
    return Draw(y, x, f, lighting_offset(rng, color_noise))


def center_box(h: int, w: int, side: int) -> tuple[int, int]:
    return (h - side) // 2, (w - side) // 2


def ten_boxes(h: int, w: int, side: int) -> list[tuple[int, int, bool]]:
    """(y, x, flip) of ten_crop's crops, in its order."""
    five = [(0, 0), (0, w - side), (h - side, 0), (h - side, w - side), center_box(h, w, side)]
    return [(y, x, False) for y, x in five] + [(y, x, True) for y, x in five]


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


def scale_bias(offsets: Optional[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 scale (3,) and bias (n, 3) of `x * scale + bias` = ((x / 255 + offset) - mean) / std,
    rounded the way every path (numpy, the C kernel, torch on any device) uses them."""
    scale = (1.0 / (255.0 * STD)).astype(np.float32)
    bias = np.broadcast_to(-MEAN / STD, (n, 3)).copy()
    if offsets is not None:
        bias += np.asarray(offsets, dtype=np.float32) / STD
    return scale, bias.astype(np.float32)


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
    scale, bias = scale_bias(offsets, n)
    scale, bias = scale.reshape(3, 1, 1), bias.reshape(n, 3, 1, 1)
    for i, c in enumerate(crops):
        planar[...] = c.transpose(2, 0, 1)
        np.multiply(planar, scale, out=buf[i])
        buf[i] += bias[i]
    return out
