"""Lazy tensor sources: a checkpoint file, or a merge of other sources.

Every source answers ``keys()``, ``info(key)`` and ``get(key)``. A merge node computes a key only
when asked, from its operands' same key, so a chain of merges (a recipe) computes each output
tensor through the whole chain in one pass and holds no intermediate model in memory. Everything
that can be checked without arithmetic (architectures, shapes, missing keys) is checked when the
node is built, before any output is written.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..architectures import EMA_PREFIX, V_PRED_MARKER, Architecture, copied_as_is, detect
from ..errors import BlockmergeError, CheckpointError
from ..io import CheckpointReader, open_checkpoint
from ..io.memory import release_free_memory
from .declare import DELTA, MODEL, Context, MergeMethod, clamp_bounds, compute_dtype, to_operand_spaces
from .metadata import space_of
from .params import check_rules, values_for
from .weights import BlockWeights

VAE_PREFIX = "first_stage_model."
TRIM_AT = 1 << 20  # elements: after tensors this large (a whole-tensor task, a statistics read) freed pages go back
_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def vae_prefix(arch: Architecture) -> str:
    """Where a family keeps its VAE (``first_stage_model.``; Flux checkpoints ``vae.``)."""
    return next((c.prefix for c in arch.components if c.name == "VAE"), VAE_PREFIX)


class Scratch:
    """Reusable buffers for one worker thread, by name, grown as needed and never freed mid-merge.

    Why: a fresh tensor per intermediate costs a page fault per 4 KiB on first touch, which on a CPU
    costs several times the arithmetic (measured: fp16 -> fp32 into a new tensor 0.21 s, into a
    reused one 0.024 s for 50 M values). Slices of every tensor go through the same few buffers.
    """

    def __init__(self, min_numel: int = 0) -> None:
        self._bufs: dict[object, torch.Tensor] = {}
        self.min_numel = min_numel
        # Where the executor will store the task's result (its output buffer): a file source whose
        # read is the result as it is (a copied tensor) reads straight into it, one copy fewer.
        self.dest: torch.Tensor | None = None

    def take_dest(self, numel: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The result buffer, once per task, when it has this size and dtype; else None."""
        d = self.dest
        if d is None or d.numel() != numel or d.dtype != dtype:
            return None
        self.dest = None
        return d

    def get(self, name: object, numel: int, dtype: torch.dtype) -> torch.Tensor:
        t = self._bufs.get(name)
        if t is None or t.dtype != dtype or t.numel() < numel:
            t = torch.empty(max(numel, self.min_numel), dtype=dtype)
            self._bufs[name] = t
        return t[:numel]


@dataclass(frozen=True)
class Info:
    dtype: torch.dtype
    shape: tuple[int, ...]


class Source(Protocol):
    """A lazy checkpoint. Sources may also offer ``get_range(key, lo, hi, scratch)`` (elements
    ``lo:hi`` of the flattened tensor, possibly a view into ``scratch`` valid until the source's
    next call with it) and ``sliceable(key)``; the executor then streams large tensors in slices."""

    name: str
    arch: Architecture

    def keys(self) -> list[str]: ...
    def info(self, key: str) -> Info: ...
    def get(self, key: str) -> torch.Tensor: ...


def is_weight(key: str, dtype: torch.dtype) -> bool:
    """Tensors that are merged: floating point, not index buffers such as CLIP's position_ids, and
    not the markers / buffers a family copies as they are (SDXL's ``v_pred`` / ``ztsnr``)."""
    return dtype.is_floating_point and not key.endswith("position_ids") and not copied_as_is(key)


