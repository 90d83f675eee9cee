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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


_FIELDS = {"sha256": 64, "legacy": 8, "addnet": 64}  # the hashes an entry may hold, by hex length


def _valid_entry(entry: object) -> bool:
    if not isinstance(entry, dict) or type(entry.get("size")) is not int or type(entry.get("mtime_ns")) is not int:
        return False
    present = [f for f in _FIELDS if f in entry]
    return bool(present) and all(
        isinstance(entry[f], str) and len(entry[f]) == _FIELDS[f] and set(entry[f]) <= _HEX for f in present
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


def _cached(p: Path) -> dict[str, Any] | None:
    """The cache's entry for the file while its size and mtime still match; None otherwise, without
    a cache, or for a file that cannot be checked (left to the caller's own check)."""
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
    if entry and entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns:
        return entry
    return None


def _remember(p: Path, st: os.stat_result, values: Mapping[str, str]) -> None:
    """Add ``values`` to the file's cache entry; an entry for another size or mtime is replaced."""
    cp = cache_path()
    if cp is None:
        return
    key = str(p.resolve())
    with _LOCK:
        data = _load_cache(cp)
        old = data.get(key)
        same = old is not None and old["size"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns
        data[key] = {**(old if same else {}), "size": st.st_size, "mtime_ns": st.st_mtime_ns, **values}
        _save_cache(cp, data)


def cached_hashes(path: str | os.PathLike[str]) -> FileHashes | None:
    """Both hashes of a file if the cache has them for its path, size and mtime; else None (nothing
    is read but the cache)."""
    entry = _cached(Path(path))
    if entry is None or "sha256" not in entry or "legacy" not in entry:
        return None
    return FileHashes(str(path), str(entry["sha256"]), str(entry["legacy"]))


def file_hashes(path: str | os.PathLike[str], use_cache: bool = True) -> FileHashes:
    """Both hashes of a file, from the cache when path, size and mtime still match."""
    p = Path(path)
    st = check_input_file(p, error=CheckpointError)
    if use_cache and (hit := cached_hashes(p)) is not None:
        return hit
    try:
        result = FileHashes(str(p), sha256_file(p), legacy_hash(p))
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read: {e.strerror or e}") from None
    if use_cache:
        _remember(p, st, {"sha256": result.sha256, "legacy": result.legacy})
    return result


def addnet_hash(path: str | os.PathLike[str], use_cache: bool = True) -> str:
    """sha256 of a safetensors file's tensor data, its header left out (kohya's ``sshs_model_hash``,
    A1111's "addnet" hash of LoRAs, whose first 12 hex digits are the infotext's ``Lora hashes``);
    the whole file's sha256 for any other format, as A1111 does.

    Why the header is left out: LoRA trainers and editors rewrite the metadata (training tags,
    cover images) without changing a weight, and the hash should still name the same LoRA.
    Cached beside the file's other hashes (path, size, mtime): finding a LoRA by the hash an
    infotext gives hashes every LoRA of the folder, and should do it once.
    """
    p = Path(path)
    st = check_input_file(p, error=CheckpointError)
    if use_cache and (entry := _cached(p)) is not None and "addnet" in entry:
        return str(entry["addnet"])
    digest = _addnet(p)
    if use_cache:
        _remember(p, st, {"addnet": digest})
    return digest


def _addnet(p: Path) -> str:
    from .checkpoint import sniff

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
