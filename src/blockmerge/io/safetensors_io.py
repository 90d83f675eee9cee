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
import stat
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import CheckpointError
from .atomic import EarlyWriteback, preallocate, pwrite_all
from .inputs import check_input_file
from .memory import available_memory

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

# Every dtype the official library accepts (safetensors 0.6-0.8), with its size in bits. The ones
# not in DTYPES are valid files that blockmerge cannot merge: "unsupported dtype", never "corrupt".
KNOWN_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}

MAX_HEADER = 100_000_000  # the official library's limit (bytes)
_U64 = (1 << 64) - 1
_MAX_DEPTH = 128  # serde_json's recursion limit: deeper JSON is rejected by the official reader


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
    return dtype.itemsize  # a property of the dtype: no tensor made per call (once per slice read and written)


class HeaderError(ValueError):
    """Why a safetensors header is invalid (the reader turns it into a :class:`CheckpointError`)."""


class _Float(float):
    """A JSON number written with a fraction or exponent: never a valid shape or offset."""


def _reject_constant(name: str) -> None:
    raise HeaderError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise HeaderError(f"duplicate key {k!r}")
            seen.add(k)
    return out


def _check_text(obj: object, depth: int = 0) -> None:
    """serde_json (the official reader) rejects what Python's json accepts: lone surrogate escapes
    (``"\\ud800"``) and nesting deeper than 128."""
    if isinstance(obj, dict | list) and depth >= _MAX_DEPTH - 1:  # serde counts the 128th container as too deep
        raise HeaderError(f"JSON nested {_MAX_DEPTH} levels deep or more")
    if isinstance(obj, str):
        if not obj.isascii():  # only then can it hold a surrogate, which strict UTF-8 cannot encode
            try:
                obj.encode("utf-8")
            except UnicodeEncodeError:
                raise HeaderError(f"invalid Unicode (a lone surrogate escape) in {obj[:40]!r}") from None
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_text(k, depth + 1)
            _check_text(v, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _check_text(v, depth + 1)


def _u64(v: object, what: str) -> int:
    if type(v) is not int:
        got = "a fraction" if isinstance(v, float) else type(v).__name__.replace("NoneType", "null")
        raise HeaderError(f"{what} must be non-negative integers, got {got} {v!r}"[:200])
    if v < 0:
        raise HeaderError(f"{what} must be non-negative integers, got {v}")
    if v > _U64:
        raise HeaderError(f"{what}: {v} does not fit in 64 bits")
    return v


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as the header describes it (any valid dtype name, even one torch lacks)."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def parse_header(raw: bytes, data_len: int) -> tuple[list[HeaderEntry], dict[str, str]]:
    """Validate a safetensors header the way the official library does; raise :class:`HeaderError`.

    ``raw`` is the header's bytes (after the 8-byte length), ``data_len`` the number of bytes after
    it. Accepted exactly when ``safetensors`` accepts the file, except that duplicate keys are
    always refused (the official reader keeps the last one silently, which makes the file mean two
    things). Checked: UTF-8; strict JSON (no NaN, no lone surrogates, depth <= 128); an object whose
    ``__metadata__`` is null or maps strings to strings, and whose other values are tensor entries
    with a known ``dtype``, a ``shape`` of unsigned 64-bit integers and two ``data_offsets``; the
    entries, sorted by offsets, tile the data exactly (no overlap, no hole, nothing after the last),
    and each one's size is its shape times its dtype's size, without overflow.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(f"the header is not valid UTF-8 (byte {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                            parse_float=_Float)
    except json.JSONDecodeError as e:
        raise HeaderError(f"the header is not valid JSON ({e.msg} at byte {e.pos})") from None
    except RecursionError:
        raise HeaderError(f"JSON nested {_MAX_DEPTH} levels deep or more") from None
    if not isinstance(header, dict):
        raise HeaderError(f"the header is a JSON {type(header).__name__}, not an object")
    _check_text(header)
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise HeaderError("__metadata__ must map strings to strings")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise HeaderError(f"__metadata__[{k!r}] must be a string, not {type(v).__name__.replace('NoneType', 'null')}")
    entries: list[HeaderEntry] = []
    for key, entry in header.items():
        where = f"tensor {key!r}"
        if not isinstance(entry, dict):
            raise HeaderError(f"{where}: the entry must be an object with dtype, shape and data_offsets")
        for field in ("dtype", "shape", "data_offsets"):
            if field not in entry:
                raise HeaderError(f"{where}: missing field {field!r}")
        dtype = entry["dtype"]
        if not isinstance(dtype, str) or dtype not in KNOWN_DTYPE_BITS:
            raise HeaderError(f"{where}: unknown dtype {dtype!r}"[:200])
        shape, offs = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list):
            raise HeaderError(f"{where}: shape must be a list of non-negative integers")
        if not isinstance(offs, list) or len(offs) != 2:
            raise HeaderError(f"{where}: data_offsets must be two non-negative integers [begin, end]")
        dims = tuple(_u64(s, f"{where}: shape") for s in shape)
        begin, end = (_u64(o, f"{where}: data_offsets") for o in offs)
        entries.append(HeaderEntry(key, dtype, dims, begin, end))
    pos = 0
    for e in sorted(entries, key=lambda x: (x.begin, x.end)):
        where = f"tensor {e.key!r}"
        if e.begin != pos or e.end < e.begin:
            if e.begin < pos:
                raise HeaderError(f"{where}: its data (bytes {e.begin}-{e.end}) overlaps the previous tensor's "
                                  f"(which ends at {pos})")
            if e.end < e.begin:
                raise HeaderError(f"{where}: data_offsets end {e.end} is before begin {e.begin}")
            raise HeaderError(f"{where}: a hole of {e.begin - pos} bytes before its data (offsets must tile the data)")
        n = 1
        for s in e.shape:
            n *= s
            if n > _U64:
                raise HeaderError(f"{where}: shape {list(e.shape)} overflows (more than 2^64 elements)")
        bits = n * KNOWN_DTYPE_BITS[e.dtype]
        if bits > _U64:
            raise HeaderError(f"{where}: shape {list(e.shape)} of {e.dtype} overflows (more than 2^64 bytes)")
        if bits % 8 or bits // 8 != e.end - e.begin:
            raise HeaderError(f"{where}: {e.end - e.begin} bytes of data do not hold shape {list(e.shape)} of {e.dtype}")
        pos = e.end
    if pos != data_len:
        if pos > data_len:
            raise HeaderError(f"truncated: the header describes {pos} bytes of tensor data, the file holds {data_len}")
        raise HeaderError(f"{data_len - pos} bytes after the last tensor's data (the file is not fully covered)")
    return entries, meta


# The limit that applies (free memory, a cgroup's, ``ulimit -v``): see :mod:`.memory`.
_available_memory = available_memory


def check_allocation(nbytes: int, what: str) -> None:
    """Refuse, before allocating, a buffer larger than the memory available (on Linux, with memory
    overcommit the allocation itself would succeed and the kernel kill the process later)."""
    if nbytes < (64 << 20):
        return
    avail = _available_memory()
    if avail is not None and nbytes > avail:
        raise CheckpointError(f"{what} needs {nbytes / 2**30:.1f} GiB of memory, more than the "
                              f"{avail / 2**30:.1f} GiB available")


class SafetensorsReader:
    """Reads a .safetensors file tensor by tensor with positioned reads (no mmap, no full load)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        check_input_file(self.path, error=CheckpointError)
        try:
            self._f: BinaryIO = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open: {e.strerror or e}") from None
        try:
            self._tensors, self.metadata = self._parse_header()
        except BaseException:
            self._f.close()
            raise

    def _parse_header(self) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        bad = f"{self.path}: not a valid safetensors file"
        if len(head) < 8:
            raise CheckpointError(f"{bad} (too short: {size} bytes)" if size else f"{self.path}: empty file, not a checkpoint")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise CheckpointError(f"{bad} (header length {n} is over the {MAX_HEADER}-byte limit; not safetensors?)")
        if 8 + n > size:
            raise CheckpointError(f"{bad} (header length {n} is past the end of the {size}-byte file; "
                                  "truncated or not safetensors)")
        raw = self._f.read(n)
        if len(raw) != n:
            raise CheckpointError(f"{self.path}: truncated while reading the header")
        try:
            entries, meta = parse_header(raw, size - 8 - n)
        except HeaderError as e:
            msg = str(e)
            if msg.startswith("truncated"):
                raise CheckpointError(f"{self.path}: {msg}") from None
            raise CheckpointError(f"{bad} ({msg})") from None
        data_start = 8 + n
        tensors: dict[str, TensorInfo] = {}
        for e in entries:
            dtype = DTYPES.get(e.dtype)
            if dtype is None:
                raise CheckpointError(f"{self.path}: tensor {e.key!r} has unsupported dtype {e.dtype} "
                                      f"(blockmerge reads {', '.join(DTYPES)})")
            tensors[e.key] = TensorInfo(e.key, dtype, e.shape, data_start + e.begin, e.end - e.begin)
        return tensors, dict(meta)

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
        check_allocation(info.nbytes, f"{self.path}: tensor {key!r}")
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


def _scalar_text(s: str) -> str:
    if not any("\ud800" <= c <= "\udfff" for c in s):
        return s
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in s)


