"""Recognising the files a sweep or report wrote, so a rerun may replace them without ``--overwrite``.

Rerunning a sweep into its folder (to resume it) or re-rendering its report rewrites ``sweep.json``,
``index.html``, heat maps, thumbnails... The write policy replaces an existing file only with
``--overwrite``, or when the writer proves the file is its own: each kind of file carries a
generator mark in its first bytes (a ``<meta name="generator">``, an SVG attribute, the JSON's
``format`` field, a JPEG comment, the PNG's ``Blockmerge variant`` infotext field). A user's own
``index.html`` in the same folder has none, and is never replaced without ``--overwrite``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BlockmergeError
from ..io.atomic import check_output_path, file_has_marker
from ..io.inputs import read_by_command
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


#: What a sweep and its report write in the sweep folder: files at fixed names, and subfolders whose
#: file names they make up (images and latents, heat maps, thumbnails, copies, the reverse sweep).
#: A test checks that a report writes nothing else.
FIXED_FILES = ("sweep.json", "index.html", "table.html", "results.json", "results.csv", "report.css", "report.js")
SUBFOLDERS = ("images", "heatmaps", "thumbs", "reverse")


def check_sweep_folder(out: Path, overwrite: bool, arg: str = "sweep folder") -> None:
    """Before any work (the slow model load, hours of images): refuse a sweep folder where the sweep or
    its report would have to replace a file it may not.

    A file there that blockmerge did not write needs ``overwrite``; a file this command reads (a
    ``--prompt-file`` kept as ``results.csv``, a preset file under ``images/``) is refused even with
    it. Without this the collision was found by the report, after every image was made.
    """
    if not out.is_dir():
        return
    for name in FIXED_FILES:
        check_output_path(out / name, (), overwrite, arg, replace_if=own_output)
    for sub in SUBFOLDERS:
        for folder, _, names in os.walk(out / sub):
            for name in names:
                p = Path(folder) / name
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                read_as = read_by_command(st)
                if read_as is not None:
                    raise BlockmergeError(f"{arg} {out}: {p} is an input file of this command ({read_as}), in a "
                                          "folder the sweep writes to; refusing to write over an input, even with "
                                          "--overwrite")