class FileSource:
    """A checkpoint file as a source (``model_ema.*`` hidden unless ``keep_ema``).

    Keys are the family's canonical names (:meth:`Architecture.canonical_key`): a bare Flux file
    (BFL's release) answers to ``model.diffusion_model.double_blocks...`` like a ComfyUI
    checkpoint, so the two merge key by key.
    """

    def __init__(self, path: str | Path, *, name: str | None = None, keep_ema: bool = False) -> None:
        self.path = Path(path)
        self.reader: CheckpointReader = open_checkpoint(self.path)
        self.name = name or self.path.name
        try:
            all_keys = self.reader.keys()
            self.arch = detect([k for k in all_keys if not k.startswith(EMA_PREFIX)], str(self.path))
            self._real: dict[str, str] = {}
            canon = []
            for k in all_keys:
                c = self.arch.canonical_key(k)
                if c != k:
                    if c in self.reader:
                        raise CheckpointError(f"{self.path}: holds both {k!r} and {c!r} (the same tensor twice)")
                    self._real[c] = k
                canon.append(c)
            self.variant = self.arch.variant_of(canon)
        except Exception:
            self.reader.close()
            raise
        self._keys = [k for k in canon if keep_ema or not k.startswith(EMA_PREFIX)]
        self.dropped_ema = len(all_keys) - len(self._keys)
        self.metadata = self.reader.metadata
        # A delta (task vector) written by blockmerge says so in its record; anything else is a model.
        self.space = space_of(self.metadata, str(self.path))

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, key: str) -> Info:
        i = self.reader.info(self._real.get(key, key))
        return Info(i.dtype, i.shape)

    def get(self, key: str) -> torch.Tensor:
        return self.reader.get(self._real.get(key, key))

    def sliceable(self, key: str) -> bool:
        return True

    def get_range(self, key: str, lo: int, hi: int, scratch: Scratch) -> torch.Tensor:
        real = self._real.get(key, key)
        dtype = self.reader.info(real).dtype
        buf = scratch.take_dest(hi - lo, dtype)
        if buf is None:
            buf = scratch.get(("read", id(self)), hi - lo, dtype)
        return self.reader.read_range(real, lo, hi, buf)

    def close(self) -> None:
        self.reader.close()


