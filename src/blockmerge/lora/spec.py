"""Which LoRA, how strong, on which blocks: ``FILE[:STRENGTH[:BLOCKS]]`` and LoRA Block Weight values.

A LoRA's per-block strengths are a weight spec like any merge parameter's (one number, a list in
the family's forms — LoRA Block Weight's 17 / 26 values for SD1/SD2, 12 / 20 for SDXL, 61 for
Flux — a preset of Merge Block Weighted or LoRA Block Weight, the readable ``IN04-IN08=1`` form,
elemental rules). BASE is the text encoder(s), as in LoRA Block Weight. Blocks a list or a
readable form leaves out get 0 (no LoRA there), which is LoRA Block Weight's ``to26`` rule.
A1111's two multipliers (``<lora:NAME:TE:UNET>``) scale BASE and the diffusion model's blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..architectures import Architecture
from ..errors import BlockmergeError, WeightSpecError
from ..io.inputs import check_input_file
from ..merge.presets import PresetBook
from ..merge.weights import BlockWeights, parse_number, parse_weights

__all__ = ["LoraSpec", "lora_weights", "parse_lora_arg"]


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: its file, A1111's two multipliers, its block spec (None: every block at 1),
    A1111's ``dyn`` (rank kept), and the name it was asked for by (a prompt's ``<lora:NAME>``)."""

    path: Path
    te: float = 1.0
    unet: float = 1.0
    blocks: str | None = None
    dyn: int | None = None
    name: str = field(default="", compare=False)

    @property
    def label(self) -> str:
        return self.name or self.path.stem

    def weights(self, arch: Architecture, presets: PresetBook | None = None, arg: str | None = None) -> BlockWeights:
        return lora_weights(arch, self.blocks, self.te, self.unet, presets, arg or f"{self.label}: blocks")


def _strength(text: str, arg: str) -> float:
    return parse_number(text, f"{arg}: strength")


def lora_weights(arch: Architecture, blocks: str | None, te: float = 1.0, unet: float = 1.0,
                 presets: PresetBook | None = None, arg: str = "blocks") -> BlockWeights:
    """The ``add_delta`` α of a LoRA for every block of ``arch``: block value x (TE or U-Net strength)."""
    base = (parse_weights(blocks, arch, arg=arg, keep_a=0.0, presets=presets) if blocks is not None
            else BlockWeights.uniform(arch, 1.0))
    if base.rules and te != unet:
        raise WeightSpecError(f"{arg}: elemental rules need one strength for the text encoder and the blocks "
                              f"(got {te:g} and {unet:g}); put the difference in the block values (BASE=...)")
    values = tuple(v * (te if i in arch.base_ids else unet) for i, v in zip(base.ids, base.values, strict=True))
    rules = tuple(r.__class__(r.text, r.blocks, r.not_blocks, r.parts, r.not_parts, r.value * unet) for r in base.rules)
    return BlockWeights(arch.name, base.ids, values, rules)


def parse_lora_arg(text: str, lora_dir: str | os.PathLike[str] | None = None, arg: str = "LORA") -> LoraSpec:
    """``FILE[:STRENGTH[:BLOCKS]]`` -> a :class:`LoraSpec`.

    FILE is the longest prefix before a ``:`` that names an existing file (paths may hold colons;
    BLOCKS may too, in elemental rules), or a LoRA name looked up in ``lora_dir``.
    """
    from ..models import find_bundled_lora
    from .library import check_lora_dir, find_lora

    if lora_dir is not None:
        check_lora_dir(lora_dir)
    parts = text.split(":")
    odd: Path | None = None  # the longest prefix that exists but is no regular file (a folder, a FIFO)
    for i in range(len(parts), 0, -1):
        head = ":".join(parts[:i])
        path = Path(head)
        if not path.is_file():
            found = find_lora(head, lora_dir) if lora_dir is not None and head else None
            found = found or find_bundled_lora(head)
            if found is None:
                if odd is None and head and os.path.lexists(head):
                    odd = path
                continue
            path = found
        rest = parts[i:]
        strength = _strength(rest[0], f"{arg} {text!r}") if rest and rest[0] != "" else 1.0
        blocks = ":".join(rest[1:]) if len(rest) > 1 else None
        return LoraSpec(path, strength, strength, blocks or None, name=Path(head).stem)
    if odd is not None:
        check_input_file(odd, f"{arg} {odd}")  # says what it is instead ("is a folder, not a file" ...)
    where = f", no LoRA of that name in {lora_dir}" if lora_dir is not None else ""
    raise BlockmergeError(f"{arg} {text!r}: no such file{where} and no bundled LoRA of that name "
                          "(expected FILE[:STRENGTH[:BLOCKS]])")
