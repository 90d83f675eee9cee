"""Write LoRA files as kohya writes them (``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``),
which A1111, ComfyUI, Forge and kohya's own scripts load."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import __version__
from ..io import atomic_write, output_dtype
from ..io.dtypes import dtype_name
from ..io.safetensors_io import SafetensorsStreamWriter
from ..merge.executor import NonFiniteError, all_finite

__all__ = ["kohya_metadata", "write_lora"]

_BASE_VERSION = {"SD1": "sd_v1", "SD2": "sd_v2", "SDXL": "sdxl_base_v1-0", "FLUX": "flux1", "SD3": "sd3",
                 "SD35L": "sd3"}


def kohya_metadata(arch: str, rank: int, conv_rank: int | None, record: Mapping[str, object]) -> dict[str, str]:
    """The ``ss_*`` fields kohya's scripts write that loaders read (family, module kind, ranks),
    and blockmerge's own record of how the file was made."""
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_base_model_version": _BASE_VERSION.get(arch, arch.lower()),
        "ss_v2": str(arch == "SD2"),
        "blockmerge": json.dumps({**record, "tool": "blockmerge", "version": __version__}, sort_keys=True,
                                 separators=(",", ":"), ensure_ascii=True),
    }
    if conv_rank:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)})
    return meta


def write_lora(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
               *, dtype: str = "fp16", overwrite: bool = False) -> Path:
    """Write ``tensors`` (sorted by key; ``.alpha`` scalars kept in float32, the factors cast to
    ``dtype``) atomically through the write policy."""
    out = Path(path)
    dt = output_dtype(dtype)
    ready: dict[str, torch.Tensor] = {}
    for k in sorted(tensors):
        t = tensors[k]
        ready[k] = t.to(torch.float32) if k.endswith(".alpha") else t.to(dt)
        if ready[k].is_floating_point() and not all_finite(ready[k]):  # never a LoRA that draws black
            raise NonFiniteError(f"{out}: {k} would hold non-finite values (inf/NaN) in {dtype_name(ready[k].dtype)}; "
                                 "an input LoRA may hold them, or a weight be too large for the output dtype")
    entries = [(k, t.dtype, tuple(t.shape)) for k, t in ready.items()]
    with atomic_write(out, overwrite=overwrite) as f:
        w = SafetensorsStreamWriter(f, entries, metadata)
        for k, t in ready.items():
            w.write(k, t)
        w.finish()
    return out
