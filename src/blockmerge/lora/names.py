"""LoRA module names -> the single-file tensors they change, derived from the family's layout.

Why derived and not a hand-kept table: a LoRA names the modules of the model it was trained on,
in one of several spellings (kohya's ``lora_unet_down_blocks_0_attentions_0_proj_in`` with diffusers
paths for SD1/SD2, ``lora_unet_input_blocks_4_1_proj_in`` with LDM paths for SDXL and
``lora_unet_double_blocks_0_img_attn_qkv`` for Flux/SD3, PEFT's ``unet.down_blocks.0...`` or
``transformer.transformer_blocks.0.attn.to_q``). Every spelling is generated here from a real
layout: the single-file keys of the model (or of the family's full-size layout on the meta
device), diffusers' own LDM -> diffusers converter for the U-Nets
(:func:`~blockmerge.architectures.ldm_names.unet_ldm_to_diffusers_names`), the inverted Flux/SD3
converter for diffusers transformer LoRAs, and the OpenCLIP slot rules for SD2's and SDXL's
second text encoder, whose LoRAs use transformers names for a tensor stored with q/k/v stacked.
The block of every module is then :meth:`Architecture.block_of` of its target key: the one block
mapping the merge engine uses.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..architectures import Architecture, families
from ..architectures.base import LoraEncoder
from ..architectures.ldm_names import text_encoder_slot, unet_ldm_to_diffusers_name
from ..architectures.unet_config import unet_config
from ..errors import CheckpointError

__all__ = ["NameTable", "Target", "family_table", "name_table"]

_OPEN_CLIP_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                      "mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class Target:
    """Where one LoRA module's ΔW goes: the single-file weight ``key``; ``shape`` is the module's
    weight as its LoRA factors make it; ``rows`` the row ranges of ``key`` that ΔW's rows fill in
    order (empty: the whole tensor); ``transpose`` when the file stores the module's weight
    transposed (OpenCLIP's ``text_projection``); ``bias`` the module's bias key, if the model has one."""

    key: str
    shape: tuple[int, ...]
    rows: tuple[tuple[int, int], ...] = ()
    transpose: bool = False
    bias: str | None = None

    def add_into(self, out: torch.Tensor, delta: torch.Tensor) -> None:
        """Add a module's ΔW (shaped :attr:`shape`) into the full single-file tensor ``out``."""
        d = delta.reshape(self.shape)
        if self.transpose:
            d = d.T
        if not self.rows:
            out.add_(d.reshape(out.shape))
            return
        start = 0
        for lo, hi in self.rows:
            n = hi - lo
            out[lo:hi].add_(d[start:start + n].reshape(out[lo:hi].shape))
            start += n

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """The module's weight (shaped :attr:`shape`) out of the full single-file tensor."""
        part = full if not self.rows else torch.cat([full[lo:hi] for lo, hi in self.rows], dim=0)
        if self.transpose:
            part = part.T
        return part.reshape(self.shape)


@dataclass
class NameTable:
    """Every name a LoRA may give a module of one model, and where it goes."""

    arch: Architecture
    targets: dict[str, Target] = field(default_factory=dict)
    # single-file key (+ rows) -> the kohya name blockmerge writes for it
    native: dict[tuple[str, tuple[tuple[int, int], ...]], str] = field(default_factory=dict)

    def add(self, name: str, target: Target) -> None:
        old = self.targets.get(name)
        if old is not None and old != target:
            raise CheckpointError(f"LoRA name {name!r} fits two tensors ({old.key}, {target.key})")
        self.targets[name] = target

    def lookup(self, name: str) -> Target | None:
        return self.targets.get(name)

    def block_of(self, target: Target) -> str:
        return self.arch.block_of(target.key)


def _module(key: str) -> str | None:
    return key[: -len(".weight")] if key.endswith(".weight") else None


def _bias(key: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    b = key[: -len(".weight")] + ".bias"
    return b if b in shapes else None


def _add_unet(table: NameTable, shapes: Mapping[str, tuple[int, ...]]) -> None:
    arch = table.arch
    lora = arch.lora
    assert lora is not None
    keys = [k for k in shapes if arch.diffusion_rest(k) is not None]
    prefix = lora.unet_prefix
    dif_names: dict[str, str] = {}
    if lora.diffusers_names is None:  # a U-Net family: its diffusers module paths (checked against
        # diffusers' converter in the tests; computed without importing it, which costs seconds)
        cfg = unet_config(arch, frozenset(shapes), lambda k: tuple(shapes[k]), "model", 64)
        for key in keys:
            try:
                dif_names[key] = unet_ldm_to_diffusers_name(key, cfg)
            except ValueError:
                continue
    for key in keys:
        mod = _module(key)
        if mod is None or len(shapes[key]) < 1:
            continue
        rest = arch.diffusion_rest(key)
        assert rest is not None
        ldm_mod = rest[: -len(".weight")]
        target = Target(key, tuple(shapes[key]), bias=_bias(key, shapes))
        table.add(prefix + ldm_mod.replace(".", "_"), target)
        dname = dif_names.get(key)
        if dname is not None and dname.endswith(".weight"):
            dmod = dname[: -len(".weight")]
            table.add(prefix + dmod.replace(".", "_"), target)
            table.add(lora.diffusers_prefix + dmod, target)
            native = dmod if lora.unet_naming == "diffusers" else ldm_mod
        else:
            native = ldm_mod
        table.native[(key, ())] = prefix + native.replace(".", "_")
    if lora.diffusers_names is not None:  # Flux / SD3: diffusers parameters are rows of fused tensors
        dshapes = {k: tuple(shapes[k]) for k in keys}
        for dname, pieces in lora.diffusers_names(dshapes).items():
            if not dname.endswith(".weight"):
                continue
            key = pieces[0].key
            if key not in shapes or any(p.key != key for p in pieces):
                continue
            trail = tuple(shapes[key][1:])
            rows = tuple((p.lo, p.hi) for p in pieces)
            n = sum(hi - lo for lo, hi in rows)
            whole = len(rows) == 1 and rows[0] == (0, shapes[key][0])
            table.add(lora.diffusers_prefix + dname[: -len(".weight")],
                      Target(key, (n, *trail), () if whole else rows, bias=_bias(key, shapes) if whole else None))


def _add_encoder(table: NameTable, enc: LoraEncoder, shapes: Mapping[str, tuple[int, ...]]) -> None:
    if enc.storage == "open_clip":
        layers = sorted({int(k[len(enc.prefix + "transformer.resblocks."):].split(".", 1)[0])
                         for k in shapes if k.startswith(enc.prefix + "transformer.resblocks.")})
        names = [f"text_model.encoder.layers.{i}.{m}" for i in layers for m in _OPEN_CLIP_MODULES]
        names.append("text_projection")
        for mod in names:
            slot = text_encoder_slot(mod + ".weight", "open_clip", enc.prefix)
            if slot.key not in shapes:
                continue
            full = tuple(shapes[slot.key])
            rows_n = full[0] // slot.parts
            rows = ((slot.part * rows_n, (slot.part + 1) * rows_n),) if slot.parts > 1 else ()
            shape = (full[1], full[0]) if slot.transpose else (rows_n, *full[1:])
            bias = None
            if not slot.transpose:
                bkey = text_encoder_slot(mod + ".bias", "open_clip", enc.prefix).key
                bias = bkey if bkey in shapes and slot.parts == 1 else None
            target = Target(slot.key, shape, rows, slot.transpose, bias)
            _add_te_names(table, enc, mod, target)
            table.native[(slot.key, rows)] = enc.kohya + mod.replace(".", "_")
        return
    for key, shape in shapes.items():
        if not key.startswith(enc.prefix):
            continue
        mod = _module(key)
        if mod is None or len(shape) < 2:
            continue
        path = mod[len(enc.prefix):]
        target = Target(key, tuple(shape), bias=_bias(key, shapes))
        _add_te_names(table, enc, path, target)
        table.native[(key, ())] = enc.kohya + ("text_model." + path if _bare_clip(path) else path).replace(".", "_")


def _bare_clip(path: str) -> bool:
    """A CLIP path without transformers 4's ``text_model.`` level (files saved by transformers 5)."""
    return path.startswith(("encoder.layers.", "embeddings.", "final_layer_norm."))


def _add_te_names(table: NameTable, enc: LoraEncoder, path: str, target: Target) -> None:
    """kohya's and PEFT's names of a text-encoder module, with and without ``text_model.``: LoRAs
    trained under transformers 4 say ``lora_te_text_model_encoder_layers_0_...``, and transformers 5
    dropped that level from CLIPTextModel (so may LoRAs made with it)."""
    forms = {path}
    if path.startswith("text_model."):
        forms.add(path[len("text_model."):])
    elif _bare_clip(path):
        forms.add("text_model." + path)
    for p in sorted(forms):
        table.add(enc.kohya + p.replace(".", "_"), target)
        if enc.peft:
            table.add(enc.peft + p, target)


def name_table(arch: Architecture, shapes: Mapping[str, tuple[int, ...]]) -> NameTable:
    """Every LoRA name of the modules of a model with these single-file ``shapes`` (canonical keys)."""
    if arch.lora is None:
        raise CheckpointError(f"{arch.title}: blockmerge knows no LoRA names for this family")
    table = NameTable(arch)
    try:
        _add_unet(table, shapes)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{arch.title}: cannot name the diffusion model's modules for LoRAs: {e}") from None
    for enc in arch.lora.text_encoders:
        _add_encoder(table, enc, shapes)
    return table


@functools.lru_cache(maxsize=16)
def _family_table(name: str, variant: str | None) -> NameTable:
    arch = next(a for a in families() if a.name == name)
    if arch.synthetic is None:
        raise CheckpointError(f"{arch.title}: no layout to name LoRA modules with")
    layout = arch.synthetic("full", variant)
    return name_table(arch, {k: tuple(t.shape) for k, t in layout.items()})


def family_table(arch: Architecture, variant: str | None = None) -> NameTable:
    """The name table of a family's full-size layout (for a LoRA read without its model)."""
    return _family_table(arch.name, variant)


def lora_families(names: Iterable[str]) -> list[Architecture]:
    """Families whose LoRA naming could cover some of ``names`` (cheap prefix test, no layouts)."""
    names = list(names)
    out = []
    for arch in families():
        if arch.lora is None:
            continue
        prefixes = [arch.lora.unet_prefix, arch.lora.diffusers_prefix,
                    *(e.kohya for e in arch.lora.text_encoders), *(e.peft for e in arch.lora.text_encoders if e.peft)]
        if any(n.startswith(tuple(p for p in prefixes if p)) for n in names):
            out.append(arch)
    return out

