"""Opening any checkpoint file through one interface, by what the file holds rather than its name.

Why by content: files travel under wrong names. A safetensors file saved as ``.ckpt`` is still a
safetensors file (and safe to read as one), a pickle named ``.safetensors`` is still a pickle, and a
"model" that is really an HTML error page, a Git LFS pointer or a text file deserves to be called
that, not "a corrupt safetensors header" or "an unsafe pickle".
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Protocol

import torch

from ..errors import CheckpointError
from .inputs import check_input_file
from .pickle_io import PickleReader
from .safetensors_io import MAX_HEADER, SafetensorsReader, TensorInfo

# torch.serialization.MAGIC_NUMBER (0x1950a86a20f9469cfc6c) as pickle writes it: LONG1, 10 bytes.
TORCH_LEGACY_MAGIC = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
SAFETENSORS_SUFFIXES = {".safetensors", ".sft"}


class CheckpointReader(Protocol):
    path: Path
    metadata: dict[str, str]

    def keys(self) -> list[str]: ...
    def info(self, key: str) -> TensorInfo: ...
    def get(self, key: str) -> torch.Tensor: ...
    def __contains__(self, key: object) -> bool: ...
    def close(self) -> None: ...
    def __enter__(self) -> CheckpointReader: ...
    def __exit__(self, *exc: object) -> None: ...


# Formats recognised by their first bytes, and what to call them.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "zip"),
    (b"GGUF", "a GGUF file (llama.cpp / ComfyUI-GGUF quantised format), which blockmerge does not read"),
    (b"\x1f\x8b", "a gzip archive (unpack it first)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive (unpack it first)"),
    (b"Rar!", "a RAR archive (unpack it first)"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89HDF", "an HDF5 file (Keras / TensorFlow weights)"),
)


def sniff(path: str | os.PathLike[str]) -> str:
    """What a file is, from its first bytes: ``"safetensors"``, ``"zip"`` (PyTorch's format),
    ``"pickle"`` (PyTorch's legacy format), ``"unknown"`` binary, or a description in words of
    something that is not a checkpoint (empty file, text, HTML page, Git LFS pointer, archive...)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    if not head:
        return "an empty file"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= min(MAX_HEADER, size - 8) and head[8:].lstrip(b" \t\r\n")[:1] == b"{":
            return "safetensors"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        # torch.save's legacy format starts with its magic number (after a protocol 4+ frame header);
        # any other pickle is some Python object, not a checkpoint, whatever its name says.
        if TORCH_LEGACY_MAGIC in head[:32]:
            return "pickle"
        return (f"a Python pickle (protocol {head[1]}) that is not a PyTorch checkpoint (no torch.save magic "
                "number; PyTorch writes a zip archive or a legacy pickle that starts with one)")
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the model itself (fetch it with `git lfs pull`)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        text = head[: e.start].decode("utf-8") if e.start >= len(head) - 4 else None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        low = text.lstrip().lower()
        if low.startswith(("<!doctype html", "<html", "<head", "<?xml")):
            return "an HTML/XML page (perhaps an error page saved instead of the download)"
        if low.startswith(("{", "[")):
            return "a JSON/text file"
        return "a text file"
    return "unknown"


def open_checkpoint(path: str | os.PathLike[str]) -> CheckpointReader:
    """A lazy reader for safetensors content, or a weights-only reader for PyTorch pickles.

    The content decides; the suffix only breaks the tie for content nothing recognises (a
    ``.safetensors`` name gets the safetensors reader's precise header errors).
    """
    p = Path(path)
    check_input_file(p, error=CheckpointError)
    kind = sniff(p)
    if kind == "safetensors":
        return SafetensorsReader(p)
    if kind in ("zip", "pickle"):
        return PickleReader(p)
    suffix = p.suffix.lower()
    if kind == "unknown":
        if suffix in SAFETENSORS_SUFFIXES:
            return SafetensorsReader(p)  # says exactly what is wrong with its header
        raise CheckpointError(f"{p}: not a checkpoint: unrecognised content (neither safetensors nor a "
                              "PyTorch zip or pickle)")
    raise CheckpointError(f"{p}: not a checkpoint: it is {kind}")
