"""What a LoRA touches, per block: which family it is for, its modules, ranks and the size of ΔW.

Without a model, the family is the one whose LoRA names and shapes (from its full-size layout)
fit the most modules; ties (a LoRA on modules SD1 and SD2 share) are settled by kohya's
``ss_base_model_version`` / ``ss_v2`` metadata, then by family order.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..architectures import Architecture
from ..errors import CheckpointError
from .delta import _delta_numel, _numel, match_modules, module_shape
from .formats import LoraFile, module_delta, open_lora
from .names import NameTable, family_table, lora_families, name_table

__all__ = ["BlockSummary", "LoraReport", "detect_lora_family", "lora_blocks", "lora_info", "module_norm"]


def _fits(lora: LoraFile, table: NameTable) -> tuple[int, int]:
    """(modules whose name the table knows, of those the ones whose factors fit its shapes)."""
    names = shapes = 0
    for name, m in lora.modules.items():
        t = table.lookup(name)
        if t is None:
            continue
        names += 1
        k = _delta_numel(lora, m)
        if k is None or k == _numel(t.shape):
            shapes += 1
    return names, shapes


def _meta_family(meta: dict[str, str]) -> str | None:
    v = str(meta.get("ss_base_model_version", "")).lower()
    if v.startswith("sdxl"):
        return "SDXL"
    if v.startswith("flux"):
        return "FLUX"
    if v.startswith("sd3"):
        return "SD3"
    if str(meta.get("ss_v2", "")) == "True" or v.startswith("sd_v2"):
        return "SD2"
    if v.startswith("sd_v1"):
        return "SD1"
    return None


def detect_lora_family(lora: LoraFile) -> tuple[Architecture, NameTable]:
    """The family (and its full-size name table) a LoRA read on its own is for.

    Names decide first (SDXL's ``lora_te2_``, Flux's ``double_blocks``); where several families
    know as many names (SD1 and SD2 share every module name), kohya's metadata decides, then how
    many modules fit the full-size shapes (SD2's 1024-wide cross-attention), then family order.
    A LoRA for a small test model of a family fits its names but not the full-size shapes.
    """
    hint = _meta_family(lora.metadata)
    scored = []
    for order, arch in enumerate(lora_families(lora.modules)):
        variants = [v.name for v in arch.variants] or [None]
        for var in variants:
            table = family_table(arch, var)
            names, shapes = _fits(lora, table)
            if names:
                scored.append(((names, arch.name == hint, shapes, -order), arch, table))
    if not scored:
        raise CheckpointError(f"{lora.path}: a LoRA whose {len(lora.modules)} modules fit no family blockmerge "
                              "knows (SD1, SD2, SDXL, Flux, SD3)")
    _, arch, table = max(scored, key=lambda s: s[0])
    return arch, table


def module_norm(kind: str, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> float:
    """||ΔW||_F of one module at strength 1 (for a plain LoRA from the r x r Gram matrices, without
    forming ΔW: ||U D||² = Σ (UᵀU) ⊙ (D Dᵀ))."""
    if kind == "lora" and "mid" not in tensors:
        up = tensors["up"].double().reshape(tensors["up"].shape[0], -1)
        down = tensors["down"].double().reshape(tensors["down"].shape[0], -1)
        sq = float(((up.T @ up) * (down @ down.T)).sum())
        rank = down.shape[0]
        if "scale" in tensors:
            s = float(tensors["scale"])
        elif "alpha" in tensors:
            s = float(tensors["alpha"]) / rank
        else:
            s = 1.0
        return abs(s) * math.sqrt(max(sq, 0.0))
    return float(module_delta(kind, tensors, shape).double().norm())


@dataclass
class BlockSummary:
    block: str
    modules: int = 0
    ranks: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    norm: float = 0.0  # sqrt of the sum of the modules' ||ΔW||² at strength 1
    names: list[str] = field(default_factory=list)


@dataclass
class LoraReport:
    path: Path
    architecture: str
    title: str
    modules: int
    matched: int
    unmatched: list[str]
    unknown_keys: list[str]
    blocks: list[BlockSummary]
    metadata: dict[str, str]
    for_model: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "architecture": self.architecture, "title": self.title,
            "for_model": self.for_model, "modules": self.modules, "matched": self.matched,
            "unmatched": self.unmatched, "unknown_keys": self.unknown_keys,
            "blocks": [b.__dict__ for b in self.blocks],
        }


def lora_blocks(path: str | os.PathLike[str], model: str | os.PathLike[str] | None = None) -> LoraReport:
    """Per block of the family (BASE = text encoders): the modules a LoRA touches, their ranks and
    kinds, and ||ΔW|| at strength 1. With ``model``, the model's own layout names the modules."""
    from ..merge.nodes import FileSource

    with open_lora(path) as lora:
        if model is not None:
            src = FileSource(model)
            try:
                arch = src.arch
                table = name_table(arch, {k: tuple(src.info(k).shape) for k in src.keys()})
            finally:
                src.close()
        else:
            arch, table = detect_lora_family(lora)
        matched, missing = match_modules(lora, table, str(model) if model else f"{arch.title} (full size)",
                                         check_shapes=model is not None)
        summary = {b: BlockSummary(b) for b in arch.all_ids}
        for mt in matched:
            if mt.bias:
                continue
            b = summary[table.block_of(mt.target)]
            m = mt.module
            b.modules += 1
            b.names.append(m.name)
            r = lora.rank(m)
            if r is not None and r not in b.ranks:
                b.ranks.append(r)
            kind = (m.kind or "") + ("+dora" if m.dora else "")
            if kind not in b.kinds:
                b.kinds.append(kind)
            shape = mt.target.shape if model is not None else (module_shape(lora, m) or mt.target.shape)
            n = module_norm(m.kind or "", lora.tensors(m), shape)
            b.norm = math.sqrt(b.norm ** 2 + n ** 2)
        for b in summary.values():
            b.ranks.sort()
        return LoraReport(Path(path), arch.name, arch.title, len(lora.modules), len(matched), missing,
                          list(lora.unknown), list(summary.values()), dict(lora.metadata),
                          str(model) if model else None)


def lora_info(path: str | os.PathLike[str], *, hashes: bool = True) -> dict[str, Any]:
    """``blockmerge info`` for a LoRA file: family, modules by kind, ranks, alphas, hashes, metadata."""
    from ..io import addnet_hash, file_hashes
    from .library import lora_hash

    p = Path(path)
    with open_lora(p) as lora:
        arch, _ = detect_lora_family(lora)
        kinds: dict[str, int] = {}
        ranks: dict[int, int] = {}
        alphas: set[float] = set()
        params = 0
        for m in lora.modules.values():
            k = (m.kind or "?") + ("+dora" if m.dora else "")
            kinds[k] = kinds.get(k, 0) + 1
            r = lora.rank(m)
            if r is not None:
                ranks[r] = ranks.get(r, 0) + 1
            if "alpha" in m.keys:
                alphas.add(float(lora.reader.get(m.keys["alpha"])))  # type: ignore[attr-defined]
            params += sum(_numel(lora.shape(key)) for key in m.keys.values())
        info: dict[str, Any] = {
            "path": str(p), "kind": "LoRA", "architecture": arch.name, "title": arch.title,
            "size_bytes": p.stat().st_size, "modules": len(lora.modules), "module_kinds": kinds,
            "ranks": {str(k): v for k, v in sorted(ranks.items())}, "alphas": sorted(alphas),
            "parameters": params, "unknown_keys": len(lora.unknown),
            "metadata": {k: v for k, v in lora.metadata.items() if len(v) < 2000},
        }
    if hashes:
        h = file_hashes(p)
        info["sha256"] = h.sha256
        info["addnet_hash"] = addnet_hash(p)
        info["lora_hash"] = lora_hash(p)
    return info


def is_lora_file(path: str | os.PathLike[str]) -> bool:
    """Whether a file holds LoRA modules rather than a checkpoint of a known family (for ``blocks``
    and ``info``, which take either). Unreadable files answer False: the checkpoint path then says why."""
    from ..architectures import detect
    from ..io import open_checkpoint
    from .formats import group_modules

    try:
        with open_checkpoint(path) as r:
            keys = r.keys()
    except CheckpointError:
        return False
    try:
        detect(keys, str(path))
        return False
    except CheckpointError:
        pass
    modules, _ = group_modules(keys)
    return bool(modules)
