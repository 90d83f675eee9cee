"""Change one block of a loaded pipeline in place and put it back bit-exactly: no checkpoint per variant.

Why: the article made 25 checkpoint files (2 GB each) and reloaded the web UI for every one. A
sweep here loads the pipeline once; a variant rewrites only the parameters of the blocks it
changes, and restores them from a copy of those blocks alone (never a copy of the model).

The block -> parameter mapping is derived, not written again: the checkpoint's own single-file
keys go through :meth:`Architecture.block_of` (the one block mapping the merge engine uses), and
:func:`~blockmerge.architectures.ldm_names.unet_ldm_to_diffusers_names` (diffusers' own converter)
says which ``UNet2DConditionModel`` parameter each key became. ``BASE`` is everything else the
pipeline holds: the text encoder(s), the VAE and any U-Net key the rule files under BASE.

The arithmetic of a merge variant is the merge engine's, per single-file tensor: every method of
:data:`blockmerge.merge.METHODS` (whole-tensor ones included) sees exactly the tensor it sees when
merging files. Each loaded parameter knows its place in the single-file layout (a
:class:`~blockmerge.architectures.ldm_names.Slot`: the key, and for OpenCLIP's stacked q/k/v or
transposed projection which part of it); an edit gathers the key's tensor from the loaded
parameters of A and the donors, computes it with the method's own function (same parameters per
key, elemental rules, seeds and model-wide statistics), and scatters the result back, cast to the
loaded dtype. So an in-place variant and ``blockmerge merge`` to a file followed by loading that
file give the same weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..architectures import BASE, Architecture
from ..architectures.ldm_names import (
    Slot,
    text_encoder_slot,
    unet_ldm_to_diffusers_names,
    vae_diffusers_to_ldm_name,
)
from ..errors import BlockmergeError
from ..merge.declare import MODEL, Context
from ..merge.methods import get_method
from ..merge.nodes import MergeNode
from ..merge.params import values_for
from ..merge.weights import BlockWeights
from .bypass import BypassPlan, apply_bypass, bypass_plan

__all__ = [
    "PIPELINE_COMPONENTS",
    "BlockMap",
    "BypassEdit",
    "Edit",
    "InPlaceModel",
    "MergeEdit",
    "block_map",
    "pipeline_parameters",
]

#: Pipeline attributes whose parameters belong to BASE (besides the U-Net's BASE keys).
PIPELINE_COMPONENTS = ("text_encoder", "text_encoder_2", "vae")
#: Components whose change invalidates encoded prompts.
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


def pipeline_parameters(pipeline: Any) -> dict[str, torch.nn.Parameter]:
    """Every parameter of the pipeline's U-Net, text encoder(s) and VAE, as ``component.name``."""
    out: dict[str, torch.nn.Parameter] = {}
    for comp in ("unet", *PIPELINE_COMPONENTS):
        module = getattr(pipeline, comp, None)
        if module is None:
            continue
        for name, p in module.named_parameters():
            out[f"{comp}.{name}"] = p
    return out


@dataclass(frozen=True)
class BlockMap:
    """Block id (and BASE) -> the qualified parameter names of the loaded pipeline it covers, and
    each parameter's place in the single-file layout."""

    architecture: Architecture
    blocks: dict[str, tuple[str, ...]]
    slots: dict[str, Slot] = field(repr=False)  # qualified name -> its single-file slot
    ldm_shapes: dict[str, tuple[int, ...]] = field(repr=False)  # single-file key -> shape in the file

    def params_of(self, block: str) -> tuple[str, ...]:
        if block not in self.blocks:
            raise BlockmergeError(f"block {block!r}: not one of {self.architecture.name}'s ({', '.join(self.blocks)})")
        return self.blocks[block]

    @property
    def ldm_key(self) -> dict[str, str]:
        """Qualified U-Net parameter name -> single-file key."""
        return {q: s.key for q, s in self.slots.items() if q.startswith("unet.")}

    def groups(self, block: str) -> dict[str, list[tuple[str, Slot]]]:
        """The single-file keys of ``block``, each with the parameters that make it (in slot order)."""
        out: dict[str, list[tuple[str, Slot]]] = {}
        for q in self.params_of(block):
            sl = self.slots[q]
            out.setdefault(sl.key, []).append((q, sl))
        for members in out.values():
            members.sort(key=lambda m: m[1].part)
        return out


