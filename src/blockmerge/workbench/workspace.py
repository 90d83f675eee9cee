"""The two folders an interactive front end may touch, and the names it may use inside them.

Why a policy of its own: a web page is a remote caller. Whatever text arrives as a model name or an
output name, the server must only ever *read* checkpoints from the models folder (or the bundled
models) and only ever *write* inside the output folder. So names are not paths: a name is relative,
has no ``..`` part, no drive or root, no control characters, and the file it names, after every
symbolic link is followed, still lies inside its root. Anything else is refused with one line
naming the name, before any file is opened or created.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import BlockmergeError
from ..models import list_models

__all__ = ["CHECKPOINT_SUFFIXES", "ModelEntry", "PathPolicyError", "Workspace"]

#: What the models folder listing offers (what the readers open).
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")
_MAX_NAME = 1024


class PathPolicyError(BlockmergeError):
    """A name from the front end that would reach outside the models or output folder."""


@dataclass(frozen=True)
class ModelEntry:
    """A model the front end may offer: its name there, its file, and whether it ships with blockmerge."""

    name: str
    path: Path
    bundled: bool


def _check_name(name: str, what: str) -> PurePosixPath:
    """``name`` as a relative path with plain parts, or a one-line error naming it."""
    if not isinstance(name, str) or not name.strip():
        raise PathPolicyError(f"{what}: no name given")
    if len(name) > _MAX_NAME:
        raise PathPolicyError(f"{what}: the name is longer than {_MAX_NAME} characters")
    if _BAD_CHARS.search(name):
        raise PathPolicyError(f"{what} {name!r}: control characters and backslashes are not allowed in a name")
    if name.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", name):
        raise PathPolicyError(f"{what} {name!r}: an absolute path is not allowed; give a name inside the folder")
    p = PurePosixPath(name)
    if any(part in ("..", ".") for part in name.split("/")) or not p.parts:
        raise PathPolicyError(f"{what} {name!r}: '..' and '.' are not allowed in a name")
    return p


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


class Workspace:
    """A models folder (read only; may be None: the bundled models alone) and an output folder.

    :meth:`model_path` and :meth:`output_path` are the only ways a name becomes a path.
    """

    def __init__(self, output_dir: str | os.PathLike[str], models_dir: str | os.PathLike[str] | None = None) -> None:
        from ..io import check_output_dir

        self.output_dir = check_output_dir(Path(output_dir), "--output-dir").resolve()
        self.models_dir: Path | None = None
        if models_dir is not None:
            m = Path(models_dir)
            if not m.is_dir():
                raise BlockmergeError(f"--models-dir {m}: is not a folder")
            self.models_dir = m.resolve()
        self._bundled = {b.name: b.path.resolve() for b in list_models()}

    # -- models -----------------------------------------------------------------------------------

    def list_models(self) -> list[ModelEntry]:
        """The bundled models, then every checkpoint file under the models folder (sorted; files
        whose real path leaves the folder through a symbolic link are not offered)."""
        out = [ModelEntry(n, p, True) for n, p in self._bundled.items()]
        if self.models_dir is None:
            return out
        found: list[ModelEntry] = []
        for dirpath, dirnames, filenames in os.walk(self.models_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if f.startswith(".") or not f.lower().endswith(CHECKPOINT_SUFFIXES):
                    continue
                rel = (Path(dirpath) / f).relative_to(self.models_dir).as_posix()
                try:
                    found.append(ModelEntry(rel, self.model_path(rel), False))
                except BlockmergeError:
                    continue
        return out + found

    def model_path(self, name: str) -> Path:
        """The checkpoint a model name stands for: a bundled model's name, or a file inside the
        models folder (its real path, after links, must stay inside)."""
        if isinstance(name, str) and name in self._bundled and (self.models_dir is None or
                                                                 not (self.models_dir / name).exists()):
            return self._bundled[name]
        rel = _check_name(name, "model")
        if self.models_dir is None:
            names = ", ".join(self._bundled) or "none"
            raise PathPolicyError(f"model {name!r}: not a bundled model ({names}) and no --models-dir was given")
        target = self.models_dir.joinpath(*rel.parts)
        real = Path(os.path.realpath(target))
        if not _inside(real, self.models_dir):
            raise PathPolicyError(f"model {name!r}: leads outside the models folder (through a symbolic link)")
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise PathPolicyError(f"model {name!r}: no such file in the models folder") from None
        if not stat.S_ISREG(st.st_mode):
            raise PathPolicyError(f"model {name!r}: is not a regular file")
        return real

    def model_name(self, path: Path) -> str:
        """The name :meth:`model_path` maps back to ``path`` (for records and recipes)."""
        real = Path(os.path.realpath(path))
        for n, p in self._bundled.items():
            if p == real:
                return n
        if self.models_dir is not None and _inside(real, self.models_dir):
            return real.relative_to(self.models_dir).as_posix()
        raise PathPolicyError(f"{path}: is neither a bundled model nor in the models folder")

    # -- outputs ----------------------------------------------------------------------------------

    def output_path(self, name: str, *, suffixes: Iterable[str] = (), what: str = "output") -> Path:
        """Where an output named ``name`` is written: inside the output folder, in a folder that
        exists there (made if it is missing) and whose real path stays inside. An existing symbolic
        link at the name is refused: writing through it could land anywhere."""
        rel = _check_name(name, what)
        sfx = tuple(s.lower() for s in suffixes)
        if sfx and not rel.name.lower().endswith(sfx):
            raise PathPolicyError(f"{what} {name!r}: the name must end in {' or '.join(sfx)}")
        target = self.output_dir.joinpath(*rel.parts)
        self._check_parent(target, name, what)
        if target.is_symlink():
            raise PathPolicyError(f"{what} {name!r}: is a symbolic link; refusing to write through it")
        return target

    def output_folder(self, name: str, *, what: str = "output folder") -> Path:
        """A folder for many outputs (a sweep), inside the output folder (made if missing)."""
        rel = _check_name(name, what)
        target = self.output_dir.joinpath(*rel.parts)
        self._check_parent(target, name, what)
        if target.is_symlink():
            raise PathPolicyError(f"{what} {name!r}: is a symbolic link; refusing to write through it")
        if target.exists() and not target.is_dir():
            raise PathPolicyError(f"{what} {name!r}: exists and is not a folder")
        return target

    def _check_parent(self, target: Path, name: str, what: str) -> None:
        parent = target.parent
        # Walk down from the root: no existing part may be a link that leaves the folder.
        cur = self.output_dir
        for part in parent.relative_to(self.output_dir).parts:
            cur = cur / part
            if os.path.lexists(cur):
                real = Path(os.path.realpath(cur))
                if not _inside(real, self.output_dir):
                    raise PathPolicyError(f"{what} {name!r}: leads outside the output folder (through a symbolic link)")
                if not real.is_dir():
                    raise PathPolicyError(f"{what} {name!r}: {cur.relative_to(self.output_dir)} is not a folder")
        parent.mkdir(parents=True, exist_ok=True)

    def relative_output(self, path: Path) -> str:
        """A written file's name inside the output folder (what the front end shows and links)."""
        real = Path(os.path.realpath(path))
        if not _inside(real, self.output_dir):
            raise PathPolicyError(f"{path}: is not in the output folder")
        return real.relative_to(self.output_dir).as_posix()

    def served_file(self, name: str) -> Path:
        """A file or folder inside the output folder that the server may send back (reports,
        images): the same name rules, and it must exist."""
        if name in ("", "."):
            return self.output_dir
        rel = _check_name(name, "file")
        target = self.output_dir.joinpath(*rel.parts)
        real = Path(os.path.realpath(target))
        if not _inside(real, self.output_dir):
            raise PathPolicyError(f"file {name!r}: leads outside the output folder")
        if not real.exists():
            raise PathPolicyError(f"file {name!r}: no such file in the output folder")
        return real
