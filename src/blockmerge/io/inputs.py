"""The files a command reads: checked before they are opened, and remembered so nothing writes over them.

Two jobs, both done once here for every reader (checkpoints, presets, recipes, prompt and infotext
files, sweep descriptions, images):

- :func:`check_input_file` refuses what is not a regular file *before* opening it: a FIFO or a
  character device would block ``open()`` or read forever, a folder gives a confusing error later.
- :func:`note_input` records the file's identity (device and inode, so ``./x``, symlinks and hard
  links are all the same file) while an :func:`input_guard` is active. The write policy
  (:mod:`blockmerge.io.atomic`) refuses to replace any recorded file, even with ``--overwrite``:
  the CLI runs every command inside one guard, so no command can forget to list one of its inputs.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import BlockmergeError

_LOCK = threading.Lock()
_DEPTH = 0
_READ: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) -> the path it was read as


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_input_file(
    path: str | os.PathLike[str], label: str | None = None, error: type[BlockmergeError] = BlockmergeError
) -> os.stat_result:
    """``stat`` of an existing regular file, else ``error`` naming ``label`` (default: the path).

    Also records it with :func:`note_input`.
    """
    p = Path(path)
    name = label or str(p)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            raise error(f"{name}: no such file (a symbolic link to a missing file)") from None
        raise error(f"{name}: no such file") from None
    except NotADirectoryError:
        raise error(f"{name}: no such file (a part of the path is not a folder)") from None
    except OSError as e:
        raise error(f"{name}: cannot read: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{name}: is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{name}: is {file_kind(st.st_mode)}, not a regular file; refusing to read it")
    _remember(st, p)
    return st


def note_input(path: str | os.PathLike[str]) -> None:
    """Record ``path`` as read by the running command (a no-op outside :func:`input_guard`)."""
    if _DEPTH == 0:
        return
    with contextlib.suppress(OSError):
        _remember(os.stat(path), Path(path))


def _remember(st: os.stat_result, p: Path) -> None:
    if _DEPTH == 0:
        return
    with _LOCK:
        _READ.setdefault((st.st_dev, st.st_ino), str(p))


def read_by_command(st: os.stat_result) -> str | None:
    """The path under which the running command read the file with this ``stat``, if it did."""
    with _LOCK:
        return _READ.get((st.st_dev, st.st_ino))


@contextlib.contextmanager
def input_guard() -> Iterator[None]:
    """While active, every file the readers open is remembered and protected from being written over.

    Nested guards share one record, cleared when the outermost ends (a library user's next command
    may of course write to what an earlier one read).
    """
    global _DEPTH
    with _LOCK:
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                _READ.clear()
