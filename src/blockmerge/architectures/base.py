"""A model family is data: one :class:`Architecture` says everything blockmerge knows about it.

Detection (sentinel keys, as diffusers' single-file loader finds families), the prefixes of its
components (diffusion model, text encoders, VAE), its block ids in order, an ordered table of key
patterns -> block, the weight-list forms it accepts (lengths, where BASE goes), the readable-form
groups, how reports and heat maps lay its blocks out, keys that are copied and never merged, and
(for families that generate) its diffusers classes. The merge engine, weight specs, presets,
``blocks``, ``info``, ``compare``, heat maps, reports and synthetic checkpoints all ask this one
place; adding a family is adding one description (:mod:`.sd`, :mod:`.flux`, :mod:`.sd3`) and
registering it (:func:`blockmerge.architectures.register`).

Why a table of regexes and not code per family: the U-Net rule of the Merge Block Weighted
extension (``input_blocks.N.*`` -> IN<N>, ...) and ComfyUI's prefix rule for Flux/SD3
(``double_blocks.N.`` -> that block's ratio) are both "first pattern that matches the key after
the diffusion model's prefix names the block"; what differs between families is only the table.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

BASE = "BASE"
#: The diffusion model's prefix in every single-file layout blockmerge reads (LDM, ComfyUI, Forge).
UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."


def block_ids_for(n_in: int, n_out: int) -> tuple[str, ...]:
    """IN00..IN(n_in-1), M00, OUT00..OUT(n_out-1) in the order weight lists use."""
    return (
        tuple(f"IN{i:02d}" for i in range(n_in))
        + ("M00",)
        + tuple(f"OUT{i:02d}" for i in range(n_out))
    )


@dataclass(frozen=True)
class Component:
    """A part of the checkpoint outside the diffusion model's blocks (text encoder, VAE), by key prefix."""

    name: str
    prefix: str


@dataclass(frozen=True)
class KeyRule:
    """One row of the key -> block table.

    ``pattern`` is matched (``re.match``, anchored at the start) against the key with the diffusion
    model's prefix removed; the block is ``block.format(*groups)`` with the numeric groups as ints,
    so ``KeyRule(r"input_blocks\\.(\\d+)\\.", "IN{0:02d}")`` sends ``input_blocks.4.1.norm.weight``
    to ``IN04``. A result that is not one of the family's blocks (``input_blocks.12`` in SDXL) is
    BASE, as the Merge Block Weighted extension treats it.
    """

    pattern: str
    block: str
    _re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_re", re.compile(self.pattern))

    def apply(self, rest: str) -> str | None:
        m = self._re.match(rest)
        if m is None:
            return None
        groups = [int(g) if g is not None and g.isdigit() else g for g in m.groups()]
        return self.block.format(*groups)


