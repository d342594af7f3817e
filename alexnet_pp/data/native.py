"""Crop, flip and normalise one decoded image into its batch row in one pass (a small C kernel).

    crop_into(img, y, x, side, flip, out, scale, bias)   # out: float32 3×S×S, or uint8 S×S×3

`img` is a decoded uint8 H×W×3 image; the crop is rows y..y+S, columns x..x+S, read right to left
when `flip`. Into a float32 3×S×S row the kernel writes `x * scale[c] + bias[c]` (planar, two
roundings, as numpy's multiply then add: the result is bit for bit `transforms.normalise`'s);
into a uint8 S×S×3 row it copies the crop's pixels.

Why C: in numpy the same work takes two passes and a temporary (a strided uint8 transpose to
planar, then multiply and add), about 3× the kernel's time here, and a flipped uint8 crop copies
3 bytes per inner step. The kernel is built on first use with one `cc` call (well under a second:
plain C, no headers beyond libc) into a per-user cache keyed by the source, flags, compiler and CPU,
and loaded with ctypes; the build writes a temporary file and renames it, so processes starting
together are safe. The source lives in this file, so every install has it. Without a compiler
(or with ALEXNET_PP_DATA_KERNEL=0) the numpy path runs instead, with a single warning; both give
the same bits.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

int aug_abi_version(void) { return 1; }

/* src: the crop's top-left pixel in an H×W×3 uint8 image, rs bytes per image row.
   dst: float32 planar 3×h×w, dst[c][y][x] = src pixel (y, flip ? w-1-x : x) channel c
   times scale[c], plus bias[c]: two roundings (built with -ffp-contract=off). */
void aug_crop_f32(const uint8_t* src, int64_t rs, int h, int w, int flip,
                  const float* scale, const float* bias, float* dst) {
  const float s0 = scale[0], s1 = scale[1], s2 = scale[2];
  const float b0 = bias[0], b1 = bias[1], b2 = bias[2];
  const int64_t plane = (int64_t)h * w;
  for (int y = 0; y < h; ++y) {
    const uint8_t* row = src + (int64_t)y * rs;
    float* o0 = dst + (int64_t)y * w;
    float* o1 = o0 + plane;
    float* o2 = o1 + plane;
    if (flip) {
      const uint8_t* last = row + 3 * (int64_t)(w - 1);
      for (int x = 0; x < w; ++x) {
        const uint8_t* p = last - 3 * (int64_t)x;
        o0[x] = (float)p[0] * s0 + b0;
        o1[x] = (float)p[1] * s1 + b1;
        o2[x] = (float)p[2] * s2 + b2;
      }
    } else {
      for (int x = 0; x < w; ++x) {
        const uint8_t* p = row + 3 * (int64_t)x;
        o0[x] = (float)p[0] * s0 + b0;
        o1[x] = (float)p[1] * s1 + b1;
        o2[x] = (float)p[2] * s2 + b2;
      }
    }
  }
}

/* The same crop copied as uint8 h×w×3 (rows of 3·w bytes). */
void aug_crop_u8(const uint8_t* src, int64_t rs, int h, int w, int flip, uint8_t* dst) {
  const int64_t n = 3 * (int64_t)w;
  for (int y = 0; y < h; ++y) {
    const uint8_t* row = src + (int64_t)y * rs;
    uint8_t* o = dst + (int64_t)y * n;
    if (!flip) {
      memcpy(o, row, (size_t)n);
      continue;
    }
    const uint8_t* last = row + n - 3;
    for (int x = 0; x < w; ++x) {
      const uint8_t* p = last - 3 * (int64_t)x;
      o[3 * x] = p[0];
      o[3 * x + 1] = p[1];
      o[3 * x + 2] = p[2];
    }
  }
}
"""
_ABI_VERSION = 1
_FLAGS = ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno"]
_FLAG_SETS = (["-march=native"], [])  # the first that builds; -ffp-contract=off keeps bits the same

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_tried = False
_error: Optional[str] = None


def cache_dir() -> Path:
    env = os.environ.get("ALEXNET_PP_CACHE_DIR")
    if env:
        return Path(env) / "data_kernel"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "alexnet_pp" / "data_kernel"


def _compiler() -> Optional[str]:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


