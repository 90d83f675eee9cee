"""What is in a checkpoint: its blocks, dtypes, size, hashes and merge record (no tensor is read)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .architectures import BASE, EMA_PREFIX, detect, prediction_of
from .io import SafetensorsReader, file_hashes, open_checkpoint
from .merge.metadata import read_record


@dataclass(frozen=True)
class BlockRow:
    block: str
    tensors: int
    parameters: int


def block_table(path: str | os.PathLike[str]) -> tuple[str, list[BlockRow], list[BlockRow]]:
    """The architecture name, one row per id (BASE and weighted components first, then the blocks)
    and one row per component of BASE."""
    with open_checkpoint(path) as r:
        keys = [k for k in r.keys() if not k.startswith(EMA_PREFIX)]
        arch = detect(keys, str(path))
        counts = {b: [0, 0] for b in arch.all_ids}
        comps: dict[str, list[int]] = {}
        for k in keys:
            n = r.info(k).numel
            b = arch.block_of(k)
            counts[b][0] += 1
            counts[b][1] += n
            if b == BASE:
                c = comps.setdefault(arch.component_of(k), [0, 0])
                c[0] += 1
                c[1] += n
    rows = [BlockRow(b, c[0], c[1]) for b, c in counts.items()]
    comp_rows = [BlockRow(name, c[0], c[1]) for name, c in comps.items()]
    return arch.name, rows, comp_rows


def checkpoint_info(path: str | os.PathLike[str], *, hashes: bool = True) -> dict[str, Any]:
    """A summary of a checkpoint file as plain data (printed by ``blockmerge info``)."""
    p = Path(path)
    with open_checkpoint(p) as r:
        keys = r.keys()
        model_keys = [k for k in keys if not k.startswith(EMA_PREFIX)]
        arch = detect(model_keys, str(p))
        variant = arch.variant_of(model_keys)
        dtypes: Counter[str] = Counter()
        params = 0
        for k in keys:
            i = r.info(k)
            dtypes[str(i.dtype).replace("torch.", "")] += i.numel
            params += i.numel
        meta = dict(r.metadata)
        fmt = "safetensors" if isinstance(r, SafetensorsReader) else "pickle"
    info: dict[str, Any] = {
        "path": str(p),
        "architecture": arch.name,
        "title": variant.title if variant is not None else arch.title,
        "variant": variant.name if variant is not None else None,
        "prediction": prediction_of(arch, model_keys, meta),
        "format": fmt,
        "size_bytes": p.stat().st_size,
        "tensors": len(keys),
        "parameters": params,
        "ema_tensors": sum(k.startswith(EMA_PREFIX) for k in keys),
        "dtypes": dict(dtypes.most_common()),
    }
    if hashes:
        h = file_hashes(p)
        info["sha256"] = h.sha256
        info["model_hash"] = h.short
        info["legacy_hash"] = h.legacy
    record = read_record(meta, str(p))
    if record is not None:
        info["merge_record"] = record
    elif "sd_merge_recipe" in meta:
        info["sd_merge_recipe"] = meta["sd_merge_recipe"]
    other = {k: v for k, v in meta.items() if k not in ("blockmerge", "sd_merge_recipe", "sd_merge_models")}
    if other:
        info["metadata"] = {k: (v if len(v) <= 200 else v[:200] + "...") for k, v in other.items()}
    return info


@dataclass(frozen=True)
class TensorValues:
    key: str
    block: str
    values: dict[str, float]


def tensor_values(
    path: str | os.PathLike[str],
    method: str = "weighted_sum",
    params: dict[str, Any] | None = None,
    *,
    alpha: Any = None,
    beta: Any = None,
    base_alpha: float | None = None,
    base_beta: float | None = None,
    presets: Any = None,
) -> tuple[str, list[TensorValues]]:
    """The value of each of ``method``'s parameters that every tensor of ``path`` would get in a merge
    (block values, then elemental rules): what ``blockmerge blocks MODEL --alpha SPEC`` shows.

    Elemental rules are checked against the file's keys, so a rule that matches nothing is an error.
    """
    from .merge.declare import get_method
    from .merge.nodes import is_weight
    from .merge.params import check_rules, merged_params, resolve_params, values_for

    m = get_method(method)
    n = m.max_operands if m.max_operands is not None else m.min_operands
    given, given_as = merged_params(params, alpha, beta)
    with open_checkpoint(path) as r:
        keys = [k for k in r.keys() if not k.startswith(EMA_PREFIX) and is_weight(k, r.info(k).dtype)]
        arch = detect(keys + [k for k in r.keys() if k not in keys], str(path))
    pv = resolve_params(m, arch, n, given, bases={"alpha": base_alpha, "beta": base_beta}, presets=presets,
                        given_as=given_as)
    check_rules(pv, keys, arch.block_of, str(path))
    rows = [TensorValues(k, arch.block_of(k), values_for(pv, k, arch.block_of(k))) for k in sorted(keys)]
    return arch.name, rows
