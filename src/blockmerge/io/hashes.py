"""Model hashes as A1111 shows them, with a cache so a multi-GB file is hashed once.

- legacy hash: first 8 hex digits of sha256 over the 64 KiB at offset 1 MiB (the
  ``Model hash: a9263745`` of older infotexts);
- sha256 of the whole file, and its first 10 hex digits (A1111's current ``Model hash``).

The cache is a small JSON file keyed by absolute path and validated by size and mtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import CheckpointError

_LOCK = threading.Lock()
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileHashes:
    path: str
    sha256: str
    legacy: str

    @property
    def short(self) -> str:
        """A1111's current model hash: the first 10 hex digits of the sha256."""
        return self.sha256[:10]


def cache_path() -> Path:
    env = os.environ.get("BLOCKMERGE_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blockmerge"
    return base / "hashes.json"


def legacy_hash(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _load_cache(p: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(p.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(p: Path, data: dict[str, dict[str, object]]) -> None:
    with contextlib.suppress(OSError):
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".hashes.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            os.replace(tmp, p)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def file_hashes(path: str | os.PathLike[str], use_cache: bool = True) -> FileHashes:
    """Both hashes of a file, from the cache when path, size and mtime still match."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read: {e.strerror or e}") from None
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder, not a file")
    key = str(p.resolve())
    cp = cache_path()
    if use_cache:
        with _LOCK:
            entry = _load_cache(cp).get(key)
        if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            return FileHashes(str(p), str(entry["sha256"]), str(entry["legacy"]))
    try:
        result = FileHashes(str(p), sha256_file(p), legacy_hash(p))
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read: {e.strerror or e}") from None
    if use_cache:
        with _LOCK:
            data = _load_cache(cp)
            data[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, **asdict(result)}
            data[key].pop("path", None)
            _save_cache(cp, data)
    return result
