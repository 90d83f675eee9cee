"""A folder of LoRAs as A1111 sees it: names, aliases and the hashes its infotexts carry.

A1111 knows a LoRA by its file name without the extension (``<lora:add_detail:1>``), also when the
file sits in a subfolder, and by its alias, the ``ss_output_name`` kohya writes into the metadata;
its infotext records ``Lora hashes: "add_detail: 7c6bad76eb54"``, the first 12 hex digits of the
file's addnet hash (``sshs_model_hash`` when the metadata has one). Everything here reads local
files only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import BlockmergeError

__all__ = ["LORA_SUFFIXES", "LoraEntry", "find_lora", "find_lora_by_hash", "list_loras", "lora_hash"]

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
_MAX_FILES = 100_000


@dataclass(frozen=True)
class LoraEntry:
    name: str  # file name without extension
    path: Path
    alias: str  # ss_output_name, or the name


def _alias(path: Path) -> str:
    from ..io import open_checkpoint

    try:
        with open_checkpoint(path) as r:
            alias = r.metadata.get("ss_output_name")
    except BlockmergeError:
        return path.stem
    return alias.strip() if isinstance(alias, str) and alias.strip() else path.stem


def check_lora_dir(lora_dir: str | os.PathLike[str]) -> Path:
    """``lora_dir`` as a path, or the error that it is no folder."""
    root = Path(lora_dir)
    if not root.is_dir():
        raise BlockmergeError(f"--lora-dir {root}: not a folder")
    return root


def list_loras(lora_dir: str | os.PathLike[str]) -> list[LoraEntry]:
    """Every LoRA file under ``lora_dir`` (subfolders too), sorted by relative path."""
    root = check_lora_dir(lora_dir)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(LORA_SUFFIXES):
                found.append(Path(dirpath) / f)
                if len(found) > _MAX_FILES:
                    raise BlockmergeError(f"--lora-dir {root}: more than {_MAX_FILES} files")
    found.sort(key=lambda p: str(p.relative_to(root)))
    return [LoraEntry(p.stem, p, _alias(p)) for p in found]


def find_lora(name: str, lora_dir: str | os.PathLike[str] | None) -> Path | None:
    """The LoRA A1111 would pick for ``<lora:NAME...>``: a file of that name (with or without its
    extension, or a relative path below ``lora_dir``), else one whose alias is NAME."""
    if lora_dir is None or not name or "\x00" in name:
        return None
    root = Path(lora_dir)
    direct = root / name
    for cand in (direct, *(direct.with_name(direct.name + s) for s in LORA_SUFFIXES)):
        try:
            if cand.is_file() and cand.resolve().is_relative_to(root.resolve()):
                return cand
        except (OSError, ValueError):
            continue
    entries = list_loras(root)
    by_name = [e for e in entries if e.name == name]
    if by_name:
        return by_name[0].path
    by_alias = [e for e in entries if e.alias == name]
    return by_alias[0].path if by_alias else None


def lora_hash(path: str | os.PathLike[str]) -> str:
    """A1111's short LoRA hash (12 hex digits): ``sshs_model_hash`` if the file says, else its addnet hash."""
    from ..io import addnet_hash, open_checkpoint

    try:
        with open_checkpoint(path) as r:
            meta = r.metadata.get("sshs_model_hash")
    except BlockmergeError:
        meta = None
    if isinstance(meta, str) and len(meta) >= 12 and all(c in "0123456789abcdef" for c in meta.lower()):
        return meta.lower()[:12]
    return addnet_hash(path)[:12]


def find_lora_by_hash(short_hash: str, lora_dir: str | os.PathLike[str] | None) -> Path | None:
    """The LoRA under ``lora_dir`` whose A1111 short hash (12 hex digits, or a longer prefix of the
    addnet hash) is ``short_hash``: what A1111 does when an infotext's name is not found."""
    if lora_dir is None or not short_hash:
        return None
    want = short_hash.strip().lower()
    for e in list_loras(lora_dir):
        try:
            if lora_hash(e.path).startswith(want[:12]):
                return e.path
        except BlockmergeError:
            continue
    return None
