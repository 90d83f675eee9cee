"""The C library's functions that Python's ``os`` module does not bind, loaded once.

``renameat2`` (publish a file without replacing one another process just made), ``sync_file_range``
(start an output's writeback while it is still being written) and glibc's ``malloc_trim`` (hand
freed heap pages back). Why ctypes: no maintained package binds these three, and each caller works
without them (:func:`libc_function` returns None off Linux or where the C library lacks the name).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["get_errno", "libc_function"]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


def libc_function(name: str, argtypes: Sequence[Any], restype: Any = ctypes.c_int) -> Any:
    """The C library's ``name`` with these argument and result types, or None where it has none."""
    lib = _libc()
    fn = getattr(lib, name, None) if lib is not None else None
    if fn is None:
        return None
    fn.argtypes = list(argtypes)
    fn.restype = restype
    return fn


def get_errno() -> int:
    """errno as the last call through :func:`libc_function` left it."""
    return ctypes.get_errno()
