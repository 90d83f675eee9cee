"""The Stable Diffusion families blockmerge knows, as data (see :mod:`.base`).

Adding a family (SD3, Flux) means adding one :class:`Architecture` here and its detector.
"""

from __future__ import annotations

from .base import UNET_PREFIX, Architecture, Component

_IN0 = UNET_PREFIX + "input_blocks.0.0.weight"


def _has_prefix(keys: frozenset[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _max_input_block(keys: frozenset[str]) -> int:
    best = -1
    p = UNET_PREFIX + "input_blocks."
    for k in keys:
        if k.startswith(p):
            num = k[len(p):].split(".", 1)[0]
            if num.isdigit():
                best = max(best, int(num))
    return best


def _is_sd1(keys: frozenset[str]) -> bool:
    return (
        _IN0 in keys
        and _max_input_block(keys) == 11
        and _has_prefix(keys, "cond_stage_model.transformer.")
    )


def _is_sd2(keys: frozenset[str]) -> bool:
    return _IN0 in keys and _max_input_block(keys) == 11 and _has_prefix(keys, "cond_stage_model.model.")


def _is_sdxl(keys: frozenset[str]) -> bool:
    return (
        _IN0 in keys
        and _max_input_block(keys) == 8
        and _has_prefix(keys, "conditioner.embedders.0.transformer.")
        and _has_prefix(keys, "conditioner.embedders.1.model.")
        and _has_prefix(keys, UNET_PREFIX + "label_emb.")
    )


SD1 = Architecture(
    name="SD1",
    title="Stable Diffusion 1.x",
    n_in=12,
    n_out=12,
    components=(
        Component("TE", "cond_stage_model."),
        Component("VAE", "first_stage_model."),
    ),
    detector=_is_sd1,
)

SD2 = Architecture(
    name="SD2",
    title="Stable Diffusion 2.x",
    n_in=12,
    n_out=12,
    components=(
        Component("TE", "cond_stage_model."),
        Component("VAE", "first_stage_model."),
    ),
    detector=_is_sd2,
)

SDXL = Architecture(
    name="SDXL",
    title="Stable Diffusion XL (base)",
    n_in=9,
    n_out=9,
    components=(
        Component("TE1", "conditioner.embedders.0."),
        Component("TE2", "conditioner.embedders.1."),
        Component("VAE", "first_stage_model."),
    ),
    detector=_is_sdxl,
)

ARCHITECTURES: tuple[Architecture, ...] = (SD1, SD2, SDXL)
