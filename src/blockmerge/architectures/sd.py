"""The Stable Diffusion U-Net families (SD1.x, SD2.x, SDXL base), as data (see :mod:`.base`).

The key -> block table follows the Merge Block Weighted extension (the one the article used):
``input_blocks.N.*`` -> IN<N>, ``middle_block.*`` -> M00, ``output_blocks.N.*`` -> OUT<N>,
``time_embed.*`` and ``label_emb.*`` -> IN00, ``out.*`` -> the last OUT block, and every tensor
outside the U-Net (text encoders, VAE) -> BASE. Detection is diffusers' idea of the families
(input block count and the text encoders' prefixes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .base import (
    BASE,
    UNET_PREFIX,
    Architecture,
    Component,
    Generation,
    KeyRule,
    ListForm,
    LoraEncoder,
    LoraNames,
    Sentinels,
    TextEncoderSpec,
    block_ids_for,
)
from .layout import u_layout
from .ldm_names import SD1_TE_PREFIX, SD2_TE_PREFIX, SDXL_TE1_PREFIX, SDXL_TE2_PREFIX, VAE_PREFIX

if TYPE_CHECKING:
    import torch

_IN0 = UNET_PREFIX + "input_blocks.0.0.weight"


def _unet_rules(n_out: int) -> tuple[KeyRule, ...]:
    return (
        KeyRule(r"input_blocks\.(\d+)\.", "IN{0:02d}"),
        KeyRule(r"middle_block\.", "M00"),
        KeyRule(r"output_blocks\.(\d+)\.", "OUT{0:02d}"),
        KeyRule(r"(?:time_embed|label_emb)\.", "IN00"),
        KeyRule(r"out\.", f"OUT{n_out - 1:02d}"),
    )


def _unet_groups(ids: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return {
        "IN": tuple(b for b in ids if b.startswith("IN")),
        "OUT": tuple(b for b in ids if b.startswith("OUT")),
        "M": ("M00",),
        "MID": ("M00",),
    }


#: LoRA Block Weight's short lists: BASE and the blocks a plain (attention-only) LoRA touches.
#: Blocks they leave out take the value that keeps model A (LBW gives them 0: no LoRA there).
_LBW17 = (BASE, "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
          *(f"OUT{i:02d}" for i in range(3, 12)))
_LBW12 = (BASE, "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6)))


def _forms(ids: tuple[str, ...], lbw: tuple[str, ...]) -> tuple[ListForm, ...]:
    return (
        ListForm(ids, "blocks", "Merge Block Weighted"),
        ListForm((BASE, *ids), "BASE first", "supermerger / LoRA Block Weight"),
        ListForm(lbw, "LoRA blocks", "LoRA Block Weight"),
    )


def _builder(name: str):
    def build(size: str, variant: str | None = None) -> Mapping[str, torch.Tensor]:
        from .synthetic import unet_family_state_dict

        return unet_family_state_dict(name, size)

    return build


def _lora(naming: str, *te: LoraEncoder) -> LoraNames:
    return LoraNames("lora_unet_", naming, te, "unet.")


_SD_BLOCKS = block_ids_for(12, 12)
_XL_BLOCKS = block_ids_for(9, 9)


def _sd(name: str, title: str, te_prefix: str, te_kind: str, pad: str, drop_last: bool, v_res: int | None) -> Architecture:
    return Architecture(
        name=name,
        title=title,
        block_ids=_SD_BLOCKS,
        components=(Component("TE", "cond_stage_model."), Component("VAE", VAE_PREFIX)),
        rules=_unet_rules(12),
        sentinels=Sentinels(keys=(_IN0,), prefixes=(te_prefix,), counts=((UNET_PREFIX + "input_blocks.", 12),)),
        list_forms=_forms(_SD_BLOCKS, _LBW17),
        layout=u_layout(_SD_BLOCKS),
        groups=_unet_groups(_SD_BLOCKS),
        id_aliases={"MID": "M"},
        prediction="epsilon" if v_res is None else "epsilon, or v for 768-v models (detected when loading)",
        generation=Generation(
            pipeline="StableDiffusionPipeline",
            denoiser="UNet2DConditionModel",
            denoiser_converter="convert_ldm_unet_checkpoint",
            vae="AutoencoderKL",
            vae_converter="convert_ldm_vae_checkpoint",
            text_encoders=(TextEncoderSpec(te_kind, te_prefix, False, pad, drop_last),),
            default_resolution=512,
            vae_scaling=0.18215,
            v_resolution=v_res,
        ),
        lora=_lora("diffusers", LoraEncoder("lora_te_", te_prefix, "transformers" if te_kind == "clip" else te_kind,
                                            "text_encoder.")),
        synthetic=_builder(name),
    )


SD1 = _sd("SD1", "Stable Diffusion 1.x", SD1_TE_PREFIX, "clip", "<|endoftext|>", False, None)
SD2 = _sd("SD2", "Stable Diffusion 2.x", SD2_TE_PREFIX, "open_clip", "!", True, 768)

#: NoobAI-style v-prediction SDXL files carry these empty marker tensors (ComfyUI writes them as
#: ``torch.tensor([])``); A1111, Forge and ComfyUI switch to v-prediction (``v_pred``) and a
#: zero-terminal-SNR schedule (``ztsnr``) when they are present.
V_PRED_MARKER = "v_pred"
ZTSNR_MARKER = "ztsnr"

SDXL = Architecture(
    name="SDXL",
    title="Stable Diffusion XL (base)",
    block_ids=_XL_BLOCKS,
    components=(
        Component("TE1", "conditioner.embedders.0."),
        Component("TE2", "conditioner.embedders.1."),
        Component("VAE", VAE_PREFIX),
    ),
    rules=_unet_rules(9),
    sentinels=Sentinels(
        keys=(_IN0,),
        prefixes=(SDXL_TE1_PREFIX, SDXL_TE2_PREFIX, UNET_PREFIX + "label_emb."),
        counts=((UNET_PREFIX + "input_blocks.", 9),),
    ),
    list_forms=_forms(_XL_BLOCKS, _LBW12),
    layout=u_layout(_XL_BLOCKS),
    groups=_unet_groups(_XL_BLOCKS),
    id_aliases={"MID": "M"},
    copied=(V_PRED_MARKER, ZTSNR_MARKER),
    prediction="epsilon",  # unless the v_pred / ztsnr markers say otherwise (architectures.prediction_of)
    generation=Generation(
        pipeline="StableDiffusionXLPipeline",
        denoiser="UNet2DConditionModel",
        denoiser_converter="convert_ldm_unet_checkpoint",
        vae="AutoencoderKL",
        vae_converter="convert_ldm_vae_checkpoint",
        text_encoders=(
            TextEncoderSpec("clip", SDXL_TE1_PREFIX, False, "<|endoftext|>"),
            TextEncoderSpec("open_clip", SDXL_TE2_PREFIX, True, "!"),
        ),
        default_resolution=1024,
        vae_scaling=0.13025,
    ),
    # kohya trains SDXL on its LDM-named U-Net, so SDXL LoRAs name U-Net modules input_blocks_4_1_...
    lora=_lora("ldm", LoraEncoder("lora_te1_", SDXL_TE1_PREFIX, "transformers", "text_encoder."),
               LoraEncoder("lora_te2_", SDXL_TE2_PREFIX, "open_clip", "text_encoder_2.")),
    synthetic=_builder("SDXL"),
)

UNET_FAMILIES: tuple[Architecture, ...] = (SD1, SD2, SDXL)
