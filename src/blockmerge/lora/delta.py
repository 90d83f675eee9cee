"""A LoRA as a lazy delta (task vector) over a model's single-file keys.

:class:`LoraDelta` is a merge-engine source in the ``delta`` space: it answers only for the
tensors the LoRA touches, and computes each one's ΔW (every module that lands on that tensor,
summed; q/k/v rows of fused tensors placed) in float32 when asked, so applying a LoRA is the
registry's ``add_delta`` (``A + α·D``) with α per block: the per-block LoRA strengths go through
the same weight specs, elemental rules, streaming writer and metadata as any merge.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from ..merge.declare import DELTA
from ..merge.nodes import Info, Scratch
from .formats import LoraFile, LoraModule, apply_dora, factor_shape, lora_factors, module_delta
from .names import NameTable, Target

__all__ = ["LoraDelta", "Matched", "match_modules", "module_shape"]


@dataclass(frozen=True)
class Matched:
    module: LoraModule
    target: Target
    bias: bool = False  # the module's ``diff_b`` on the target's bias


_numel = math.prod  # a shape's element count


def module_shape(lora: LoraFile, m: LoraModule) -> tuple[int, ...] | None:
    """The shape of the weight a module's factors make, from the factors alone (None for a
    bias-only module). Convolutions come out 4-D where the factors say so, else flattened 2-D."""
    return factor_shape(m.kind, {role: lora.shape(key) for role, key in m.keys.items()})


def _delta_numel(lora: LoraFile, m: LoraModule) -> int | None:
    shape = module_shape(lora, m)
    return None if shape is None else _numel(shape)


def match_modules(lora: LoraFile, table: NameTable, model_name: str = "the model", *,
                  check_shapes: bool = True) -> tuple[list[Matched], list[str]]:
    """The LoRA's modules that land on the model, and the names of those that do not.

    A module whose factors do not fit the tensor it names is an error naming both (a LoRA for
    another model with the same names, e.g. SD2's cross-attention on SD1); a file none of whose
    modules fits is an error saying which family the LoRA looks like. ``check_shapes=False`` is
    for a LoRA read without its model (the table then holds a full-size layout's shapes).
    """
    matched: list[Matched] = []
    missing: list[str] = []
    misfit: list[tuple[str, int, Target]] = []
    for name, m in lora.modules.items():
        target = table.lookup(name)
        if target is None:
            missing.append(name)
            continue
        if "diff" in m.keys or m.kind != "full":
            n = _delta_numel(lora, m)
            if check_shapes and n is not None and n != _numel(target.shape):
                misfit.append((name, n, target))
                continue
            matched.append(Matched(m, target))
        if "diff_b" in m.keys:
            if target.bias is None:
                missing.append(name + ".diff_b")
            else:
                matched.append(Matched(m, target, bias=True))
    if not matched:
        shapes = f" ({len(misfit)} have its names but other shapes)" if misfit else ""
        raise CheckpointError(f"{lora.path}: none of its {len(lora.modules)} modules fits {model_name} "
                              f"({table.arch.title}){shapes}{_family_guess(lora, table.arch)}")
    if misfit:
        name, n, target = misfit[0]
        more = f" (and {len(misfit) - 1} more modules)" if len(misfit) > 1 else ""
        raise CheckpointError(
            f"{lora.path}: module {name} makes {n} values but {model_name}'s {target.key} has "
            f"{list(target.shape)} ({_numel(target.shape)}){more}: the LoRA is for another model"
            f"{_family_guess(lora, table.arch)}"
        )
    return matched, missing


def _family_guess(lora: LoraFile, not_this: object) -> str:
    """``; it is a LoRA for SDXL`` when the LoRA on its own reads as another family."""
    from .inspect import detect_lora_family

    try:
        arch, _ = detect_lora_family(lora)
    except CheckpointError:
        return ""
    return f"; it is a LoRA for {arch.title}" if arch is not not_this else ""


class LoraDelta:
    """A LoRA's ΔW per single-file key of one model, computed on demand (a ``delta`` source).

    ``base`` is the source the delta is added to; it is read only for DoRA modules, whose change
    depends on the weight they change (A1111 applies DoRA against the weight as it stands, so a
    second LoRA's DoRA sees the first LoRA's result). ``dyn`` keeps the first ``dyn`` ranks of plain
    LoRA modules (A1111's ``dyn``).
    """

    space = DELTA

    def __init__(self, lora: LoraFile, table: NameTable, shapes: Mapping[str, tuple[int, ...]], *,
                 base: object | None = None, dyn: int | None = None, name: str | None = None,
                 model_name: str = "the model") -> None:
        self.lora = lora
        self.arch = table.arch
        self.name = name or lora.path.name
        self.base = base
        self.dyn = dyn
        self.matched, self.unmatched = match_modules(lora, table, model_name)
        self._by_key: dict[str, list[Matched]] = {}
        for mt in self.matched:
            key = mt.target.bias if mt.bias else mt.target.key
            assert key is not None
            self._by_key.setdefault(key, []).append(mt)
        self._shapes = {k: tuple(shapes[k]) for k in self._by_key}
        if any(mt.module.dora for mt in self.matched) and base is None:
            raise CheckpointError(f"{lora.path}: DoRA modules need the model they are applied to")

    def keys(self) -> list[str]:
        return list(self._by_key)

    def info(self, key: str) -> Info:
        return Info(torch.float32, self._shapes[key])

    def sliceable(self, key: str) -> bool:
        """Keys whose every module is a plain LoRA (``up @ down``, no Tucker core, no DoRA, stored
        untransposed): any rows of their ΔW are a product of those rows of ``up`` with ``down``.

        Why: computed whole, SD1.5's rank-128 attention deltas cost a fresh float32 tensor each (plus
        its copy and sum), and on a CPU the first touch of fresh pages cost more than the matmul;
        sliced, the executor streams them through the same reused buffers as every other tensor,
        and both workers share one large tensor's rows."""
        memo = self.__dict__.setdefault("_sliceable_memo", {})
        if key not in memo:
            mods = self._by_key[key]
            memo[key] = all(not mt.bias and mt.module.kind == "lora" and "mid" not in mt.module.keys
                            and not mt.module.dora and not mt.target.transpose for mt in mods)
        return memo[key]

    def get_range(self, key: str, lo: int, hi: int, scratch: Scratch) -> torch.Tensor:
        """Elements ``lo:hi`` of the flattened ΔW of a :meth:`sliceable` key, computed into ``scratch``."""
        out = scratch.get(("lora", id(self)), hi - lo, torch.float32)
        out.zero_()
        self.add_range_into(key, lo, hi, out, 1.0, scratch)
        return out

    def add_range_into(self, key: str, lo: int, hi: int, out: torch.Tensor, alpha: float, scratch: Scratch) -> None:
        """``out += alpha · ΔW.flatten()[lo:hi]`` for a :meth:`sliceable` key, without making ΔW:
        per module, ``addmm`` of the ``up`` rows whose output rows lie wholly in the range, and one
        row product for a row the range cuts at either end (fused q/k/v rows placed)."""
        cols = _numel(self._shapes[key][1:])
        first, last = -(-lo // cols), hi // cols  # the rows wholly inside [lo, hi)
        for mt in self._by_key[key]:
            up, down, scale = self._factors(mt, out.dtype)
            a_ = alpha * scale
            start = 0  # where this row range begins in the module's own ΔW
            for a, b in mt.target.rows or ((0, self._shapes[key][0]),):
                x0, x1 = max(a, first), min(b, last)
                if x0 < x1:
                    out[x0 * cols - lo:x1 * cols - lo].view(x1 - x0, cols).addmm_(
                        up[start + x0 - a:start + x1 - a], down, alpha=a_)
                for r in {lo // cols, (hi - 1) // cols}:  # rows cut by the range's ends
                    if a <= r < b and not (first <= r < last):
                        c0, c1 = max(lo, r * cols), min(hi, (r + 1) * cols)
                        row = scratch.get(("lora-row", id(self)), cols, out.dtype).view(1, cols)
                        torch.mm(up[start + r - a:start + r - a + 1], down, out=row)
                        out[c0 - lo:c1 - lo].add_(row.view(-1)[c0 - r * cols:c1 - r * cols], alpha=a_)
                start += b - a

    def _factors(self, mt: Matched, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
        up, down, scale = lora_factors(self.lora.tensors(mt.module), self.dyn)
        return up.to(dtype), down.to(dtype), scale

    def modules_of(self, key: str) -> list[Matched]:
        return list(self._by_key.get(key, ()))

    def get(self, key: str) -> torch.Tensor:
        mods = self._by_key[key]
        if len(mods) == 1 and not mods[0].bias and not mods[0].module.dora and not mods[0].target.rows \
                and not mods[0].target.transpose:
            # one module on the whole tensor (nearly every key): its ΔW is the answer, no zeros to add into
            mt = mods[0]
            d = module_delta(mt.module.kind or "", self.lora.tensors(mt.module), mt.target.shape,
                             name=f"{self.lora.path}: {mt.module.name}", dyn=self.dyn)
            return d.to(torch.float32).reshape(self._shapes[key])
        out = torch.zeros(self._shapes[key], dtype=torch.float32)
        weight: torch.Tensor | None = None
        for mt in mods:
            m = mt.module
            tensors = self.lora.tensors(m)
            if mt.bias:
                out.add_(tensors["diff_b"].to(out.dtype).reshape(out.shape))
                continue
            d = module_delta(m.kind or "", tensors, mt.target.shape, name=f"{self.lora.path}: {m.name}",
                             dyn=self.dyn).to(out.dtype)
            if m.dora:
                if weight is None:
                    weight = self.base.get(key).to(torch.float32)  # type: ignore[union-attr]
                d = apply_dora(mt.target.take(weight), d, tensors["dora_scale"])
            mt.target.add_into(out, d)
        return out
