"""Streaming safetensors reading and writing.

Why not ``safetensors.safe_open`` / ``save_file``: ``safe_open`` memory-maps the file, and every page a
merge touches stays resident (and counted in RSS) until the map is closed, so a streaming merge of
two 2 GB files would still show ~4 GB resident. ``save_file`` needs every output tensor in memory at
once. The format is small and fixed (8-byte little-endian header length, a JSON header with dtype,
shape and byte offsets, then raw little-endian bytes), so we read tensors with plain positioned
reads into private buffers that are freed when the tensor is dropped, and write the header first
and then each tensor as it is computed. Files written here load with the official library.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import CheckpointError
from .atomic import EarlyWriteback, preallocate

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, without reading it."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = -1  # absolute file offset of the data (safetensors only)
    nbytes: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SafetensorsReader:
    """Reads a .safetensors file tensor by tensor with positioned reads (no mmap, no full load)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._f: BinaryIO = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open: {e.strerror or e}") from None
        try:
            self._tensors, self.metadata = self._parse_header()
        except Exception:
            self._f.close()
            raise

    def _parse_header(self) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        bad = f"{self.path}: not a valid safetensors file"
        if len(head) < 8:
            raise CheckpointError(f"{bad} (too short)")
        (n,) = struct.unpack("<Q", head)
        if n <= 1 or n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{bad} (bad header length {n}; truncated or not safetensors)")
        raw = self._f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{bad} (header is not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{bad} (header is not a JSON object)")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise CheckpointError(f"{bad} (__metadata__ must map strings to strings)")
        data_start = 8 + n
        data_len = size - data_start
        tensors: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{bad} (bad header entry for {key!r})") from None
            info = TensorInfo(key, dtype, shape, data_start + begin, end - begin)
            if begin < 0 or end < begin or any(s < 0 for s in shape):
                raise CheckpointError(f"{bad} (bad offsets for {key!r})")
            if end > data_len:
                raise CheckpointError(f"{self.path}: truncated safetensors file (tensor {key!r} lies past the end)")
            if info.numel * _itemsize(dtype) != end - begin:
                raise CheckpointError(f"{bad} (size of {key!r} does not match its shape and dtype)")
            tensors[key] = info
        return tensors, {str(k): str(v) for k, v in meta.items()}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        return self._tensors[key]

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def get(self, key: str) -> torch.Tensor:
        info = self._tensors[key]
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.dtype)
        # Read straight into the tensor's own (uninitialised) storage: no zero-fill, no extra copy.
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        got = os.preadv(self._f.fileno(), [memoryview(raw.numpy())], info.offset)
        if got != info.nbytes:
            raise CheckpointError(f"{self.path}: truncated while reading {key!r}")
        if info.dtype == torch.bool:
            return raw.to(torch.bool).reshape(info.shape)
        return raw.view(info.dtype).reshape(info.shape)

    def read_range(self, key: str, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Elements ``lo:hi`` of the flattened tensor, read into ``out`` (a contiguous 1-D tensor of
        the tensor's dtype and at least ``hi - lo`` elements, reused by the caller); returns the view."""
        info = self._tensors[key]
        item = _itemsize(info.dtype)
        dest = out[: hi - lo]
        n = (hi - lo) * item
        if n:
            got = os.preadv(self._f.fileno(), [memoryview(dest.view(torch.uint8).numpy())], info.offset + lo * item)
            if got != n:
                raise CheckpointError(f"{self.path}: truncated while reading {key!r}")
        return dest

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_header(
    entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    metadata: Mapping[str, str] | None,
    pad_to: int = 0,
) -> tuple[bytes, list[tuple[str, int]]]:
    """The header bytes (length prefix included, space-padded to a multiple of 8 like the official
    writer, and at least to ``pad_to`` bytes) and each tensor's byte size in file order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    sizes: list[tuple[str, int]] = []
    for key, dtype, shape in entries:
        n = 1
        for s in shape:
            n *= s
        nbytes = n * _itemsize(dtype)
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        sizes.append((key, nbytes))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    raw += b" " * max(0, pad_to - 8 - len(raw))
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw, sizes


class SafetensorsStreamWriter:
    """Writes a safetensors file whose header is known up front, one tensor at a time."""

    def __init__(
        self,
        f: BinaryIO,
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self._f = f
        self._entries = entries
        head, self._sizes = build_header(entries, metadata)
        self.header_len = len(head)
        self.total_bytes = self.header_len + sum(n for _, n in self._sizes)
        self._start = f.tell()
        preallocate(f, self._start + self.total_bytes)
        f.write(head)
        self._writeback = EarlyWriteback(f)
        self._next = 0
        self._part_bytes = 0  # bytes written so far of the tensor being written in parts

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want_key, dtype, shape = self._entries[self._next]
        if key != want_key or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(
                f"stream writer expected {want_key} {dtype} {shape}, got {key} {tensor.dtype} {tuple(tensor.shape)}"
            )
        t = tensor.detach().contiguous().cpu()
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        if t.numel():
            self._f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            self._writeback.advance()
        self._next += 1

    def write_part(self, key: str, part: torch.Tensor, last: bool) -> None:
        """Write the next consecutive elements of ``key`` (a flat slice); ``last`` closes the tensor,
        whose byte count must then be complete."""
        want_key, dtype, _ = self._entries[self._next]
        if key != want_key or part.dtype != dtype:
            raise RuntimeError(f"stream writer expected {want_key} {dtype}, got a part of {key} {part.dtype}")
        if part.numel():
            self._f.write(memoryview(part.contiguous().view(torch.uint8).numpy()))
            self._writeback.advance()
        self._part_bytes += part.numel() * part.element_size()
        if last:
            if self._part_bytes != self._sizes[self._next][1]:
                raise RuntimeError(f"stream writer got {self._part_bytes} bytes for {key}, expected {self._sizes[self._next][1]}")
            self._part_bytes = 0
            self._next += 1

    def rewrite_metadata(self, metadata: Mapping[str, str]) -> None:
        """Replace the metadata after the tensors are written (used to fill in input hashes computed
        while the merge ran). The new header may not be longer than the one written; it is padded
        with spaces, which JSON allows, to the same length."""
        head, _ = build_header(self._entries, metadata, pad_to=self.header_len)
        if len(head) != self.header_len:
            raise RuntimeError("metadata rewrite made the header longer than the space reserved for it")
        pos = self._f.tell()
        self._f.seek(self._start)
        self._f.write(head)
        self._f.seek(pos)

    def finish(self) -> None:
        if self._next != len(self._entries):
            raise RuntimeError(f"stream writer got {self._next} of {len(self._entries)} tensors")
        if self._f.tell() != self._start + self.total_bytes:  # the file was preallocated to this size
            raise RuntimeError(f"stream writer wrote {self._f.tell() - self._start} bytes, expected {self.total_bytes}")
