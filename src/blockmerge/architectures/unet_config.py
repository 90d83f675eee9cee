"""A diffusers ``UNet2DConditionModel`` config read off the shapes of a single file's LDM U-Net.

Why in ``architectures``: the layout of a family's files is what says which diffusers module each
tensor is (levels, resblocks per level, attention depths), and both the generation loader and the
LoRA name mapping (kohya names SD1/SD2 U-Net modules by their diffusers paths) need that answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import CheckpointError
from .base import UNET_PREFIX, Architecture

__all__ = ["norm_groups", "unet_config"]

Shape = tuple[int, ...]
ShapeOf = Callable[[str], Shape]


def _indices(keys: Iterable[str], prefix: str) -> list[int]:
    out = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                out.add(int(head))
    return sorted(out)


def norm_groups(widths: Iterable[int]) -> int:
    """32 (every SD model); for narrow test models the largest divisor of all widths up to 32."""
    g = 0
    for w in widths:
        g = math.gcd(g, int(w))
    if g % 32 == 0:
        return 32
    return max(d for d in range(1, min(g, 32) + 1) if g % d == 0)


def _need(keys: frozenset[str], key: str, source: str) -> str:
    if key not in keys:
        raise CheckpointError(f"{source}: missing tensor {key!r}; the checkpoint is incomplete")
    return key


def unet_config(
    arch: Architecture, keys: frozenset[str], shape: ShapeOf, source: str, sample_size: int
) -> dict[str, Any]:
    """A ``UNet2DConditionModel`` config from the LDM U-Net's shapes."""
    p = UNET_PREFIX
    conv_in = shape(_need(keys, p + "input_blocks.0.0.weight", source))
    in_ch = conv_in[1]
    # Walk input blocks 1..N: resblocks accumulate into the current level, a downsampler closes it.
    levels: list[dict[str, Any]] = [{"res": [], "attn": []}]
    for i in _indices(keys, p + "input_blocks."):
        if i == 0:
            continue
        b = f"{p}input_blocks.{i}."
        if b + "0.op.weight" in keys:
            levels.append({"res": [], "attn": []})
            continue
        if b + "0.out_layers.3.weight" not in keys:
            raise CheckpointError(f"{source}: input block {i} is neither a resblock nor a downsampler")
        levels[-1]["res"].append(shape(b + "0.out_layers.3.weight")[0])
        depth = len(_indices(keys, b + "1.transformer_blocks."))
        levels[-1]["attn"].append(depth)
    layers = len(levels[0]["res"])
    if layers == 0 or any(len(lv["res"]) != layers for lv in levels):
        raise CheckpointError(f"{source}: U-Net levels have different numbers of resblocks")
    channels = [lv["res"][0] for lv in levels]
    depths = [max(lv["attn"]) for lv in levels]
    has_attn = [d > 0 for d in depths]

    # Any transformer block tells the cross-attention width and the projection kind.
    tkey = next((k for k in sorted(keys) if k.startswith(p) and k.endswith("attn2.to_k.weight")), None)
    if tkey is None:
        raise CheckpointError(f"{source}: the U-Net has no cross-attention layers")
    cross_dim = shape(tkey)[1]
    proj = next(k for k in sorted(keys) if k.startswith(p) and k.endswith(".proj_in.weight"))
    linear = len(shape(proj)) == 2

    if arch.name == "SD1":
        heads: int | list[int] = 8
    else:
        # diffusers' "attention_head_dim" is really the head count; SD2 / SDXL heads are 64 wide.
        heads = [max(1, c // 64) for c in channels]
    mid_depth = len(_indices(keys, p + "middle_block.1.transformer_blocks."))
    config: dict[str, Any] = {
        "sample_size": sample_size,
        "in_channels": in_ch,
        "out_channels": shape(_need(keys, p + "out.2.weight", source))[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "cross_attention_dim": cross_dim,
        "attention_head_dim": heads,
        "use_linear_projection": linear,
        "norm_num_groups": norm_groups(channels),
        "upcast_attention": arch.name == "SD2",
    }
    if mid_depth == 0:
        raise CheckpointError(f"{source}: the U-Net middle block has no transformer")
    if any(d > 1 for d in depths) or mid_depth > 1:
        # diffusers' mid block takes the last entry; SDXL's mid block is as deep as its last level.
        config["transformer_layers_per_block"] = [max(d, 1) for d in depths]
    if UNET_PREFIX + "label_emb.0.0.weight" in keys:
        config["addition_embed_type"] = "text_time"
        config["projection_class_embeddings_input_dim"] = shape(UNET_PREFIX + "label_emb.0.0.weight")[1]
    return config


