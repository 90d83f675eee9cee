"""diffusers/transformers names -> A1111/LDM single-file names (U-Net, KL VAE, CLIP, OpenCLIP).

Why this exists: blockmerge works on single-file checkpoints (the A1111 / ComfyUI layout), while
the models we run, test against and build on the meta device are diffusers / transformers
modules. diffusers ships only the LDM -> diffusers direction
(``diffusers.loaders.single_file_utils``); the reverse, which we need to describe real files
from a diffusers config (and to write a diffusers model as a real single file), is written here
once, as plain rules over the module structure. ``tests/test_layouts.py`` proves it against
diffusers' own converters, value for value.

The one direction we do *not* write ourselves is LDM -> diffusers for the U-Net:
:func:`unet_ldm_to_diffusers_names` runs diffusers' converter and reads off where each tensor
went, so the in-place sweeps map blocks onto a loaded ``UNet2DConditionModel`` from the one
block mapping (``Architecture.block_of`` on LDM keys) with diffusers' own idea of the names.

All converters work on any tensors, meta tensors included: a layout (names and shapes of a real
file) is the conversion of a state dict built on the meta device.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import UNET_PREFIX

__all__ = [
    "SD1_TE_PREFIX",
    "Slot",
    "SD2_TE_PREFIX",
    "SDXL_TE1_PREFIX",
    "SDXL_TE2_PREFIX",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "clip_to_ldm",
    "open_clip_to_ldm",
    "text_encoder_slot",
    "unet_diffusers_to_ldm_name",
    "unet_ldm_to_diffusers_name",
    "unet_ldm_to_diffusers_names",
    "unet_to_ldm",
    "vae_diffusers_to_ldm_name",
    "vae_to_ldm",
]

VAE_PREFIX = "first_stage_model."
#: SD1: transformers CLIPTextModel (ViT-L/14) under this prefix, ``text_model.*`` names kept.
SD1_TE_PREFIX = "cond_stage_model.transformer."
#: SD2: OpenCLIP ViT-H text tower (``transformer.resblocks.N...``, ``ln_final``, ...).
SD2_TE_PREFIX = "cond_stage_model.model."
#: SDXL first encoder: CLIP ViT-L/14, transformers names like SD1.
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."
#: SDXL second encoder: OpenCLIP ViT-bigG/14 text tower.
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."

# ----------------------------------------------------------------------------------------------
# U-Net
# ----------------------------------------------------------------------------------------------

_UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    # SDXL's micro-conditioning ("text_time") and SD2-upscaler-style class embeddings both
    # live in LDM's label_emb.0 Sequential(Linear, SiLU, Linear).
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "class_embedding.linear_1.": "label_emb.0.0.",
    "class_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}

# diffusers ResnetBlock2D -> LDM ResBlock (in_layers = GroupNorm, SiLU, Conv; out_layers =
# GroupNorm, SiLU, Dropout, Conv; emb_layers = SiLU, Linear).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_DOWNSAMPLE = re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)")
_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_UPSAMPLE = re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _resnet_rest(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_UNET_RESNET.get(head, head)}.{tail}"


def _layers_per_block(config: Mapping[str, Any]) -> int:
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        # LDM's UNetModel has one num_res_blocks for every level in all SD families.
        raise ValueError(f"per-level layers_per_block {lpb!r} has no single-file layout")
    return lpb


def unet_diffusers_to_ldm_name(name: str, config: Mapping[str, Any]) -> str:
    """The single-file key (with ``model.diffusion_model.``) of a ``UNet2DConditionModel`` tensor.

    ``config`` is the diffusers U-Net config: ``layers_per_block`` fixes the LDM block numbering
    (``layers_per_block + 1`` LDM blocks per level), ``up_block_types`` tells whether a level's
    upsampler sits at index 1 (no attention) or 2 (after the attention) of its last block.
    """
    lpb = _layers_per_block(config)
    per_level = lpb + 1
    for dif, ldm in _UNET_FIXED.items():
        if name.startswith(dif):
            return UNET_PREFIX + ldm + name[len(dif):]
    m = _DOWN.fullmatch(name)
    if m:
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = per_level * level + j + 1
        if kind == "resnets":
            return f"{UNET_PREFIX}input_blocks.{n}.0.{_resnet_rest(rest)}"
        return f"{UNET_PREFIX}input_blocks.{n}.1.{rest}"
    m = _DOWNSAMPLE.fullmatch(name)
    if m:
        n = per_level * (int(m[1]) + 1)
        return f"{UNET_PREFIX}input_blocks.{n}.0.op.{m[2]}"
    m = _MID.fullmatch(name)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"{UNET_PREFIX}middle_block.{2 * j}.{_resnet_rest(rest)}"
        return f"{UNET_PREFIX}middle_block.{2 * j + 1}.{rest}"
    m = _UP.fullmatch(name)
    if m:
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = per_level * level + j
        if kind == "resnets":
            return f"{UNET_PREFIX}output_blocks.{n}.0.{_resnet_rest(rest)}"
        return f"{UNET_PREFIX}output_blocks.{n}.1.{rest}"
    m = _UPSAMPLE.fullmatch(name)
    if m:
        level = int(m[1])
        n = per_level * level + lpb
        has_attention = "CrossAttn" in config["up_block_types"][level]
        return f"{UNET_PREFIX}output_blocks.{n}.{2 if has_attention else 1}.conv.{m[2]}"
    raise ValueError(f"no single-file name for U-Net tensor {name!r}")


_LDM_INPUT = re.compile(r"input_blocks\.(\d+)\.(\d+)\.(.+)")
_LDM_MIDDLE = re.compile(r"middle_block\.(\d+)\.(.+)")
_LDM_OUTPUT = re.compile(r"output_blocks\.(\d+)\.(\d+)\.(.+)")
_RESNET_BACK = {v: k for k, v in _UNET_RESNET.items()}


def _resnet_back(rest: str) -> str:
    for ldm, dif in _RESNET_BACK.items():
        if rest.startswith(ldm + "."):
            return dif + rest[len(ldm):]
    return rest


def _ldm_candidate(rest: str, config: Mapping[str, Any]) -> str | None:
    per_level = _layers_per_block(config) + 1
    for dif, ldm in _UNET_FIXED.items():
        if rest.startswith(ldm):
            if ldm.startswith("label_emb") and (config.get("addition_embed_type") is None) != dif.startswith("class"):
                continue
            return dif + rest[len(ldm):]
    m = _LDM_INPUT.fullmatch(rest)
    if m:
        n, part, tail = int(m[1]), int(m[2]), m[3]
        level, j = (n - 1) // per_level, (n - 1) % per_level
        if part == 0 and tail.startswith("op."):
            return f"down_blocks.{n // per_level - 1}.downsamplers.0.conv.{tail[3:]}"
        if part == 0:
            return f"down_blocks.{level}.resnets.{j}.{_resnet_back(tail)}"
        return f"down_blocks.{level}.attentions.{j}.{tail}"
    m = _LDM_MIDDLE.fullmatch(rest)
    if m:
        k, tail = int(m[1]), m[2]
        return f"mid_block.attentions.0.{tail}" if k % 2 else f"mid_block.resnets.{k // 2}.{_resnet_back(tail)}"
    m = _LDM_OUTPUT.fullmatch(rest)
    if m:
        n, part, tail = int(m[1]), int(m[2]), m[3]
        level, j = n // per_level, n % per_level
        if part == 0:
            return f"up_blocks.{level}.resnets.{j}.{_resnet_back(tail)}"
        if tail.startswith("conv.") and (part == 2 or "CrossAttn" not in config["up_block_types"][level]):
            return f"up_blocks.{level}.upsamplers.0.conv.{tail[5:]}"
        return f"up_blocks.{level}.attentions.{j}.{tail}"
    return None


def unet_ldm_to_diffusers_name(key: str, config: Mapping[str, Any]) -> str:
    """The ``UNet2DConditionModel`` parameter a single-file U-Net key is, without diffusers.

    Why besides :func:`unet_ldm_to_diffusers_names`: that one runs diffusers' converter, and
    importing diffusers' single-file code costs seconds (47 s on a loaded 2-core machine), which
    a LoRA bake of a few seconds should not pay. This is the inverse of
    :func:`unet_diffusers_to_ldm_name`, and every answer is checked against it (a candidate that
    does not map back to ``key`` is an error); tests prove both agree with diffusers' converter.
    """
    rest = key[len(UNET_PREFIX):] if key.startswith(UNET_PREFIX) else key
    cand = _ldm_candidate(rest, config)
    if cand is None or unet_diffusers_to_ldm_name(cand, config) != UNET_PREFIX + rest:
        raise ValueError(f"no diffusers name for U-Net tensor {key!r}")
    return cand


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A ``UNet2DConditionModel`` state dict renamed to single-file keys (same tensors, same shapes)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        key = unet_diffusers_to_ldm_name(name, config)
        if key in out:
            raise ValueError(f"two U-Net tensors map to {key!r}")
        out[key] = t
    return out


def unet_ldm_to_diffusers_names(ldm_keys: Iterable[str], unet_config: Mapping[str, Any]) -> dict[str, str]:
    """``{single-file U-Net key: UNet2DConditionModel parameter name}``, as diffusers itself maps them.

    Runs ``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`` on a distinct
    placeholder tensor per key and follows each placeholder to the name it lands on, so the
    answer is diffusers' own, not a second hand-written copy of the rules. Keys outside
    ``model.diffusion_model.`` are ignored; a U-Net key diffusers drops is absent from the result.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    keys = [k for k in ldm_keys if k.startswith(UNET_PREFIX)]
    placeholders = {k: torch.empty(0, device="meta") for k in keys}
    by_id = {id(t): k for k, t in placeholders.items()}
    converted = convert_ldm_unet_checkpoint(placeholders, dict(unet_config))
    out: dict[str, str] = {}
    for dname, t in converted.items():
        k = by_id.get(id(t))
        if k is None:
            raise ValueError(f"diffusers produced {dname!r} from no single tensor of the checkpoint")
        out[k] = dname
    return out


