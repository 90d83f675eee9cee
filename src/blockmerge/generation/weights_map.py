"""Which loaded pipeline parameter is which single-file tensor, per block: the map in-place edits use.

Why derived, not written again: the checkpoint's own single-file keys go through
:meth:`Architecture.block_of` (the one block mapping the merge engine uses), and
:func:`~blockmerge.architectures.ldm_names.unet_ldm_to_diffusers_names` (diffusers' own converter)
says which ``UNet2DConditionModel`` parameter each key became; the text encoders and the VAE get
their single-file slots from the same name tables that write them. Each loaded parameter then
knows its place in the single-file layout (a :class:`~blockmerge.architectures.ldm_names.Slot`:
the key, and for OpenCLIP's stacked q/k/v or transposed projection which part of it), so an edit
can gather a key's tensor from the loaded parameters, change it exactly as a file merge would, and
scatter it back. Sweeps (:mod:`blockmerge.experiments.inplace`) and prompt LoRAs
(:mod:`.lora_inplace`) both edit through this map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..architectures import BASE, Architecture
from ..architectures.ldm_names import (
    Slot,
    text_encoder_slot,
    unet_ldm_to_diffusers_names,
    vae_diffusers_to_ldm_name,
)
from ..errors import BlockmergeError

__all__ = [
    "PIPELINE_COMPONENTS",
    "TEXT_COMPONENTS",
    "BlockMap",
    "block_map",
    "gather",
    "pipeline_parameters",
    "scatter",
]

#: Pipeline attributes whose parameters belong to BASE (besides the U-Net's BASE keys).
PIPELINE_COMPONENTS = ("text_encoder", "text_encoder_2", "vae")
#: Components whose change invalidates encoded prompts.
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


def pipeline_parameters(pipeline: Any) -> dict[str, torch.nn.Parameter]:
    """Every parameter of the pipeline's U-Net, text encoder(s) and VAE, as ``component.name``."""
    out: dict[str, torch.nn.Parameter] = {}
    for comp in ("unet", *PIPELINE_COMPONENTS):
        module = getattr(pipeline, comp, None)
        if module is None:
            continue
        for name, p in module.named_parameters():
            out[f"{comp}.{name}"] = p
    return out


@dataclass(frozen=True)
class BlockMap:
    """Block id (and BASE) -> the qualified parameter names of the loaded pipeline it covers, and
    each parameter's place in the single-file layout."""

    architecture: Architecture
    blocks: dict[str, tuple[str, ...]]
    slots: dict[str, Slot] = field(repr=False)  # qualified name -> its single-file slot
    ldm_shapes: dict[str, tuple[int, ...]] = field(repr=False)  # single-file key -> shape in the file

    def params_of(self, block: str) -> tuple[str, ...]:
        if block not in self.blocks:
            raise BlockmergeError(f"block {block!r}: not one of {self.architecture.name}'s ({', '.join(self.blocks)})")
        return self.blocks[block]

    @property
    def ldm_key(self) -> dict[str, str]:
        """Qualified U-Net parameter name -> single-file key."""
        return {q: s.key for q, s in self.slots.items() if q.startswith("unet.")}

    def groups(self, block: str) -> dict[str, list[tuple[str, Slot]]]:
        """The single-file keys of ``block``, each with the parameters that make it (in slot order)."""
        out: dict[str, list[tuple[str, Slot]]] = {}
        for q in self.params_of(block):
            sl = self.slots[q]
            out.setdefault(sl.key, []).append((q, sl))
        for members in out.values():
            members.sort(key=lambda m: m[1].part)
        return out


def _checkpoint_shapes(path: Any) -> dict[str, tuple[int, ...]]:
    from ..io import open_checkpoint

    with open_checkpoint(path) as r:
        return {k: tuple(r.info(k).shape) for k in r.keys()}


