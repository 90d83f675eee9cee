"""Merging and resizing LoRAs (kohya's ``merge_lora.py`` / ``svd_merge_lora.py`` / ``resize_lora.py``).

- merge without a rank **concatenates**: ``[w1·up1 | w2·up2] @ [down1; down2]`` is exactly
  ``w1·ΔW1 + w2·ΔW2``, at the sum of the ranks (plain LoRA modules only: LoHa and LoKr products do
  not concatenate);
- merge with ``--rank R`` adds the ΔWs (any module kind) and factors the sum to rank R by SVD;
- resize factors each module's ΔW again, to a rank or to the smallest rank that keeps a share of
  ||ΔW||². For a plain LoRA module this needs no d x d matrix: with ``up = Qu·Ru`` and
  ``downᵀ = Qd·Rd``, ``ΔW = Qu (Ru Rdᵀ) Qdᵀ`` and the SVD of the r x r core gives ΔW's exactly.

Each LoRA's strength and block spec weigh its modules (``FILE[:STRENGTH[:BLOCKS]]``), so a merge
can take only some blocks of one LoRA. Modules are matched by the tensor they change, whatever
spelling each file uses, and written in kohya's naming for the family. DoRA modules depend on the
weight they change and are refused (bake them into a checkpoint with ``lora apply`` instead).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import BlockmergeError, CheckpointError
from ..io import check_output_path
from ..merge.executor import all_finite
from ..merge.presets import PresetBook, load_presets
from .delta import _numel, match_modules, module_shape
from .formats import LoraFile, LoraModule, module_delta, open_lora
from .inspect import detect_lora_family
from .lowrank import low_rank
from .names import Target
from .spec import LoraSpec
from .writer import kohya_metadata, write_lora

__all__ = ["LoraOpResult", "merge_loras", "resize_lora"]


@dataclass
class LoraOpResult:
    output: Path
    architecture: str
    modules: int
    ranks: dict[str, int]  # module -> rank written
    energy: dict[str, tuple[float, float]] = field(default_factory=dict)  # block -> (kept, total)
    warnings: list[str] = field(default_factory=list)


def _plain(m: LoraModule) -> bool:
    return m.kind == "lora" and "mid" not in m.keys


def _check_no_dora(lora: LoraFile) -> None:
    dora = [n for n, m in lora.modules.items() if m.dora]
    if dora:
        raise BlockmergeError(f"{lora.path}: has {len(dora)} DoRA modules (e.g. {dora[0]}), whose change depends on "
                              "the model's weight; bake it into a checkpoint with `blockmerge lora apply` instead")


def _require_finite(lora: LoraFile, m: LoraModule, *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``ts`` unchanged, or an error naming the file and module if any holds inf/NaN (its factors
    have no low-rank re-factoring, and a resized LoRA of them would draw black)."""
    if not all(all_finite(t) for t in ts):
        raise CheckpointError(f"{lora.path}: module {m.name}: holds non-finite values (inf/NaN)")
    return ts