# ----------------------------------------------------------------------------------------------
# KL VAE (AutoencoderKL <-> LDM first_stage_model)
# ----------------------------------------------------------------------------------------------

_VAE_DOWN = re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)")
_VAE_DOWNSAMPLE = re.compile(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)")
_VAE_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)")
_VAE_UPSAMPLE = re.compile(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)")
_VAE_MID_RESNET = re.compile(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)")
_VAE_MID_ATTN = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)")
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# LDM's AttnBlock uses 1x1 Conv2d for these; diffusers' Attention uses Linear.
_VAE_CONV_ATTN = ("q.weight", "k.weight", "v.weight", "proj_out.weight")


def _vae_resnet_rest(rest: str) -> str:
    return rest.replace("conv_shortcut.", "nin_shortcut.", 1) if rest.startswith("conv_shortcut.") else rest


def vae_diffusers_to_ldm_name(name: str, config: Mapping[str, Any], prefix: str = VAE_PREFIX) -> str:
    """The single-file key (under ``prefix``: ``first_stage_model.``, Flux checkpoints ``vae.``) of an
    ``AutoencoderKL`` tensor.

    LDM numbers decoder levels from the lowest resolution up (``up.3`` runs first), diffusers in
    execution order (``up_blocks.0`` runs first), so the decoder index is reversed; ``config``
    (``block_out_channels``) gives the number of levels.
    """
    n_levels = len(config["block_out_channels"])
    for side in ("encoder", "decoder"):
        if name.startswith(f"{side}.conv_norm_out."):
            return f"{prefix}{side}.norm_out.{name[len(side) + len('.conv_norm_out.'):]}"
    m = _VAE_DOWN.fullmatch(name)
    if m:
        return f"{prefix}encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet_rest(m[3])}"
    m = _VAE_DOWNSAMPLE.fullmatch(name)
    if m:
        return f"{prefix}encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = _VAE_UP.fullmatch(name)
    if m:
        level = n_levels - 1 - int(m[1])
        return f"{prefix}decoder.up.{level}.block.{m[2]}.{_vae_resnet_rest(m[3])}"
    m = _VAE_UPSAMPLE.fullmatch(name)
    if m:
        level = n_levels - 1 - int(m[1])
        return f"{prefix}decoder.up.{level}.upsample.conv.{m[2]}"
    m = _VAE_MID_RESNET.fullmatch(name)
    if m:
        return f"{prefix}{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet_rest(m[3])}"
    m = _VAE_MID_ATTN.fullmatch(name)
    if m:
        module, _, param = m[2].rpartition(".")
        if module not in _VAE_ATTN:
            raise ValueError(f"no single-file name for VAE tensor {name!r}")
        return f"{prefix}{m[1]}.mid.attn_1.{_VAE_ATTN[module]}.{param}"
    if name.split(".")[0] in ("quant_conv", "post_quant_conv") or re.fullmatch(
        r"(encoder|decoder)\.conv_(in|out)\.(weight|bias)", name
    ):
        return prefix + name
    raise ValueError(f"no single-file name for VAE tensor {name!r}")


