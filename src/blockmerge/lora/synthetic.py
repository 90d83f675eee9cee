"""Random LoRAs with a real model's module names and shapes, for tests and benchmarks (like
:mod:`blockmerge.architectures.synthetic` for checkpoints): the modules kohya's network trains,
named as kohya (or diffusers/PEFT) names them, with seeded random factors."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ..architectures import Architecture
from .extract import kohya_modules
from .names import name_table

__all__ = ["synthetic_lora"]


def synthetic_lora(
    arch: Architecture,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    rank: int = 4,
    conv_rank: int | None = None,
    alpha: float | None = None,
    seed: int = 0,
    naming: str = "kohya",
    text_encoder: bool = True,
    scale: float = 0.02,
) -> dict[str, torch.Tensor]:
    """A LoRA state dict (float32) for a model of ``arch`` with these single-file ``shapes``.

    ``naming`` is ``"kohya"`` (``.lora_down`` / ``.lora_up`` / ``.alpha``, kohya's names) or
    ``"peft"`` (diffusers' ``lora_A`` / ``lora_B`` under ``unet.`` / ``transformer.`` /
    ``text_encoder.``, no alpha). ``alpha`` defaults to the rank (scale 1).
    """
    table = name_table(arch, dict(shapes))
    mods = kohya_modules(arch, dict(shapes), table, conv=conv_rank is not None)
    by_target: dict[tuple[str, tuple[tuple[int, int], ...]], list[str]] = {}
    for name, t in table.targets.items():
        by_target.setdefault((t.key, t.rows), []).append(name)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for m in mods:
        if m.text_encoder and not text_encoder:
            continue
        shape = m.target.shape
        r = min(conv_rank if m.conv3x3 else rank, shape[0], int(torch.tensor(shape[1:]).prod()))  # type: ignore[arg-type]
        if len(shape) == 4:
            down = torch.randn(r, *shape[1:], generator=g)
            up = torch.randn(shape[0], r, 1, 1, generator=g) * scale
        else:
            down = torch.randn(r, shape[1], generator=g)
            up = torch.randn(shape[0], r, generator=g) * scale
        if naming == "kohya":
            out[m.name + ".lora_down.weight"] = down
            out[m.name + ".lora_up.weight"] = up
            out[m.name + ".alpha"] = torch.tensor(float(alpha if alpha is not None else r))
        elif naming == "peft":
            names = [n for n in by_target[(m.target.key, m.target.rows)] if "." in n]
            if not names:
                continue
            out[names[0] + ".lora_A.weight"] = down
            out[names[0] + ".lora_B.weight"] = up
        else:
            raise ValueError(f"naming {naming!r}: expected kohya or peft")
    return out


def write_synthetic_lora(path: str | os.PathLike[str], model: str | os.PathLike[str], *, dtype: str = "fp16",
                         overwrite: bool = False, **kwargs: object) -> dict[str, torch.Tensor]:
    """:func:`synthetic_lora` for the checkpoint file ``model``, written to ``path``."""
    from ..merge.nodes import FileSource
    from .writer import write_lora

    src = FileSource(model)
    try:
        shapes = {k: tuple(src.info(k).shape) for k in src.keys()}
        arch = src.arch
    finally:
        src.close()
    sd = synthetic_lora(arch, shapes, **kwargs)  # type: ignore[arg-type]
    write_lora(path, sd, {"ss_network_module": "networks.lora"}, dtype=dtype, overwrite=overwrite)
    return sd
