"""How a merge method is declared, and the registry every other part of blockmerge reads.

A method is one Python function with a decorator. Its signature *is* the declaration:

- positional parameters are the operands, annotated with the space each lives in: :class:`Model`
  (a checkpoint), :class:`Delta` (a task vector, e.g. ``B - C`` written by the ``difference``
  method) or :class:`TaskVector` (either: a model given there is turned into the delta
  ``model - first operand`` before the formula sees it). ``*models`` is a variable number of
  operands, a default of ``None`` an optional one;
- keyword-only parameters with a :class:`Param` default are the named parameters, each with its
  default (``None``: required), valid range and one-line meaning. Every parameter is given per
  block (any weight-spec form) and below block level by elemental rules; the function receives
  the one number that applies to the tensor at hand (a list for per-operand parameters);
- ``ctx`` (keyword-only, optional) receives a :class:`Context`: the key, a random generator
  derived from the method's ``seed`` parameter and the key, and model-wide statistics;
- the return annotation is the space of the result.

The decorator's arguments say what the signature cannot: the formula for the docs, whether the
method is elementwise (the executor may then compute it slice by slice of the flat tensor;
otherwise it always sees whole tensors), the parameter values that reproduce the first operand
exactly (``identity``: the executor copies instead of computing, and readable weight specs fill
unnamed blocks with them), where the definition comes from, optional model-wide statistics, and
``adds`` for ``A + α·D`` methods (a delta that can add itself into a buffer is then never
materialised).

Why this shape (it follows mergekit's ``@merge_method`` and sd-mecha's typed parameters and merge
spaces): the CLI, recipes, sweeps, in-place edits, metadata, ``blockmerge methods`` and the UI all
read :data:`METHODS`; nothing else names a method, so adding one is adding one declaration.

Kernels compute in place: their tensors are scratch copies in the compute dtype (float32, or
float64 when an input is float64) that they may overwrite, and they return the tensor holding
the result. On a CPU, fresh allocations for every intermediate cost more (page faults) than the
arithmetic itself, so elementwise kernels should use ``mul_``/``add_`` on their operands.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from ..errors import BlockmergeError

__all__ = [
    "DELTA",
    "METHODS",
    "MODEL",
    "Context",
    "Delta",
    "MergeMethod",
    "Model",
    "Operand",
    "Param",
    "Statistics",
    "TaskVector",
    "compute_dtype",
    "derive_seed",
    "get_method",
    "merge_method",
]

MODEL = "model"
DELTA = "delta"
TASK = "task"  # a delta, or a model made into one relative to the first operand


class Model:
    """Operand / result annotation: a checkpoint's weights."""

    space = MODEL


class Delta:
    """Operand / result annotation: a task vector (a difference of two models)."""

    space = DELTA


class TaskVector:
    """Operand annotation: a delta, or a model that becomes ``model - first operand``."""

    space = TASK


_SPACES: dict[Any, str] = {Model: MODEL, Delta: DELTA, TaskVector: TASK}


@dataclass(frozen=True)
class Operand:
    name: str
    space: str  # MODEL, DELTA or TASK
    variadic: bool = False
    optional: bool = False


@dataclass(frozen=True)
class Param:
    """A named parameter: default (None = required), valid range, one-line meaning.

    ``kind`` is ``float``, ``int`` or ``bool`` (0/1); ``per_operand`` gives one value per operand of
    the method's variable group, named ``<name>1``..``<name>N``; ``requires`` names an optional
    operand without which the parameter is meaningless (giving it then is an error).
    """

    default: float | None = None
    meaning: str = ""
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    kind: str = "float"
    per_operand: bool = False
    requires: str | None = None
    name: str = ""

    def range_text(self) -> str:
        if self.kind == "bool":
            return "0 or 1"
        lo = "-inf" if self.lo == -math.inf else f"{self.lo:g}"
        hi = "inf" if self.hi == math.inf else f"{self.hi:g}"
        return f"{'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"

    def check(self, value: float, where: str) -> None:
        """Raise a one-line error naming ``where`` when ``value`` is outside the range or kind."""
        if not math.isfinite(value):
            raise BlockmergeError(f"{where}: {value!r} is not a finite number")
        if self.kind == "bool" and value not in (0.0, 1.0):
            raise BlockmergeError(f"{where}: {value:g} must be 0 or 1")
        if self.kind == "int" and value != int(value):
            raise BlockmergeError(f"{where}: {value:g} must be a whole number")
        below = value <= self.lo if self.lo_open else value < self.lo
        above = value >= self.hi if self.hi_open else value > self.hi
        if below or above:
            raise BlockmergeError(f"{where}: {value:g} is outside {self.name}'s range {self.range_text()}")


