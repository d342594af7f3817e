"""Loader for the fused C++ CPU LRN kernels (``_lrn_cpu.cpp``).

The kernel has a plain C ABI and is built on first use with one ``g++`` call
(about a second: no torch headers) into a per-user cache directory, then loaded
with :mod:`ctypes`.  The file name carries a hash of the source, the compiler
flags, the compiler version and the CPU model/flags (it is built with
``-march=native``), so a changed source or a different machine rebuilds.  The
build writes to a temporary file and renames it into place, so several
processes starting at once (pipeline stages, Ray workers) are safe.

If anything fails (no compiler, read-only cache, unsupported platform) the
loader returns ``None`` once, emits a single ``RuntimeWarning`` and
:mod:`ops.lrn` falls back to its pure-torch CPU path.  Set
``ALEXNET_LRN_CPU_EXT=0`` to disable the extension, and
``ALEXNET_PP_CACHE_DIR`` to choose where it is built.
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

import torch

__all__ = ["load", "available", "forward", "backward", "cache_dir", "SUPPORTED_DTYPES"]

_SRC = Path(__file__).with_name("_lrn_cpu.cpp")
_BASE_FLAGS = [
    "-O3",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-pthread",
    "-fno-math-errno",
    "-fno-trapping-math",
]
# Tried in order until one builds: the last set is portable.  512-bit vectors
# measured ~1.5x faster than gcc's default 256-bit preference on an AVX-512
# Xeon (the flag is a no-op on CPUs without AVX-512).
_FLAG_SETS = (
    ["-march=native", "-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else None,
    ["-march=native"],
    [],
)
_ABI_VERSION = 1

SUPPORTED_DTYPES = {torch.float32: 0, torch.float64: 1}

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_tried = False
_error: Optional[str] = None


def cache_dir() -> Path:
    env = os.environ.get("ALEXNET_PP_CACHE_DIR")
    if env:
        return Path(env) / "lrn_cpu"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "alexnet_pp" / "lrn_cpu"


def _cpu_signature() -> str:
    sig = [platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            seen = set()
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part") and key not in seen:
                    seen.add(key)
                    sig.append(line.strip())
    except OSError:
        sig.append(platform.processor())
    return "\n".join(sig)


def _compiler() -> Optional[str]:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return cand
    return None


def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cxx: str, dest_dir: Path, flags: list[str]) -> Path:
    src = _SRC.read_bytes()
    key = hashlib.sha256()
    for part in (src, " ".join(flags).encode(), _compiler_version(cxx).encode(),
                 _cpu_signature().encode(), sys.platform.encode()):
        key.update(part)
        key.update(b"\0")
    target = dest_dir / f"lrn_cpu_{key.hexdigest()[:20]}.so"
    if target.exists():
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    # One builder at a time per cache dir (pipeline stages often start together);
    # the others wait and then find the finished file.
    with open(dest_dir / ".build.lock", "a+") as lock_file:
        try:
            import fcntl

            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass  # no locking available: concurrent builds are still safe, just wasteful
        if target.exists():
            return target
        fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=dest_dir)
        os.close(fd)
        try:
            proc = subprocess.run([cxx, *flags, str(_SRC), "-o", tmp], capture_output=True,
                                  text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"{cxx} failed ({proc.returncode}): "
                                   f"{proc.stderr.strip()[-2000:]}")
            os.replace(tmp, target)  # atomic: readers never see a partial file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def _configure(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, dbl, ptr, cint = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_int
    lib.lrn_abi_version.restype = cint
    lib.lrn_abi_version.argtypes = []
    lib.lrn_forward.restype = cint
    lib.lrn_forward.argtypes = [cint, cint, ptr, ptr, ptr, i64, i64, i64, cint, dbl, dbl, dbl, cint]
    lib.lrn_backward.restype = cint
    lib.lrn_backward.argtypes = [cint, cint, ptr, ptr, ptr, ptr, i64, i64, i64, cint, dbl, dbl,
                                 dbl, cint]
    if lib.lrn_abi_version() != _ABI_VERSION:
        raise RuntimeError("stale LRN CPU kernel ABI")
    return lib


def _load_uncached() -> ctypes.CDLL:
    if not sys.platform.startswith("linux") and sys.platform != "darwin":
        raise RuntimeError(f"unsupported platform {sys.platform}")
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    dirs = [cache_dir(), Path(tempfile.gettempdir()) / f"alexnet_pp_{os.getuid()}" / "lrn_cpu"]
    errors = []
    for extra in _FLAG_SETS:
        if extra is None:
            continue
        flags = _BASE_FLAGS + extra
        for d in dirs:
            try:
                return _configure(ctypes.CDLL(str(_build(cxx, d, flags))))
            except Exception as exc:  # noqa: BLE001 - any failure means "fall back"
                errors.append(f"{d} {' '.join(extra)}: {exc}")
    raise RuntimeError("; ".join(errors))


def load() -> Optional[ctypes.CDLL]:
    """Return the loaded kernel library, building it if needed; None if unavailable."""
    global _lib, _tried, _error
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get("ALEXNET_LRN_CPU_EXT", "1").strip().lower() in ("0", "false", "no", "off"):
            _error = "disabled by ALEXNET_LRN_CPU_EXT"
        else:
            try:
                _lib = _load_uncached()
            except Exception as exc:  # noqa: BLE001
                _error = str(exc)
                warnings.warn(f"ops.lrn: fused CPU kernel unavailable, using the torch fallback "
                              f"({_error[:500]})", RuntimeWarning, stacklevel=2)
        _tried = True
        return _lib


def available() -> bool:
    return load() is not None


def last_error() -> Optional[str]:
    return _error


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def forward(x: torch.Tensor, y: torch.Tensor, p: Optional[torch.Tensor], layout: int, n: int,
            c: int, s: int, size: int, alpha: float, beta: float, k: float) -> None:
    """Run the fused forward kernel on dense buffers (see ``_lrn_cpu.cpp`` for layouts)."""
    lib = load()
    assert lib is not None
    rc = lib.lrn_forward(SUPPORTED_DTYPES[x.dtype], layout, _ptr(x), _ptr(y), _ptr(p), n, c, s,
                         int(size), float(alpha), float(beta), float(k), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"lrn_forward kernel failed with code {rc}")


def backward(x: torch.Tensor, p: torch.Tensor, g: torch.Tensor, gi: torch.Tensor, layout: int,
             n: int, c: int, s: int, size: int, alpha: float, beta: float, k: float) -> None:
    lib = load()
    assert lib is not None
    rc = lib.lrn_backward(SUPPORTED_DTYPES[x.dtype], layout, _ptr(x), _ptr(p), _ptr(g), _ptr(gi),
                          n, c, s, int(size), float(alpha), float(beta), float(k),
                          torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"lrn_backward kernel failed with code {rc}")
