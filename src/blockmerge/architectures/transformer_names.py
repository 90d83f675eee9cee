"""diffusers Flux.1 / SD3 transformers <-> the single-file (original release) key names.

Why this exists: Flux and SD3 single files use the names of their original code (BFL's ``flux``,
Stability's ``sd3`` MMDiT: ``double_blocks.N.img_attn.qkv``, ``joint_blocks.N.x_block.attn.qkv``),
while the real model definitions we can build without downloading anything are diffusers'
``FluxTransformer2DModel`` and ``SD3Transformer2DModel``. diffusers ships only the direction
single file -> diffusers (``convert_flux_transformer_checkpoint_to_diffusers`` and
``convert_sd3_transformer_checkpoint_to_diffusers`` in ``diffusers.loaders.single_file_utils``);
this module is that converter inverted, once, as a table: each diffusers parameter is a run of
rows of one single-file tensor (q, k and v are thirds of a fused ``qkv``; Flux's single-stream
``linear1`` is q, k, v and the MLP input stacked; the final ``adaLN_modulation`` has its shift and
scale halves swapped). ``tests/test_transformer_layouts.py`` proves the table against diffusers'
converters row by row at full size (their Flux converter hard-codes the 3072-wide model, so the
tiny layouts use the same table with smaller widths).

The same table is what a LoRA name mapping needs: a diffusers ``transformer.`` LoRA on ``to_q``
updates the first third of the single file's ``qkv``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .base import UNET_PREFIX

__all__ = [
    "Piece",
    "TransformerKind",
    "diffusers_config",
    "diffusers_to_single_file",
    "meta_transformer",
    "single_file_shapes",
    "transformer_to_single_file",
]

TransformerKind = Literal["flux", "sd3"]


@dataclass(frozen=True)
class Piece:
    """Rows ``lo:hi`` (dim 0) of single-file tensor ``key`` (``model.diffusion_model.`` included)."""

    key: str
    lo: int
    hi: int


# (diffusers name pattern, single-file template, slot) where slot is the part's place in a fused
# tensor (None: the whole tensor), or "swap" for shift/scale halves in the other order.
_Rule = tuple[str, str, int | str | None]

_FLUX: tuple[_Rule, ...] = (
    (r"time_text_embed\.timestep_embedder\.linear_1\.(weight|bias)", r"time_in.in_layer.\1", None),
    (r"time_text_embed\.timestep_embedder\.linear_2\.(weight|bias)", r"time_in.out_layer.\1", None),
    (r"time_text_embed\.text_embedder\.linear_1\.(weight|bias)", r"vector_in.in_layer.\1", None),
    (r"time_text_embed\.text_embedder\.linear_2\.(weight|bias)", r"vector_in.out_layer.\1", None),
    (r"time_text_embed\.guidance_embedder\.linear_1\.(weight|bias)", r"guidance_in.in_layer.\1", None),
    (r"time_text_embed\.guidance_embedder\.linear_2\.(weight|bias)", r"guidance_in.out_layer.\1", None),
    (r"context_embedder\.(weight|bias)", r"txt_in.\1", None),
    (r"x_embedder\.(weight|bias)", r"img_in.\1", None),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.(weight|bias)", r"double_blocks.\1.img_mod.lin.\2", None),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear\.(weight|bias)", r"double_blocks.\1.txt_mod.lin.\2", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_q\.(weight|bias)", r"double_blocks.\1.img_attn.qkv.\2", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_k\.(weight|bias)", r"double_blocks.\1.img_attn.qkv.\2", 1),
    (r"transformer_blocks\.(\d+)\.attn\.to_v\.(weight|bias)", r"double_blocks.\1.img_attn.qkv.\2", 2),
    (r"transformer_blocks\.(\d+)\.attn\.add_q_proj\.(weight|bias)", r"double_blocks.\1.txt_attn.qkv.\2", 0),
    (r"transformer_blocks\.(\d+)\.attn\.add_k_proj\.(weight|bias)", r"double_blocks.\1.txt_attn.qkv.\2", 1),
    (r"transformer_blocks\.(\d+)\.attn\.add_v_proj\.(weight|bias)", r"double_blocks.\1.txt_attn.qkv.\2", 2),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.(weight|bias)", r"double_blocks.\1.img_attn.proj.\2", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out\.(weight|bias)", r"double_blocks.\1.txt_attn.proj.\2", None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(weight|bias)", r"double_blocks.\1.img_mlp.0.\2", None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(weight|bias)", r"double_blocks.\1.img_mlp.2.\2", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.(weight|bias)", r"double_blocks.\1.txt_mlp.0.\2", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2\.(weight|bias)", r"double_blocks.\1.txt_mlp.2.\2", None),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear\.(weight|bias)", r"single_blocks.\1.modulation.lin.\2", None),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_q\.(weight|bias)", r"single_blocks.\1.linear1.\2", 0),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_k\.(weight|bias)", r"single_blocks.\1.linear1.\2", 1),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_v\.(weight|bias)", r"single_blocks.\1.linear1.\2", 2),
    (r"single_transformer_blocks\.(\d+)\.proj_mlp\.(weight|bias)", r"single_blocks.\1.linear1.\2", 3),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale", None),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale", None),
    (r"single_transformer_blocks\.(\d+)\.proj_out\.(weight|bias)", r"single_blocks.\1.linear2.\2", None),
    (r"proj_out\.(weight|bias)", r"final_layer.linear.\1", None),
    (r"norm_out\.linear\.(weight|bias)", r"final_layer.adaLN_modulation.1.\1", "swap"),
)

_SD3: tuple[_Rule, ...] = (
    (r"pos_embed\.pos_embed", "pos_embed", None),
    (r"pos_embed\.proj\.(weight|bias)", r"x_embedder.proj.\1", None),
    (r"time_text_embed\.timestep_embedder\.linear_1\.(weight|bias)", r"t_embedder.mlp.0.\1", None),
    (r"time_text_embed\.timestep_embedder\.linear_2\.(weight|bias)", r"t_embedder.mlp.2.\1", None),
    (r"time_text_embed\.text_embedder\.linear_1\.(weight|bias)", r"y_embedder.mlp.0.\1", None),
    (r"time_text_embed\.text_embedder\.linear_2\.(weight|bias)", r"y_embedder.mlp.2.\1", None),
    (r"context_embedder\.(weight|bias)", r"context_embedder.\1", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_q\.(weight|bias)", r"joint_blocks.\1.x_block.attn.qkv.\2", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_k\.(weight|bias)", r"joint_blocks.\1.x_block.attn.qkv.\2", 1),
    (r"transformer_blocks\.(\d+)\.attn\.to_v\.(weight|bias)", r"joint_blocks.\1.x_block.attn.qkv.\2", 2),
    (r"transformer_blocks\.(\d+)\.attn\.add_q_proj\.(weight|bias)", r"joint_blocks.\1.context_block.attn.qkv.\2", 0),
    (r"transformer_blocks\.(\d+)\.attn\.add_k_proj\.(weight|bias)", r"joint_blocks.\1.context_block.attn.qkv.\2", 1),
    (r"transformer_blocks\.(\d+)\.attn\.add_v_proj\.(weight|bias)", r"joint_blocks.\1.context_block.attn.qkv.\2", 2),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"joint_blocks.\1.x_block.attn.ln_q.weight", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"joint_blocks.\1.x_block.attn.ln_k.weight", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"joint_blocks.\1.context_block.attn.ln_q.weight", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"joint_blocks.\1.context_block.attn.ln_k.weight", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.(weight|bias)", r"joint_blocks.\1.x_block.attn.proj.\2", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out\.(weight|bias)", r"joint_blocks.\1.context_block.attn.proj.\2", None),
    (r"transformer_blocks\.(\d+)\.attn2\.to_q\.(weight|bias)", r"joint_blocks.\1.x_block.attn2.qkv.\2", 0),
    (r"transformer_blocks\.(\d+)\.attn2\.to_k\.(weight|bias)", r"joint_blocks.\1.x_block.attn2.qkv.\2", 1),
    (r"transformer_blocks\.(\d+)\.attn2\.to_v\.(weight|bias)", r"joint_blocks.\1.x_block.attn2.qkv.\2", 2),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_q\.weight", r"joint_blocks.\1.x_block.attn2.ln_q.weight", None),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_k\.weight", r"joint_blocks.\1.x_block.attn2.ln_k.weight", None),
    (r"transformer_blocks\.(\d+)\.attn2\.to_out\.0\.(weight|bias)", r"joint_blocks.\1.x_block.attn2.proj.\2", None),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.(weight|bias)", r"joint_blocks.\1.x_block.adaLN_modulation.1.\2", None),
    # The last joint block's context side is an AdaLayerNormContinuous: halves swapped there only.
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear\.(weight|bias)",
     r"joint_blocks.\1.context_block.adaLN_modulation.1.\2", "swap_if_last"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(weight|bias)", r"joint_blocks.\1.x_block.mlp.fc1.\2", None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(weight|bias)", r"joint_blocks.\1.x_block.mlp.fc2.\2", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.(weight|bias)", r"joint_blocks.\1.context_block.mlp.fc1.\2", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2\.(weight|bias)", r"joint_blocks.\1.context_block.mlp.fc2.\2", None),
    (r"proj_out\.(weight|bias)", r"final_layer.linear.\1", None),
    (r"norm_out\.linear\.(weight|bias)", r"final_layer.adaLN_modulation.1.\1", "swap"),
)

_RULES = {"flux": tuple((re.compile(p), t, s) for p, t, s in _FLUX),
          "sd3": tuple((re.compile(p), t, s) for p, t, s in _SD3)}


def _num_layers(names: Iterable[str]) -> int:
    return 1 + max((int(n.split(".")[1]) for n in names if n.startswith("transformer_blocks.")), default=-1)


def diffusers_to_single_file(
    kind: TransformerKind, shapes: Mapping[str, tuple[int, ...]], prefix: str = UNET_PREFIX
) -> dict[str, tuple[Piece, ...]]:
    """``{diffusers parameter: the single-file rows it is, in order}`` for a transformer's state dict
    shapes (``{name: shape}``); single-file keys carry ``prefix``.

    A diffusers tensor is the concatenation (dim 0) of its pieces: one piece for a renamed tensor,
    a third of ``qkv`` for ``to_q``, the two halves the other way round for a swapped modulation.
    Raises ``ValueError`` for a name no rule covers, or parts of a fused tensor that disagree.
    """
    rules = _RULES[kind]
    last = _num_layers(shapes) - 1
    parts: dict[str, dict[int, str]] = {}  # single-file key -> {slot: diffusers name}
    plan: dict[str, tuple[str, int | str | None]] = {}
    for name in shapes:
        for rx, template, slot in rules:
            m = rx.fullmatch(name)
            if m is None:
                continue
            key = prefix + m.expand(template)
            if slot == "swap_if_last":
                slot = "swap" if int(m.group(1)) == last else None
            plan[name] = (key, slot)
            if isinstance(slot, int):
                if slot in parts.setdefault(key, {}):
                    raise ValueError(f"{name} and {parts[key][slot]} both map to part {slot} of {key}")
                parts[key][slot] = name
            break
        else:
            raise ValueError(f"no single-file name for {kind} transformer tensor {name!r}")
    out: dict[str, tuple[Piece, ...]] = {}
    offsets: dict[str, dict[str, tuple[int, int]]] = {}
    for key, slots in parts.items():
        if sorted(slots) != list(range(len(slots))):
            raise ValueError(f"{key}: fused parts {sorted(slots)} are not contiguous")
        trail = {shapes[n][1:] for n in slots.values()}
        if len(trail) != 1:
            raise ValueError(f"{key}: fused parts have different trailing shapes {sorted(trail)}")
        lo = 0
        offsets[key] = {}
        for s in sorted(slots):
            n = slots[s]
            offsets[key][n] = (lo, lo + shapes[n][0])
            lo += shapes[n][0]
    for name, (key, slot) in plan.items():
        rows = shapes[name][0] if shapes[name] else 1
        if isinstance(slot, int):
            lo, hi = offsets[key][name]
            out[name] = (Piece(key, lo, hi),)
        elif slot == "swap":
            half = rows // 2
            out[name] = (Piece(key, half, rows), Piece(key, 0, half))
        else:
            out[name] = (Piece(key, 0, rows),)
    return out


def single_file_shapes(
    mapping: Mapping[str, tuple[Piece, ...]], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """The shape of every single-file tensor of ``mapping`` (rows summed over its parts)."""
    rows: dict[str, int] = {}
    trail: dict[str, tuple[int, ...]] = {}
    for name, pieces in mapping.items():
        for p in pieces:
            rows[p.key] = max(rows.get(p.key, 0), p.hi)
            trail[p.key] = tuple(shapes[name][1:])
    out = {}
    for key in rows:
        first = next(n for n, ps in mapping.items() if ps[0].key == key)
        out[key] = (rows[key], *trail[key]) if shapes[first] else ()
    return out


def transformer_to_single_file(
    kind: TransformerKind, state_dict: Mapping[str, torch.Tensor], prefix: str = UNET_PREFIX
) -> dict[str, torch.Tensor]:
    """A diffusers Flux / SD3 transformer state dict as single-file tensors (meta tensors give a layout)."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    mapping = diffusers_to_single_file(kind, shapes, prefix)
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, ps in mapping.items():
        t = state_dict[name]
        if len(ps) == 2:  # swapped halves: this tensor's first half is the single file's second
            half = t.shape[0] // 2
            pieces.setdefault(ps[0].key, []).append((ps[0].lo, t[:half]))
            pieces[ps[0].key].append((ps[1].lo, t[half:]))
        else:
            pieces.setdefault(ps[0].key, []).append((ps[0].lo, t))
    out: dict[str, torch.Tensor] = {}
    for key, parts in pieces.items():
        parts.sort(key=lambda x: x[0])
        out[key] = parts[0][1] if len(parts) == 1 else torch.cat([t for _, t in parts], dim=0)
    return out


