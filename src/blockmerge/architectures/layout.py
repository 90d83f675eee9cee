"""Report and heat-map layouts of a family's blocks (positions in a grid), as data.

Two shapes cover every family blockmerge knows:

- the **U** of a U-Net, the article's picture: IN00 at the top of the left arm going down, the
  middle block at the bottom, OUT00 at the bottom of the right arm going up to the last OUT block;
- a **stack** for transformer families (Flux, SD3): the blocks in execution order, down each
  column and then on to the next column, so a heat map reads like the forward pass does.

Row 1 is kept free in both for the cells that are not blocks (the baseline image of a sweep
report, BASE and the components of a heat map).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .base import Layout

_ID = re.compile(r"^(IN|M|OUT)(\d+)$")


def u_layout(block_ids: Sequence[str]) -> Layout:
    """(row, column) for each U-Net block id in a 3-column grid.

    IN<i> -> (2 + i, 1); M<k> -> (bottom + k, 2); OUT<j> -> (bottom - 1 - j, 3), where bottom is
    2 + the longer arm, so IN00 and the last OUT block share the top row of the arms.
    """
    parsed: list[tuple[str, int, str]] = []
    for b in block_ids:
        m = _ID.match(b)
        if not m:
            raise ValueError(f"block id {b!r} has no place in the U layout (expected IN<n>, M<n>, OUT<n>)")
        parsed.append((m.group(1), int(m.group(2)), b))
    n_in = sum(1 for k, _, _ in parsed if k == "IN")
    n_out = sum(1 for k, _, _ in parsed if k == "OUT")
    bottom = 2 + max(n_in, n_out)
    pos: dict[str, tuple[int, int]] = {}
    for kind, i, b in parsed:
        if kind == "IN":
            pos[b] = (2 + i, 1)
        elif kind == "M":
            pos[b] = (bottom + i, 2)
        else:
            pos[b] = (bottom - 1 - i, 3)
    return Layout("u", pos, "the U-Net as a U: IN going down on the left, M at the bottom, OUT going up on the right")


def stack_layout(columns: Sequence[Sequence[str]]) -> Layout:
    """Blocks in execution order: ``columns[c][r]`` at (2 + r, 1 + c)."""
    pos: dict[str, tuple[int, int]] = {}
    for c, col in enumerate(columns):
        for r, b in enumerate(col):
            if b in pos:
                raise ValueError(f"block {b!r} appears twice in the stack layout")
            pos[b] = (2 + r, 1 + c)
    return Layout("stack", pos, "execution order: down each column, left to right")


def split_columns(ids: Sequence[str], n_columns: int) -> list[list[str]]:
    """``ids`` cut into ``n_columns`` runs of (nearly) equal length, in order."""
    n = len(ids)
    per = -(-n // n_columns)
    return [list(ids[i : i + per]) for i in range(0, n, per)]