def _base_slots(loaded: Any) -> dict[str, Slot]:
    """Slots of the text encoders' and VAE's parameters (BASE)."""
    out: dict[str, Slot] = {}
    pipe = loaded.pipeline
    specs = list(getattr(loaded.configs, "text_encoders", ()) or ())
    for attr, spec in zip(TEXT_COMPONENTS, specs, strict=False):
        module = getattr(pipe, attr, None)
        if module is None:
            continue
        for name, _ in module.named_parameters():
            out[f"{attr}.{name}"] = text_encoder_slot(name, spec.kind, spec.prefix)
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        for name, _ in vae.named_parameters():
            out[f"vae.{name}"] = Slot(vae_diffusers_to_ldm_name(name, dict(vae.config)))
    return out


def block_map(loaded: Any, ldm_shapes: Mapping[str, tuple[int, ...]] | Sequence[str] | None = None) -> BlockMap:
    """The block -> parameter mapping of a :class:`~blockmerge.generation.loader.LoadedModel`.

    ``ldm_shapes`` default to the keys and shapes of the file the model was loaded from (header
    only for safetensors). Raises :class:`BlockmergeError` if any U-Net parameter has no block: a
    mapping that silently missed tensors would make a "bypassed" block half bypassed.
    """
    arch: Architecture = loaded.architecture
    unet = loaded.pipeline.unet
    if ldm_shapes is None:
        shapes = _checkpoint_shapes(loaded.path)
    elif isinstance(ldm_shapes, Mapping):
        shapes = dict(ldm_shapes)
    else:
        shapes = {k: () for k in ldm_shapes}
    to_diffusers = unet_ldm_to_diffusers_names(list(shapes), dict(unet.config))
    params = pipeline_parameters(loaded.pipeline)
    blocks: dict[str, list[str]] = {b: [] for b in arch.all_ids}
    slots: dict[str, Slot] = {}
    for key, dname in to_diffusers.items():
        q = "unet." + dname
        if q not in params:
            continue  # a buffer, not a parameter
        blocks[arch.block_of(key)].append(q)
        slots[q] = Slot(key)
    missing = [q for q in params if q.startswith("unet.") and q not in slots]
    if missing:
        raise BlockmergeError(
            f"{loaded.path}: {len(missing)} U-Net parameters have no block in the checkpoint's keys (e.g. {missing[0]})"
        )
    try:
        base = _base_slots(loaded)
    except ValueError as e:
        raise BlockmergeError(f"{loaded.path}: {e}") from None
    for q in params:
        if q.startswith("unet."):
            continue
        blocks[BASE].append(q)
        if q in base:
            slots[q] = base[q]
    unmapped = [q for q in blocks[BASE] if q not in slots]
    if unmapped:
        raise BlockmergeError(f"{loaded.path}: {len(unmapped)} parameters have no single-file name (e.g. {unmapped[0]})")
    return BlockMap(arch, {b: tuple(v) for b, v in blocks.items()}, slots, shapes)


def gather(members: Sequence[tuple[str, Slot]], tensors: Mapping[str, torch.Tensor],
           shape: tuple[int, ...] | None) -> torch.Tensor:
    """One single-file tensor from the loaded parameters that make it (row parts, transposes, reshapes)."""
    parts = [tensors[q].detach() for q, _ in members]
    t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if members[0][1].transpose:
        t = t.T
    if shape and tuple(t.shape) != tuple(shape) and t.numel() == _numel(shape):
        t = t.reshape(shape)
    return t


def scatter(members: Sequence[tuple[str, Slot]], value: torch.Tensor, params: Mapping[str, torch.Tensor]) -> None:
    """Write a single-file tensor back into the loaded parameters it was gathered from."""
    first = params[members[0][0]]
    if members[0][1].transpose:
        value = value.reshape(first.T.shape).T if len(members) == 1 else value.T
    n = len(members)
    rows = value.reshape(n * first.shape[0], *first.shape[1:]) if n > 1 else value.reshape(first.shape)
    for i, (q, _) in enumerate(members):
        p = params[q]
        p.copy_((rows[i * p.shape[0]:(i + 1) * p.shape[0]] if n > 1 else rows).to(p.dtype))


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


