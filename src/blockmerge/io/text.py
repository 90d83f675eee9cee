"""Reading the small text files users hand us (presets, recipes, infotexts, prompt files, Merge Board text)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import BlockmergeError
from .inputs import check_input_file

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def split_lines(text: str) -> list[str]:
    """``text`` cut at its line breaks: ``\n``, ``\r\n`` and ``\r``, and nothing else.

    Why not ``str.splitlines``: it also breaks at \x0b, \x0c, \x1c-\x1e, \x85, U+2028 and U+2029,
    which an editor shows inside one line. A Merge Board comment holding U+2028 became two lines and
    every error after it named the wrong line number. Every reader of user text that goes line by
    line (Merge Board, presets, sd-mecha recipes, infotexts, prompt files) uses this.
    """
    return _LINE_BREAK.split(text)


# Presets, recipes and prompts are a few KB. A multi-GB file given by mistake (a checkpoint passed
# as --prompt-file) is refused before it is read instead of filling the memory.
MAX_TEXT_BYTES = 16 << 20


def read_user_text(
    path: str | os.PathLike[str], label: str, error: type[BlockmergeError] = BlockmergeError,
    max_bytes: int = MAX_TEXT_BYTES,
) -> str:
    """UTF-8 text of ``path``, or ``error`` with one line naming ``label`` (e.g. ``--presets x.tsv``).

    Refused: a missing file, a folder, a FIFO or device (which would block), a file over
    ``max_bytes``, bytes that are not UTF-8. The file is recorded as an input of the command.
    """
    st = check_input_file(path, label, error)
    if st.st_size > max_bytes:
        raise error(f"{label}: is {st.st_size / 2**20:.0f} MiB; a text file of at most "
                    f"{max_bytes / 2**20:.0f} MiB is expected")
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise error(f"{label}: cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{label}: not UTF-8 text (byte {e.start})") from None
    return text.removeprefix("\ufeff")  # a BOM some editors write