def _core_factors(up: torch.Tensor, down: torch.Tensor, rank: int | None, energy: float | None
                  ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Re-factor ``up @ down`` (2-D, float64) exactly through its r x r core; returns new up, down and
    (kept, total) ||ΔW||²."""
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    uc, s, vch = torch.linalg.svd(ru @ rd.T)
    k = _keep(s, rank, energy)
    total = float(s.pow(2).sum())
    kept = float(s[:k].pow(2).sum())
    return (qu @ uc[:, :k]) * s[:k], vch[:k] @ qd.T, kept, total


def _keep(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """How many singular values to keep: at most ``rank``, and the fewest that keep ``energy`` of Σs²."""
    k = s.numel()
    if energy is not None:
        sq = s.double().pow(2)
        tot = float(sq.sum())
        if tot > 0:
            cum = torch.cumsum(sq, 0) / tot
            k = min(k, int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype)).item()) + 1)
    if rank is not None:
        k = min(k, rank)
    return max(k, 1) if s.numel() else 0


def _shape_factors(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    k = up.shape[1]
    if len(shape) == 4:
        return up.reshape(shape[0], k, 1, 1), down.reshape(k, *shape[1:])
    return up.reshape(shape[0], k), down.reshape(k, -1)


def _put(out: dict[str, torch.Tensor], name: str, up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...]) -> None:
    u, d = _shape_factors(up.float(), down.float(), shape)
    out[name + ".lora_up.weight"] = u.contiguous()
    out[name + ".lora_down.weight"] = d.contiguous()
    out[name + ".alpha"] = torch.tensor(float(u.shape[1]))


def _scaled_factors(lora: LoraFile, m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain module's (up·scale, down) as 2-D float64."""
    t = lora.tensors(m)
    up = t["up"].double().reshape(t["up"].shape[0], -1)
    down = t["down"].double().reshape(t["down"].shape[0], -1)
    rank = down.shape[0]
    scale = float(t["scale"]) if "scale" in t else (float(t["alpha"]) / rank if "alpha" in t else 1.0)
    return up * scale, down


def _block_energy(energy: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    return {b: (v[0], v[1]) for b, v in energy.items()}


def resize_lora(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    rank: int | None = None,
    keep_energy: float | None = None,
    dtype: str = "fp16",
    overwrite: bool = False,
) -> LoraOpResult:
    """Re-factor every module of a LoRA to ``rank`` and/or the smallest rank keeping ``keep_energy``
    of its ||ΔW||² (the library form of ``blockmerge lora resize``)."""
    if rank is None and keep_energy is None:
        raise BlockmergeError("lora resize: give --rank, --keep-energy or both")
    if rank is not None and rank < 1:
        raise BlockmergeError(f"--rank {rank}: must be at least 1")
    if keep_energy is not None and not (math.isfinite(keep_energy) and 0.0 < keep_energy <= 1.0):
        raise BlockmergeError(f"--keep-energy {keep_energy}: must be in (0, 1]")
    out = Path(output)
    check_output_path(out, [Path(path)], overwrite)
    with open_lora(path) as lora:
        _check_no_dora(lora)
        arch, table = detect_lora_family(lora)
        matched, missing = match_modules(lora, table, f"{arch.title} (full size)", check_shapes=False)
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        energy: dict[str, list[float]] = {}
        for mt in matched:
            if mt.bias:
                continue
            m, target = mt.module, mt.target
            shape = module_shape(lora, m) or target.shape
            if _plain(m):
                up, down = _require_finite(lora, m, *_scaled_factors(lora, m))
                nu, nd, kept, total = _core_factors(up, down, rank, keep_energy)
            else:
                d, = _require_finite(lora, m, module_delta(m.kind or "", lora.tensors(m), shape, name=m.name).double())
                mat = d.reshape(d.shape[0], -1)
                s = torch.linalg.svdvals(mat)
                k = _keep(s, rank, keep_energy)
                f = low_rank(mat, k, name=m.name, exact=True)
                nu, nd, kept, total = f.up, f.down, f.kept, f.total
            e = energy.setdefault(table.block_of(target), [0.0, 0.0])
            e[0] += kept
            e[1] += total
            _put(tensors, m.name, nu, nd, shape)
            ranks[m.name] = nu.shape[1]
        meta = dict(lora.metadata)
        meta.update(kohya_metadata(arch.name, max(ranks.values(), default=0), None, {
            "method": "lora_resize", "source": Path(path).name, "rank": rank, "keep_energy": keep_energy,
            "kept_energy": {b: (v[0] / v[1] if v[1] > 0 else 1.0) for b, v in energy.items()},
        }))
        meta.pop("sshs_model_hash", None)  # the tensors changed: A1111 must hash them anew
        meta.pop("sshs_legacy_hash", None)
        write_lora(out, tensors, meta, dtype=dtype, overwrite=overwrite)
        warnings = [f"{path}: {len(missing)} modules fit nothing in {arch.title} and are left out (e.g. {missing[0]})"] if missing else []
        return LoraOpResult(out, arch.name, len(ranks), ranks, _block_energy(energy), warnings)


def merge_loras(
    specs: Sequence[LoraSpec],
    output: str | os.PathLike[str],
    *,
    rank: int | None = None,
    conv_rank: int | None = None,
    dtype: str = "fp16",
    overwrite: bool = False,
    presets: PresetBook | None = None,
) -> LoraOpResult:
    """Merge LoRAs into one (the library form of ``blockmerge lora merge``): concatenated when no
    ``rank`` is given, else the weighted sum of their ΔWs factored to ``rank`` (``conv_rank`` for
    3x3 convolutions, default ``rank``)."""
    if len(specs) < 1:
        raise BlockmergeError("lora merge: give at least one LoRA")
    for r, arg in ((rank, "--rank"), (conv_rank, "--conv-rank")):
        if r is not None and r < 1:
            raise BlockmergeError(f"{arg} {r}: must be at least 1")
    if conv_rank is not None and rank is None:
        raise BlockmergeError(f"--conv-rank {conv_rank}: only with --rank (without it the LoRAs are concatenated, "
                              "every rank kept)")
    out = Path(output)
    check_output_path(out, [s.path for s in specs], overwrite)
    book = presets if presets is not None else load_presets()
    with contextlib.ExitStack() as stack:
        loras: list[LoraFile] = []
        for s in specs:
            lf = open_lora(s.path)
            stack.callback(lf.close)
            _check_no_dora(lf)
            loras.append(lf)
        arch, table = detect_lora_family(loras[0])
        warnings: list[str] = []
        # target -> [(lora index, module, weight)]
        by_target: dict[tuple[str, tuple[tuple[int, int], ...]], list[tuple[int, LoraModule, float]]] = {}
        targets: dict[tuple[str, tuple[tuple[int, int], ...]], Target] = {}
        shapes: dict[tuple[str, tuple[tuple[int, int], ...]], tuple[int, ...]] = {}
        for i, (spec, lf) in enumerate(zip(specs, loras, strict=True)):
            if i:
                other, _ = detect_lora_family(lf)
                if other is not arch:
                    raise BlockmergeError(f"{spec.path}: is a {other.title} LoRA but {specs[0].path} is {arch.title}")
            weights = spec.weights(arch, book, f"LoRA {i + 1} ({spec.label}): blocks")
            matched, missing = match_modules(lf, table, f"{arch.title} (full size)", check_shapes=False)
            if missing:
                warnings.append(f"{spec.path}: {len(missing)} modules fit nothing in {arch.title} and are left out")
            for mt in matched:
                if mt.bias:
                    warnings.append(f"{spec.path}: {mt.module.name}: a bias difference cannot be merged; left out")
                    continue
                key = (mt.target.key, mt.target.rows)
                w = weights.value(mt.target.key, table.block_of(mt.target))
                if w == 0.0:
                    continue
                shape = module_shape(lf, mt.module) or mt.target.shape
                if key in shapes and len(shape) != len(shapes[key]) and _numel(shape) == _numel(shapes[key]):
                    shape = max(shape, shapes[key], key=len)  # a 1x1 conv written as Linear by one LoRA
                elif key in shapes and shape != shapes[key]:
                    raise BlockmergeError(f"{spec.path}: {mt.module.name} makes {list(shape)}, but an earlier LoRA's "
                                          f"module on the same tensor makes {list(shapes[key])}")
                shapes[key] = shape
                targets[key] = mt.target
                by_target.setdefault(key, []).append((i, mt.module, w))
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        energy: dict[str, list[float]] = {}
        for key, parts in by_target.items():
            target = targets[key]
            shape = shapes[key]
            name = table.native.get(key) or parts[0][1].name
            if rank is None:
                if not all(_plain(m) for _, m, _ in parts):
                    kinds = sorted({m.kind or "" for _, m, _ in parts if not _plain(m)})
                    raise BlockmergeError(f"{name}: {', '.join(kinds)} modules cannot be concatenated; give --rank "
                                          "to merge by SVD")
                ups, downs = [], []
                for i, m, w in parts:
                    up, down = _scaled_factors(loras[i], m)
                    ups.append(up * w)
                    downs.append(down)
                _put(tensors, name, torch.cat(ups, dim=1), torch.cat(downs, dim=0), shape)
                ranks[name] = sum(u.shape[1] for u in ups)
                continue
            total = None
            for i, m, w in parts:
                d = module_delta(m.kind or "", loras[i].tensors(m), shape, name=m.name).double() * w
                total = d if total is None else total.add_(d)
            assert total is not None
            r = conv_rank if (len(shape) == 4 and shape[2:] != (1, 1) and conv_rank) else rank
            f = low_rank(total.reshape(total.shape[0], -1), r, name=name)
            e = energy.setdefault(table.block_of(target), [0.0, 0.0])
            e[0] += f.kept
            e[1] += f.total
            _put(tensors, name, f.up, f.down, shape)
            ranks[name] = f.up.shape[1]
        if not tensors:
            raise BlockmergeError("lora merge: every module has weight 0; nothing to write")
        record: dict[str, Any] = {
            "method": "lora_merge", "mode": "concat" if rank is None else "svd", "rank": rank, "conv_rank": conv_rank,
            "loras": [{"file": s.path.name, "strength": s.unet, "te": s.te, "blocks": s.blocks} for s in specs],
        }
        write_lora(out, tensors, kohya_metadata(arch.name, max(ranks.values()), conv_rank, record),
                   dtype=dtype, overwrite=overwrite)
        return LoraOpResult(out, arch.name, len(ranks), ranks, _block_energy(energy), warnings)

