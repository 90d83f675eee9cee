"""Opening any checkpoint file through one interface."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import torch

from ..errors import CheckpointError
from .pickle_io import PickleReader
from .safetensors_io import SafetensorsReader, TensorInfo

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


def _sniff_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def open_checkpoint(path: str | os.PathLike[str]) -> CheckpointReader:
    """A lazy reader for .safetensors, or a weights-only reader for pickled formats.

    The format is taken from the content when the suffix is unknown.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder, not a checkpoint file")
    suffix = p.suffix.lower()
    try:
        is_st = suffix in SAFETENSORS_SUFFIXES or (suffix not in PICKLE_SUFFIXES and _sniff_safetensors(p))
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read: {e.strerror or e}") from None
    if is_st:
        return SafetensorsReader(p)
    return PickleReader(p)
