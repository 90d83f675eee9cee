"""Synthetic single-file checkpoints with the real key layouts of SD1.x, SD2.x and SDXL.

Why: tests and benchmarks need checkpoints that look exactly like the real files (every key,
shape and dtype, text encoders and VAE included) without downloading gigabytes. The layout is
not written down by hand: the real diffusers / transformers modules are built on the meta device
(no memory) from literal configs and renamed with :mod:`.ldm_names`, so a layout is as real as
the converters that ``tests/test_layouts.py`` checks against diffusers.

Two sizes:

- ``"full"``: the published configs of SD1.5, SD2.1 (768-v) and SDXL base 1.0 (parameter counts
  of the real models; SD1.5 fp16 ~2.1 GB, SDXL fp16 ~6.9 GB);
- ``"tiny"``: the same block structure and key names (12/1/12 U-Net blocks for SD1/SD2, 9/1/9
  for SDXL, the same VAE and text-encoder names) with 8-32 channels and 2 text layers, a few MB.
  The vocabulary stays 49408 so the shipped CLIP tokenizer drives tiny models end to end.

Values are seeded normal noise (std 0.02; norm weights around 1; ``logit_scale`` ln 100;
``position_ids`` = arange). Each tensor's values depend only on ``(seed, key)``, so a file can be
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
    "ArchConfigs",
    "LayoutEntry",
    "SIZES",
    "TextEncoderConfig",
    "arch_configs",
    "layout",
    "make_state_dict",
    "make_tensor",
    "param_count",
    "write_synthetic",
]

SIZES = ("tiny", "full")
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


@lru_cache(maxsize=8)
def _layout(arch: str, size: str) -> tuple[LayoutEntry, ...]:
    sd = _meta_state_dicts(arch_configs(arch, size))
    return tuple((k, tuple(sd[k].shape), sd[k].dtype) for k in sorted(sd))


def layout(arch_name: str, size: str = "tiny") -> list[LayoutEntry]:
    """Every ``(key, shape, dtype)`` of a single-file checkpoint of the family, sorted by key.

    ``dtype`` is the stored dtype of the real model in float32 form: floating tensors say
    ``torch.float32`` (they are written in the dtype asked for), ``position_ids`` ``torch.int64``.
    Built on the meta device: the full SDXL layout costs no tensor memory.
    """
    return list(_layout(_arch_key(arch_name), _size_key(size)))


def param_count(arch_name: str, size: str = "full", prefix: str = "") -> int:
    """Number of floating-point values under ``prefix`` in the layout (integer buffers excluded)."""
    return sum(
        math.prod(shape) for k, shape, dt in layout(arch_name, size) if k.startswith(prefix) and dt.is_floating_point
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
    # ``in_layers.0`` or ``out.0`` hide that); Linear / Conv / embedding weights are >= 2-D.
    return len(shape) == 1 and key.endswith(".weight")


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


def _iter_tensors(arch: str, size: str, seed: int, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for key, shape, dt in layout(arch, size):
        yield key, make_tensor(key, shape, dtype if dt.is_floating_point else dt, seed)


def make_state_dict(
    arch: str, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """A whole synthetic checkpoint in memory (use :func:`write_synthetic` for full-size files)."""
    if not dtype.is_floating_point:
        raise BlockmergeError(f"synthetic checkpoint: dtype must be floating point, got {dtype}")
    return dict(_iter_tensors(arch, size, seed, dtype))


def write_synthetic(
    path: str | Path,
    arch: str,
    size: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    fmt: Literal["safetensors", "ckpt"] = "safetensors",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a synthetic single-file checkpoint and return its path.

    ``safetensors`` is streamed tensor by tensor (full SDXL never sits in memory); ``ckpt`` is
    ``torch.save({"state_dict": sd})`` like real ``.ckpt`` files, so it holds the model in memory
    once. ``metadata`` goes to the safetensors ``__metadata__`` header.
    """
    if not dtype.is_floating_point:
        raise BlockmergeError(f"synthetic checkpoint: dtype must be floating point, got {dtype}")
    path = Path(path)
    a, s = _arch_key(arch), _size_key(size)
    from ..io import SafetensorsStreamWriter, atomic_write

    if fmt == "ckpt":
        with atomic_write(path) as f:
            torch.save({"state_dict": make_state_dict(a, s, seed, dtype)}, f)
        return path
    if fmt != "safetensors":
        raise BlockmergeError(f"synthetic checkpoint: unknown format {fmt!r} (expected safetensors or ckpt)")
    entries = [(k, shape, dtype if dt.is_floating_point else dt) for k, shape, dt in layout(a, s)]
    meta = {"format": "pt", **(metadata or {})}
    # The same streaming writer as merges: full SDXL never sits in memory.
    with atomic_write(path) as f:
        writer = SafetensorsStreamWriter(f, [(k, dt, shape) for k, shape, dt in entries], meta)
        for key, t in _iter_tensors(a, s, seed, dtype):
            writer.write(key, t)
        writer.finish()
    return path