def _checkpoint_shapes(path: Any) -> dict[str, tuple[int, ...]]:
    from ..io import open_checkpoint

    with open_checkpoint(path) as r:
        return {k: tuple(r.info(k).shape) for k in r.keys()}


def _base_slots(loaded: Any) -> dict[str, Slot]:
    """Slots of the text encoders' and VAE's parameters (BASE)."""
    out: dict[str, Slot] = {}
    pipe = loaded.pipeline
    specs = list(getattr(loaded.configs, "text_encoders", ()) or ())
    for attr, spec in zip(TEXT_COMPONENTS, specs, strict=False):
        module = getattr(pipe, attr, None)
        if module is None:
            continue
        for name, _ in module.named_parameters():
            out[f"{attr}.{name}"] = text_encoder_slot(name, spec.kind, spec.prefix)
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        for name, _ in vae.named_parameters():
            out[f"vae.{name}"] = Slot(vae_diffusers_to_ldm_name(name, dict(vae.config)))
    return out


def block_map(loaded: Any, ldm_shapes: Mapping[str, tuple[int, ...]] | Sequence[str] | None = None) -> BlockMap:
    """The block -> parameter mapping of a :class:`~blockmerge.generation.loader.LoadedModel`.

    ``ldm_shapes`` default to the keys and shapes of the file the model was loaded from (header
    only for safetensors). Raises :class:`BlockmergeError` if any U-Net parameter has no block: a
    mapping that silently missed tensors would make a "bypassed" block half bypassed.
    """
    arch: Architecture = loaded.architecture
    unet = loaded.pipeline.unet
    if ldm_shapes is None:
        shapes = _checkpoint_shapes(loaded.path)
    elif isinstance(ldm_shapes, Mapping):
        shapes = dict(ldm_shapes)
    else:
        shapes = {k: () for k in ldm_shapes}
    to_diffusers = unet_ldm_to_diffusers_names(list(shapes), dict(unet.config))
    params = pipeline_parameters(loaded.pipeline)
    blocks: dict[str, list[str]] = {b: [] for b in arch.all_ids}
    slots: dict[str, Slot] = {}
    for key, dname in to_diffusers.items():
        q = "unet." + dname
        if q not in params:
            continue  # a buffer, not a parameter
        blocks[arch.block_of(key)].append(q)
        slots[q] = Slot(key)
    missing = [q for q in params if q.startswith("unet.") and q not in slots]
    if missing:
        raise BlockmergeError(
            f"{loaded.path}: {len(missing)} U-Net parameters have no block in the checkpoint's keys (e.g. {missing[0]})"
        )
    try:
        base = _base_slots(loaded)
    except ValueError as e:
        raise BlockmergeError(f"{loaded.path}: {e}") from None
    for q in params:
        if q.startswith("unet."):
            continue
        blocks[BASE].append(q)
        if q in base:
            slots[q] = base[q]
    unmapped = [q for q in blocks[BASE] if q not in slots]
    if unmapped:
        raise BlockmergeError(f"{loaded.path}: {len(unmapped)} parameters have no single-file name (e.g. {unmapped[0]})")
    return BlockMap(arch, {b: tuple(v) for b, v in blocks.items()}, slots, shapes)


def gather(members: Sequence[tuple[str, Slot]], tensors: Mapping[str, torch.Tensor],
           shape: tuple[int, ...] | None) -> torch.Tensor:
    """One single-file tensor from the loaded parameters that make it (row parts, transposes, reshapes)."""
    parts = [tensors[q].detach() for q, _ in members]
    t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if members[0][1].transpose:
        t = t.T
    if shape and tuple(t.shape) != tuple(shape) and t.numel() == _numel(shape):
        t = t.reshape(shape)
    return t