@dataclass(frozen=True)
class Statistics:
    """A model-wide statistic a method needs before it can merge any tensor (a first pass).

    ``collect(key, tensors)`` sees the whole operand tensors of one key (compute dtype) and
    returns values to keep (or None); ``reduce`` turns everything kept into what the kernel reads
    as ``ctx.stats``. ``applies(key)`` says which keys take part.
    """

    collect: Callable[[str, Sequence[torch.Tensor]], torch.Tensor | None]
    reduce: Callable[[list[torch.Tensor]], Any]
    applies: Callable[[str], bool] = lambda key: True


def derive_seed(seed: int, key: str, stream: int = 0) -> int:
    """A 63-bit seed from the method's ``seed`` parameter, the tensor's key and a stream number.

    Why: random methods (DARE) must give the same bytes whatever the thread count or the order in
    which tensors are computed, so each tensor's random stream depends only on what names it.
    """
    digest = hashlib.sha256(f"blockmerge/{int(seed)}/{stream}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class Context:
    """What a kernel may need beyond numbers: which tensor it is, randomness, model-wide stats."""

    key: str = ""
    seed: int = 0
    stats: Any = None

    def generator(self, stream: int = 0) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, self.key, stream))


Value = float | list[float]


@dataclass(frozen=True)
class MergeMethod:
    """One merge method, as its declaration says (see the module docstring)."""

    name: str
    formula: str
    operands: tuple[Operand, ...]
    params: tuple[Param, ...]
    result: str
    elementwise: bool
    kernel: Callable[..., torch.Tensor] = field(repr=False, compare=False)
    identity: Mapping[str, float] = field(default_factory=dict)
    a1111_name: str = ""
    summary: str = ""
    source: str = ""
    statistics: Statistics | None = field(default=None, repr=False, compare=False)
    min_variadic: int = 1
    wants_ctx: bool = False
    # Optional check of one tensor's kernel values together (e.g. weights that must not sum to 0):
    # returns an error message or None. Checked per block and rule before any work.
    constraint: Callable[[Mapping[str, Value]], str | None] | None = field(default=None, repr=False, compare=False)
    # The operands whose per-element range ``clamp`` clips to; empty: every model operand. Methods
    # that add a difference (B - C) to A clip to A and B, as sd-meh's weights_clip and sd-mecha's
    # clamp_to_ab do: C only enters through the difference.
    clamp_to: tuple[str, ...] = ()
    # ``(operand, parameter)`` when the result is the first operand plus that parameter times that
    # (delta) operand and nothing else: a delta that can add a multiple of itself into a buffer
    # (a LoRA: ``addmm`` of its factors) is then summed into A's copy without being materialised.
    adds: tuple[str, str] | None = None

    # --- operands ---------------------------------------------------------------------------
    @property
    def fixed(self) -> tuple[Operand, ...]:
        return tuple(o for o in self.operands if not o.variadic)

    @property
    def variadic(self) -> Operand | None:
        return next((o for o in self.operands if o.variadic), None)

    @property
    def min_operands(self) -> int:
        n = sum(1 for o in self.fixed if not o.optional)
        return n + (self.min_variadic if self.variadic else 0)

    @property
    def max_operands(self) -> int | None:
        return None if self.variadic else len(self.fixed)

    def operands_text(self) -> str:
        parts = []
        for o in self.operands:
            sp = {MODEL: "model", DELTA: "delta", TASK: "model|delta"}[o.space]
            if o.variadic:
                parts.append(f"{o.name}... ({sp}, {self.min_variadic} or more)")
            else:
                parts.append(f"{o.name} ({sp}{', optional' if o.optional else ''})")
        return ", ".join(parts)

    def check_count(self, n: int, what: str = "models") -> None:
        lo, hi = self.min_operands, self.max_operands
        if n < lo or (hi is not None and n > hi):
            if hi is None:
                want = f"{lo} or more"
            elif lo == hi:
                want = str(lo)
            else:
                want = f"{lo} to {hi}"
            raise BlockmergeError(
                f"{self.name} needs {want} {what} ({self.operands_text()}), got {n}"
            )

    def roles(self, n: int) -> list[Operand]:
        """The operand declaration each of ``n`` given operands fills, in order."""
        self.check_count(n)
        out = []
        fixed = list(self.fixed)
        n_var = n - len(fixed) if self.variadic else 0
        if not self.variadic:
            return fixed[:n]
        # Fixed operands before the variable group, then the group (methods put the group last).
        out.extend(fixed)
        out.extend([self.variadic] * n_var)
        return out

    def n_variadic(self, n: int) -> int:
        return n - len(self.fixed) if self.variadic else 0

    # --- parameters -------------------------------------------------------------------------
    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def param_names(self, n_operands: int) -> list[str]:
        """Every parameter name a merge of ``n_operands`` takes (per-operand ones expanded)."""
        names: list[str] = []
        present = {o.name for o in self.roles(n_operands)}
        for p in self.params:
            if p.requires and p.requires not in present:
                continue
            if p.per_operand:
                names.extend(f"{p.name}{i + 1}" for i in range(self.n_variadic(n_operands)))
            else:
                names.append(p.name)
        return names

    def lookup(self, name: str, n_operands: int) -> Param:
        """The :class:`Param` behind a (possibly per-operand, e.g. ``w2``) name, or a one-line error."""
        if name in self.param_names(n_operands):
            p = self.param(name)
            if p is not None:
                return p
            for q in self.params:
                if q.per_operand and name.startswith(q.name) and name[len(q.name):].isdigit():
                    return q
        p = self.param(name)
        if p is not None and p.requires:
            raise BlockmergeError(f"{self.name}: parameter {name!r} needs operand {p.requires}, which was not given")
        known = ", ".join(self.param_names(n_operands)) or "none"
        raise BlockmergeError(f"{self.name}: unknown parameter {name!r} (its parameters: {known})")

    def fill_value(self, name: str, n_operands: int) -> float | None:
        """What blocks a readable spec does not name get: the identity value, else the default."""
        if name in self.identity:
            return float(self.identity[name])
        p = self.lookup(name, n_operands)
        return None if p.default is None else float(p.default)

    def kernel_values(self, flat: Mapping[str, float], n_operands: int) -> dict[str, Value]:
        """``{'alpha': 0.3, 'w1': 1, 'w2': 2}`` -> the kernel's keywords (``w=[1, 2]``)."""
        out: dict[str, Value] = {}
        n_var = self.n_variadic(n_operands)
        present = {o.name for o in self.roles(n_operands)}
        for p in self.params:
            if p.requires and p.requires not in present:
                out[p.name] = float(p.default) if p.default is not None else 0.0
            elif p.per_operand:
                out[p.name] = [float(flat[f"{p.name}{i + 1}"]) for i in range(n_var)]
            else:
                v = float(flat[p.name])
                out[p.name] = int(v) if p.kind in ("int", "bool") else v
        return out

    def is_identity(self, flat: Mapping[str, float]) -> bool:
        """True when these values make the result exactly the first operand (so it is copied)."""
        if not self.identity:
            return False
        return all(flat.get(k, self.identity[k]) == v for k, v in self.identity.items())

    # --- arithmetic -------------------------------------------------------------------------
    def call(self, tensors: Sequence[torch.Tensor], values: Mapping[str, Value], ctx: Context | None = None) -> torch.Tensor:
        """The kernel on scratch tensors it may overwrite (already in the compute dtype and space)."""
        kw = dict(values)
        if self.wants_ctx:
            kw["ctx"] = ctx or Context()
        return self.kernel(*tensors, **kw)

    def fn(self, tensors: Sequence[torch.Tensor], flat: Mapping[str, float], ctx: Context | None = None,
           spaces: Sequence[str] | None = None, clamp: bool = False) -> torch.Tensor:
        """The method on whole tensors of any float dtype; inputs untouched, result in float32/64.

        ``spaces`` are the spaces the operands are in (default: models); a model given for a
        :class:`TaskVector` operand is made into a delta against the first operand here. ``clamp``
        clips the result to the per-element range of the model operands (:func:`clamp_bounds`).
        """
        ct = compute_dtype(*(t.dtype for t in tensors))
        spaces = list(spaces or [MODEL] * len(tensors))
        ops = [t.to(dtype=ct, copy=True) for t in tensors]
        bounds = clamp_bounds(self, ops, spaces) if clamp else None
        ops = to_operand_spaces(self, ops, spaces)
        out = self.call(ops, self.kernel_values(flat, len(ops)), ctx)
        return out.clamp_(min=bounds[0], max=bounds[1]) if bounds is not None else out

    def clamp_problem(self, spaces: Sequence[str]) -> str | None:
        """Why ``clamp`` cannot apply to this method on operands in ``spaces`` (None: it can)."""
        if self.result != MODEL:
            return f"{self.name} gives a delta; clamping needs a model result"
        if len(clamp_operands(self, spaces)) < 2:
            return f"{self.name} here has fewer than two model operands to clamp between"
        return None


