"""Flux.1 (dev and schnell), as data (see :mod:`.base`).

Files: BFL's original release (bare names: ``double_blocks.N.*``, ``single_blocks.N.*``, ``img_in``,
``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``, ``final_layer``) and ComfyUI / Forge
checkpoints (the same under ``model.diffusion_model.``, with or without ``text_encoders.clip_l.*``,
``text_encoders.t5xxl.*`` and ``vae.*``). Detection: diffusers' sentinel
(``double_blocks.0.img_attn.norm.key_norm.scale``), 19 double and 38 single blocks; schnell has no
``guidance_in`` (diffusers tells the two apart the same way).

Blocks follow ComfyUI's ModelMergeFlux1 node: each ``double_blocks.N.`` and ``single_blocks.N.``
prefix is a block (D00-D18, S00-S37), the input embedders (``img_in``, ``time_in``,
``guidance_in``, ``vector_in``, ``txt_in``) are IN and ``final_layer`` is OUT. The weight lists
supermerger and LoRA Block Weight write for Flux have 61 values: CLIP, T5, IN, D00-D18, S00-S37,
OUT (their ``BLOCKIDFLUX``), so the two text encoders are weighted components of their own; the
VAE (which supermerger does not merge) is BASE.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .base import (
    BASE,
    UNET_PREFIX,
    Architecture,
    Component,
    KeyRule,
    ListForm,
    LoraEncoder,
    LoraNames,
    Sentinels,
    Variant,
)
from .layout import stack_layout

if TYPE_CHECKING:
    import torch

CLIP_PREFIX = "text_encoders.clip_l."
T5_PREFIX = "text_encoders.t5xxl."
FLUX_VAE_PREFIX = "vae."

N_DOUBLE = 19
N_SINGLE = 38
DOUBLE = tuple(f"D{i:02d}" for i in range(N_DOUBLE))
SINGLE = tuple(f"S{i:02d}" for i in range(N_SINGLE))
BLOCKS = ("IN", *DOUBLE, *SINGLE, "OUT")


def _build(size: str, variant: str | None = None) -> Mapping[str, torch.Tensor]:
    from .synthetic import transformer_family_state_dict

    return transformer_family_state_dict("FLUX", size, variant)


def _lora_rows(shapes: Mapping[str, tuple[int, ...]]):
    from .transformer_names import lora_rows

    return lora_rows("flux", shapes)


FLUX = Architecture(
    name="FLUX",
    title="Flux.1",
    block_ids=BLOCKS,
    components=(
        Component("CLIP", CLIP_PREFIX),
        Component("T5", T5_PREFIX),
        Component("VAE", FLUX_VAE_PREFIX),
    ),
    weighted_components=("CLIP", "T5"),
    diffusion_prefixes=(UNET_PREFIX, ""),
    diffusion_name="TRANSFORMER",
    rules=(
        KeyRule(r"double_blocks\.(\d+)\.", "D{0:02d}"),
        KeyRule(r"single_blocks\.(\d+)\.", "S{0:02d}"),
        KeyRule(r"(?:img_in|txt_in|time_in|vector_in|guidance_in)\.", "IN"),
        KeyRule(r"final_layer\.", "OUT"),
    ),
    sentinels=Sentinels(
        any_keys=(UNET_PREFIX + "double_blocks.0.img_attn.norm.key_norm.scale",),
        counts=((UNET_PREFIX + "double_blocks.", N_DOUBLE), (UNET_PREFIX + "single_blocks.", N_SINGLE)),
        # Flux.2, Flux "3" and Chroma reuse the block names with other layouts (diffusers' sentinels).
        absent=(UNET_PREFIX + "single_stream_modulation.", UNET_PREFIX + "early_stream_modulations.",
                UNET_PREFIX + "distilled_guidance_layer."),
    ),
    variants=(
        Variant("dev", "Flux.1 dev", Sentinels(prefixes=(UNET_PREFIX + "guidance_in.",))),
        Variant("schnell", "Flux.1 schnell"),
    ),
    list_forms=(
        ListForm(BLOCKS, "blocks"),
        ListForm((BASE, *BLOCKS), "BASE first"),
        ListForm(("CLIP", "T5", *BLOCKS), "CLIP, T5, then the blocks", "supermerger / LoRA Block Weight"),
    ),
    groups={"D": DOUBLE, "S": SINGLE, "DOUBLE": DOUBLE, "SINGLE": SINGLE},
    layout=stack_layout([("IN", *DOUBLE), SINGLE[:19], (*SINGLE[19:], "OUT")]),
    prediction="flow matching (rectified flow)",
    lora=LoraNames(
        "lora_unet_", "ldm",
        (LoraEncoder("lora_te1_", CLIP_PREFIX + "transformer.", peft="text_encoder."),
         LoraEncoder("lora_te3_", T5_PREFIX + "transformer.", peft="text_encoder_2.")),
        "transformer.", _lora_rows,
    ),
    synthetic=_build,
)