def scatter(members: Sequence[tuple[str, Slot]], value: torch.Tensor, params: Mapping[str, torch.Tensor]) -> None:
    """Write a single-file tensor back into the loaded parameters it was gathered from."""
    first = params[members[0][0]]
    if members[0][1].transpose:
        value = value.reshape(first.T.shape).T if len(members) == 1 else value.T
    n = len(members)
    rows = value.reshape(n * first.shape[0], *first.shape[1:]) if n > 1 else value.reshape(first.shape)
    for i, (q, _) in enumerate(members):
        p = params[q]
        p.copy_((rows[i * p.shape[0]:(i + 1) * p.shape[0]] if n > 1 else rows).to(p.dtype))


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ----------------------------------------------------------------------------------------------
# Edits: what a variant does to the weights
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeEdit:
    """A merge method applied in place: model A is the loaded model, ``donors`` are the other
    operands (names of models given to :class:`InPlaceModel`), in the method's operand order, and
    ``params`` every parameter's per-block values (from :func:`~blockmerge.merge.params.resolve_params`).

    Examples: one block scaled by k is ``scaled_sum`` with α = k on that block and 1 elsewhere; one
    block taken from B at ratio r is ``weighted_sum`` with donor B, α = r there and 0 elsewhere.

    ``dtype`` (``fp16``, ``bf16``, ``fp32``, ``fp8_*``) rounds each merged tensor through that
    storage dtype, as a merge written to a file of that dtype stores it: the live preview of the UI
    then runs with exactly the weights that ``blockmerge merge --dtype`` writes and a reload reads.
    ``None`` keeps the compute dtype's values (what the sweeps measure).
    """

    method: str
    params: Mapping[str, BlockWeights]
    donors: tuple[str, ...] = ()
    # The architecture's block ids (BASE first), for methods without parameters; else the params'.
    ids: tuple[str, ...] = ()
    dtype: str | None = None

    def changed_blocks(self) -> list[str]:
        """Blocks some tensor of which differs from A: non-identity block values, or a rule there."""
        m = get_method(self.method)
        ids = next(iter(self.params.values())).ids if self.params else self.ids
        if not ids:
            raise BlockmergeError(f"{self.method}: an edit without parameters needs the architecture's block ids")
        out = []
        for b in ids:
            values = {n: w[b] for n, w in self.params.items()}
            ruled = any(r.covers(b) for w in self.params.values() for r in w.rules)
            if ruled or not m.is_identity(values):
                out.append(b)
        return out

    def key(self) -> dict[str, Any]:
        out = {"edit": "merge", "method": self.method, "donors": list(self.donors),
               "params": {n: w.as_dict() for n, w in sorted(self.params.items())},
               "rules": {n: [r.text for r in w.rules] for n, w in sorted(self.params.items()) if w.rules}}
        if self.dtype is not None:  # only when set: the sweeps' cache keys stay what they were
            out["dtype"] = self.dtype
        return out


@dataclass(frozen=True)
class BypassEdit:
    """Bypass one block (see :mod:`.bypass`)."""

    block: str

    def changed_blocks(self) -> list[str]:
        return [self.block]

    def key(self) -> dict[str, Any]:
        return {"edit": "bypass", "block": self.block, "rule": BYPASS_RULE_VERSION}


# Bump when the bypass rules change, so cached sweep images made under old rules are not reused.
BYPASS_RULE_VERSION = 1

Edit = MergeEdit | BypassEdit


