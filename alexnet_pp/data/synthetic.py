"""The embedded dataset: procedurally drawn, deterministic, learnable image classes (no downloads).

A class is a combination of shape × colour family × texture (10 × 10 × 10 = up to 1000 classes).
Class c uses shape a = c % 10, colour (a + b) % 10 and texture (a + b + t) % 10 with
b = c // 10 % 10, t = c // 100: a bijection, and for K ≤ 10 classes differ in all three at once,
so a small convnet separates them within a few epochs. Within a class every image varies in
position, scale, rotation, hue, brightness, background and noise, and carries a small distractor
shape of a random kind and colour, so memorising pixels does not work.

Images are a pure function of (seed, split, index): split "train" and "val" draw from different
random streams, so the splits are disjoint. Labels are index % K (balanced, interleaved).
"""

from __future__ import annotations

import colorsys
import functools
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "ring", "crescent", "semicircle", "arrow")
COLOURS = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "blue", "purple", "magenta")
TEXTURES = ("solid", "stripes", "checker", "dots", "rings", "spokes", "radial", "speckle", "halves", "grid")
MAX_CLASSES = len(SHAPES) * len(COLOURS) * len(TEXTURES)
_SPLIT_IDS = {"train": 0, "val": 1}


def class_parts(c: int) -> tuple[int, int, int]:
    """(shape, colour, texture) indices of class c."""
    if not 0 <= c < MAX_CLASSES:
        raise ValueError(f"class {c} out of range: the embedded dataset has at most {MAX_CLASSES} classes")
    a, b, t = c % 10, c // 10 % 10, c // 100
    return a, (a + b) % 10, (a + b + t) % 10


def class_names(num_classes: int) -> list[str]:
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    out = []
    for c in range(num_classes):
        s, col, tex = class_parts(c)
        out.append(f"{COLOURS[col]}-{TEXTURES[tex]}-{SHAPES[s]}")
    return out


def label_of(index: int, num_classes: int) -> int:
    return index % num_classes


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _polygon(kind: str) -> list[tuple[float, float]]:
    """Vertices on the unit scale (radius ≈ 1) before rotation."""
    if kind == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if kind == "triangle":
        return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "hexagon":
        return [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]
    if kind == "star":
        return [((1.0 if k % 2 == 0 else 0.42) * math.cos(k * math.pi / 5 - math.pi / 2),
                 (1.0 if k % 2 == 0 else 0.42) * math.sin(k * math.pi / 5 - math.pi / 2)) for k in range(10)]
    if kind == "cross":
        w = 0.33
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                (-1, -w), (-w, -w)]
    if kind == "arrow":
        return [(-1, -0.3), (0.15, -0.3), (0.15, -0.75), (1, 0), (0.15, 0.75), (0.15, 0.3), (-1, 0.3)]
    raise KeyError(kind)


