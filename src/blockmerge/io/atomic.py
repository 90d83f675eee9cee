"""Atomic output: write to a temporary file beside the target, flush, fsync, rename.

On any failure (an exception, a full disk) the temporary file is removed and the target is left as
it was, so nothing partial is ever visible under the output name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import BlockmergeError


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _default_mode()


def check_output_path(output: Path, inputs: list[Path], overwrite: bool, arg: str = "-o/--output") -> None:
    """Refuse an output that is one of the inputs, or that exists without ``overwrite``."""
    out_res = output.resolve()
    for inp in inputs:
        try:
            same = out_res == inp.resolve() or (output.exists() and os.path.samefile(output, inp))
        except OSError:
            same = False
        if same:
            raise BlockmergeError(f"{arg} {output}: is an input file; refusing to write over an input")
    if output.exists() and not overwrite:
        raise BlockmergeError(f"{arg} {output}: already exists (use --overwrite to replace it)")
    if output.exists() and output.is_dir():
        raise BlockmergeError(f"{arg} {output}: is a folder")
    if not output.parent.exists():
        raise BlockmergeError(f"{arg} {output}: folder {output.parent} does not exist")


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file; on success it becomes ``target``, on failure it disappears."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    ok = False
    try:
        os.fchmod(fd, _MODE)  # mkstemp makes 0600; a finished output gets the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        ok = True
    except OSError as e:
        if e.errno in (28, 27):  # ENOSPC, EFBIG
            raise BlockmergeError(f"{target}: disk full while writing ({e.strerror}); nothing was written") from None
        raise
    finally:
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
