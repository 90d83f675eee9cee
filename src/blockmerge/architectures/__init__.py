"""Architectures: detection, block ids, key -> block rules (the one block mapping)."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import CheckpointError
from .base import BASE, EMA_PREFIX, UNET_PREFIX, Architecture, Component, block_ids_for
from .sd import ARCHITECTURES, SD1, SD2, SDXL

__all__ = [
    "ARCHITECTURES",
    "BASE",
    "EMA_PREFIX",
    "SD1",
    "SD2",
    "SDXL",
    "UNET_PREFIX",
    "Architecture",
    "Component",
    "block_ids_for",
    "by_name",
    "detect",
]


def by_name(name: str) -> Architecture:
    for arch in ARCHITECTURES:
        if arch.name.lower() == name.lower():
            return arch
    raise KeyError(name)


def detect(keys: Iterable[str], source: str = "model") -> Architecture:
    """The architecture of a single-file (A1111/LDM layout) checkpoint, from its key names.

    Raises :class:`CheckpointError` naming ``source`` when the layout is not one we know.
    """
    ks = frozenset(keys)
    for arch in ARCHITECTURES:
        if arch.detector(ks):
            return arch
    if any(k.startswith(("down_blocks.", "unet.down_blocks.", "mid_block.")) for k in ks):
        raise CheckpointError(
            f"{source}: this looks like a diffusers-format model, not a single-file (A1111/LDM) "
            "checkpoint with model.diffusion_model.* keys"
        )
    if not any(k.startswith(UNET_PREFIX) for k in ks):
        raise CheckpointError(
            f"{source}: unknown architecture: no Stable Diffusion U-Net keys (model.diffusion_model.*) found"
        )
    raise CheckpointError(
        f"{source}: unknown architecture: a U-Net is present but the layout is not SD1.x, SD2.x or "
        "SDXL base (single-file checkpoints need their text encoder keys, cond_stage_model.* or "
        "conditioner.embedders.*)"
    )
