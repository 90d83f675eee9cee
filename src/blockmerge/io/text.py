"""Reading the small text files users hand us (presets, recipes, infotexts)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BlockmergeError


def read_user_text(
    path: str | os.PathLike[str], label: str, error: type[BlockmergeError] = BlockmergeError
) -> str:
    """UTF-8 text of ``path``, or ``error`` with one line naming ``label`` (e.g. ``--presets x.tsv``)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"{label}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise error(f"{label}: not UTF-8 text") from None
