"""Argument types and output helpers shared by the command modules.

Every argument is checked when it is parsed (argparse then prints one ``blockmerge: error:`` line
naming it, exit code 2), so no bad value reaches the library, let alone an allocation.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: object) -> str:
    """``text`` safe for a terminal: control characters (an ANSI escape in a model's metadata, a
    carriage return in a file name) shown as ``\\x1b``-style escapes instead of acting. Tabs and
    newlines stay."""
    s = str(text)
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), s)


def one_line(text: object) -> str:
    """:func:`printable`, and newlines too, so an error or warning stays one line."""
    return printable(text).replace("\r", "\\r").replace("\n", "\\n")


def finite_float(text: str) -> float:
    """An argparse type: a finite number, or a one-line usage error naming the value."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def int_range(lo: int, hi: int, multiple: int = 1) -> Callable[[str], int]:
    """An argparse type: an integer in ``lo..hi`` (and a multiple of ``multiple``)."""

    def parse(text: str) -> int:
        try:
            v = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is outside {lo}..{hi}")
        if v % multiple:
            raise argparse.ArgumentTypeError(f"{v} is not a multiple of {multiple}")
        return v

    parse.__name__ = "integer"
    return parse


# Bounds that keep every size the commands allocate from (threads, images, steps) sane before any
# allocation happens. Image sides: A1111's UI allows 64-2048; beyond 8192 an SD image does not fit in
# any machine's memory (the VAE decoder alone needs ~130 bytes per pixel per image).
THREADS = int_range(1, 256)
STEPS = int_range(1, 10_000)
IMAGE_SIDE = int_range(8, 8192, multiple=8)
BATCH = int_range(1, 1024)
CLIP_SKIP = int_range(1, 12)
TOP = int_range(0, 1_000_000)


def output_file(text: str) -> str:
    """An argparse type for an output *file*: not empty, and not ending in ``/`` (that names a folder,
    and a file would silently get the folder's name)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty name is not a file name")
    if text.endswith(("/", os.sep)) or text.rstrip("/").endswith(("/.", "/..")) or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} names a folder; give a file name")
    return text


def device(text: str) -> str:
    """An argparse type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import torch

    try:
        dev = torch.device(text.strip())
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cpu":
        return str(dev)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (use --device cpu)")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return str(dev)
    if dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine (use --device cpu)")
        return str(dev)
    raise argparse.ArgumentTypeError(f"{text!r}: blockmerge runs on cpu, cuda or mps, not {dev.type}")


device.__name__ = "device"
