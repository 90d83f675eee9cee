"""Checkpoint readers and writers, hashes and metadata. Knows nothing of merge methods."""

from __future__ import annotations

from .atomic import atomic_write, check_output_path
from .checkpoint import CheckpointReader, open_checkpoint
from .hashes import FileHashes, file_hashes, legacy_hash, sha256_file
from .safetensors_io import DTYPE_NAMES, DTYPES, SafetensorsReader, SafetensorsStreamWriter, TensorInfo

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "CheckpointReader",
    "FileHashes",
    "SafetensorsReader",
    "SafetensorsStreamWriter",
    "TensorInfo",
    "atomic_write",
    "check_output_path",
    "file_hashes",
    "legacy_hash",
    "open_checkpoint",
    "sha256_file",
]