@dataclass(frozen=True)
class ListForm:
    """A plain list of weights the family accepts: its values go to ``ids`` in this order.

    Ids of the BASE group (:attr:`Architecture.base_ids`) a form leaves out take ``--base-alpha``
    (or the value that keeps model A); when the form has BASE but not a weighted component, that
    component takes BASE's value.
    """

    ids: tuple[str, ...]
    label: str
    source: str = ""

    @property
    def length(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Sentinels:
    """What a key set must look like to be this family (or variant), as plain data.

    ``keys``: each must be present; ``any_keys``: at least one (diffusers' CHECKPOINT_KEY_NAMES
    lists alternatives like this); ``prefixes``: each must start some key; ``absent``: no key may
    start with these; ``counts``: (numbered prefix, n): the numbers after the prefix run to n - 1
    (``("model.diffusion_model.input_blocks.", 12)`` for SD1).
    """

    keys: tuple[str, ...] = ()
    any_keys: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    counts: tuple[tuple[str, int], ...] = ()

    def match(self, keys: frozenset[str]) -> bool:
        if not all(k in keys for k in self.keys):
            return False
        if self.any_keys and not any(k in keys for k in self.any_keys):
            return False
        if not all(any(k.startswith(p) for k in keys) for p in self.prefixes):
            return False
        if any(k.startswith(self.absent) for k in keys) if self.absent else False:
            return False
        return all(numbered_count(keys, p) == n for p, n in self.counts)


def numbered_count(keys: Iterable[str], prefix: str) -> int:
    """1 + the largest N of keys ``prefix + "N." ...`` (0 when there is none)."""
    best = -1
    for k in keys:
        if k.startswith(prefix):
            num = k[len(prefix):].split(".", 1)[0]
            if num.isdigit():
                best = max(best, int(num))
    return best + 1


@dataclass(frozen=True)
class Variant:
    """A named variant of a family with the same blocks (Flux.1 dev / schnell, SD3 / SD3.5 Medium)."""

    name: str
    title: str
    sentinels: Sentinels = Sentinels()


@dataclass(frozen=True)
class Layout:
    """Where reports and heat maps draw each block: ``positions[id] = (row, column)``, 1-based.

    Row 1 is left for the cells that are not blocks (the baseline image in a sweep report; BASE
    and the components in a heat map). ``kind`` is ``"u"`` (the article's U: IN down the left, M at
    the bottom, OUT up the right) or ``"stack"`` (transformer blocks in execution order, down each
    column, left to right); ``note`` says how to read it.
    """

    kind: str
    positions: Mapping[str, tuple[int, int]]
    note: str = ""

    @property
    def columns(self) -> int:
        return max((c for _, c in self.positions.values()), default=1)

    @property
    def rows(self) -> int:
        return max((r for r, _ in self.positions.values()), default=1)


@dataclass(frozen=True)
class TextEncoderSpec:
    """How a generating family's text encoder is stored and run (read by the generation loader).

    ``kind`` is ``"clip"`` (transformers names under ``prefix``) or ``"open_clip"`` (OpenCLIP
    names); ``pad_token`` the token the tokenizer pads with; ``drop_last_layer`` is True where the
    pipeline runs one layer fewer than the file holds (SD2 reads the penultimate layer).
    """

    kind: str
    prefix: str
    with_projection: bool
    pad_token: str
    drop_last_layer: bool = False


@dataclass(frozen=True)
class Generation:
    """The diffusers side of a family that blockmerge can generate with (SD1/SD2/SDXL)."""

    pipeline: str
    denoiser: str
    denoiser_converter: str
    vae: str
    vae_converter: str
    text_encoders: tuple[TextEncoderSpec, ...]
    default_resolution: int
    vae_scaling: float
    v_resolution: int | None = None  # SD2 768-v models are trained at 768


@dataclass(frozen=True)
class LoraEncoder:
    """A text encoder as LoRAs name it.

    ``kohya`` is the kohya prefix (``lora_te_``, ``lora_te1_``), ``prefix`` the single-file prefix
    below which the encoder's tensors are stored, ``storage`` how: ``"transformers"`` (the module
    paths LoRAs use, so ``lora_te_text_model_encoder_layers_0_mlp_fc1`` is
    ``<prefix>text_model.encoder.layers.0.mlp.fc1.weight``) or ``"open_clip"`` (SD2's and SDXL's
    OpenCLIP towers: LoRAs still use transformers names, which
    :func:`~blockmerge.architectures.ldm_names.text_encoder_slot` places in the stacked q/k/v and
    transposed projection); ``peft`` the diffusers / PEFT prefix (``text_encoder.``).
    """

    kohya: str
    prefix: str
    storage: str = "transformers"
    peft: str = ""


@dataclass(frozen=True)
class LoraNames:
    """How LoRAs name a family's modules (read by :mod:`blockmerge.lora.names`).

    - ``unet_prefix`` / ``unet_naming``: kohya names a diffusion-model module
      ``<unet_prefix><module path with dots as underscores>``. The path is the single-file key below
      ``model.diffusion_model.`` without its parameter suffix (``"ldm"``: SDXL's kohya LoRAs,
      ``lora_unet_input_blocks_4_1_proj_in``; Flux and SD3, ``lora_unet_double_blocks_0_img_attn_qkv``)
      or the diffusers ``UNet2DConditionModel`` path (``"diffusers"``: SD1/SD2 kohya LoRAs,
      ``lora_unet_down_blocks_0_attentions_0_proj_in``). This is the form blockmerge writes; both
      forms are read for the U-Net families.
    - ``text_encoders``: the encoders LoRAs can touch, in LoRA Block Weight's BASE.
    - ``diffusers_prefix``: the prefix of diffusers / PEFT keys of the diffusion model (``unet.``,
      ``transformer.``); ``diffusers_names(shapes)`` maps each diffusers parameter of a
      transformer family to the rows of the single-file tensor it is (``to_q`` is the first third
      of a fused ``qkv``). The U-Net families get theirs from diffusers' own converter.
    """

    unet_prefix: str
    unet_naming: str
    text_encoders: tuple[LoraEncoder, ...] = ()
    diffusers_prefix: str = ""
    diffusers_names: Callable[[Mapping[str, tuple[int, ...]]], Mapping[str, Any]] | None = None


#: ``(size, variant) -> {single-file key: tensor}`` (meta tensors: a layout, no memory).
SyntheticBuilder = Callable[[str, "str | None"], "Mapping[str, torch.Tensor]"]


@dataclass(frozen=True, eq=False)
class Architecture:
    """One model family as data (see the module docstring). Compared by identity.

    ``name`` is the id users type (``--arch FLUX``), ``title`` the readable name. ``block_ids`` are
    the diffusion model's blocks in weight-list order; ``weighted_components`` are components that
    are outside the diffusion model (so in the BASE group) but carry a weight of their own (Flux's
    CLIP and T5, as supermerger and LoRA Block Weight give them). ``diffusion_prefixes`` are the
    prefixes the diffusion model's keys may have (``""`` for bare files such as BFL's Flux
    release: a bare key belongs to the diffusion model when a rule matches it). ``synthetic``
    builds the family's single-file layout on the meta device for a size (``"tiny"``/``"full"``).
    """

    name: str
    title: str
    block_ids: tuple[str, ...]
    components: tuple[Component, ...]
    rules: tuple[KeyRule, ...]
    sentinels: Sentinels
    list_forms: tuple[ListForm, ...]
    layout: Layout
    weighted_components: tuple[str, ...] = ()
    diffusion_prefixes: tuple[str, ...] = (UNET_PREFIX,)
    diffusion_name: str = "UNET"
    variants: tuple[Variant, ...] = ()
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    id_aliases: Mapping[str, str] = field(default_factory=dict)
    copied: tuple[str, ...] = ()
    prediction: str = "epsilon"
    generation: Generation | None = None
    lora: LoraNames | None = None
    synthetic: SyntheticBuilder | None = None
    _cache: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _copied_re: re.Pattern[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        names = [c.name for c in self.components]
        bad = [w for w in self.weighted_components if w not in names]
        if bad:
            raise ValueError(f"{self.name}: weighted components {bad} are not components")
        ids = self.all_ids
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.name}: duplicate ids in {ids}")
        for form in self.list_forms:
            unknown = [i for i in form.ids if i not in ids]
            if unknown:
                raise ValueError(f"{self.name}: list form {form.label!r} names unknown ids {unknown}")
        missing = [b for b in self.block_ids if b not in self.layout.positions]
        if missing:
            raise ValueError(f"{self.name}: the layout has no place for {missing}")
        if self.copied:
            object.__setattr__(self, "_copied_re", re.compile("|".join(f"(?:{p})" for p in self.copied)))

    # -- ids ---------------------------------------------------------------------------------------

    @property
    def base_ids(self) -> tuple[str, ...]:
        """BASE and the weighted components: everything outside the diffusion model's blocks."""
        return (BASE, *self.weighted_components)

    @property
    def all_ids(self) -> tuple[str, ...]:
        """BASE (and weighted components) first, then the blocks: the supermerger order of a 26
        (SDXL 20) value list."""
        return (*self.base_ids, *self.block_ids)

    @property
    def n_blocks(self) -> int:
        return len(self.block_ids)

    @property
    def n_in(self) -> int:
        """Number of IN blocks (U-Net families)."""
        return sum(1 for b in self.block_ids if b.startswith("IN"))

    @property
    def n_out(self) -> int:
        """Number of OUT blocks (U-Net families)."""
        return sum(1 for b in self.block_ids if b.startswith("OUT"))

    def list_form(self, n: int) -> ListForm | None:
        for f in self.list_forms:
            if f.length == n:
                return f
        return None

    # -- keys --------------------------------------------------------------------------------------

    def _component(self, key: str) -> Component | None:
        for comp in self.components:
            if key.startswith(comp.prefix):
                return comp
        return None

    def _rule_block(self, rest: str) -> str | None:
        for rule in self.rules:
            b = rule.apply(rest)
            if b is not None:
                return b
        return None

    def diffusion_rest(self, key: str) -> str | None:
        """The key below the diffusion model's prefix, or None when the key is not the diffusion
        model's (a bare key counts only when a rule matches it)."""
        for p in self.diffusion_prefixes:
            if p and key.startswith(p):
                return key[len(p):]
        if "" in self.diffusion_prefixes and self._component(key) is None and self._rule_block(key) is not None:
            return key
        return None

    def block_of(self, key: str) -> str:
        """The block id (or ``BASE``, or a weighted component) a checkpoint key belongs to."""
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        comp = self._component(key)
        if comp is not None and comp.name in self.weighted_components:
            block = comp.name
        else:
            rest = self.diffusion_rest(key) if comp is None else None
            block = BASE
            if rest is not None:
                b = self._rule_block(rest)
                if b is not None and b in self.block_ids:
                    block = b
        self._cache[key] = block
        return block

    def component_of(self, key: str) -> str:
        """The diffusion model's name (``UNET``) for its keys, else the component name (e.g.
        ``TE``, ``VAE``), else ``OTHER``."""
        if self._component(key) is None and self.diffusion_rest(key) is not None:
            return self.diffusion_name
        comp = self._component(key)
        return comp.name if comp is not None else "OTHER"

    def blocks_of(self, keys: Iterable[str]) -> dict[str, list[str]]:
        """Group keys by id, in ``all_ids`` order (empty ids included)."""
        out: dict[str, list[str]] = {b: [] for b in self.all_ids}
        for k in keys:
            out[self.block_of(k)].append(k)
        return out

    def canonical_key(self, key: str) -> str:
        """The key as blockmerge names it: a bare diffusion-model key gets ``model.diffusion_model.``
        (BFL's Flux release and a ComfyUI checkpoint then name the same tensor the same way)."""
        bare = "" in self.diffusion_prefixes and not key.startswith(UNET_PREFIX)
        if bare and self._component(key) is None and self._rule_block(key) is not None:
            return UNET_PREFIX + key
        return key

    def is_copied(self, key: str) -> bool:
        """Keys copied from model A untouched, never merged (markers such as SDXL's ``v_pred``)."""
        return self._copied_re is not None and self._copied_re.fullmatch(key) is not None

    # -- detection ---------------------------------------------------------------------------------

    def matches(self, keys: Iterable[str]) -> bool:
        """Is a single-file key set (EMA keys removed) of this family?"""
        return self.sentinels.match(frozenset(self.canonical_key(k) for k in keys))

    def variant_of(self, keys: Iterable[str]) -> Variant | None:
        """The first variant whose sentinels match (the last one is the default), or None."""
        if not self.variants:
            return None
        ks = frozenset(self.canonical_key(k) for k in keys)
        for v in self.variants:
            if v.sentinels.match(ks):
                return v
        return self.variants[-1]