class InPlaceModel:
    """A loaded model whose blocks can be changed for the duration of a ``with`` and then restored.

    ``donors`` are other loaded models of the same architecture and shapes (for swaps and custom
    merges), by the names edits refer to them with. Only the parameters of the blocks an edit
    changes are copied (to restore them); donors are only read.
    """

    def __init__(self, loaded: Any, donors: Mapping[str, Any] | None = None) -> None:
        self.loaded = loaded
        self.map = block_map(loaded)
        self.params = pipeline_parameters(loaded.pipeline)
        self.donors: dict[str, dict[str, torch.nn.Parameter]] = {}
        self._stats_cache: dict[Any, Any] = {}
        self._donor_paths: dict[str, Any] = {}
        for name, d in (donors or {}).items():
            self.add_donor(name, d)
        self._active = False

    def add_donor(self, name: str, loaded: Any) -> None:
        if loaded.architecture is not self.loaded.architecture:
            raise BlockmergeError(
                f"{loaded.path}: is {loaded.architecture.title} but {self.loaded.path} is "
                f"{self.loaded.architecture.title}; blocks cannot be swapped between them"
            )
        dparams = pipeline_parameters(loaded.pipeline)
        self._stats_cache.clear()
        self._donor_paths[name] = loaded.path
        for q, p in self.params.items():
            d = dparams.get(q)
            if d is None or (d.shape != p.shape and not self._partial_ok(q, p, d)):
                got = "missing" if d is None else list(d.shape)
                raise BlockmergeError(f"{loaded.path}: {q} is {got}, {self.loaded.path} has {list(p.shape)}")
        self.donors[name] = dparams

    def _partial_ok(self, q: str, p: torch.Tensor, d: torch.Tensor) -> bool:
        sl = self.map.slots.get(q)
        return sl is not None and q.startswith("unet.") and MergeNode._partial_ok(sl.key, tuple(p.shape), [tuple(d.shape)])

    def snapshot(self, blocks: Sequence[str]) -> dict[str, torch.Tensor]:
        """Copies of the parameters of ``blocks`` (what :meth:`restore` needs)."""
        return {q: self.params[q].detach().clone() for b in blocks for q in self.map.params_of(b)}

    @torch.no_grad()
    def restore(self, saved: Mapping[str, torch.Tensor]) -> None:
        for q, t in saved.items():
            self.params[q].copy_(t)

    def _operands(self, members: Sequence[tuple[str, Slot]], saved: Mapping[str, torch.Tensor],
                  donors: Sequence[str], shape: tuple[int, ...] | None) -> list[torch.Tensor]:
        ops = [gather(members, saved, shape)]
        for name in donors:
            ops.append(gather(members, self.donors[name], shape))
        return ops

    def _stats(self, edit: MergeEdit) -> Any:
        """A method's model-wide statistics, cached (they depend on the models, not the parameters).

        Computed by the merge engine from the models' files, because the loaded pipeline does not hold
        every tensor a file merge measures (SD2's unused last text-encoder layer, ``logit_scale``).
        """
        m = get_method(edit.method)
        if m.statistics is None:
            return None
        cache_key = (m.name, edit.donors)
        if cache_key not in self._stats_cache:
            from ..merge.nodes import FileSource

            paths = [self.loaded.path, *(self._donor_paths[n] for n in edit.donors)]
            sources = [FileSource(p) for p in paths]
            try:
                node = MergeNode(m, sources, dict(edit.params))
                self._stats_cache[cache_key] = node._ensure_stats()
            finally:
                for src in sources:
                    src.close()
        return self._stats_cache[cache_key]

    @torch.no_grad()
    def _write_merge(self, edit: MergeEdit, saved: Mapping[str, torch.Tensor]) -> None:
        m = get_method(edit.method)
        m.check_count(1 + len(edit.donors))
        for name in edit.donors:
            if name not in self.donors:
                raise BlockmergeError(f"edit names model {name!r}, which was not loaded as a donor")
        spaces = [MODEL] * (1 + len(edit.donors))
        stats = self._stats(edit)
        stored = None
        if edit.dtype is not None:
            from ..io import cast_to, output_dtype

            stored = output_dtype(edit.dtype)
        for b in edit.changed_blocks():
            for key, members in self.map.groups(b).items():
                values = values_for(dict(edit.params), key, b)
                if m.is_identity(values):
                    continue
                shape = self.map.ldm_shapes.get(key)
                ops = self._operands(members, saved, edit.donors, shape)
                ctx = Context(key=key, seed=int(values.get("seed", 0)), stats=stats)
                if any(t.shape != ops[0].shape for t in ops[1:]):  # inpainting conv_in: shared channels only
                    n = min(t.shape[1] for t in ops[1:])
                    out = ops[0].to(torch.float64 if ops[0].dtype == torch.float64 else torch.float32, copy=True)
                    out[:, :n] = m.fn([t[:, :n] for t in ops], values, ctx, spaces)
                else:
                    out = m.fn(ops, values, ctx, spaces)
                if stored is not None and out.dtype != stored and out.is_floating_point():
                    out = cast_to(out, stored)[0]  # as the file stores it (float8: clamped to its range)
                scatter(members, out, self.params)

    def bypass_plan(self, block: str) -> BypassPlan:
        return bypass_plan(self.loaded.pipeline.unet, block, self.map.params_of(block))

    def touches_text_encoder(self, edit: Edit) -> bool:
        """Whether prompts must be re-encoded under this edit."""
        return any(q.startswith(TEXT_COMPONENTS) for b in edit.changed_blocks() for q in self.map.params_of(b))

    @contextlib.contextmanager
    def applied(self, edit: Edit | None) -> Iterator[InPlaceModel]:
        """Within the ``with``, the model runs with ``edit``; afterwards every parameter is bit-identical
        to before (also when the body raises). ``None`` is the unchanged model."""
        if edit is None:
            yield self
            return
        if self._active:
            raise BlockmergeError("edits cannot be nested")
        blocks = edit.changed_blocks()
        for b in blocks:
            self.map.params_of(b)
        saved = self.snapshot(blocks)
        self._active = True
        try:
            if isinstance(edit, BypassEdit):
                apply_bypass(self.bypass_plan(edit.block), self.params)
            else:
                self._write_merge(edit, saved)
            yield self
        finally:
            self.restore(saved)
            self._active = False
