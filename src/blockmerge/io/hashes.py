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
import stat
import struct
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import BlockmergeError, CheckpointError
from .inputs import check_input_file

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


def cache_path() -> Path | None:
    """The hash cache file; None where there is no place for one (no ``BLOCKMERGE_CACHE``, no
    ``XDG_CACHE_HOME`` and no home directory, as for a container user without a passwd entry):
    then nothing is cached, and nothing fails for it."""
    env = os.environ.get("BLOCKMERGE_CACHE") or None
    if env is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or None
        if xdg is None:
            try:
                xdg = str(Path.home() / ".cache")
            except (RuntimeError, KeyError, OSError):
                return None
        env = str(Path(xdg) / "blockmerge")
    return Path(env) / "hashes.json"


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


_HEX = frozenset("0123456789abcdef")
_MAX_CACHE_BYTES = 64 << 20


def _valid_entry(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    sha, legacy = entry.get("sha256"), entry.get("legacy")
    return (
        type(entry.get("size")) is int and type(entry.get("mtime_ns")) is int
        and isinstance(sha, str) and len(sha) == 64 and set(sha) <= _HEX
        and isinstance(legacy, str) and len(legacy) == 8 and set(legacy) <= _HEX
    )


def _load_cache(p: Path) -> dict[str, dict[str, object]]:
    """The cache's valid entries; anything unreadable or malformed is ignored (and, being left out,
    rebuilt on the next save): a corrupt cache must never stop a command."""
    try:
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_CACHE_BYTES:
            return {}
        data = json.loads(p.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and _valid_entry(v)}


def _save_cache(p: Path, data: dict[str, dict[str, object]]) -> None:
    from .atomic import write_text

    with contextlib.suppress(OSError, BlockmergeError):
        p.parent.mkdir(parents=True, exist_ok=True)
        write_text(p, json.dumps(data, indent=0, sort_keys=True), overwrite=True)


def cached_hashes(path: str | os.PathLike[str]) -> FileHashes | None:
    """Both hashes of a file if the cache has them for its path, size and mtime; else None (nothing
    is read but the cache; a file that cannot be checked is None, left to :func:`file_hashes`)."""
    p = Path(path)
    try:
        st = p.stat()
        key = str(p.resolve())
    except (OSError, RuntimeError, ValueError):
        return None
    cp = cache_path()
    if cp is None:
        return None
    with _LOCK:
        entry = _load_cache(cp).get(key)
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return FileHashes(str(p), str(entry["sha256"]), str(entry["legacy"]))
    return None


def file_hashes(path: str | os.PathLike[str], use_cache: bool = True) -> FileHashes:
    """Both hashes of a file, from the cache when path, size and mtime still match."""
    p = Path(path)
    st = check_input_file(p, error=CheckpointError)
    key = str(p.resolve())
    cp = cache_path() if use_cache else None
    if cp is not None and (hit := cached_hashes(p)) is not None:
        return hit
    try:
        result = FileHashes(str(p), sha256_file(p), legacy_hash(p))
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read: {e.strerror or e}") from None
    if cp is not None:
        with _LOCK:
            data = _load_cache(cp)
            data[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, **asdict(result)}
            data[key].pop("path", None)
            _save_cache(cp, data)
    return result


def addnet_hash(path: str | os.PathLike[str]) -> str:
    """sha256 of a safetensors file's tensor data, its header left out (kohya's ``sshs_model_hash``,
    A1111's "addnet" hash of LoRAs, whose first 12 hex digits are the infotext's ``Lora hashes``);
    the whole file's sha256 for any other format, as A1111 does.

    Why the header is left out: LoRA trainers and editors rewrite the metadata (training tags,
    cover images) without changing a weight, and the hash should still name the same LoRA.
    """
    from .checkpoint import sniff

    p = Path(path)
    check_input_file(p, error=CheckpointError)
    if sniff(p) != "safetensors":
        return sha256_file(p)
    h = hashlib.sha256()
    try:
        with open(p, "rb", buffering=0) as f:
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n)
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            while k := f.readinto(buf):
                h.update(view[:k])
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read: {e.strerror or e}") from None
    return h.hexdigest()