def vae_to_ldm(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], prefix: str = VAE_PREFIX
) -> dict[str, torch.Tensor]:
    """An ``AutoencoderKL`` state dict as single-file tensors (mid-block attention as 1x1 convs)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        key = vae_diffusers_to_ldm_name(name, config, prefix)
        if key.endswith(_VAE_CONV_ATTN) and t.ndim == 2:
            t = t.reshape(*t.shape, 1, 1)
        out[key] = t
    return out


# ----------------------------------------------------------------------------------------------
# Text encoders
# ----------------------------------------------------------------------------------------------


def _text_model_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise transformers' CLIP names to the ``text_model.*`` form.

    transformers >= 5.6 flattened ``CLIPTextModel`` (no ``text_model.`` prefix) while
    ``CLIPTextModelWithProjection`` still nests it; single files always use the nested names.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if name.startswith("text_model.") or name == "text_projection.weight":
            out[name] = t
        else:
            out["text_model." + name] = t
    return out


def clip_to_ldm(
    state_dict: Mapping[str, torch.Tensor], prefix: str = SD1_TE_PREFIX, position_ids: bool = True
) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` state dict under a single-file prefix.

    Real SD1 / SDXL files carry ``text_model.embeddings.position_ids`` (int64 ``[1, 77]``), a
    buffer transformers no longer saves; ``position_ids=True`` adds it, as ``arange`` on the
    position embedding's device (the meta device gives a layout, not values).
    """
    named = _text_model_names(state_dict)
    out = {prefix + k: t for k, t in named.items()}
    if position_ids:
        pos = named["text_model.embeddings.position_embedding.weight"]
        out[prefix + "text_model.embeddings.position_ids"] = torch.arange(
            pos.shape[0], dtype=torch.int64, device=pos.device
        ).unsqueeze(0)
    return out