def _shape_mask(kind: str, wh: tuple[int, int], cx: float, cy: float, r: float, theta: float,
                u: np.ndarray, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """Boolean mask (of a w×h window) of a shape centred at (cx, cy) in the window, radius r,
    rotated by theta. u, v: pixel coordinates in the shape's rotated frame; d2: squared distance
    to the centre."""
    if kind == "circle":
        return d2 <= r * r
    if kind == "ring":
        return (d2 <= r * r) & (d2 >= (0.58 * r) ** 2)
    if kind == "crescent":
        return (d2 <= r * r) & ((u - 0.45 * r) ** 2 + v ** 2 >= (0.8 * r) ** 2)
    if kind == "semicircle":
        return (d2 <= r * r) & (u >= -0.1 * r)
    c, s = math.cos(theta), math.sin(theta)
    pts = [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in _polygon(kind)]
    im = Image.new("L", wh, 0)
    ImageDraw.Draw(im).polygon(pts, fill=255)
    return np.asarray(im) > 127


def _texture(kind: int, u: np.ndarray, v: np.ndarray, d2: np.ndarray, r: float, period: float,
             rng: np.random.Generator) -> np.ndarray:
    """Brightness pattern in [0, 1] attached to the shape's frame."""
    if kind == 0:  # solid
        return np.ones_like(u)
    if kind == 1:  # stripes
        return (np.floor(u / period) % 2).astype(np.float32)
    if kind == 2:  # checker
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if kind == 3:  # dots
        p = period * 1.6
        du, dv = (u % p) - p / 2, (v % p) - p / 2
        return (du * du + dv * dv > (p * 0.3) ** 2).astype(np.float32)
    if kind == 4:  # concentric rings
        return (np.floor(np.sqrt(d2) / period) % 2).astype(np.float32)
    if kind == 5:  # spokes
        return (np.floor(np.arctan2(v, u) / (math.pi / 6)) % 2).astype(np.float32)
    if kind == 6:  # radial gradient, bright centre
        return np.clip(1.0 - np.sqrt(d2) / max(r, 1e-6), 0.0, 1.0).astype(np.float32)
    if kind == 7:  # speckle
        return (rng.random(u.shape, dtype=np.float32) > 0.5).astype(np.float32)
    if kind == 8:  # two-tone halves
        return (v > 0).astype(np.float32)
    if kind == 9:  # grid lines
        g = period * 1.5
        return (((u % g) > period * 0.5) & ((v % g) > period * 0.5)).astype(np.float32)
    raise KeyError(kind)


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> np.ndarray:
    g = np.mgrid[0:size, 0:size].astype(np.float32)
    g.flags.writeable = False
    return g


def render(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One image of class `label` as uint8 size×size×3."""
    shape, colour, texture = class_parts(label)
    yy, xx = _grid(size)

    # background: a low-saturation two-colour gradient plus blotchy noise
    h0 = rng.random()
    c0 = _hsv(h0, rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.75))
    c1 = _hsv(h0 + rng.uniform(-0.3, 0.3), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.75))
    ang = rng.uniform(0, 2 * math.pi)
    g = ((xx * math.cos(ang) + yy * math.sin(ang)) / size + 1.0) / 2.0
    img = c0 * (1 - g[..., None]) + c1 * g[..., None]
    low = rng.standard_normal((size // 8 + 2, size // 8 + 2, 1), dtype=np.float32) * 14.0
    img += np.asarray(Image.fromarray(low[..., 0]).resize((size, size), Image.BILINEAR))[..., None]

    def place(kind: str, cx: float, cy: float, r: float, theta: float, fill: np.ndarray, tex: int) -> None:
        # only the shape's bounding window is computed (every shape lies within 1.2 r of its centre)
        y0, y1 = max(0, int(cy - 1.2 * r)), min(size, int(math.ceil(cy + 1.2 * r)) + 1)
        x0, x1 = max(0, int(cx - 1.2 * r)), min(size, int(math.ceil(cx + 1.2 * r)) + 1)
        period = max(2.5, size * rng.uniform(0.045, 0.065))
        if y0 >= y1 or x0 >= x1:
            return
        wy, wx = cy - y0, cx - x0
        dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
        cth, sth = math.cos(theta), math.sin(theta)
        u, v = dx * cth + dy * sth, -dx * sth + dy * cth
        d2 = dx * dx + dy * dy
        mask = _shape_mask(kind, (x1 - x0, y1 - y0), wx, wy, r, theta, u, v, d2)
        pat = _texture(tex, u, v, d2, r, period, rng)
        shade = (0.45 + 0.55 * pat)[..., None] * fill
        window = img[y0:y1, x0:x1]
        window[mask] = shade[mask]

    # distractor first, so the class shape lies on top of it
    dr = size * rng.uniform(0.08, 0.15)
    place(SHAPES[rng.integers(len(SHAPES))], rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size,
          dr, rng.uniform(0, 2 * math.pi), _hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.4, 1.0)),
          int(rng.integers(len(TEXTURES))))

    r = size * rng.uniform(0.2, 0.34)
    hue = colour / len(COLOURS) + rng.uniform(-0.02, 0.02)
    fill = _hsv(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
    place(SHAPES[shape], rng.uniform(0.36, 0.64) * size, rng.uniform(0.36, 0.64) * size, r,
          rng.uniform(0, 2 * math.pi), fill, texture)

    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(2.0, 9.0)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image(seed: int, split: str, index: int, num_classes: int, size: int) -> tuple[np.ndarray, int]:
    """(uint8 image, label) for one sample; a pure function of its arguments."""
    label = label_of(index, num_classes)
    return render(label, size, _rng(seed, split, index)), label
