"""Argument types shared by the command modules."""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """An argparse type: a finite number, or a one-line usage error naming the value."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v