_OPEN_CLIP_FIXED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")
_OPEN_CLIP_PARTS = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}
_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")


def open_clip_to_ldm(
    state_dict: Mapping[str, torch.Tensor], prefix: str, logit_scale: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model state dict in OpenCLIP's single-file layout.

    OpenCLIP keeps q, k and v as one ``nn.MultiheadAttention`` ``in_proj_weight`` ``[3C, C]``
    (q, k, v stacked in that order) and applies ``x @ text_projection``, so the projection is
    the transpose of transformers' ``Linear`` weight. Real SD2 / SDXL files also keep the
    CLIP ``logit_scale`` scalar; pass it to include it. ``position_ids`` is not an OpenCLIP tensor.
    """
    named = _text_model_names(state_dict)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, t in named.items():
        if name == "text_model.embeddings.position_ids":
            continue
        if name in _OPEN_CLIP_FIXED:
            out[prefix + _OPEN_CLIP_FIXED[name]] = t
            continue
        if name == "text_projection.weight":
            out[prefix + "text_projection"] = t.T.contiguous()
            continue
        m = _OPEN_CLIP_LAYER.fullmatch(name)
        if not m:
            raise ValueError(f"no OpenCLIP name for text encoder tensor {name!r}")
        layer, rest = int(m[1]), m[2]
        q = _QKV.fullmatch(rest)
        if q:
            qkv.setdefault((layer, q[2]), {})[q[1]] = t
            continue
        for dif, oc in _OPEN_CLIP_PARTS.items():
            if rest.startswith(dif):
                out[f"{prefix}transformer.resblocks.{layer}.{oc}{rest[len(dif):]}"] = t
                break
        else:
            raise ValueError(f"no OpenCLIP name for text encoder tensor {name!r}")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"layer {layer} {kind}: q/k/v incomplete ({sorted(parts)})")
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    if logit_scale is not None:
        out[prefix + "logit_scale"] = logit_scale
    return out


# ----------------------------------------------------------------------------------------------
# Loaded text encoders -> single-file keys (for in-place edits of BASE)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """Where a loaded module's parameter sits in a single-file tensor: the key, which of ``parts``
    equal row blocks it is (OpenCLIP stacks q, k, v into one ``in_proj``), and whether the file
    stores it transposed (OpenCLIP's ``text_projection``). Reshapes (the VAE's 1x1-conv attention
    against diffusers' Linear) are taken from the file's shapes by the caller."""

    key: str
    part: int = 0
    parts: int = 1
    transpose: bool = False


def text_encoder_slot(name: str, kind: str, prefix: str) -> Slot:
    """The single-file slot of a transformers CLIP text-model parameter ``name`` (any transformers
    version's naming), stored at ``prefix`` as ``kind`` ``"clip"`` (transformers names) or
    ``"open_clip"`` (the layout :func:`open_clip_to_ldm` writes; the same tables)."""
    (norm,) = _text_model_names({name: torch.empty(0)})
    if kind == "clip":
        return Slot(prefix + norm)
    if norm in _OPEN_CLIP_FIXED:
        return Slot(prefix + _OPEN_CLIP_FIXED[norm])
    if norm == "text_projection.weight":
        return Slot(prefix + "text_projection", transpose=True)
    m = _OPEN_CLIP_LAYER.fullmatch(norm)
    if not m:
        raise ValueError(f"no OpenCLIP name for text encoder tensor {name!r}")
    layer, rest = int(m[1]), m[2]
    q = _QKV.fullmatch(rest)
    if q:
        return Slot(f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{q[2]}", part="qkv".index(q[1]), parts=3)
    for dif, oc in _OPEN_CLIP_PARTS.items():
        if rest.startswith(dif):
            return Slot(f"{prefix}transformer.resblocks.{layer}.{oc}{rest[len(dif):]}")
    raise ValueError(f"no OpenCLIP name for text encoder tensor {name!r}")
