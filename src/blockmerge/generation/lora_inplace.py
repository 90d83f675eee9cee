"""LoRAs put onto a loaded pipeline in place, and taken off bit-exactly afterwards.

The arithmetic is the merge engine's ``add_delta`` on each single-file tensor (``A + α·ΔW`` in
float32, α per block from the LoRA's strengths and block weights), gathered from and scattered back
to the loaded parameters through the one block map (:mod:`.weights_map`). So a prompt's
``<lora:NAME:1>`` draws what the same LoRA baked into a float32 checkpoint with ``blockmerge lora
apply`` draws, and the model is restored from copies of the parameters it changed, nothing else.
Several LoRAs go on in order, each DoRA module seeing the weights as the LoRAs before it left
them (A1111's order).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..architectures.ldm_names import Slot
from ..errors import CheckpointError
from ..merge.executor import all_finite
from ..merge.weights import BlockWeights
from .weights_map import block_map, gather, pipeline_parameters, scatter

__all__ = ["InPlaceLora", "key_members", "loras_applied"]


@dataclass(frozen=True)
class InPlaceLora:
    """A LoRA to put on a loaded model: its file, α per block (strengths included), A1111's ``dyn``."""

    path: Path
    weights: BlockWeights
    dyn: int | None = None
    label: str = ""


def _cached(loaded: Any, name: str, make: Any) -> Any:
    cache = getattr(loaded, "cache", None)
    if cache is None:
        return make()
    if name not in cache:
        cache[name] = make()
    return cache[name]


def key_members(loaded: Any) -> dict[str, list[tuple[str, Slot]]]:
    """Single-file key -> the loaded parameters that make it (in slot order), for the whole model."""

    def make() -> dict[str, list[tuple[str, Slot]]]:
        bmap = _cached(loaded, "block_map", lambda: block_map(loaded))
        out: dict[str, list[tuple[str, Slot]]] = {}
        for q, sl in bmap.slots.items():
            out.setdefault(sl.key, []).append((q, sl))
        for members in out.values():
            members.sort(key=lambda m: m[1].part)
        return out

    return _cached(loaded, "key_members", make)


def _table(loaded: Any) -> Any:
    from ..lora.names import name_table

    bmap = _cached(loaded, "block_map", lambda: block_map(loaded))
    return _cached(loaded, "lora_names", lambda: name_table(loaded.architecture, bmap.ldm_shapes))


class _Current:
    """The loaded weights as a source (what DoRA modules are applied against)."""

    def __init__(self, members: dict[str, list[tuple[str, Slot]]], params: dict[str, torch.Tensor],
                 shapes: dict[str, tuple[int, ...]]) -> None:
        self.members, self.params, self.shapes = members, params, shapes

    def get(self, key: str) -> torch.Tensor:
        return gather(self.members[key], self.params, self.shapes.get(key))


@contextlib.contextmanager
def loras_applied(loaded: Any, loras: Sequence[InPlaceLora]) -> Iterator[list[str]]:
    """Within the ``with`` the model runs with ``loras``; afterwards every parameter is bit-identical
    to before (also when the body raises). Yields warnings (modules that fit nothing)."""
    from ..lora.delta import LoraDelta
    from ..lora.formats import open_lora

    if not loras:
        yield []
        return
    params = pipeline_parameters(loaded.pipeline)
    members = key_members(loaded)
    table = _table(loaded)
    shapes = _cached(loaded, "block_map", lambda: block_map(loaded)).ldm_shapes
    arch = loaded.architecture
    saved: dict[str, torch.Tensor] = {}
    warnings: list[str] = []
    try:
        with torch.no_grad():
            for lora in loras:
                with open_lora(lora.path) as lf:
                    delta = LoraDelta(lf, table, shapes, base=_Current(members, params, shapes), dyn=lora.dyn,
                                      name=lora.label or lora.path.stem, model_name=str(loaded.path))
                    if delta.unmatched:
                        warnings.append(f"{lora.path}: {len(delta.unmatched)} of {len(lf.modules)} modules fit "
                                        f"nothing in {Path(loaded.path).name} (e.g. {delta.unmatched[0]})")
                    for key in delta.keys():
                        mem = members.get(key)
                        if mem is None:  # a tensor the pipeline does not hold (SD2's unused last layer)
                            continue
                        alpha = lora.weights.value(key, arch.block_of(key))
                        if alpha == 0.0:
                            continue
                        for q, _ in mem:
                            if q not in saved:
                                saved[q] = params[q].detach().clone()
                        w = gather(mem, params, shapes.get(key))
                        a = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32, copy=True)
                        # add_delta's kernel, cast once to the model's dtype, where the check belongs (an
                        # fp16 model overflows where float32 does not); without it the sampler's "latents
                        # are not finite" would not say why
                        d = delta.get(key).to(a.dtype, copy=True).mul_(alpha).add_(a).to(w.dtype)
                        if not all_finite(d):
                            raise CheckpointError(f"{lora.path}: {key}: the LoRA at {alpha:g} makes non-finite "
                                                  "values (inf/NaN); its factors may hold them")
                        scatter(mem, d, params)
        yield warnings
    finally:
        with torch.no_grad():
            for q, t in saved.items():
                params[q].copy_(t)


def lora_label(path: str | os.PathLike[str]) -> str:
    return Path(path).stem
