"""Host-process settings every trainer applies before it builds a model: threads and the allocator.

glibc serves allocations above 32 MiB with fresh mmaps and unmaps them on free, so every large
activation and gradient of a step (fc6's weight gradient alone is 151 MB) is page-faulted in anew:
on this project's CPUs that made fc6's weight-gradient product 4× slower than the product itself.
`reuse_freed_memory` tells glibc to serve them from the heap and keep what is freed, so the next
step reuses warm pages. Both sides of every benchmark comparison apply it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Optional


def cores() -> int:
    """CPU cores this process may run on (its affinity, which a container or taskset narrows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def busy_cpu_seconds() -> Optional[float]:
    """CPU seconds the cores this process may run on have spent busy since boot, whoever ran there
    (Linux's /proc/stat; None elsewhere): two readings bracket what the whole machine did meanwhile.
    Busy counts user, nice, system, interrupts and steal (time the hypervisor gave to another guest).
    Read around every training step, so a process that may run on every core (the usual case) reads
    the machine's total line instead of parsing one line per core."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        allowed = os.sched_getaffinity(0)
    except (OSError, AttributeError):
        return None
    per_core = [line for line in lines[1:] if line.startswith("cpu")]
    ticks = 0
    try:  # a format this code does not know: no reading, rather than a worker stopped mid-step
        if len(allowed) < len(per_core):  # pinned to some cores (taskset, a container's cpuset): theirs only
            chosen = [line for line in per_core if int(line.partition(" ")[0][3:]) in allowed]
        else:
            chosen = lines[:1]  # "cpu  …": the sum over every online core
        for line in chosen:
            v = [int(x) for x in line.split()[1:]]
            ticks += v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)  # not idle, iowait, guest
    except (ValueError, IndexError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h
_applied = False


def reuse_freed_memory() -> bool:
    """Keep freed host memory for reuse (glibc only; elsewhere a no-op returning False)."""
    global _applied
    if _applied:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


def configure_host(threads: int, keep_freed_memory: bool) -> None:
    import torch  # here: the data pipeline's processes use this module without torch

    if threads > 0:
        torch.set_num_threads(threads)
    if keep_freed_memory:
        reuse_freed_memory()