def build_header(
    entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    metadata: Mapping[str, str] | None,
    pad_to: int = 0,
) -> tuple[bytes, list[tuple[str, int]]]:
    """The header bytes (length prefix included, space-padded to a multiple of 8 like the official
    writer, and at least to ``pad_to`` bytes) and each tensor's byte size in file order."""
    header: dict[str, object] = {}
    if metadata:
        # A file name's undecodable bytes reach Python as lone surrogates, which JSON can escape but
        # the official reader (and every strict one) rejects: write U+FFFD instead.
        header["__metadata__"] = {_scalar_text(str(k)): _scalar_text(str(v)) for k, v in metadata.items()}
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


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as stored in safetensors: flat, contiguous, on the CPU, bool as uint8."""
    t = t.detach().cpu()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.contiguous().reshape(-1).view(torch.uint8)


class SafetensorsStreamWriter:
    """Writes a safetensors file whose header is known up front, one tensor at a time.

    Tensors are accounted in file order (:meth:`write`, :meth:`write_part`), which write their bytes
    unless :meth:`place` already put them where they go (then ``placed=True``). Several threads may
    call :meth:`place` at once for different ranges: then the output's page writes, which cost more
    than the arithmetic of most merges, are spread over the threads that computed the bytes.
    All data goes in by position (``pwrite``), so the file position stays after the header until
    :meth:`finish`.
    """

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
        f.flush()  # before any positional write: the buffered header must not land after them
        # accounted up to here (in file order; a part accounted as placed may still be on its way:
        # finish() checks that every byte was placed)
        self._pos = self._start + self.header_len
        self._where: dict[str, tuple[int, int]] = {}  # key -> (file offset of its data, byte size)
        at = self._pos
        for key, n in self._sizes:
            self._where[key] = (at, n)
            at += n
        self._pwrite = getattr(f, "pwrite", None) or partial(pwrite_all, f.fileno())
        self._writeback = EarlyWriteback(f)
        self._placed = 0  # bytes of tensor data placed, checked by finish()
        self._placed_lock = threading.Lock()
        self._next = 0
        self._part_bytes = 0  # bytes written so far of the tensor being written in parts

    def place(self, key: str, byte_offset: int, data: torch.Tensor) -> None:
        """Write ``data`` (a tensor of ``key``'s stored dtype, or a flat part of it) at its place in
        the file, ``byte_offset`` bytes into ``key``'s data. Thread-safe; the writer must still be
        told, in file order, with ``placed=True``."""
        start, size = self._where[key]
        raw = _raw_bytes(data)
        if byte_offset < 0 or byte_offset + raw.numel() > size:
            raise RuntimeError(f"stream writer: {raw.numel()} bytes at {byte_offset} do not fit in {key}")
        if raw.numel():
            self._pwrite(memoryview(raw.numpy()), start + byte_offset)
            with self._placed_lock:
                self._placed += raw.numel()

    def _wrote(self, n: int) -> None:
        self._pos += n
        self._writeback.advance(self._pos)

    def write(self, key: str, tensor: torch.Tensor, placed: bool = False) -> None:
        want_key, dtype, shape = self._entries[self._next]
        if key != want_key or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(
                f"stream writer expected {want_key} {dtype} {shape}, got {key} {tensor.dtype} {tuple(tensor.shape)}"
            )
        if not placed:
            self.place(key, 0, tensor)
        self._wrote(self._sizes[self._next][1])
        self._next += 1

    def write_part(self, key: str, part: torch.Tensor, last: bool, placed: bool = False) -> None:
        """Write the next consecutive elements of ``key`` (a flat slice); ``last`` closes the tensor,
        whose byte count must then be complete."""
        want_key, dtype, _ = self._entries[self._next]
        if key != want_key or part.dtype != dtype:
            raise RuntimeError(f"stream writer expected {want_key} {dtype}, got a part of {key} {part.dtype}")
        n = part.numel() * part.element_size()
        if not placed:
            self.place(key, self._part_bytes, part)
        self._wrote(n)
        self._part_bytes += n
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
        self._pwrite(head, self._start)

    def finish(self) -> None:
        if self._next != len(self._entries):
            raise RuntimeError(f"stream writer got {self._next} of {len(self._entries)} tensors")
        if self._placed != self.total_bytes - self.header_len:  # a tensor accounted as placed never was
            raise RuntimeError(f"stream writer placed {self._placed} bytes of tensor data, expected "
                               f"{self.total_bytes - self.header_len}")
        if self._pos != self._start + self.total_bytes:  # the file was preallocated to this size
            raise RuntimeError(f"stream writer wrote {self._pos - self._start} bytes, expected {self.total_bytes}")
        self._f.seek(self._pos)  # data went in by position: the file position is where it ends
        st = os.fstat(self._f.fileno())  # and a tensor accounted but never placed cannot hide at the end
        if stat.S_ISREG(st.st_mode) and st.st_size != self._pos:
            raise RuntimeError(f"stream writer: the file holds {st.st_size} bytes, expected {self._pos}")