def clamp_operands(method: MergeMethod, spaces: Sequence[str]) -> list[int]:
    """The operands whose per-element range ``clamp`` clips to: the models among the method's
    ``clamp_to`` roles (every model operand when it names none)."""
    roles = method.roles(len(spaces))
    return [i for i, (sp, r) in enumerate(zip(spaces, roles, strict=True))
            if sp == MODEL and (not method.clamp_to or r.name in method.clamp_to)]


def clamp_bounds(method: MergeMethod, ops: Sequence[torch.Tensor], spaces: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element minimum and maximum of the clamping operands (meh's weights_clip); new tensors."""
    idx = clamp_operands(method, spaces)
    lo, hi = ops[idx[0]].clone(), ops[idx[0]].clone()
    for i in idx[1:]:
        torch.minimum(lo, ops[i], out=lo)
        torch.maximum(hi, ops[i], out=hi)
    return lo, hi


def to_operand_spaces(method: MergeMethod, ops: list[torch.Tensor], spaces: Sequence[str]) -> list[torch.Tensor]:
    """Turn models given for TaskVector operands into deltas (in place) against the first operand."""
    roles = method.roles(len(ops))
    for i, (role, sp) in enumerate(zip(roles, spaces, strict=True)):
        if i and role.space == TASK and sp == MODEL:
            ops[i].sub_(ops[0])
    return ops


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when an operand is float64: never narrower than float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


#: Every merge method by name (read-only view; :func:`merge_method` adds to it).
_REGISTRY: dict[str, MergeMethod] = {}
METHODS: Mapping[str, MergeMethod] = MappingProxyType(_REGISTRY)


def get_method(name: str, arg: str = "--method") -> MergeMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BlockmergeError(f"{arg} {name}: unknown method (choose from {', '.join(_REGISTRY)}; "
                              "`blockmerge methods` lists them)") from None


def unregister(name: str) -> None:
    """Remove a method (tests that declare a method of their own clean up with this)."""
    _REGISTRY.pop(name, None)


def _space_of(annotation: Any, where: str) -> str:
    if annotation in _SPACES:
        return _SPACES[annotation]
    raise TypeError(f"{where}: annotate with Model, Delta or TaskVector, not {annotation!r}")


def merge_method(
    *,
    formula: str,
    elementwise: bool,
    identity: Mapping[str, float] | None = None,
    a1111: str = "",
    source: str = "",
    statistics: Statistics | None = None,
    min_variadic: int = 1,
    constraint: Callable[[Mapping[str, Value]], str | None] | None = None,
    clamp_to: Sequence[str] = (),
    adds: tuple[str, str] | None = None,
    name: str | None = None,
) -> Callable[[Callable[..., torch.Tensor]], MergeMethod]:
    """Declare a merge method from a kernel function (see the module docstring) and register it."""

    def wrap(fn: Callable[..., torch.Tensor]) -> MergeMethod:
        mname = name or fn.__name__
        sig = inspect.signature(fn, eval_str=True)
        operands: list[Operand] = []
        params: list[Param] = []
        wants_ctx = False
        for pname, p in sig.parameters.items():
            where = f"merge method {mname}: {pname}"
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                if operands and operands[-1].variadic:
                    raise TypeError(f"{where}: operands after the variable group")
                operands.append(Operand(pname, _space_of(p.annotation, where), optional=p.default is None))
            elif p.kind == p.VAR_POSITIONAL:
                operands.append(Operand(pname, _space_of(p.annotation, where), variadic=True))
            elif p.kind == p.KEYWORD_ONLY and pname == "ctx":
                wants_ctx = True
            elif p.kind == p.KEYWORD_ONLY:
                if not isinstance(p.default, Param):
                    raise TypeError(f"{where}: keyword parameters take a Param(...) default")
                params.append(Param(**{**p.default.__dict__, "name": pname}))
            else:
                raise TypeError(f"{where}: not an operand or a Param")
        if not operands:
            raise TypeError(f"merge method {mname}: no operands")
        if operands[0].space == TASK or operands[0].optional:
            raise TypeError(f"merge method {mname}: the first operand must be a required Model or Delta")
        opt = [o for o in operands if o.optional]
        if opt and operands[-1] is not opt[-1] and not operands[-1].variadic:
            raise TypeError(f"merge method {mname}: optional operands come last")
        result = _space_of(sig.return_annotation, f"merge method {mname}: return")
        if result == TASK:
            raise TypeError(f"merge method {mname}: the result is a Model or a Delta")
        for k in identity or {}:
            if not any(q.name == k for q in params):
                raise TypeError(f"merge method {mname}: identity names unknown parameter {k!r}")
        for c in clamp_to:
            if not any(o.name == c for o in operands):
                raise TypeError(f"merge method {mname}: clamp_to names unknown operand {c!r}")
        if adds is not None and (len(operands) != 2 or operands[1].name != adds[0] or operands[1].space != DELTA
                                 or not any(q.name == adds[1] for q in params)):
            raise TypeError(f"merge method {mname}: adds={adds!r} must name its second operand (a Delta) and a parameter")
        for q in params:
            if q.requires and not any(o.name == q.requires and o.optional for o in operands):
                raise TypeError(f"merge method {mname}: {q.name} requires unknown optional operand {q.requires!r}")
        method = MergeMethod(
            name=mname, formula=formula, operands=tuple(operands), params=tuple(params), result=result,
            elementwise=elementwise, kernel=fn, identity=MappingProxyType(dict(identity or {})),
            a1111_name=a1111 or mname, summary=(inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " "),
            source=source, statistics=statistics, min_variadic=min_variadic, wants_ctx=wants_ctx,
            constraint=constraint, clamp_to=tuple(clamp_to), adds=adds,
        )
        if mname in _REGISTRY:
            raise TypeError(f"merge method {mname!r} is declared twice")
        _REGISTRY[mname] = method
        return method

    return wrap
