"""Stable Diffusion 3 / 3.5 (Medium: 24 joint blocks; Large: 38), as data (see :mod:`.base`).

Files: ``model.diffusion_model.joint_blocks.N.*`` (or bare, as diffusers also accepts) with the
embedders (``pos_embed``, ``x_embedder``, ``context_embedder``, ``y_embedder``, ``t_embedder``)
and ``final_layer``; optionally ``text_encoders.clip_l/clip_g/t5xxl.*`` and ``first_stage_model.*``.
Detection: diffusers' sentinel (``joint_blocks.0.context_block.adaLN_modulation.1.bias``) and the
number of joint blocks; SD3.5 Medium has the second attention (``x_block.attn2``) of MMDiT-X.

Blocks follow ComfyUI's ModelMergeSD3_2B (24 blocks) and ModelMergeSD35_Large (38) nodes: the
embedders are IN, each ``joint_blocks.N.`` is J<N>, ``final_layer`` is OUT; text encoders and VAE
are BASE. ComfyUI-saved files may carry ``model.model_sampling.sigmas`` (the noise schedule, a
buffer): it is copied from model A, never merged.
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
from .layout import split_columns, stack_layout
from .ldm_names import VAE_PREFIX

if TYPE_CHECKING:
    import torch

SD3_TE_PREFIXES = ("text_encoders.clip_l.", "text_encoders.clip_g.", "text_encoders.t5xxl.")
_SENTINEL = UNET_PREFIX + "joint_blocks.0.context_block.adaLN_modulation.1.bias"


def _builder(name: str):
    def build(size: str, variant: str | None = None) -> Mapping[str, torch.Tensor]:
        from .synthetic import transformer_family_state_dict

        return transformer_family_state_dict(name, size, variant)

    return build


def _lora_rows(shapes: Mapping[str, tuple[int, ...]]):
    from .transformer_names import lora_rows

    return lora_rows("sd3", shapes)


def _sd3(name: str, title: str, n: int, variants: tuple[Variant, ...]) -> Architecture:
    joint = tuple(f"J{i:02d}" for i in range(n))
    blocks = ("IN", *joint, "OUT")
    first, second = split_columns(joint, 2)
    return Architecture(
        name=name,
        title=title,
        block_ids=blocks,
        components=(
            Component("CLIP_L", SD3_TE_PREFIXES[0]),
            Component("CLIP_G", SD3_TE_PREFIXES[1]),
            Component("T5", SD3_TE_PREFIXES[2]),
            Component("VAE", VAE_PREFIX),
        ),
        diffusion_prefixes=(UNET_PREFIX, ""),
        diffusion_name="TRANSFORMER",
        rules=(
            KeyRule(r"joint_blocks\.(\d+)\.", "J{0:02d}"),
            KeyRule(r"(?:pos_embed|x_embedder|context_embedder|y_embedder|t_embedder)(?:\.|$)", "IN"),
            KeyRule(r"final_layer\.", "OUT"),
        ),
        sentinels=Sentinels(any_keys=(_SENTINEL,), counts=((UNET_PREFIX + "joint_blocks.", n),)),
        variants=variants,
        list_forms=(ListForm(blocks, "blocks"), ListForm((BASE, *blocks), "BASE first")),
        groups={"J": joint},
        layout=stack_layout([("IN", *first), (*second, "OUT")]),
        copied=(r"model\.model_sampling\..+",),
        prediction="flow matching (rectified flow)",
        lora=LoraNames(
            "lora_unet_", "ldm",
            (LoraEncoder("lora_te1_", SD3_TE_PREFIXES[0] + "transformer.", peft="text_encoder."),
             LoraEncoder("lora_te2_", SD3_TE_PREFIXES[1] + "transformer.", peft="text_encoder_2."),
             LoraEncoder("lora_te3_", SD3_TE_PREFIXES[2] + "transformer.", peft="text_encoder_3.")),
            "transformer.", _lora_rows,
        ),
        synthetic=_builder(name),
    )


SD3 = _sd3(
    "SD3", "Stable Diffusion 3 / 3.5 Medium", 24,
    (
        Variant("sd3.5-medium", "Stable Diffusion 3.5 Medium",
                Sentinels(prefixes=(UNET_PREFIX + "joint_blocks.0.x_block.attn2.",))),
        Variant("sd3-medium", "Stable Diffusion 3 Medium"),
    ),
)
SD35L = _sd3("SD35L", "Stable Diffusion 3.5 Large", 38, (Variant("large", "Stable Diffusion 3.5 Large"),))