def _signature(cc: str, flags: list[str]) -> str:
    h = hashlib.sha256()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpu = "".join(line for line in f if line.startswith(("model name", "flags")))[:20000]
    except OSError:
        cpu = platform.processor()
    for part in (_SOURCE, " ".join(flags), version, cpu, sys.platform, platform.machine()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _build(cc: str, dest: Path, flags: list[str]) -> Path:
    target = dest / f"aug_{_signature(cc, flags)}.so"
    if target.exists():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=dest)
    os.close(fd)
    src = tmp[:-len(".tmp.so")] + ".c"
    try:
        Path(src).write_text(_SOURCE)
        proc = subprocess.run([cc, *flags, src, "-o", tmp], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[-1000:]}")
        os.replace(tmp, target)  # atomic: a reader never sees half a library
    finally:
        for p in (tmp, src):
            if os.path.exists(p):
                os.unlink(p)
    return target


def _configure(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.aug_abi_version.restype = i
    lib.aug_abi_version.argtypes = []
    if lib.aug_abi_version() != _ABI_VERSION:
        raise RuntimeError("stale data kernel")
    lib.aug_crop_f32.restype = None
    lib.aug_crop_f32.argtypes = [p, i64, i, i, i, p, p, p]
    lib.aug_crop_u8.restype = None
    lib.aug_crop_u8.argtypes = [p, i64, i, i, i, p]
    return lib


def _load() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    errors = []
    for extra in _FLAG_SETS:
        for d in (cache_dir(), Path(tempfile.gettempdir()) / f"alexnet_pp_{os.getuid()}" / "data_kernel"):
            try:
                return _configure(ctypes.CDLL(str(_build(cc, d, _FLAGS + extra))))
            except Exception as e:  # noqa: BLE001 - any failure means the numpy path
                errors.append(f"{d} {' '.join(extra)}: {e}")
    raise RuntimeError("; ".join(errors))


def load() -> Optional[ctypes.CDLL]:
    """The kernel library (built on first use), or None when it cannot be had."""
    global _lib, _tried, _error
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("ALEXNET_PP_DATA_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
                _error = "disabled by ALEXNET_PP_DATA_KERNEL"
            else:
                try:
                    _lib = _load()
                except Exception as e:  # noqa: BLE001
                    _error = str(e)
                    warnings.warn(f"alexnet_pp.data: crop kernel unavailable, using numpy ({_error[:300]})",
                                  RuntimeWarning, stacklevel=2)
            _tried = True
    return _lib


def available() -> bool:
    return load() is not None


def last_error() -> Optional[str]:
    return _error


def crop_into(img: np.ndarray, y: int, x: int, side: int, flip: bool, out: np.ndarray,
              scale: Optional[np.ndarray] = None, bias: Optional[np.ndarray] = None) -> None:
    """Write the side×side crop of `img` at (y, x), mirrored when `flip`, into `out`: a float32
    3×S×S row gets `pixel * scale[c] + bias[c]`, a uint8 S×S×3 row the pixels."""
    h, w = img.shape[:2]
    if not (img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and 0 <= y <= h - side
            and 0 <= x <= w - side):
        raise ValueError(f"crop {side} at ({y}, {x}) of an image {img.shape} {img.dtype}")
    if out.dtype == np.float32:
        if out.shape != (3, side, side) or scale is None or bias is None:
            raise ValueError(f"float crop needs a 3×{side}×{side} row, scale and bias")
    elif out.dtype != np.uint8 or out.shape != (side, side, 3):
        raise ValueError(f"uint8 crop needs a {side}×{side}×3 row, got {out.shape} {out.dtype}")
    lib = load()
    if lib is None or not out.flags.c_contiguous or img.strides[1:] != (3, 1):
        _crop_numpy(img, y, x, side, flip, out, scale, bias)
        return
    src = img.ctypes.data + y * img.strides[0] + 3 * x
    if out.dtype == np.float32:
        s = np.ascontiguousarray(scale, dtype=np.float32)
        b = np.ascontiguousarray(bias, dtype=np.float32)
        lib.aug_crop_f32(src, img.strides[0], side, side, int(bool(flip)), s.ctypes.data, b.ctypes.data,
                         out.ctypes.data)
    else:
        lib.aug_crop_u8(src, img.strides[0], side, side, int(bool(flip)), out.ctypes.data)


def _crop_numpy(img, y, x, side, flip, out, scale, bias) -> None:
    crop = img[y:y + side, x:x + side]
    if flip:
        crop = crop[:, ::-1]
    if out.dtype == np.uint8:
        out[...] = crop
        return
    planar = np.ascontiguousarray(crop.transpose(2, 0, 1))
    np.multiply(planar, np.asarray(scale, np.float32).reshape(3, 1, 1), out=out)
    out += np.asarray(bias, np.float32).reshape(3, 1, 1)
