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
from dataclasses import dataclass
from typing import Any

import torch

from ..architectures.ldm_names import Slot
from ..errors import BlockmergeError
from ..generation.weights_map import (
    PIPELINE_COMPONENTS,
    TEXT_COMPONENTS,
    BlockMap,
    block_map,
    gather,
    pipeline_parameters,
    scatter,
)
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
    "LoraEdit",
    "MergeEdit",
    "block_map",
    "pipeline_parameters",
]

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
    ``None`` keeps the compute dtype's values (what the sweeps measure). ``clamp`` clips each merged
    element to the range of the model operands, as ``blockmerge merge --clamp`` does.
    """

    method: str
    params: Mapping[str, BlockWeights]
    donors: tuple[str, ...] = ()
    # The architecture's block ids (BASE first), for methods without parameters; else the params'.
    ids: tuple[str, ...] = ()
    dtype: str | None = None
    clamp: bool = False

    def __post_init__(self) -> None:
        if self.clamp:
            m = get_method(self.method)
            m.check_count(1 + len(self.donors))
            problem = m.clamp_problem([MODEL] * (1 + len(self.donors)))
            if problem:
                raise BlockmergeError(f"clamp: {problem}")

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
        if self.clamp:
            out["clamp"] = True
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


@dataclass(frozen=True)
class LoraEdit:
    """A LoRA put on the model in place, at ``weights`` per block (strength included); see
    :mod:`blockmerge.generation.lora_inplace`. ``lora_hash`` names the file's contents in cache keys."""

    path: str
    weights: BlockWeights
    lora_hash: str
    dyn: int | None = None

    def changed_blocks(self) -> list[str]:
        w = self.weights
        return [b for b in w.ids if w[b] != 0.0 or any(r.covers(b) for r in w.rules)]

    def key(self) -> dict[str, Any]:
        return {"edit": "lora", "lora": self.lora_hash, "weights": self.weights.as_dict(),
                "rules": [r.text for r in self.weights.rules], "dyn": self.dyn}


Edit = MergeEdit | BypassEdit | LoraEdit


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
                    out[:, :n] = m.fn([t[:, :n] for t in ops], values, ctx, spaces, clamp=edit.clamp)
                else:
                    out = m.fn(ops, values, ctx, spaces, clamp=edit.clamp)
                if stored is not None and out.dtype != stored and out.is_floating_point():
                    out = cast_to(out, stored)[0]  # as the file stores it (float8: clamped to its range)
                scatter(members, out, self.params)

    def bypass_plan(self, block: str) -> BypassPlan:
        return bypass_plan(self.loaded.pipeline.unet, block, self.map.params_of(block))

    def touches_text_encoder(self, edit: Edit) -> bool:
        """Whether prompts must be re-encoded under this edit."""
        return any(q.startswith(TEXT_COMPONENTS) for b in edit.changed_blocks() for q in self.map.params_of(b))

    @contextlib.contextmanager
    def _lora(self, edit: LoraEdit) -> Iterator[InPlaceModel]:
        from pathlib import Path

        from ..generation.lora_inplace import InPlaceLora, loras_applied

        self._active = True
        try:
            with loras_applied(self.loaded, [InPlaceLora(Path(edit.path), edit.weights, edit.dyn)]):
                yield self
        finally:
            self._active = False

    @contextlib.contextmanager
    def applied(self, edit: Edit | None) -> Iterator[InPlaceModel]:
        """Within the ``with``, the model runs with ``edit``; afterwards every parameter is bit-identical
        to before (also when the body raises). ``None`` is the unchanged model."""
        if edit is None:
            yield self
            return
        if self._active:
            raise BlockmergeError("edits cannot be nested")
        if isinstance(edit, LoraEdit):
            with self._lora(edit):
                yield self
            return
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
