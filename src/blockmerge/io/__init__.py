"""Checkpoint readers and writers, hashes and metadata. Knows nothing of merge methods."""

from __future__ import annotations

from .atomic import (
    atomic_write,
    check_output_dir,
    check_output_path,
    made_folders_guard,
    remove_stale_partials,
    write_bytes,
    write_text,
)
from .checkpoint import CheckpointReader, open_checkpoint, sniff
from .dtypes import OUTPUT_DTYPES, cast_into, cast_to, dtype_name, output_dtype, saturates
from .hashes import FileHashes, addnet_hash, file_hashes, legacy_hash, sha256_file
from .inputs import check_input_file, input_guard, note_input
from .safetensors_io import DTYPE_NAMES, DTYPES, SafetensorsReader, SafetensorsStreamWriter, TensorInfo

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "OUTPUT_DTYPES",
    "CheckpointReader",
    "FileHashes",
    "SafetensorsReader",
    "SafetensorsStreamWriter",
    "TensorInfo",
    "addnet_hash",
    "atomic_write",
    "cast_into",
    "cast_to",
    "check_input_file",
    "check_output_dir",
    "check_output_path",
    "dtype_name",
    "file_hashes",
    "input_guard",
    "legacy_hash",
    "made_folders_guard",
    "note_input",
    "open_checkpoint",
    "output_dtype",
    "saturates",
    "remove_stale_partials",
    "sha256_file",
    "sniff",
    "write_bytes",
    "write_text",
]