# ----------------------------------------------------------------------------------------------
# diffusers configs read off single-file shapes, and the models on the meta device
# ----------------------------------------------------------------------------------------------


def _count(keys: Iterable[str], prefix: str) -> int:
    best = -1
    for k in keys:
        if k.startswith(prefix):
            num = k[len(prefix):].split(".", 1)[0]
            if num.isdigit():
                best = max(best, int(num))
    return best + 1


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Flux's rotary axes split of a head (16, 56, 56 for 128); they carry no parameters."""
    if head_dim == 128:
        return (16, 56, 56)
    a = head_dim // 8 * 2 or 2
    b = (head_dim - a) // 2 // 2 * 2
    return (a, b, head_dim - a - b)


def diffusers_config(kind: TransformerKind, shapes: Mapping[str, tuple[int, ...]], prefix: str = UNET_PREFIX) -> dict[str, Any]:
    """The ``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` config of a single file, from shapes.

    What shapes cannot say comes from the families' published configs: Flux's MLP ratio 4 and
    SD3's 64-wide attention heads (used when a file has no q/k norm to read the width from; the
    head count changes no parameter shape).
    """
    def s(k: str) -> tuple[int, ...]:
        return tuple(shapes[prefix + k])

    keys = list(shapes)
    if kind == "flux":
        inner, in_ch = s("img_in.weight")
        head = s("double_blocks.0.img_attn.norm.query_norm.scale")[0]
        return {
            "patch_size": 1,
            "in_channels": in_ch,
            "out_channels": s("final_layer.linear.weight")[0],
            "num_layers": _count(keys, prefix + "double_blocks."),
            "num_single_layers": _count(keys, prefix + "single_blocks."),
            "attention_head_dim": head,
            "num_attention_heads": inner // head,
            "joint_attention_dim": s("txt_in.weight")[1],
            "pooled_projection_dim": s("vector_in.in_layer.weight")[1],
            "guidance_embeds": prefix + "guidance_in.in_layer.weight" in shapes,
            "axes_dims_rope": _rope_axes(head),
        }
    n = _count(keys, prefix + "joint_blocks.")
    inner = s("context_embedder.weight")[0]
    qk = prefix + "joint_blocks.0.x_block.attn.ln_q.weight" in shapes
    # Without q/k norms nothing stores the head width; it changes no shape (heads x width = inner).
    head = s("joint_blocks.0.x_block.attn.ln_q.weight")[0] if qk else (64 if inner % 64 == 0 else inner)
    proj = s("x_embedder.proj.weight")
    patch = proj[2]
    return {
        "sample_size": 128,
        "patch_size": patch,
        "in_channels": proj[1],
        "num_layers": n,
        "attention_head_dim": head,
        "num_attention_heads": inner // head,
        "joint_attention_dim": s("context_embedder.weight")[1],
        "caption_projection_dim": inner,
        "pooled_projection_dim": s("y_embedder.mlp.0.weight")[1],
        "out_channels": s("final_layer.linear.weight")[0] // (patch * patch),
        "pos_embed_max_size": math.isqrt(s("pos_embed")[1]),
        "dual_attention_layers": tuple(i for i in range(n) if prefix + f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes),
        "qk_norm": "rms_norm" if qk else None,
    }


def meta_transformer(kind: TransformerKind, config: Mapping[str, Any]) -> torch.nn.Module:
    """The diffusers transformer of ``config`` on the meta device (no memory, no download)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if kind == "flux" else SD3Transformer2DModel
    with torch.device("meta"):
        return cls(**dict(config))


def lora_rows(kind: TransformerKind, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[Piece, ...]]:
    """``{diffusers parameter: single-file rows}`` for a single file's diffusion-model shapes: the
    mapping a diffusers ``transformer.`` LoRA needs (see :class:`~blockmerge.architectures.base.LoraNames`)."""
    model = meta_transformer(kind, diffusers_config(kind, shapes))
    return diffusers_to_single_file(kind, {k: tuple(v.shape) for k, v in model.state_dict().items()})
