"""diffusers / transformers configs inferred from the tensor shapes of a single-file checkpoint.

Why this exists: diffusers' ``from_single_file`` fetches a config from the Hugging Face hub (or
needs a local copy of a model repository) to know what it is loading. Everything it needs is in the
tensors themselves, so we read it off the shapes: real SD1.5 / SD2.1 / SDXL files and the tiny
bundled or synthetic ones go through this one code path, and nothing touches the network.

What shapes cannot say comes from the family description (:attr:`Architecture.generation`: the
text encoders, where they are stored and how they pad, the VAE scaling factor, the training
resolution) and from conventions written down once here: attention heads (SD1: 8 per layer; SD2
/ SDXL and every CLIP text tower: 64-wide heads), GroupNorm groups (32, as in every SD model;
narrower test models use the largest divisor of their widths up to 32) and the text towers'
activation (OpenAI CLIP: quick_gelu; OpenCLIP: gelu).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..architectures import SD1, SD2, SDXL, Architecture
from ..architectures.ldm_names import (
    SD1_TE_PREFIX,
    SD2_TE_PREFIX,
    SDXL_TE1_PREFIX,
    SDXL_TE2_PREFIX,
    VAE_PREFIX,
)
from ..architectures.unet_config import _indices, _need, norm_groups, unet_config
from ..errors import CheckpointError

__all__ = ["SD1_TE_PREFIX", "SD2_TE_PREFIX", "SDXL_TE1_PREFIX", "SDXL_TE2_PREFIX", "VAE_PREFIX"]

#: Pixel resolution each family was trained at (``modelspec.resolution`` metadata overrides it),
#: as the family descriptions say.
DEFAULT_RESOLUTION = {
    **{a.name: a.generation.default_resolution for a in (SD1, SD2, SDXL) if a.generation},
    "SD2-v": SD2.generation.v_resolution if SD2.generation else 768,
}
VAE_SCALING = {a.name: a.generation.vae_scaling for a in (SD1, SD2, SDXL) if a.generation}

Shape = tuple[int, ...]
ShapeOf = Callable[[str], Shape]


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text tower: its transformers config and where / how it is stored in the file."""

    kind: str  # "clip" (transformers names) or "open_clip"
    prefix: str
    config: dict[str, Any]
    with_projection: bool
    pad_token: str
    drop_last_layer: bool  # SD2 runs the penultimate layer: the file has one more than the model


@dataclass(frozen=True)
class ModelConfigs:
    arch: Architecture
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[TextEncoderSpec, ...]


def add_time_embed_dim(config: dict[str, Any], pooled_dim: int, source: str) -> None:
    """SDXL: label_emb's input is the pooled text embedding + 6 sinusoidal size/crop embeddings."""
    extra = config["projection_class_embeddings_input_dim"] - pooled_dim
    if extra <= 0 or extra % 6:
        raise CheckpointError(f"{source}: label_emb input width does not fit the text encoder's projection")
    config["addition_time_embed_dim"] = extra // 6
    config["addition_embed_type_num_heads"] = 64


def vae_config(keys: frozenset[str], shape: ShapeOf, source: str, sample_size: int, scaling: float) -> dict[str, Any]:
    """An ``AutoencoderKL`` config from the LDM VAE's shapes."""
    p = VAE_PREFIX + "encoder."
    levels = _indices(keys, p + "down.")
    if not levels:
        raise CheckpointError(f"{source}: no VAE encoder found (first_stage_model.encoder.down.*)")
    channels = [shape(f"{p}down.{i}.block.0.conv2.weight")[0] for i in levels]
    layers = len(_indices(keys, p + "down.0.block."))
    n = len(channels)
    return {
        "in_channels": shape(_need(keys, p + "conv_in.weight", source))[1],
        "out_channels": shape(_need(keys, VAE_PREFIX + "decoder.conv_out.weight", source))[0],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": shape(_need(keys, VAE_PREFIX + "decoder.conv_in.weight", source))[1],
        "norm_num_groups": norm_groups(channels),
        "sample_size": sample_size,
        "scaling_factor": scaling,
        # SDXL's VAE overflows in fp16; the SDXL pipeline upcasts it to fp32 to decode when set.
        "force_upcast": scaling == VAE_SCALING["SDXL"],
    }


_LAYER = re.compile(r"(\d+)\.")


def clip_config(keys: frozenset[str], shape: ShapeOf, prefix: str, source: str) -> dict[str, Any]:
    """OpenAI CLIP text tower stored with transformers names (SD1, SDXL's first encoder)."""
    emb = shape(_need(keys, prefix + "text_model.embeddings.token_embedding.weight", source))
    pos = shape(_need(keys, prefix + "text_model.embeddings.position_embedding.weight", source))
    n_layers = len(_indices(keys, prefix + "text_model.encoder.layers."))
    inter = shape(_need(keys, prefix + "text_model.encoder.layers.0.mlp.fc1.weight", source))[0]
    return _text_config(emb, pos, n_layers, inter, "quick_gelu")


def open_clip_config(keys: frozenset[str], shape: ShapeOf, prefix: str, source: str) -> dict[str, Any]:
    """OpenCLIP text tower (SD2, SDXL's second encoder)."""
    emb = shape(_need(keys, prefix + "token_embedding.weight", source))
    pos = shape(_need(keys, prefix + "positional_embedding", source))
    n_layers = len(_indices(keys, prefix + "transformer.resblocks."))
    inter = shape(_need(keys, prefix + "transformer.resblocks.0.mlp.c_fc.weight", source))[0]
    cfg = _text_config(emb, pos, n_layers, inter, "gelu")
    if prefix + "text_projection" in keys:
        cfg["projection_dim"] = shape(prefix + "text_projection")[1]
    return cfg


def _text_config(emb: Shape, pos: Shape, n_layers: int, inter: int, act: str) -> dict[str, Any]:
    hidden = emb[1]
    return {
        "vocab_size": emb[0],
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": n_layers,
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": pos[0],
        "hidden_act": act,
        "projection_dim": hidden,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }


def infer_configs(arch: Architecture, keys: frozenset[str], shape: ShapeOf, source: str,
                  resolution: int) -> ModelConfigs:
    """All configs of a single-file checkpoint of family ``arch``; ``resolution`` in pixels."""
    gen = arch.generation
    if gen is None:
        raise CheckpointError(f"{source}: blockmerge does not generate with {arch.title} models "
                              "(merge, blocks, info and compare work)")
    vae = vae_config(keys, shape, source, resolution, gen.vae_scaling)
    latent_size = resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    unet = unet_config(arch, keys, shape, source, latent_size)
    tes = []
    for te in gen.text_encoders:
        cfg = (clip_config if te.kind == "clip" else open_clip_config)(keys, shape, te.prefix, source)
        if te.drop_last_layer:
            cfg["num_hidden_layers"] -= 1
        tes.append(TextEncoderSpec(te.kind, te.prefix, cfg, te.with_projection, te.pad_token, te.drop_last_layer))
    if "projection_class_embeddings_input_dim" in unet:  # SDXL's label_emb: pooled text + size/crop
        add_time_embed_dim(unet, tes[-1].config["projection_dim"], source)
    return ModelConfigs(arch, unet, vae, tuple(tes))
