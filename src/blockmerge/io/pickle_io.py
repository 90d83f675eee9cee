"""Pickled checkpoints (.ckpt/.pt/.pth/.bin) loaded without executing code.

``torch.load(weights_only=True)`` is torch's restricted unpickler: it rebuilds tensors, containers
and plain numbers and refuses every other global. Real SD .ckpt files written by PyTorch Lightning
also carry a ``ModelCheckpoint`` callback object; like A1111's safe unpickler we allow that one name,
rebuilt as an inert placeholder class that has no methods and runs nothing.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from .inputs import check_input_file
from .safetensors_io import DTYPE_NAMES, TensorInfo


def _placeholder(module: str, name: str) -> type:
    cls = type(name, (), {})
    cls.__module__ = module
    cls.__qualname__ = name
    return cls


_ALLOWED_EXTRA = [
    _placeholder("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
]


def load_pickled_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a pickled checkpoint; refuses anything that would run code."""
    p = Path(path)
    check_input_file(p, error=CheckpointError)
    try:
        mmap = zipfile.is_zipfile(p)
        with torch.serialization.safe_globals(_ALLOWED_EXTRA), contextlib.ExitStack() as stack:
            src: object = p
            if os.fspath(p).endswith(".safetensors"):
                # torch.load reads any *path* ending in .safetensors as safetensors; this content is a
                # pickle misnamed, so hand torch an open file (no mmap then: it is read into memory).
                src, mmap = stack.enter_context(open(p, "rb")), False
            obj = torch.load(src, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower() and "unsupported class" not in str(e).lower():
            # Not a refusal of code but a stream torch cannot parse ("invalid load key", "Unsupported
            # operand 103"): a damaged file, not an unsafe one.
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            detail = next((ln for ln in lines if "operand" in ln or "load key" in ln), lines[0] if lines else "")
            protocol = _legacy_protocol(p)
            if protocol is not None and protocol >= 4 and "operand" in detail:
                raise CheckpointError(f"{p}: a PyTorch legacy checkpoint saved with pickle protocol {protocol}, which "
                                      "torch's safe (weights-only) loader cannot read; re-save it with torch.save's "
                                      "default format (or as safetensors)") from None
            raise CheckpointError(f"{p}: not a readable checkpoint (a damaged pickle: {detail[:160]})") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        for line in str(e).splitlines():
            if "Unsupported global" in line or "GLOBAL" in line:
                first = line.strip()
                break
        raise CheckpointError(
            f"{p}: refused: this pickle needs code that a weights-only load does not run ({first[:200]})"
        ) from None
    except (MemoryError, torch.OutOfMemoryError):
        raise CheckpointError(f"{p}: its tensors do not fit in the memory available") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, IndexError, TypeError,
            AttributeError, struct.error, OverflowError, RecursionError) as e:
        # torch.load's errors on a damaged file are of many types; all mean the same to the user.
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if "can't allocate memory" in first or "out of memory" in first.lower():
            raise CheckpointError(f"{p}: its tensors do not fit in the memory available") from None
        if "central directory" in first or "failed finding" in first:
            first = "a damaged or truncated zip archive"
        elif "data.pkl" in first:
            first = "a zip archive, but not a PyTorch checkpoint"
        raise CheckpointError(f"{p}: not a readable checkpoint ({first})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: not a checkpoint (no state dict of tensors inside)")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{p}: not a checkpoint (no tensors inside)")
    for k, v in tensors.items():
        check_tensor_kind(v, f"{p}: tensor {k!r}")
    return tensors


def check_tensor_kind(t: torch.Tensor, where: str) -> None:
    """Refuse a tensor blockmerge cannot merge or write, when the file is opened (before any work,
    the same for every command, as the safetensors reader refuses an unsupported dtype).

    A pickle can hold what a safetensors file cannot: complex, unsigned 16-64 bit and quantized
    dtypes, and sparse layouts. Unsupported dtypes used to reach the writer ("KeyError:
    torch.complex64") while ``info`` listed them as if all was well.

    Sparse tensors are refused rather than densified: no Stable Diffusion checkpoint stores one, a
    dense copy can need any amount of memory whatever the file's size (the shape is free, only the
    stored values cost bytes), and the fix is one line for whoever made the file (``.to_dense()``).
    """
    if t.layout != torch.strided:
        layout = str(t.layout).removeprefix("torch.")
        raise CheckpointError(f"{where} has layout {layout}, not a dense tensor; blockmerge reads dense tensors only "
                              "(save it with .to_dense())")
    if t.dtype not in DTYPE_NAMES:
        raise CheckpointError(f"{where} has unsupported dtype {str(t.dtype).removeprefix('torch.')} "
                              f"(blockmerge reads {', '.join(_READABLE)})")


_READABLE = sorted({str(d).removeprefix("torch.") for d in DTYPE_NAMES}, key=str)


def _legacy_protocol(p: Path) -> int | None:
    """The pickle protocol of a torch.save legacy-format file, None for anything else."""
    from .checkpoint import TORCH_LEGACY_MAGIC

    try:
        with open(p, "rb") as f:
            head = f.read(32)
    except OSError:
        return None
    if head[:1] == b"\x80" and TORCH_LEGACY_MAGIC in head:
        return head[1]
    return None


class PickleReader:
    """The same interface as :class:`SafetensorsReader` over a weights-only loaded pickle."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._sd = load_pickled_state_dict(self.path)
        self.metadata: dict[str, str] = {}

    def keys(self) -> list[str]:
        return list(self._sd)

    def info(self, key: str) -> TensorInfo:
        t = self._sd[key]
        return TensorInfo(key, t.dtype, tuple(t.shape), -1, t.numel() * t.element_size())

    def __contains__(self, key: object) -> bool:
        return key in self._sd

    def get(self, key: str) -> torch.Tensor:
        return self._sd[key]

    def read_range(self, key: str, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        dest = out[: hi - lo]
        dest.copy_(self._sd[key].reshape(-1)[lo:hi])
        return dest

    def close(self) -> None:
        self._sd = {}

    def __enter__(self) -> PickleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
