"""Model families: one description per family (detection, blocks, key rules, layouts, names).

The families blockmerge knows are registered here in detection order; :func:`register` adds one
at run time (a test defines a toy family this way, and a user can describe their own).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from ..errors import CheckpointError
from .base import (
    BASE,
    EMA_PREFIX,
    UNET_PREFIX,
    Architecture,
    Component,
    Generation,
    KeyRule,
    Layout,
    ListForm,
    LoraEncoder,
    LoraNames,
    Sentinels,
    TextEncoderSpec,
    Variant,
    block_ids_for,
)
from .flux import FLUX
from .sd import SD1, SD2, SDXL, V_PRED_MARKER, ZTSNR_MARKER
from .sd3 import SD3, SD35L

__all__ = [
    "ARCHITECTURES",
    "BASE",
    "EMA_PREFIX",
    "FLUX",
    "SD1",
    "SD2",
    "SD3",
    "SD35L",
    "SDXL",
    "UNET_PREFIX",
    "V_PRED_MARKER",
    "ZTSNR_MARKER",
    "Architecture",
    "Component",
    "Generation",
    "KeyRule",
    "Layout",
    "ListForm",
    "LoraEncoder",
    "LoraNames",
    "Sentinels",
    "TextEncoderSpec",
    "Variant",
    "block_ids_for",
    "by_name",
    "copied_as_is",
    "detect",
    "families",
    "families_for_list_length",
    "list_lengths",
    "prediction_of",
    "register",
    "unregister",
]

_LOCK = threading.Lock()
_FAMILIES: list[Architecture] = [SD1, SD2, SDXL, FLUX, SD3, SD35L]
#: The built-in families, in detection order (see :func:`families` for the registered ones).
ARCHITECTURES: tuple[Architecture, ...] = tuple(_FAMILIES)


def families() -> tuple[Architecture, ...]:
    """Every registered family, in detection order."""
    return tuple(_FAMILIES)


def register(arch: Architecture) -> Architecture:
    """Add a family (detected after the ones registered before it); its name must be new."""
    with _LOCK:
        if any(a.name.upper() == arch.name.upper() for a in _FAMILIES):
            raise ValueError(f"a family named {arch.name!r} is already registered")
        _FAMILIES.append(arch)
    return arch


def unregister(arch: Architecture) -> None:
    """Remove a family added with :func:`register` (the built-in ones stay)."""
    if arch in ARCHITECTURES:
        raise ValueError(f"{arch.name} is built in")
    with _LOCK:
        if arch in _FAMILIES:
            _FAMILIES.remove(arch)


def by_name(name: str) -> Architecture:
    for arch in _FAMILIES:
        if arch.name.lower() == name.lower():
            return arch
    raise KeyError(name)


def list_lengths() -> tuple[int, ...]:
    """Every weight-list length some registered family accepts (presets must have one of them)."""
    return tuple(sorted({f.length for a in _FAMILIES for f in a.list_forms}))


def families_for_list_length(n: int) -> list[Architecture]:
    return [a for a in _FAMILIES if a.list_form(n) is not None]


def copied_as_is(key: str) -> bool:
    """Is ``key`` a marker or buffer some family copies from model A and never merges?"""
    return any(a.is_copied(key) for a in _FAMILIES)


def _titles() -> str:
    names = [a.title for a in _FAMILIES]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def detect(keys: Iterable[str], source: str = "model") -> Architecture:
    """The family of a single-file checkpoint, from its key names (sentinels, as diffusers does).

    Raises :class:`CheckpointError` naming ``source`` when the layout is not one we know.
    """
    ks = frozenset(keys)
    for arch in _FAMILIES:
        if arch.matches(ks):
            return arch
    if any(k.startswith(("down_blocks.", "unet.down_blocks.", "mid_block.", "transformer_blocks.",
                         "transformer.transformer_blocks.")) for k in ks):
        raise CheckpointError(
            f"{source}: this looks like a diffusers-format model, not a single-file checkpoint "
            "(model.diffusion_model.* keys, or the original release's names)"
        )
    if not any(k.startswith(UNET_PREFIX) for k in ks) and not any(a.diffusion_rest(k) is not None for a in _FAMILIES for k in ks):
        raise CheckpointError(
            f"{source}: unknown architecture: no diffusion model keys (model.diffusion_model.*) found"
        )
    raise CheckpointError(
        f"{source}: unknown architecture: a diffusion model is present but the layout is not {_titles()} "
        "(single-file U-Net checkpoints need their text encoder keys, cond_stage_model.* or conditioner.embedders.*)"
    )


def prediction_of(arch: Architecture, keys: Iterable[str], metadata: dict[str, str] | None = None) -> str:
    """What a file says about its prediction type, in words (``blockmerge info``, the loader).

    SDXL files with the ``v_pred`` marker are v-prediction, with ``ztsnr`` also zero terminal SNR
    (NoobAI-style; what A1111, Forge and ComfyUI read); ``modelspec.prediction_type`` metadata is
    reported when there is no marker; otherwise the family's own description.
    """
    ks = set(keys)
    if arch.is_copied(V_PRED_MARKER) and V_PRED_MARKER in ks:
        return "v_prediction, zero terminal SNR" if ZTSNR_MARKER in ks else "v_prediction"
    meta = (metadata or {}).get("modelspec.prediction_type")
    if meta:
        return f"{meta} (modelspec.prediction_type)"
    return arch.prediction
