"""Change one block of a loaded pipeline in place and put it back bit-exactly: no checkpoint per variant.

Why: the article made 25 checkpoint files (2 GB each) and reloaded the web UI for every one. A
sweep here loads the pipeline once; a variant rewrites only the parameters of the blocks it
changes, and restores them from a copy of those blocks alone (never a copy of the model).

The block -> parameter mapping is derived, not written again: the checkpoint's own single-file
keys go through :meth:`Architecture.block_of` (the one block mapping the merge engine uses), and
:func:`~blockmerge.architectures.ldm_names.unet_ldm_to_diffusers_names` (diffusers' own converter)
says which ``UNet2DConditionModel`` parameter each key became. ``BASE`` is everything else the
pipeline holds: the text encoder(s), the VAE and any U-Net key the rule files under BASE.

The arithmetic of a merge variant is the merge engine's: :data:`blockmerge.merge.METHODS`
functions on float32 (or wider) copies, cast back to the loaded dtype, so an in-place variant and
``blockmerge merge`` to a file followed by loading that file give the same weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..architectures import BASE, Architecture
from ..architectures.ldm_names import unet_ldm_to_diffusers_names
from ..errors import BlockmergeError
from ..merge.methods import METHODS
from ..merge.nodes import MergeNode, compute_dtype
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
    """Block id (and BASE) -> the qualified parameter names of the loaded pipeline it covers."""

    architecture: Architecture
    blocks: dict[str, tuple[str, ...]]
    ldm_key: dict[str, str] = field(repr=False)  # U-Net qualified name -> single-file key

    def params_of(self, block: str) -> tuple[str, ...]:
        if block not in self.blocks:
            raise BlockmergeError(f"block {block!r}: not one of {self.architecture.name}'s ({', '.join(self.blocks)})")
        return self.blocks[block]


def _checkpoint_keys(path: Any) -> list[str]:
    from ..io import open_checkpoint

    with open_checkpoint(path) as r:
        return list(r.keys())


def block_map(loaded: Any, ldm_keys: Sequence[str] | None = None) -> BlockMap:
    """The block -> parameter mapping of a :class:`~blockmerge.generation.loader.LoadedModel`.

    ``ldm_keys`` default to the keys of the file the model was loaded from (header only for
    safetensors). Raises :class:`BlockmergeError` if any U-Net parameter has no block: a mapping
    that silently missed tensors would make a "bypassed" block half bypassed.
    """
    arch: Architecture = loaded.architecture
    unet = loaded.pipeline.unet
    keys = list(ldm_keys) if ldm_keys is not None else _checkpoint_keys(loaded.path)
    to_diffusers = unet_ldm_to_diffusers_names(keys, dict(unet.config))
    params = pipeline_parameters(loaded.pipeline)
    blocks: dict[str, list[str]] = {b: [] for b in arch.all_ids}
    ldm_of: dict[str, str] = {}
    for key, dname in to_diffusers.items():
        q = "unet." + dname
        if q not in params:
            continue  # a buffer, not a parameter
        blocks[arch.block_of(key)].append(q)
        ldm_of[q] = key
    missing = [q for q in params if q.startswith("unet.") and q not in ldm_of]
    if missing:
        raise BlockmergeError(
            f"{loaded.path}: {len(missing)} U-Net parameters have no block in the checkpoint's keys (e.g. {missing[0]})"
        )
    blocks[BASE].extend(q for q in params if not q.startswith("unet."))
    return BlockMap(arch, {b: tuple(v) for b, v in blocks.items()}, ldm_of)


# ----------------------------------------------------------------------------------------------
# Edits: what a variant does to the weights
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeEdit:
    """A block-weighted merge method applied in place: model A is the loaded model, ``donors`` are
    the other operands (names of models given to :class:`InPlaceModel`), in method order.

    Examples: one block scaled by k is ``scaled_sum`` with α = k on that block and 1 elsewhere; one
    block taken from B at ratio r is ``weighted_sum`` with donor B, α = r there and 0 elsewhere.
    """

    method: str
    alpha: BlockWeights
    beta: BlockWeights | None = None
    donors: tuple[str, ...] = ()

    def changed_blocks(self) -> list[str]:
        m = METHODS[self.method]
        n = 1 + len(self.donors)
        out = []
        for b in self.alpha.ids:
            beta = self.beta[b] if self.beta is not None else m.keep_a_beta
            if not m.is_identity(self.alpha[b], beta, n):
                out.append(b)
        return out

    def key(self) -> dict[str, Any]:
        return {"edit": "merge", "method": self.method, "alpha": self.alpha.as_dict(),
                "beta": self.beta.as_dict() if self.beta is not None else None, "donors": list(self.donors)}


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
        for q, p in self.params.items():
            d = dparams.get(q)
            if d is None or (d.shape != p.shape and not self._partial_ok(q, p, d)):
                got = "missing" if d is None else list(d.shape)
                raise BlockmergeError(f"{loaded.path}: {q} is {got}, {self.loaded.path} has {list(p.shape)}")
        self.donors[name] = dparams

    def _partial_ok(self, q: str, p: torch.Tensor, d: torch.Tensor) -> bool:
        key = self.map.ldm_key.get(q)
        return key is not None and MergeNode._partial_ok(key, tuple(p.shape), [tuple(d.shape)])

    def snapshot(self, blocks: Sequence[str]) -> dict[str, torch.Tensor]:
        """Copies of the parameters of ``blocks`` (what :meth:`restore` needs)."""
        return {q: self.params[q].detach().clone() for b in blocks for q in self.map.params_of(b)}

    @torch.no_grad()
    def restore(self, saved: Mapping[str, torch.Tensor]) -> None:
        for q, t in saved.items():
            self.params[q].copy_(t)

    @torch.no_grad()
    def _write_merge(self, edit: MergeEdit, saved: Mapping[str, torch.Tensor]) -> None:
        m = METHODS[edit.method]
        if len(edit.donors) + 1 < m.min_models or len(edit.donors) + 1 > m.max_models:
            raise BlockmergeError(f"{m.name} needs {m.min_models}-{m.max_models} models, got {1 + len(edit.donors)}")
        for name in edit.donors:
            if name not in self.donors:
                raise BlockmergeError(f"edit names model {name!r}, which was not loaded as a donor")
        for b in edit.changed_blocks():
            alpha = edit.alpha[b]
            beta = edit.beta[b] if edit.beta is not None else m.keep_a_beta
            for q in self.map.params_of(b):
                p = self.params[q]
                a = saved[q]
                others = [self.donors[n][q].detach() for n in edit.donors]
                ct = compute_dtype(a.dtype, *(o.dtype for o in others))
                ts = [a.to(ct), *(o.to(device=a.device, dtype=ct) for o in others)]
                if any(t.shape != a.shape for t in ts[1:]):  # inpainting conv_in: shared channels only
                    n = min(t.shape[1] for t in ts[1:])
                    out = ts[0].clone()
                    out[:, :n] = m.fn([t[:, :n] for t in ts], alpha, beta)
                else:
                    out = m.fn(ts, alpha, beta)
                p.copy_(out.to(p.dtype))

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
