"""Synthetic single-file checkpoints with the real key layouts of every family blockmerge knows.

Why: tests and benchmarks need checkpoints that look exactly like the real files (every key,
shape and dtype, text encoders and VAE included) without downloading gigabytes. The layout is
not written down by hand: the real diffusers / transformers modules are built on the meta device
(no memory) from literal configs and renamed with :mod:`.ldm_names` (U-Nets, KL VAEs, CLIP) and
:mod:`.transformer_names` (Flux / SD3 transformers), so a layout is as real as the converters
that ``tests/test_layouts.py`` and ``tests/test_transformer_layouts.py`` check against diffusers.
Each family's description says how its layout is built (:attr:`Architecture.synthetic`), so a
new family (even one defined in a test) gets synthetic files with no change here.

Two sizes:

- ``"full"``: the published configs of SD1.5, SD2.1 (768-v), SDXL base 1.0, Flux.1 dev / schnell,
  SD3 Medium, SD3.5 Medium and SD3.5 Large (parameter counts of the real models; SD1.5 fp16
  ~2.1 GB, SDXL fp16 ~6.9 GB, the Flux transformer alone ~11.9 GB in fp8);
- ``"tiny"``: the same block structure and key names (12/1/12 U-Net blocks for SD1/SD2, 9/1/9
  for SDXL, 19 + 38 Flux blocks, 24 / 38 joint blocks, the same VAE and text-encoder names) with
  8-32 channels and 2 text layers, a few MB. The CLIP vocabulary stays 49408 so the shipped
  tokenizer drives tiny models end to end.

Values are seeded normal noise (std 0.02; norm weights around 1; ``logit_scale`` ln 100;
``position_ids`` = arange; Flux's RMSNorm ``.scale`` like norm weights). Each tensor's values depend only on ``(seed, key)``, so a file can be
generated tensor by tensor in any order and :func:`make_state_dict` equals what
:func:`write_synthetic` writes.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import BlockmergeError
from .base import UNET_PREFIX
from .ldm_names import (
    SD1_TE_PREFIX,
    SD2_TE_PREFIX,
    SDXL_TE1_PREFIX,
    SDXL_TE2_PREFIX,
    clip_to_ldm,
    open_clip_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)

__all__ = [
    "PARTS",
    "SIZES",
    "ArchConfigs",
    "LayoutEntry",
    "TextEncoderConfig",
    "TransformerConfigs",
    "arch_configs",
    "layout",
    "make_state_dict",
    "make_tensor",
    "param_count",
    "transformer_configs",
    "write_synthetic",
]

SIZES = ("tiny", "full")
#: ``all``: every component the real files carry; ``model``: the diffusion model only.
PARTS = ("all", "model")
LayoutEntry = tuple[str, tuple[int, ...], torch.dtype]

# ----------------------------------------------------------------------------------------------
# Configs (literal; nothing is downloaded)
# ----------------------------------------------------------------------------------------------

# runwayml/stable-diffusion-v1-5 unet/config.json
_SD1_UNET_FULL: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}
# stabilityai/stable-diffusion-2-1 (768-v) unet/config.json
_SD2_UNET_FULL: dict[str, Any] = {
    **_SD1_UNET_FULL,
    "sample_size": 96,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": True,
}
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
_SDXL_UNET_FULL: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
_VAE_FULL: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
_CLIP_L: dict[str, Any] = {  # openai/clip-vit-large-patch14, text side
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
# OpenCLIP ViT-H/14 text tower as stored in SD2 files: all 24 resblocks (diffusers' SD2 text
# encoder keeps 23 because SD2 reads the penultimate layer) plus text_projection.
_OPEN_CLIP_H: dict[str, Any] = {
    **_CLIP_L,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 1024,
}
_OPEN_CLIP_BIGG: dict[str, Any] = {  # OpenCLIP ViT-bigG/14 text tower (SDXL's second encoder)
    **_CLIP_L,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

# Tiny: same structure, tiny widths. GroupNorm groups shrink to 4 so 8-channel levels work.
_TINY_UNET_COMMON: dict[str, Any] = {
    "block_out_channels": [8, 16, 32, 32],
    "norm_num_groups": 4,
    "sample_size": 8,
}
_SD1_UNET_TINY = {**_SD1_UNET_FULL, **_TINY_UNET_COMMON, "attention_head_dim": 2, "cross_attention_dim": 32}
_SD2_UNET_TINY = {
    **_SD2_UNET_FULL,
    **_TINY_UNET_COMMON,
    "attention_head_dim": [2, 4, 8, 8],
    "cross_attention_dim": 24,
}
_SDXL_UNET_TINY = {
    **_SDXL_UNET_FULL,
    "block_out_channels": [8, 16, 32],
    "norm_num_groups": 4,
    "sample_size": 8,
    "attention_head_dim": [1, 2, 4],
    "transformer_layers_per_block": [1, 1, 2],
    "cross_attention_dim": 16 + 32,  # TE1 hidden + TE2 hidden (768 + 1280 in the real model)
    "addition_embed_type_num_heads": 4,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24 + 6 * 8,  # TE2 projection + 6 size/crop embeddings
}
_VAE_TINY = {**_VAE_FULL, "block_out_channels": [8, 8, 16, 16], "norm_num_groups": 4, "sample_size": 64}
_CLIP_TINY = {**_CLIP_L, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
# Distinct hidden and projection widths, so a transposed text_projection cannot go unnoticed.
_OPEN_CLIP_TINY = {**_CLIP_TINY, "hidden_size": 24, "intermediate_size": 48, "hidden_act": "gelu", "projection_dim": 16}
_SDXL_TE1_TINY = {**_CLIP_TINY, "hidden_size": 16, "intermediate_size": 32}
_SDXL_TE2_TINY = {**_CLIP_TINY, "hidden_act": "gelu", "projection_dim": 24}


@dataclass(frozen=True)
class TextEncoderConfig:
    """One text encoder of a checkpoint: its transformers config, how and where it is stored.

    ``kind`` is ``"clip"`` (transformers names under ``prefix``, with ``position_ids``) or
    ``"open_clip"`` (OpenCLIP names, q/k/v fused, ``text_projection`` and ``logit_scale``).
    ``config`` describes the tower as stored in the file (SD2: all layers, although diffusers
    runs one fewer).
    """

    kind: Literal["clip", "open_clip"]
    prefix: str
    config: dict[str, Any]


@dataclass(frozen=True)
class ArchConfigs:
    """The diffusers / transformers configs a synthetic checkpoint is built from."""

    arch: str
    size: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[TextEncoderConfig, ...]


def _family(arch: Any):
    """The registered family named ``arch`` (or the family itself) that can build a layout."""
    from . import Architecture, by_name, families

    if isinstance(arch, Architecture):
        fam = arch
    else:
        try:
            fam = by_name(str(arch))
        except KeyError:
            fam = None
    if fam is None or fam.synthetic is None:
        names = ", ".join(a.name for a in families() if a.synthetic is not None)
        raise BlockmergeError(f"synthetic checkpoint: unknown architecture {arch!r} (expected one of {names})")
    return fam


def _arch_key(arch: str) -> str:
    key = str(getattr(arch, "name", arch)).upper()
    if key not in ("SD1", "SD2", "SDXL"):
        raise BlockmergeError(f"synthetic checkpoint: unknown architecture {arch!r} (expected SD1, SD2 or SDXL)")
    return key


def _size_key(size: str) -> str:
    if size not in SIZES:
        raise BlockmergeError(f"synthetic checkpoint: unknown size {size!r} (expected one of {', '.join(SIZES)})")
    return size


def arch_configs(arch: str, size: str = "tiny") -> ArchConfigs:
    """The configs (deep copies) behind ``layout(arch, size)``: build matching diffusers models."""
    a, s = _arch_key(arch), _size_key(size)
    full = s == "full"
    vae = _VAE_FULL if full else _VAE_TINY
    if a == "SD1":
        unet = _SD1_UNET_FULL if full else _SD1_UNET_TINY
        tes = (TextEncoderConfig("clip", SD1_TE_PREFIX, _CLIP_L if full else _CLIP_TINY),)
    elif a == "SD2":
        unet = _SD2_UNET_FULL if full else _SD2_UNET_TINY
        tes = (TextEncoderConfig("open_clip", SD2_TE_PREFIX, _OPEN_CLIP_H if full else _OPEN_CLIP_TINY),)
    else:
        unet = _SDXL_UNET_FULL if full else _SDXL_UNET_TINY
        vae = {**vae, "scaling_factor": 0.13025, "sample_size": 1024 if full else 64}
        tes = (
            TextEncoderConfig("clip", SDXL_TE1_PREFIX, _CLIP_L if full else _SDXL_TE1_TINY),
            TextEncoderConfig("open_clip", SDXL_TE2_PREFIX, _OPEN_CLIP_BIGG if full else _SDXL_TE2_TINY),
        )
    return copy.deepcopy(ArchConfigs(a, s, dict(unet), dict(vae), tes))


# ----------------------------------------------------------------------------------------------
# Transformer families (Flux.1, SD3 / SD3.5): configs
# ----------------------------------------------------------------------------------------------

# black-forest-labs/FLUX.1-dev transformer/config.json (schnell: guidance_embeds false)
_FLUX_FULL: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}
# The same 19 + 38 blocks, 16-wide (2 heads of 8); text widths those of the tiny encoders below.
_FLUX_TINY: dict[str, Any] = {
    **_FLUX_FULL, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
    "pooled_projection_dim": 32, "axes_dims_rope": (2, 2, 4),
}
# stabilityai/stable-diffusion-3-medium-diffusers, -3.5-medium, -3.5-large transformer/config.json
_SD3_FULL: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
}
_SD35M_FULL: dict[str, Any] = {
    **_SD3_FULL, "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}
_SD35L_FULL: dict[str, Any] = {
    **_SD3_FULL, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432, "qk_norm": "rms_norm",
}
_SD3_TINY_WIDTHS: dict[str, Any] = {
    "sample_size": 32, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
    "caption_projection_dim": 16, "pooled_projection_dim": 16 + 32, "pos_embed_max_size": 16,
}
# The 16-channel KL VAE of Flux and SD3 (no quant convs); scaling / shift do not change the layout.
_VAE16_FULL: dict[str, Any] = {
    **_VAE_FULL, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
    "scaling_factor": 0.3611, "shift_factor": 0.1159, "sample_size": 1024,
}
_VAE16_TINY: dict[str, Any] = {**_VAE16_FULL, "block_out_channels": [8, 8, 16, 16], "norm_num_groups": 4, "sample_size": 64}
# google/t5-v1_1-xxl encoder (the T5 of Flux and SD3)
_T5_XXL: dict[str, Any] = {
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False, "use_cache": False,
}
_T5_TINY: dict[str, Any] = {**_T5_XXL, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}
_CLIP_L_PROJ_TINY = {**_CLIP_TINY, "hidden_size": 16, "intermediate_size": 32, "projection_dim": 16}
_CLIP_G_HF_TINY = {**_CLIP_TINY, "hidden_act": "gelu", "projection_dim": 32}


@dataclass(frozen=True)
class TransformerTextEncoder:
    """A text encoder of a Flux / SD3 file: transformers names under ``prefix + "transformer."``.

    ``kind``: ``clip`` (``CLIPTextModel``), ``clip_proj`` (``CLIPTextModelWithProjection``, with
    ``text_projection.weight``) or ``t5`` (``T5EncoderModel``; its tied ``encoder.embed_tokens``
    is not stored, only ``shared.weight``, as in the real files). ``logit_scale``: ComfyUI-saved
    SD3 files keep a ``logit_scale`` scalar per encoder.
    """

    kind: Literal["clip", "clip_proj", "t5"]
    prefix: str
    config: dict[str, Any]
    logit_scale: bool = False


@dataclass(frozen=True)
class TransformerConfigs:
    """The diffusers / transformers configs a synthetic Flux / SD3 checkpoint is built from."""

    arch: str
    size: str
    variant: str
    kind: Literal["flux", "sd3"]
    transformer: dict[str, Any]
    vae: dict[str, Any]
    vae_prefix: str
    text_encoders: tuple[TransformerTextEncoder, ...]
    extra: tuple[tuple[str, tuple[int, ...]], ...] = ()


def transformer_configs(arch: str, size: str = "tiny", variant: str | None = None) -> TransformerConfigs:
    """The configs (deep copies) behind the Flux / SD3 layouts; build matching diffusers models."""
    from .flux import CLIP_PREFIX, FLUX_VAE_PREFIX, T5_PREFIX
    from .ldm_names import VAE_PREFIX
    from .sd3 import SD3_TE_PREFIXES

    name, s = str(arch).upper(), _size_key(size)
    full = s == "full"
    t5 = _T5_XXL if full else _T5_TINY
    if name == "FLUX":
        v = variant or "dev"
        tr = {**(_FLUX_FULL if full else _FLUX_TINY), "guidance_embeds": v == "dev"}
        tes = (TransformerTextEncoder("clip", CLIP_PREFIX, _CLIP_L if full else _CLIP_TINY),
               TransformerTextEncoder("t5", T5_PREFIX, t5))
        cfg = TransformerConfigs(name, s, v, "flux", tr, _VAE16_FULL if full else _VAE16_TINY, FLUX_VAE_PREFIX, tes)
        return copy.deepcopy(cfg)
    if name not in ("SD3", "SD35L"):
        raise BlockmergeError(f"synthetic checkpoint: {arch!r} is not a transformer family")
    v = variant or ("sd3-medium" if name == "SD3" else "large")
    base = {"sd3-medium": _SD3_FULL, "sd3.5-medium": _SD35M_FULL, "large": _SD35L_FULL}[v]
    if not full:
        base = {**base, **_SD3_TINY_WIDTHS}
        if v == "sd3.5-medium":
            base["pos_embed_max_size"] = 24
    clip_l = {**_CLIP_L, "projection_dim": 768} if full else _CLIP_L_PROJ_TINY
    clip_g = {**_OPEN_CLIP_BIGG} if full else _CLIP_G_HF_TINY
    tes = (TransformerTextEncoder("clip_proj", SD3_TE_PREFIXES[0], clip_l, True),
           TransformerTextEncoder("clip_proj", SD3_TE_PREFIXES[1], clip_g, True),
           TransformerTextEncoder("t5", SD3_TE_PREFIXES[2], t5, True))
    # ComfyUI-saved SD3 Medium files carry the noise schedule buffer (sd-mecha's sd3-comfyui config).
    extra = (("model.model_sampling.sigmas", (1000,)),) if v == "sd3-medium" else ()
    cfg = TransformerConfigs(name, s, v, "sd3", dict(base), _VAE16_FULL if full else _VAE16_TINY, VAE_PREFIX, tes, extra)
    return copy.deepcopy(cfg)


def transformer_family_state_dict(arch: str, size: str, variant: str | None = None) -> dict[str, torch.Tensor]:
    """The meta-device single-file state dict of a Flux / SD3 checkpoint (the families' builder)."""
    from diffusers import AutoencoderKL
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from .transformer_names import meta_transformer, transformer_to_single_file

    cfg = transformer_configs(arch, size, variant)
    out: dict[str, torch.Tensor] = {}
    out.update(transformer_to_single_file(cfg.kind, meta_transformer(cfg.kind, cfg.transformer).state_dict()))
    with torch.device("meta"):
        out.update(vae_to_ldm(AutoencoderKL(**cfg.vae).state_dict(), cfg.vae, cfg.vae_prefix))
        for te in cfg.text_encoders:
            p = te.prefix + "transformer."
            if te.kind == "t5":
                sd = T5EncoderModel(T5Config(**te.config)).state_dict()
                sd = {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
                out.update({p + k: v for k, v in sd.items()})
            else:
                model = (CLIPTextModel if te.kind == "clip" else CLIPTextModelWithProjection)(CLIPTextConfig(**te.config))
                out.update(clip_to_ldm(model.state_dict(), p, position_ids=False))
            if te.logit_scale:
                out[te.prefix + "logit_scale"] = torch.empty(())
        for key, shape in cfg.extra:
            out[key] = torch.empty(shape)
    return out


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------


def _meta_state_dicts(cfg: ArchConfigs) -> dict[str, torch.Tensor]:
    # Imported here: diffusers / transformers take seconds to import and most users of
    # blockmerge.architectures never need them.
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out: dict[str, torch.Tensor] = {}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg.unet)
        out.update(unet_to_ldm(unet.state_dict(), cfg.unet))
        vae = AutoencoderKL(**cfg.vae)
        out.update(vae_to_ldm(vae.state_dict(), cfg.vae))
        for te in cfg.text_encoders:
            tcfg = CLIPTextConfig(**te.config)
            if te.kind == "clip":
                out.update(clip_to_ldm(CLIPTextModel(tcfg).state_dict(), te.prefix))
            else:
                model = CLIPTextModelWithProjection(tcfg)
                out.update(open_clip_to_ldm(model.state_dict(), te.prefix, logit_scale=torch.empty(())))
    return out


def unet_family_state_dict(arch: str, size: str) -> dict[str, torch.Tensor]:
    """The meta-device single-file state dict of an SD1 / SD2 / SDXL checkpoint (the families' builder)."""
    return _meta_state_dicts(arch_configs(arch, size))


@lru_cache(maxsize=16)
def _layout(fam: Any, size: str, variant: str | None) -> tuple[LayoutEntry, ...]:
    sd = fam.synthetic(size, variant)
    return tuple((k, tuple(sd[k].shape), sd[k].dtype) for k in sorted(sd))


def layout(
    arch_name: Any, size: str = "tiny", *, variant: str | None = None, parts: str = "all", bare: bool = False
) -> list[LayoutEntry]:
    """Every ``(key, shape, dtype)`` of a single-file checkpoint of the family, sorted by key.

    ``dtype`` is the stored dtype of the real model in float32 form: floating tensors say
    ``torch.float32`` (they are written in the dtype asked for), ``position_ids`` ``torch.int64``.
    Built on the meta device: the full Flux layout costs no tensor memory. ``variant`` picks one
    of the family's variants (Flux ``dev`` / ``schnell``, ...; default the first); ``parts="model"``
    keeps only the diffusion model (as BFL's Flux release and SD3.5's ship it); ``bare`` writes the
    diffusion model without ``model.diffusion_model.`` (BFL's names; families that allow it).
    """
    fam = _family(arch_name)
    s = _size_key(size)
    if variant is not None and variant not in [v.name for v in fam.variants]:
        names = ", ".join(v.name for v in fam.variants) or "none"
        raise BlockmergeError(f"synthetic checkpoint: {fam.name} has no variant {variant!r} (variants: {names})")
    if parts not in PARTS:
        raise BlockmergeError(f"synthetic checkpoint: unknown parts {parts!r} (expected one of {', '.join(PARTS)})")
    if bare and "" not in fam.diffusion_prefixes:
        raise BlockmergeError(f"synthetic checkpoint: {fam.name} files always carry model.diffusion_model.")
    entries = list(_layout(fam, s, variant))
    if parts == "model":
        entries = [e for e in entries if fam.component_of(e[0]) == fam.diffusion_name]
    if bare:
        entries = sorted(
            ((k[len(UNET_PREFIX):] if k.startswith(UNET_PREFIX) else k, shape, dt) for k, shape, dt in entries)
        )
    return entries


def param_count(arch_name: Any, size: str = "full", prefix: str = "", **kw: Any) -> int:
    """Number of floating-point values under ``prefix`` in the layout (integer buffers excluded)."""
    return sum(
        math.prod(shape) for k, shape, dt in layout(arch_name, size, **kw) if k.startswith(prefix) and dt.is_floating_point
    )


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------

_STD = 0.02


def _key_seed(seed: int, key: str) -> int:
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _is_norm_weight(key: str, shape: tuple[int, ...]) -> bool:
    # In these models every 1-D ``.weight`` is a GroupNorm / LayerNorm scale (LDM names such as
    # ``in_layers.0`` or ``out.0`` hide that), and so is every ``.scale`` (Flux's RMSNorm);
    # Linear / Conv / embedding weights are >= 2-D.
    return len(shape) == 1 and key.endswith((".weight", ".scale"))


def make_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """The value of one synthetic tensor; depends only on ``(seed, key, shape, dtype)``.

    Floats: N(0, 0.02) like an initialised transformer, norm weights 1 + N(0, 0.02) (as trained
    norms sit near 1), ``logit_scale`` ln(100) as in trained CLIP. Integers: ``arange`` over the
    last dimension (``position_ids``).
    """
    if not dtype.is_floating_point:
        n = shape[-1] if shape else 1
        return torch.arange(n, dtype=dtype).reshape(n).expand(*shape).contiguous() if shape else torch.zeros((), dtype=dtype)
    if key.endswith("logit_scale"):
        return torch.full(shape, math.log(100.0), dtype=torch.float32).to(dtype)
    g = torch.Generator().manual_seed(_key_seed(seed, key))
    t = torch.randn(shape, generator=g, dtype=torch.float32).mul_(_STD)
    if _is_norm_weight(key, shape):
        t.add_(1.0)
    return t.to(dtype)


def _iter_tensors(arch: Any, size: str, seed: int, dtype: torch.dtype, **kw: Any) -> Iterator[tuple[str, torch.Tensor]]:
    bare = kw.get("bare", False)
    for key, shape, dt in layout(arch, size, **kw):
        # A bare key's values are those of its prefixed name: the two forms hold the same model.
        name = UNET_PREFIX + key if bare and _family(arch).canonical_key(key) != key else key
        yield key, make_tensor(name, shape, dtype if dt.is_floating_point else dt, seed)


def make_state_dict(
    arch: Any, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float16, **kw: Any
) -> dict[str, torch.Tensor]:
    """A whole synthetic checkpoint in memory (use :func:`write_synthetic` for full-size files).
    Keywords as :func:`layout` (``variant``, ``parts``, ``bare``)."""
    if not dtype.is_floating_point:
        raise BlockmergeError(f"synthetic checkpoint: dtype must be floating point, got {dtype}")
    return dict(_iter_tensors(arch, size, seed, dtype, **kw))


def write_synthetic(
    path: str | Path,
    arch: Any,
    size: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    fmt: Literal["safetensors", "ckpt"] = "safetensors",
    metadata: Mapping[str, str] | None = None,
    *,
    variant: str | None = None,
    parts: str = "all",
    bare: bool = False,
    extra: Mapping[str, torch.Tensor] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic single-file checkpoint and return its path (an existing file only with
    ``overwrite``).

    ``safetensors`` is streamed tensor by tensor (full Flux never sits in memory); ``ckpt`` is
    ``torch.save({"state_dict": sd})`` like real ``.ckpt`` files, so it holds the model in memory
    once. ``metadata`` goes to the safetensors ``__metadata__`` header; ``extra`` tensors (e.g.
    SDXL's ``v_pred`` / ``ztsnr`` markers) are added as they are. ``variant``, ``parts`` and
    ``bare`` as :func:`layout`.
    """
    if not dtype.is_floating_point:
        raise BlockmergeError(f"synthetic checkpoint: dtype must be floating point, got {dtype}")
    path = Path(path)
    fam, s = _family(arch), _size_key(size)
    kw = {"variant": variant, "parts": parts, "bare": bare}
    extra = dict(extra or {})
    from ..io import SafetensorsStreamWriter, atomic_write

    if fmt == "ckpt":
        with atomic_write(path, overwrite=overwrite) as f:
            torch.save({"state_dict": {**make_state_dict(fam, s, seed, dtype, **kw), **extra}}, f)
        return path
    if fmt != "safetensors":
        raise BlockmergeError(f"synthetic checkpoint: unknown format {fmt!r} (expected safetensors or ckpt)")
    entries = [(k, shape, dtype if dt.is_floating_point else dt) for k, shape, dt in layout(fam, s, **kw)]
    entries += [(k, tuple(t.shape), t.dtype) for k, t in extra.items()]
    entries.sort(key=lambda e: e[0])
    meta = {"format": "pt", **(metadata or {})}
    # The same streaming writer as merges: full Flux never sits in memory.
    tensors = _iter_tensors(fam, s, seed, dtype, **kw)
    with atomic_write(path, overwrite=overwrite) as f:
        writer = SafetensorsStreamWriter(f, [(k, dt, shape) for k, shape, dt in entries], meta)
        pending = next(tensors, None)
        for key, _, _ in entries:
            if key in extra:
                writer.write(key, extra[key])
                continue
            assert pending is not None and pending[0] == key
            writer.write(key, pending[1])
            pending = next(tensors, None)
        writer.finish()
    return path