class TensorSource:
    """An in-memory state dict (single-file key names) as a source: merge tensors a notebook or the
    UI already holds, and the tests' small hand-made models. ``space`` is ``"model"`` or ``"delta"``."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], arch: Architecture, *, name: str = "tensors",
                 space: str = MODEL) -> None:
        self.tensors = dict(tensors)
        self.arch = arch
        self.name = name
        self.space = space
        self.metadata: dict[str, str] = {}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, key: str) -> Info:
        t = self.tensors[key]
        return Info(t.dtype, tuple(t.shape))

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def sliceable(self, key: str) -> bool:
        return True

    def get_range(self, key: str, lo: int, hi: int, scratch: Scratch) -> torch.Tensor:
        return self.tensors[key].reshape(-1)[lo:hi]


@dataclass
class MergeReport:
    """What a merge did beyond the arithmetic, for the user to read."""

    only_in_a: int = 0
    only_in_others: list[str] = field(default_factory=list)
    partial_channels: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class MergeNode:
    """``method`` applied per key to ``operands`` with per-block (and per-rule) parameter values.

    ``params`` come from :func:`~blockmerge.merge.params.resolve_params`. Operands are checked
    against the method's declaration: their number, and their space (a delta where a model is
    needed, or the reverse, is an error naming both). ``clamp`` clips each result element to the
    range of the model operands' values there (sd-meh's weights_clip).
    """

    def __init__(
        self,
        method: MergeMethod,
        operands: Sequence[Source],
        params: Mapping[str, BlockWeights],
        *,
        name: str = "merge",
        fix_position_ids: bool = False,
        clamp: bool = False,
    ) -> None:
        method.check_count(len(operands))
        self.method = method
        self.operands = list(operands)
        self.spaces = [getattr(op, "space", MODEL) for op in operands]
        self.roles = method.roles(len(operands))
        for op, sp, role in zip(self.operands, self.spaces, self.roles, strict=True):
            if role.space == MODEL and sp != MODEL:
                raise BlockmergeError(f"{op.name}: is a delta (task vector), but {method.name}'s operand "
                                      f"{role.name} must be a model")
            if role.space == DELTA and sp != DELTA:
                raise BlockmergeError(f"{op.name}: is a model, but {method.name}'s operand {role.name} must be a "
                                      "delta (make one with --method difference)")
        self.space = method.result
        problem = method.clamp_problem(self.spaces) if clamp else None
        if problem:
            raise BlockmergeError(f"--clamp: {problem}")
        self.arch = operands[0].arch
        for op in operands[1:]:
            if op.arch is not self.arch:
                raise CheckpointError(
                    f"{op.name}: is {op.arch.title} but {operands[0].name} is {self.arch.title}; "
                    "models of different architectures cannot be merged"
                )
        for pname, w in params.items():
            if w.arch != self.arch.name:
                raise BlockmergeError(f"{pname} weights are for {w.arch}, the models are {self.arch.name}")
        missing = [n for n in method.param_names(len(operands)) if n not in params]
        if missing:
            raise BlockmergeError(f"{method.name}: no values for {', '.join(missing)}")
        self.params = dict(params)
        self.name = name
        self.fix_position_ids = fix_position_ids
        self.clamp = clamp
        self.report = MergeReport()
        self._keys = operands[0].keys()
        self._plan: dict[str, str] = {}
        self._info: dict[str, Info] = {}
        self._stats_lock = threading.Lock()
        self._stats: Any = None
        self._stats_done = method.statistics is None
        self._check()

    # --- planning -----------------------------------------------------------------------------
    def _check(self) -> None:
        a = self.operands[0]
        others = self.operands[1:]
        other_keys = [set(o.keys()) for o in others]
        a_keys = set(self._keys)
        extra = sorted(set().union(*other_keys) - a_keys) if other_keys else []
        self.report.only_in_others = extra
        self._check_markers(a_keys, other_keys)
        kept: list[str] = []
        for key in self._keys:
            ia = a.info(key)
            if not is_weight(key, ia.dtype):
                self._plan[key] = "copy"
                kept.append(key)
                continue
            if not all(key in ks for ks in other_keys):
                self.report.only_in_a += 1
                if self.space == DELTA:
                    self._plan[key] = "drop"  # a difference with a missing operand is not a delta
                    continue
                self._plan[key] = "copy"
                kept.append(key)
                continue
            shapes = [o.info(key).shape for o in others]
            kept.append(key)
            if all(s == ia.shape for s in shapes):
                self._plan[key] = "merge"
            elif self._partial_ok(key, ia.shape, shapes):
                self._plan[key] = "partial"
                self.report.partial_channels.append(key)
            else:
                detail = ", ".join(f"{o.name} {list(s)}" for o, s in zip(others, shapes, strict=True))
                raise CheckpointError(f"{key}: shape mismatch: {a.name} {list(ia.shape)} vs {detail}{self._variants_note()}")
            if self.method.constraint is not None:
                values = self.method.kernel_values(self.values(key), len(self.operands))
                problem = self.method.constraint(values)
                if problem:
                    raise BlockmergeError(f"{self.name}: {self.method.name} at {key} ({self.arch.block_of(key)}): {problem}")
        self._keys = kept
        merged = [k for k in kept if self._plan[k] != "copy"]
        check_rules(self.params, merged, self.arch.block_of, self.name)

    def _check_markers(self, a_keys: set[str], other_keys: list[set[str]]) -> None:
        """Warn when the operands disagree on a family's copied markers (a v-prediction model merged
        with an epsilon one), and when they are different variants of a family (Flux dev/schnell)."""
        names = [o.name for o in self.operands]
        for i, ks in enumerate(other_keys, 1):
            diff = sorted(k for k in a_keys ^ ks if self.arch.is_copied(k))
            if not diff:
                continue
            kind = ""
            if V_PRED_MARKER in diff:
                pa, po = ("a v-prediction", "an epsilon") if V_PRED_MARKER in a_keys else ("an epsilon", "a v-prediction")
                kind = f": merging {pa} model ({names[0]}) with {po} one ({names[i]})"
            self.report.warnings.append(
                f"{', '.join(diff)} differ between {names[0]} and {names[i]}{kind}; "
                f"the output keeps {names[0]}'s ({', '.join(sorted(k for k in a_keys if self.arch.is_copied(k))) or 'none'})"
            )
        variants = [getattr(o, "variant", None) for o in self.operands]
        for i, v in enumerate(variants[1:], 1):
            if v is not None and variants[0] is not None and v is not variants[0]:
                self.report.warnings.append(
                    f"{names[0]} is {variants[0].title} but {names[i]} is {v.title}; tensors only {names[0]} has are kept from it"
                )

    def _variants_note(self) -> str:
        vs = [(o.name, getattr(o, "variant", None)) for o in self.operands]
        if len({id(v) for _, v in vs if v is not None}) < 2:
            return ""
        return " (" + ", ".join(f"{n} is {v.title}" for n, v in vs if v is not None) + ": different variants)"

    @staticmethod
    def _partial_ok(key: str, a_shape: tuple[int, ...], shapes: list[tuple[int, ...]]) -> bool:
        """Inpainting (9-channel) / instruct-pix2pix (8-channel) conv_in with a 4-channel model: A1111
        merges the shared 4 input channels and keeps the rest from A (A must be the wider model)."""
        if not key.endswith("input_blocks.0.0.weight") or len(a_shape) != 4:
            return False
        for s in shapes:
            if len(s) != 4 or s[0] != a_shape[0] or s[2:] != a_shape[2:]:
                return False
            if s[1] > a_shape[1]:
                raise CheckpointError(
                    f"{key}: the inpainting/instruct-pix2pix model ({s[1]} input channels) must be model A "
                    f"(A has {a_shape[1]})"
                )
        return True

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, key: str) -> Info:
        # Memoised: a recipe's chain asks each node for every key's info, and without the memo a
        # step used twice by the next one doubles the work per step (exponential planning).
        i = self._info.get(key)
        if i is not None:
            return i
        i = self.operands[0].info(key)
        if self._plan[key] == "copy":
            if self.fix_position_ids and key.endswith("embeddings.position_ids"):
                i = Info(torch.int64, i.shape)
        else:
            i = Info(compute_dtype(*(o.info(key).dtype for o in self.operands)), i.shape)
        self._info[key] = i
        return i

    def values(self, key: str) -> dict[str, float]:
        """Every parameter's value for ``key`` (its block's, or its last matching elemental rule's)."""
        return values_for(self.params, key, self.arch.block_of(key))

    def weights_for(self, key: str) -> tuple[float, float]:
        """α and β for ``key`` (the parameters of the usual two-parameter methods), for callers that
        only know those two; other methods' parameters are in :meth:`values`."""
        v = self.values(key)
        return v.get("alpha", 0.0), v.get("beta", 0.0)

    def explain(self, key: str) -> str:
        """``block IN04, alpha=0.5`` for messages about one tensor."""
        vals = ", ".join(f"{k}={v:g}" for k, v in self.values(key).items())
        return f"block {self.arch.block_of(key)}" + (f", {vals}" if vals else "")

    def _identity(self, key: str) -> bool:
        return self.method.is_identity(self.values(key))

    def sliceable(self, key: str) -> bool:
        """Elementwise merges (and copies) can be computed slice by slice of the flat tensor; a
        whole-tensor method only where it copies A (identity values). Memoised, as :meth:`info`:
        without it a recipe's chain asks its operands once per use (exponential in steps)."""
        memo = self.__dict__.setdefault("_sliceable_memo", {})
        if key not in memo:
            memo[key] = self._sliceable(key)
        return memo[key]

    def _sliceable(self, key: str) -> bool:
        plan = self._plan[key]
        if plan == "partial" or (plan == "copy" and self.fix_position_ids and key.endswith("position_ids")):
            return False
        if plan == "merge" and not self.method.elementwise and not self._identity(key):
            return False
        ops = self.operands if plan == "merge" and not self._identity(key) else self.operands[:1]
        return all(getattr(o, "sliceable", lambda k: False)(key) for o in ops)

    # --- model-wide statistics ------------------------------------------------------------------
    def _ensure_stats(self) -> Any:
        if self._stats_done:
            return self._stats
        with self._stats_lock:
            if not self._stats_done:
                st = self.method.statistics
                assert st is not None
                kept = []
                for key in self._keys:
                    if self._plan[key] != "merge" or not st.applies(key):
                        continue
                    ts = [o.get(key) for o in self.operands]
                    ct = compute_dtype(*(t.dtype for t in ts))
                    for i in range(len(ts)):  # the reads freed as they are converted
                        ts[i] = ts[i].to(ct)
                    v = st.collect(key, ts)
                    if v is not None:
                        kept.append(v.detach().to(torch.float64).reshape(-1))
                    big = ts[0].numel() >= TRIM_AT
                    del ts, v
                    if big:  # the small kept values pin the heap: its freed pages are returned
                        release_free_memory()
                self._stats = st.reduce(kept)
                self._stats_done = True
        return self._stats

    # --- arithmetic ----------------------------------------------------------------------------
    def _context(self, key: str, values: Mapping[str, float]) -> Context:
        return Context(key=key, seed=int(values.get("seed", 0)), stats=self._ensure_stats())

    def _compute(self, key: str, ops: list[torch.Tensor], values: Mapping[str, float]) -> torch.Tensor:
        """The method on compute-dtype copies ``ops`` (overwritten), clamped if asked."""
        bounds = clamp_bounds(self.method, ops, self.spaces) if self.clamp else None
        ops = to_operand_spaces(self.method, ops, self.spaces)
        out = self.method.call(ops, self.method.kernel_values(values, len(ops)), self._context(key, values))
        if bounds is not None:
            out = out.clamp_(min=bounds[0], max=bounds[1])
        return out

    def get_range(self, key: str, lo: int, hi: int, scratch: Scratch) -> torch.Tensor:
        a = self.operands[0]
        if self._plan[key] == "copy" or self._identity(key):
            return a.get_range(key, lo, hi, scratch)  # type: ignore[attr-defined]
        ct = self.info(key).dtype
        values = self.values(key)
        adds = self.method.adds
        if adds is not None and not self.clamp and hasattr(self.operands[1], "add_range_into"):
            # A + α·D with a delta that adds itself (a LoRA's addmm): D is never materialised.
            out = scratch.get(("op", id(self), 0), hi - lo, ct)
            out.copy_(a.get_range(key, lo, hi, scratch))  # type: ignore[attr-defined]
            self.operands[1].add_range_into(key, lo, hi, out, float(values[adds[1]]), scratch)  # type: ignore[attr-defined]
            return out
        ins = []
        for i, op in enumerate(self.operands):
            raw = op.get_range(key, lo, hi, scratch)  # type: ignore[attr-defined]
            # Always our own copy: the kernel overwrites it, and ``raw`` may be a buffer of a
            # source that another operand (the same step used twice) is about to reuse.
            buf = scratch.get(("op", id(self), i), hi - lo, ct)
            buf.copy_(raw)
            ins.append(buf)
        return self._compute(key, ins, values)

    def get(self, key: str) -> torch.Tensor:
        plan = self._plan[key]
        a = self.operands[0]
        if plan == "copy":
            if self.fix_position_ids and key.endswith("embeddings.position_ids"):
                i = a.info(key)
                return torch.arange(i.shape[-1], dtype=torch.int64).reshape(i.shape)
            return a.get(key)
        values = self.values(key)
        if self.method.is_identity(values):
            return a.get(key)
        # Model-wide statistics first: a thread waiting for another's statistics pass then holds no tensors.
        self._ensure_stats()
        tensors = [o.get(key) for o in self.operands]
        ct = compute_dtype(*(t.dtype for t in tensors))
        if plan == "partial":
            n = min(t.shape[1] for t in tensors[1:])
            out = tensors[0].to(ct, copy=True)
            out[:, :n] = self._compute(key, [t[:, :n].to(ct, copy=True) for t in tensors], values)
            return out
        # Each read replaced by its compute-dtype copy, so the reads are freed before the method
        # runs (SD1.5's token embedding: 76 MB per fp16 operand that the kernel never looks at).
        for i in range(len(tensors)):
            tensors[i] = tensors[i].to(ct, copy=True)
        return self._compute(key, tensors, values)


