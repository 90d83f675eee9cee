"""How much memory this process can still allocate, so big buffers are refused before they exist.

Why not just try: on Linux, with memory overcommit, a huge CPU allocation "succeeds" and the kernel
kills the process later (no message, no cleanup); under a limit (``ulimit -v``, a container's cgroup)
the failure comes late, after the slow work, and torch's message names neither the argument nor the
way out. So the callers estimate first and refuse with a line naming the arguments.

Three limits can apply and the smallest wins: the kernel's ``MemAvailable`` (free memory plus
reclaimable caches), the cgroup v2 memory limit of the process's group (``memory.max`` minus
``memory.current``), and the address-space limit (``RLIMIT_AS`` minus the process's ``VmSize``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
from pathlib import Path

from .libc import libc_function


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup_room() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    root = Path("/sys/fs/cgroup")
    for line in lines:
        _, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        rel = rel.strip().lstrip("/")
        if controllers == "":  # the v2 hierarchy
            names, base = ("memory.max", "memory.current"), root
        elif "memory" in controllers.split(","):
            names, base = ("memory.limit_in_bytes", "memory.usage_in_bytes"), root / "memory"
        else:
            continue
        # Inside a cgroup namespace the group is the mount's root; outside, the path names it.
        for folder in (base / rel, base):
            limit, used = _read_int(folder / names[0]), _read_int(folder / names[1])
            if limit is not None and used is not None:
                return None if limit >= 1 << 60 else max(0, limit - used)
    return None


def _address_space_room() -> int | None:
    """RLIMIT_AS minus the address space already in use (``ulimit -v``)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open(f"/proc/{os.getpid()}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmSize:"):
                    return max(0, soft - int(line.split()[1]) * 1024)
        return soft
    return None


def available_memory() -> int | None:
    """Bytes this process can still allocate in RAM (None where the system does not say)."""
    known = [v for v in (_meminfo_available(), _cgroup_room(), _address_space_room()) if v is not None]
    return min(known) if known else None


def device_free_memory(device: object) -> int | None:
    """Free bytes on ``device`` (a torch device or its name): CUDA asks the driver, CPU the kernel."""
    import torch

    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(dev)
        except (RuntimeError, AssertionError, ValueError):
            return None
        return int(free)
    if dev.type == "cpu":
        return available_memory()
    return None


def gib(n: float) -> str:
    """``n`` bytes as GiB with one decimal (``12.5 GiB``); large values without decimals."""
    g = n / 2**30
    return f"{g:,.0f} GiB" if g >= 100 else f"{g:.1f} GiB"


_trim: object = None  # glibc's malloc_trim once looked up; False where there is none


def release_free_memory() -> None:
    """Hand the pages of freed memory back to the system now (glibc's ``malloc_trim``; elsewhere nothing).

    Why: glibc serves allocations below its mmap threshold (which rises to 32 MiB after the first
    large free) from heaps it shrinks only from the top, so the few-MiB tensors of a whole-tensor
    merge, freed between small long-lived ones, leave their pages resident. Over SD1.5 that alone
    took the cosine methods' statistics pass from 0.22 to 1.16 GB of RSS (0.27 GB trimming after
    each large tensor), and a merge's peak adds on top. A call costs about 1 ms, so callers trim
    after large tensors only.
    """
    global _trim
    if _trim is None:
        _trim = libc_function("malloc_trim", [ctypes.c_size_t]) or False
    if _trim:
        _trim(0)  # type: ignore[operator]
