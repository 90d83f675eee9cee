"""A LoRA from the difference of two checkpoints, as kohya's ``extract_lora_from_models.py`` makes it.

kohya's semantics, kept: the modules are those its LoRA network targets — every Linear and 1x1
convolution inside the U-Net's transformer blocks (``Transformer2DModel``), and with a conv rank
also the resblocks' (``ResnetBlock2D``: 3x3 convolutions at the conv rank, ``time_emb_proj`` and
the 1x1 shortcut at the rank) and the down/upsamplers' convolutions; the text encoders' attention
and MLP projections, left out when no weight there differs by more than ``min_diff`` (kohya: "Text
encoder is same. Extract U-Net only."). Each difference is factored to its rank by SVD, ``up = U·S``
and ``down = Vᵀ``, both clamped to the ``clamp_quantile`` of their values, and ``alpha`` = rank.
The modules are found from the model itself: diffusers' ``UNet2DConditionModel`` of the file's
config, built on the meta device, says which module classes hold which tensors.

What blockmerge adds: streaming (one tensor pair in memory at a time), a block spec (modules of a
block at 0 are left out, other values scale that block's difference) and the share of each
block's ||ΔW||² the rank keeps, printed and written into the file's metadata.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..architectures import Architecture
from ..errors import BlockmergeError
from ..io import check_output_path
from ..merge.nodes import FileSource
from ..merge.presets import PresetBook, load_presets
from ..merge.weights import BlockWeights, parse_weights
from .lowrank import low_rank
from .names import NameTable, Target, name_table
from .writer import kohya_metadata, write_lora

__all__ = ["ExtractResult", "KohyaModule", "extract_lora", "kohya_modules"]

_UNET_CLASSES = {"Transformer2DModel": False, "ResnetBlock2D": True, "Downsample2D": True, "Upsample2D": True}
_TE_MODULES = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


@dataclass(frozen=True)
class KohyaModule:
    name: str  # the kohya module name written
    target: Target
    conv3x3: bool  # takes the conv rank
    text_encoder: bool


# kohya's target module classes, by the part of the diffusers path that holds them in a
# UNet2DConditionModel: Transformer2DModel (attentions.N), ResnetBlock2D (resnets.N), Downsample2D /
# Upsample2D (downsamplers.0 / upsamplers.0). Their Linear and Conv2d layers are the tensors of 2 or 4
# dimensions (norms are 1-D). tests/test_lora.py checks this against the classes of diffusers' model.
_UNET_PARTS = {"attentions": False, "resnets": True, "downsamplers": True, "upsamplers": True}


def _unet_modules(arch: Architecture, shapes: dict[str, tuple[int, ...]], table: NameTable,
                  conv: bool) -> list[KohyaModule]:
    from ..architectures.ldm_names import unet_ldm_to_diffusers_name
    from ..architectures.unet_config import unet_config

    cfg = unet_config(arch, frozenset(shapes), lambda k: shapes[k], "model", 64)
    out: list[KohyaModule] = []
    for key, shape in shapes.items():
        if arch.diffusion_rest(key) is None or not key.endswith(".weight") or len(shape) not in (2, 4):
            continue
        try:
            parts = unet_ldm_to_diffusers_name(key, cfg).split(".")
        except ValueError:
            continue
        kind = next((_UNET_PARTS[p] for p in parts if p in _UNET_PARTS), None)
        if kind is None or (kind and not conv):
            continue
        big_kernel = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        if big_kernel and not conv:
            continue
        name = table.native.get((key, ()))
        if name is not None:
            out.append(KohyaModule(name, table.targets[name], big_kernel, False))
    return out


def _transformer_modules(arch: Architecture, table: NameTable) -> list[KohyaModule]:
    """Flux / SD3 (kohya's lora_flux / lora_sd3): the Linear layers of the transformer blocks."""
    out = []
    for (key, rows), name in table.native.items():
        if rows or not name.startswith(arch.lora.unet_prefix):  # type: ignore[union-attr]
            continue
        t = table.targets[name]
        if len(t.shape) == 2 and arch.block_of(key) in arch.block_ids and arch.block_of(key) not in ("IN", "OUT"):
            out.append(KohyaModule(name, t, False, False))
    return out


def kohya_modules(arch: Architecture, shapes: dict[str, tuple[int, ...]], table: NameTable, *,
                  conv: bool) -> list[KohyaModule]:
    """The modules kohya's LoRA network would train on this model, in its naming."""
    if arch.lora is None:
        raise BlockmergeError(f"{arch.title}: blockmerge knows no LoRA names for this family")
    mods = (_unet_modules(arch, shapes, table, conv) if arch.lora.diffusers_names is None
            else _transformer_modules(arch, table))
    for enc in arch.lora.text_encoders:
        if "t5" in enc.prefix:  # kohya trains CLIP encoders only (T5 is left as it is)
            continue
        for (_key, _rows), name in table.native.items():
            if name.startswith(enc.kohya) and name.endswith(_TE_MODULES) and "_layers_" in name:
                mods.append(KohyaModule(name, table.targets[name], False, True))
    return mods


@dataclass
class ExtractResult:
    output: Path
    architecture: str
    rank: int
    conv_rank: int | None
    modules: int
    text_encoder: bool
    energy: dict[str, tuple[float, float]] = field(default_factory=dict)  # block -> (kept, total) ||ΔW||²
    warnings: list[str] = field(default_factory=list)

    def kept_fraction(self, block: str) -> float:
        kept, total = self.energy[block]
        return kept / total if total > 0 else 1.0


def _clamp(up: torch.Tensor, down: torch.Tensor, q: float) -> None:
    if q >= 1.0:
        return
    dist = np.concatenate([up.reshape(-1).double().numpy(), down.reshape(-1).double().numpy()])
    hi = float(np.quantile(dist, q))  # torch.quantile refuses tensors of more than 2**24 values
    up.clamp_(-hi, hi)
    down.clamp_(-hi, hi)


def extract_lora(
    tuned: str | os.PathLike[str],
    base: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    rank: int,
    conv_rank: int | None = None,
    clamp_quantile: float = 0.99,
    min_diff: float = 0.01,
    blocks: str | float | BlockWeights | None = None,
    dtype: str = "fp16",
    device: str = "cpu",
    overwrite: bool = False,
    presets: PresetBook | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> ExtractResult:
    """Extract ``tuned - base`` as a kohya LoRA (the library form of ``blockmerge lora extract``)."""
    if rank < 1:
        raise BlockmergeError(f"--rank {rank}: must be at least 1")
    if conv_rank is not None and conv_rank < 1:
        raise BlockmergeError(f"--conv-rank {conv_rank}: must be at least 1")
    if not 0.0 < clamp_quantile <= 1.0:
        raise BlockmergeError(f"--clamp-quantile {clamp_quantile}: must be in (0, 1]")
    if not (math.isfinite(min_diff) and min_diff >= 0):
        raise BlockmergeError(f"--min-diff {min_diff}: must be a finite number >= 0")
    out = Path(output)
    check_output_path(out, [Path(tuned), Path(base)], overwrite)
    with contextlib.ExitStack() as stack:
        t_src = FileSource(tuned)  # each closed even when the next fails to open
        stack.callback(t_src.close)
        b_src = FileSource(base)
        stack.callback(b_src.close)
        arch = t_src.arch
        if b_src.arch is not arch:
            raise BlockmergeError(f"{base}: is {b_src.arch.title} but {tuned} is {arch.title}")
        shapes = {k: tuple(t_src.info(k).shape) for k in t_src.keys()}
        for k, s in shapes.items():
            if k in b_src.keys() and tuple(b_src.info(k).shape) != s:
                raise BlockmergeError(f"{k}: {tuned} has {list(s)}, {base} has {list(b_src.info(k).shape)}")
        weights = (parse_weights(blocks, arch, arg="--blocks", keep_a=0.0,
                                 presets=presets if presets is not None else load_presets())
                   if blocks is not None else BlockWeights.uniform(arch, 1.0))
        table = name_table(arch, shapes)
        mods = [m for m in kohya_modules(arch, shapes, table, conv=conv_rank is not None)
                if m.target.key in b_src.keys()]
        warnings: list[str] = []

        def diff(m: KohyaModule) -> torch.Tensor:
            a = m.target.take(t_src.get(m.target.key).to(device=device, dtype=torch.float32))
            b = m.target.take(b_src.get(m.target.key).to(device=device, dtype=torch.float32))
            return a - b

        te = [m for m in mods if m.text_encoder]
        te_max = max((float(diff(m).abs().max()) for m in te), default=0.0)
        use_te = te_max > min_diff
        if te and not use_te:
            warnings.append(f"the text encoders differ by at most {te_max:.3g} (<= --min-diff {min_diff:g}): "
                            "extracting the diffusion model only")
        chosen = [m for m in mods if (use_te or not m.text_encoder)]
        energy: dict[str, list[float]] = {}
        tensors: dict[str, torch.Tensor] = {}
        written = 0
        for i, m in enumerate(chosen, 1):
            block = arch.block_of(m.target.key)
            value = weights.value(m.target.key, block)
            if progress is not None:
                progress(i, len(chosen), m.name)
            if value == 0.0:
                continue
            d = diff(m)
            if value != 1.0:
                d.mul_(value)
            r = conv_rank if m.conv3x3 else rank
            mat = d.reshape(d.shape[0], -1)
            f = low_rank(mat, r, name=m.name)  # type: ignore[arg-type]
            e = energy.setdefault(block, [0.0, 0.0])
            e[0] += f.kept
            e[1] += f.total
            k = f.up.shape[1]
            if k == 0 or f.total == 0.0:  # no difference here: a module of zeros would only add noise to files
                continue
            up, down = f.up.float().cpu(), f.down.float().cpu()
            _clamp(up, down, clamp_quantile)
            shape = m.target.shape
            if len(shape) == 4:
                up = up.reshape(shape[0], k, 1, 1)
                down = down.reshape(k, *shape[1:])
            tensors[m.name + ".lora_up.weight"] = up.contiguous()
            tensors[m.name + ".lora_down.weight"] = down.contiguous()
            tensors[m.name + ".alpha"] = torch.tensor(float(k))
            written += 1
        if not written:
            raise BlockmergeError(f"{tuned} and {base}: nothing to extract (no module differs in the chosen blocks)")
        record: dict[str, Any] = {
            "method": "lora_extract", "architecture": arch.name, "tuned": Path(tuned).name, "base": Path(base).name,
            "rank": rank, "conv_rank": conv_rank, "clamp_quantile": clamp_quantile, "min_diff": min_diff,
            "text_encoder": use_te, "blocks": weights.as_dict(),
            "kept_energy": {b: (v[0] / v[1] if v[1] > 0 else 1.0) for b, v in energy.items()},
        }
        write_lora(out, tensors, kohya_metadata(arch.name, rank, conv_rank, record), dtype=dtype, overwrite=overwrite)
        return ExtractResult(out, arch.name, rank, conv_rank, written, use_te,
                             {b: (v[0], v[1]) for b, v in energy.items()}, warnings)
