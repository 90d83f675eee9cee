"""Recognising the files a sweep or report wrote, so a rerun may replace them without ``--overwrite``.

Rerunning a sweep into its folder (to resume it) or re-rendering its report rewrites ``sweep.json``,
``index.html``, heat maps, thumbnails... The write policy replaces an existing file only with
``--overwrite``, or when the writer proves the file is its own: each kind of file carries a
generator mark in its first bytes (a ``<meta name="generator">``, an SVG attribute, the JSON's
``format`` field, a JPEG comment, the PNG's ``Blockmerge variant`` infotext field). A user's own
``index.html`` in the same folder has none, and is never replaced without ``--overwrite``.
"""

from __future__ import annotations

from pathlib import Path

from ..io.atomic import file_has_marker
from .heatmap import GENERATOR

HTML_GENERATOR = "blockmerge report"
THUMB_COMMENT = b"blockmerge thumbnail"

_OWN_MARKERS: dict[str, bytes] = {
    ".html": f'<meta name="generator" content="{HTML_GENERATOR}">'.encode(),
    ".svg": f'data-generator="{GENERATOR}"'.encode(),
    ".css": b"/* blockmerge report",
    ".js": b"// blockmerge report",
    ".csv": b"level,group,variant,kind,block,",
    ".json": b'"format": "blockmerge.',
    ".jpg": THUMB_COMMENT,
    ".png": b"Blockmerge variant",
}


def own_output(path: Path) -> bool:
    """Whether ``path`` is a file blockmerge's sweep or report wrote (its generator mark is there)."""
    marker = _OWN_MARKERS.get(Path(path).suffix.lower())
    return marker is not None and file_has_marker(Path(path), marker)