class OverlayNode:
    """A VAE (or any component) baked over a source: keys under ``prefix`` come from ``overlay``."""

    def __init__(self, base: Source, overlay: FileSource | CheckpointReader, prefix: str = VAE_PREFIX) -> None:
        self.base = base
        self.arch = base.arch
        self.space = getattr(base, "space", MODEL)
        self.name = base.name
        self.prefix = prefix
        self.overlay = overlay
        okeys = overlay.keys()
        has_prefix = any(k.startswith(prefix) for k in okeys)
        self._map: dict[str, str] = {}
        for k in okeys:
            if has_prefix:
                if k.startswith(prefix):
                    self._map[k] = k
            elif k.startswith(_VAE_PARTS):  # a standalone VAE file: encoder.*, decoder.*, quant convs
                self._map[prefix + k] = k
        src = getattr(overlay, "path", "VAE")
        if not self._map:
            raise CheckpointError(f"{src}: no VAE tensors found (expected encoder.*/decoder.* keys)")
        base_keys = set(base.keys())
        for out_key, k in self._map.items():
            if out_key in base_keys:
                want = base.info(out_key).shape
                got = tuple(overlay.info(k).shape)
                if want != got:
                    raise CheckpointError(f"{src}: {k}: shape {list(got)} does not fit the model's {list(want)}")
        self._keys = base.keys() + sorted(k for k in self._map if k not in base_keys)

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, key: str) -> Info:
        if key in self._map:
            i = self.overlay.info(self._map[key])
            return Info(i.dtype, tuple(i.shape))
        return self.base.info(key)

    def get(self, key: str) -> torch.Tensor:
        if key in self._map:
            return self.overlay.get(self._map[key])
        return self.base.get(key)

    def sliceable(self, key: str) -> bool:
        if key in self._map:
            return hasattr(self.overlay, "read_range") or hasattr(self.overlay, "get_range")
        return getattr(self.base, "sliceable", lambda k: False)(key)

    def get_range(self, key: str, lo: int, hi: int, scratch: Scratch) -> torch.Tensor:
        if key not in self._map:
            return self.base.get_range(key, lo, hi, scratch)  # type: ignore[attr-defined]
        if hasattr(self.overlay, "get_range"):
            return self.overlay.get_range(self._map[key], lo, hi, scratch)  # type: ignore[union-attr]
        k = self._map[key]
        buf = scratch.get(("read", id(self)), hi - lo, self.overlay.info(k).dtype)
        return self.overlay.read_range(k, lo, hi, buf)  # type: ignore[union-attr]

