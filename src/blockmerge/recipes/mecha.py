"""Import sd-mecha recipes (``.mecha`` text) as blockmerge recipes.

sd-mecha writes a recipe as numbered lines (``version 0.1.0`` first): ``model "PATH" model_config=...``,
``dict KEY=VALUE ...``, ``literal &N model_config=...`` (block weights), and ``merge "METHOD" ARGS
KEY=VALUE...`` where ``&N`` refers to line N's result. This module reads that text (its own small
tokenizer, after sd-mecha's rules: quotes, backslash escapes, ``null/true/false``) and maps the
graph onto blockmerge steps, only where the formulas are the same:

- ``weighted_sum``, ``slerp``, ``geometric_sum``, ``n_average``, ``geometric_median``,
  ``subtract`` (blockmerge's ``difference``), ``add_difference`` (of a ``subtract``: blockmerge's
  ``add_difference``; of another delta: ``add_delta``);
- sd-mecha's compositions of blockmerge's single methods: ``add_difference(A,
  perpendicular_component(A - C, B - C))`` is ``add_perpendicular``, ``add_difference(A, B - C,
  alpha=train_difference_mask(A, B, C))`` is ``train_difference``, ``add_difference(base,
  ties_sum(Mᵢ - base))`` is ``ties`` (sd-mecha's ``vote_sgn`` false = election by count);
  ``clamp(X, A, B)`` of a step over A and B is that step with ``clamp``; ``fallback`` and the
  block-weight conversions are transparent.

Block weights (``sd1-supermerger_blocks`` / ``sdxl-supermerger_blocks`` literals) become specs in
the same block ids; blocks a literal leaves out get sd-mecha's default for that parameter. Where
sd-mecha's block rule differs from Merge Block Weighted's (it files ``time_embed``, SDXL's
``label_emb`` under BASE, blockmerge under IN00; SDXL has its own VAE value), the import adds the
elemental rule that reproduces sd-mecha's assignment. Any other method is an error naming it,
including sd-mecha methods that share a name with blockmerge's but not the formula
(``add_cosine_a/b`` are not supermerger's model-wide cosine merges; sd-mecha's ``model_stock``
averages consecutive pairs row by row, blockmerge's follows mergekit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..io.text import split_lines
from .schema import RecipeError, to_toml

__all__ = ["mecha_to_recipe_data", "mecha_to_toml", "parse_mecha"]

VERSION = "version 0.1.0"

#: sd-mecha's positional parameters and defaults for the methods that can be imported.
_SIGNATURES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "weighted_sum": (("a", "b", "alpha"), {"alpha": 0.5}),
    "slerp": (("a", "b", "alpha"), {"alpha": 0.5}),
    "geometric_sum": (("a", "b", "alpha"), {"alpha": 0.5}),
    "add_difference": (("a", "b", "alpha"), {"alpha": 1.0}),
    "subtract": (("a", "b"), {}),
    "perpendicular_component": (("a", "b"), {}),
    "fallback": (("a", "default"), {}),
}
_VARIADIC: dict[str, dict[str, Any]] = {
    "n_average": {},
    "geometric_median": {"eps": 1e-6, "maxiter": 100, "ftol": 1e-20},
    "ties_sum": {"k": 1.0, "vote_sgn": False},
    "clamp": {"stiffness": 0.0},
}
_DIFFERENT = {
    "add_cosine_a": "sd-mecha's add_cosine_a is a per-tensor similarity merge, not supermerger's model-wide cosineA "
                    "(blockmerge's add_cosine_a)",
    "add_cosine_b": "sd-mecha's add_cosine_b is a per-tensor similarity merge, not supermerger's model-wide cosineB "
                    "(blockmerge's add_cosine_b)",
    "model_stock": "sd-mecha's model_stock averages the cosine of consecutive pairs row by row; blockmerge's "
                   "follows mergekit (all pairs, whole tensors)",
    "dropout": "sd-mecha's dropout (n-supermario) combines the masks differently from DARE (blockmerge's dare)",
    "ties_sum_with_dropout": "sd-mecha's DARE-TIES variant rescales differently from blockmerge's dare_ties",
}


@dataclass
class _Line:
    number: int
    kind: str  # model | dict | literal | merge
    args: list[Any]
    kwargs: dict[str, Any]
    text: str


@dataclass(frozen=True)
class _Ref:
    index: int


def _tokenize(line: str) -> list[str]:
    tokens: list[str] = []
    cur: list[str] = []
    quoted = False
    esc = False
    started = False
    for ch in line:
        if esc:
            cur.append(ch)
            esc = False
            continue
        if ch == "\\":
            esc = True
            continue
        if ch == '"':
            quoted = not quoted
            cur.append(ch)
            started = True
            continue
        if ch == " " and not quoted:
            if started:
                tokens.append("".join(cur))
                cur, started = [], False
            continue
        cur.append(ch)
        started = True
    if quoted or esc:
        raise ValueError("unbalanced quotes")
    if started:
        tokens.append("".join(cur))
    return tokens


def _value(tok: str) -> Any:
    if tok in ("null", "true", "false"):
        return {"null": None, "true": True, "false": False}[tok]
    if tok.startswith("&"):
        return _Ref(int(tok[1:]))
    if len(tok) >= 2 and tok[0] == '"' and tok[-1] == '"':
        return tok[1:-1]
    if "." in tok or "e" in tok.lower() or "inf" in tok.lower() or "nan" in tok.lower():
        return float(tok)
    return int(tok)


def parse_mecha(text: str, source: str = "recipe.mecha") -> list[_Line]:
    """The lines of an sd-mecha recipe, with ``&N`` references checked."""
    lines = split_lines(text)
    if not lines or lines[0].strip() != VERSION:
        raise RecipeError(f"{source}: line 1: expected {VERSION!r} (an sd-mecha recipe), got {lines[0][:40]!r}")
    out: list[_Line] = []
    for n, raw in enumerate(lines[1:], 2):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            cmd, *toks = _tokenize(line)
            args: list[Any] = []
            kwargs: dict[str, Any] = {}
            for t in toks:
                if "=" in t and not t.startswith('"'):
                    k, v = t.split("=", 1)
                    kwargs[k] = _value(v)
                else:
                    args.append(_value(t))
        except ValueError as e:
            raise RecipeError(f"{source}: line {n}: {e}: {line[:80]}") from None
        if cmd not in ("model", "dict", "literal", "merge"):
            raise RecipeError(f"{source}: line {n}: unknown command {cmd!r}")
        for v in [*args, *kwargs.values()]:
            if isinstance(v, _Ref) and not 0 <= v.index < len(out):
                raise RecipeError(f"{source}: line {n}: reference &{v.index} is not an earlier line")
        out.append(_Line(n, cmd, args, kwargs, line))
    if not out:
        raise RecipeError(f"{source}: no recipe lines")
    return out


@dataclass
class _Builder:
    lines: list[_Line]
    source: str
    base_dir: Path | None
    inputs: dict[str, str] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)  # line index -> input or step name
    arch: str | None = None
    warnings: list[str] = field(default_factory=list)

    def where(self, i: int) -> str:
        return f"{self.source}: line {self.lines[i].number}"

    # -- graph access ------------------------------------------------------------------------
    def line(self, v: Any) -> tuple[int, _Line] | None:
        return (v.index, self.lines[v.index]) if isinstance(v, _Ref) else None

    def bind(self, i: int, sig: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
        ln = self.lines[i]
        method = ln.args[0]
        pos = ln.args[1:]
        if len(pos) > len(sig):
            raise RecipeError(f"{self.where(i)}: {method} takes {len(sig)} arguments, got {len(pos)}")
        bound = dict(defaults)
        bound.update(zip(sig, pos, strict=False))
        for k, v in ln.kwargs.items():
            if k not in sig and k not in defaults:
                raise RecipeError(f"{self.where(i)}: {method}: argument {k!r} cannot be imported")
            bound[k] = v
        missing = [s for s in sig if s not in bound]
        if missing:
            raise RecipeError(f"{self.where(i)}: {method}: missing {', '.join(missing)}")
        return bound

    def method_of(self, v: Any) -> str | None:
        got = self.line(v)
        if got and got[1].kind == "merge":
            return str(got[1].args[0])
        return None

    def strip(self, v: Any) -> Any:
        """Through sd-mecha's transparent nodes (fallback, conversions)."""
        while True:
            got = self.line(v)
            if not got or got[1].kind != "merge":
                return v
            m = str(got[1].args[0])
            if m == "fallback" or m.startswith("convert_"):
                v = got[1].args[1]
                continue
            return v

    # -- models --------------------------------------------------------------------------------
    def model(self, i: int) -> str:
        if i in self.names:
            return self.names[i]
        ln = self.lines[i]
        path = ln.args[0] if ln.args else None
        if not isinstance(path, str) or not path:
            raise RecipeError(f"{self.where(i)}: model needs a path")
        cfg = str(ln.kwargs.get("model_config") or "")
        arch = "SDXL" if cfg.startswith("sdxl") else "SD1" if cfg.startswith("sd1") else None
        if cfg and arch is None:
            raise RecipeError(f"{self.where(i)}: model_config {cfg!r} has no blockmerge architecture "
                              "(sd1-* and sdxl-* import)")
        if arch:
            if self.arch and self.arch != arch:
                raise RecipeError(f"{self.where(i)}: {arch} model in a {self.arch} recipe")
            self.arch = arch
        if ln.kwargs.get("merge_space") not in (None, "weight"):
            raise RecipeError(f"{self.where(i)}: only models in sd-mecha's 'weight' space import")
        stem = PurePosixPath(path.replace("\\", "/")).stem or "model"
        name = "".join(c if c.isalnum() or c in "_-" else "_" for c in stem) or "model"
        base = name
        k = 2
        while name in self.inputs or name in {s["name"] for s in self.steps}:
            name, k = f"{base}_{k}", k + 1
        p = Path(path)
        if self.base_dir is not None and p.is_absolute():
            with contextlib.suppress(ValueError):
                path = str(p.relative_to(self.base_dir))
        self.inputs[name] = path
        self.names[i] = name
        return name

    # -- parameters ----------------------------------------------------------------------------
    def scalar(self, v: Any, what: str) -> Any:
        """A plain value (number or bool), given directly or as a singleton literal (``&N``)."""
        if not isinstance(v, _Ref):
            return v
        got = self.line(self.strip(v))
        if got and got[1].kind == "literal" and got[1].kwargs.get("model_config") == "singleton-mecha":
            inner = got[1].args[0] if got[1].args else None
            d = self.lines[inner.index] if isinstance(inner, _Ref) else None
            if d is not None and d.kind == "dict" and len(d.kwargs) == 1:
                return next(iter(d.kwargs.values()))
        if got and got[1].kind == "dict" and len(got[1].kwargs) == 1:
            return next(iter(got[1].kwargs.values()))
        raise RecipeError(f"{self.source}: {what}: expected a single value")

    def param(self, v: Any, default: float, what: str) -> Any:
        """An sd-mecha hyperparameter -> a number or a blockmerge weight spec."""
        if isinstance(v, bool) or v is None:
            raise RecipeError(f"{self.source}: {what}: {v!r} is not a number")
        if isinstance(v, int | float):
            return float(v)
        v = self.strip(v)
        got = self.line(v)
        if not got:
            raise RecipeError(f"{self.source}: {what}: cannot import {v!r}")
        i, ln = got
        if ln.kind == "literal":
            cfg = str(ln.kwargs.get("model_config") or "")
            inner = ln.args[0] if ln.args else None
            values = self.lines[inner.index] if isinstance(inner, _Ref) else None
            if isinstance(inner, int | float) and not isinstance(inner, bool):
                return float(inner)
            if values is None or values.kind != "dict":
                raise RecipeError(f"{self.where(i)}: {what}: literal without a dict of values")
            if cfg == "singleton-mecha":
                (val,) = values.kwargs.values()
                return float(val)
            if cfg in ("sd1-supermerger_blocks", "sdxl-supermerger_blocks"):
                return self.blocks(i, values.kwargs, default, "SDXL" if cfg.startswith("sdxl") else "SD1", what)
            raise RecipeError(f"{self.where(i)}: {what}: literal of model_config {cfg!r} cannot be imported")
        if ln.kind == "dict" and len(ln.kwargs) == 1:
            return float(next(iter(ln.kwargs.values())))
        raise RecipeError(f"{self.where(i)}: {what}: {ln.kind} {ln.args[:1]} cannot be imported as a parameter")

    def blocks(self, i: int, values: dict[str, Any], default: float, arch: str, what: str) -> str:
        from ..architectures import by_name

        a = by_name(arch)
        if self.arch and self.arch != arch:
            raise RecipeError(f"{self.where(i)}: {arch} block weights in a {self.arch} recipe")
        self.arch = arch
        allowed = set(a.all_ids) | ({"VAE"} if arch == "SDXL" else set())
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise RecipeError(f"{self.where(i)}: {what}: unknown block {unknown[0]!r} for {arch}")
        vals = {b: float(values.get(b, default)) for b in allowed}
        head = ",".join(repr(vals[b]) for b in a.all_ids)
        rules = []
        # sd-mecha files the time embedding (and SDXL's label_emb) under BASE, Merge Block Weighted
        # (blockmerge) under IN00; SDXL has a separate VAE value. Rules restore sd-mecha's choice.
        if vals["BASE"] != vals["IN00"]:
            parts = "time_embed label_emb" if arch == "SDXL" else "time_embed"
            rules.append(f"IN00:{parts}:{vals['BASE']!r}")
        if arch == "SDXL" and vals["VAE"] != vals["BASE"]:
            rules.append(f"BASE:first_stage_model:{vals['VAE']!r}")
        return head + "".join(f"; {r}" for r in rules)

    # -- steps ---------------------------------------------------------------------------------
    def operand(self, v: Any, what: str) -> str:
        v = self.strip(v)
        got = self.line(v)
        if not got:
            raise RecipeError(f"{self.source}: {what}: {v!r} is not a model or a merge")
        i, ln = got
        if ln.kind == "model":
            return self.model(i)
        if ln.kind == "merge":
            return self.merge(i)
        raise RecipeError(f"{self.where(i)}: {what}: a {ln.kind} where a model is expected")

    def add_step(self, i: int, method: str, models: list[str], **fields: Any) -> str:
        name = f"s{len(self.steps) + 1}"
        step: dict[str, Any] = {"name": name, "method": method, "models": models}
        step.update({k: v for k, v in fields.items() if v is not None})
        self.steps.append(step)
        self.names[i] = name
        return name

    def merge(self, i: int) -> str:
        if i in self.names:
            return self.names[i]
        ln = self.lines[i]
        m = str(ln.args[0]) if ln.args else ""
        where = self.where(i)
        if m in _DIFFERENT:
            raise RecipeError(f"{where}: {m}: not imported: {_DIFFERENT[m]}")
        if m in ("weighted_sum", "slerp", "geometric_sum"):
            b = self.bind(i, *_SIGNATURES[m])
            return self.add_step(i, m, [self.operand(b["a"], f"{m} a"), self.operand(b["b"], f"{m} b")],
                                 alpha=self.param(b["alpha"], _SIGNATURES[m][1]["alpha"], f"{m} alpha"))
        if m == "subtract":
            b = self.bind(i, *_SIGNATURES[m])
            return self.add_step(i, "difference", [self.operand(b["a"], "subtract a"), self.operand(b["b"], "subtract b")])
        if m == "add_difference":
            return self.add_difference(i)
        if m in ("n_average", "geometric_median"):
            defaults = _VARIADIC[m]
            extra = {k: float(self.scalar(v, f"{m} {k}")) for k, v in ln.kwargs.items()}
            unknown = sorted(set(extra) - set(defaults))
            if unknown:
                raise RecipeError(f"{where}: {m}: argument {unknown[0]!r} cannot be imported")
            models = [self.operand(v, m) for v in ln.args[1:]]
            params = {k: extra.get(k, d) for k, d in defaults.items()} or None
            if params and "maxiter" in params:
                params["maxiter"] = int(params["maxiter"])
            return self.add_step(i, m, models, params=params)
        if m == "clamp":
            return self.clamp(i)
        raise RecipeError(f"{where}: sd-mecha method {m!r} has no blockmerge equivalent "
                          "(`blockmerge methods` lists what can be imported)")

    def add_difference(self, i: int) -> str:
        b = self.bind(i, *_SIGNATURES["add_difference"])
        a_ref, d_ref = self.strip(b["a"]), self.strip(b["b"])
        alpha_raw = b["alpha"]
        dm = self.method_of(d_ref)
        alpha = self.param(alpha_raw, 1.0, "add_difference alpha")
        if dm == "subtract":
            sb = self.bind(d_ref.index, *_SIGNATURES["subtract"])
            models = [self.operand(a_ref, "a"), self.operand(sb["a"], "b"), self.operand(sb["b"], "c")]
            return self.add_step(i, "add_difference", models, alpha=alpha)
        if dm == "perpendicular_component":
            pb = self.bind(d_ref.index, *_SIGNATURES["perpendicular_component"])
            da, db = self.strip(pb["a"]), self.strip(pb["b"])
            if self.method_of(da) == "subtract" and self.method_of(db) == "subtract":
                sa = self.bind(da.index, *_SIGNATURES["subtract"])
                sb = self.bind(db.index, *_SIGNATURES["subtract"])
                if self.strip(sa["a"]) == a_ref and self.strip(sa["b"]) == self.strip(sb["b"]):
                    models = [self.operand(a_ref, "a"), self.operand(sb["a"], "b"), self.operand(sb["b"], "c")]
                    return self.add_step(i, "add_perpendicular", models, alpha=alpha)
            raise RecipeError(f"{self.where(i)}: perpendicular_component not of (A - C, B - C) cannot be imported")
        if dm == "ties_sum":
            ti = d_ref.index
            tl = self.lines[ti]
            opts = {**_VARIADIC["ties_sum"],
                    **{k: self.scalar(v, f"ties_sum {k}") for k, v in tl.kwargs.items()}}
            unknown = sorted(set(tl.kwargs) - set(_VARIADIC["ties_sum"]))
            if unknown:
                raise RecipeError(f"{self.where(ti)}: ties_sum: argument {unknown[0]!r} cannot be imported")
            models = [self.operand(a_ref, "base")]
            for v in tl.args[1:]:
                sv = self.strip(v)
                if self.method_of(sv) != "subtract":
                    raise RecipeError(f"{self.where(ti)}: ties_sum over something other than model - base")
                sb = self.bind(sv.index, *_SIGNATURES["subtract"])
                if self.strip(sb["b"]) != a_ref:
                    raise RecipeError(f"{self.where(ti)}: ties_sum task vectors must be relative to the base")
                models.append(self.operand(sb["a"], "ties model"))
            self.warnings.append(f"{self.where(ti)}: ties_sum: sd-mecha keeps about one more element per tensor "
                                 "than blockmerge's k, so a few elements can differ")
            return self.add_step(i, "ties", models, alpha=alpha,
                                 params={"k": self.param(opts["k"], 1.0, "ties_sum k"),
                                         "count_signs": 0 if opts["vote_sgn"] else 1})
        return self.add_step(i, "add_delta", [self.operand(a_ref, "a"), self.operand(d_ref, "delta")], alpha=alpha)

    def clamp(self, i: int) -> str:
        ln = self.lines[i]
        x, *bounds = [self.strip(v) for v in ln.args[1:]]
        if float(self.scalar(ln.kwargs.get("stiffness", 0.0), "clamp stiffness")) != 0.0:
            raise RecipeError(f"{self.where(i)}: clamp with stiffness cannot be imported")
        inner = self.merge(x.index) if self.method_of(x) else None
        if inner is None:
            raise RecipeError(f"{self.where(i)}: clamp of something other than a merge cannot be imported")
        step = next(s for s in self.steps if s["name"] == inner)
        from ..merge.methods import METHODS

        method = METHODS[step["method"]]
        roles = method.roles(len(step["models"]))
        ours = {n for n, r in zip(step["models"], roles, strict=True) if not method.clamp_to or r.name in method.clamp_to}
        bound_names = {self.operand(v, "clamp bound") for v in bounds}
        if bound_names != ours:
            raise RecipeError(f"{self.where(i)}: clamp bounds other than the merge's own models cannot be imported")
        step["clamp"] = True
        self.names[i] = inner
        return inner


def mecha_to_recipe_data(
    text: str, source: str = "recipe.mecha", *, output: str | None = None, base_dir: Path | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The blockmerge recipe (as data for :func:`~.schema.to_toml`) of an sd-mecha recipe, and warnings."""
    lines = parse_mecha(text, source)
    b = _Builder(lines, source, base_dir)
    last = len(lines) - 1
    root = b.strip(_Ref(last))
    got = b.line(root)
    assert got is not None
    if got[1].kind != "merge":
        raise RecipeError(f"{source}: the last line must be a merge")
    final = b.merge(got[0])
    data: dict[str, Any] = {"version": 1}
    if b.arch:
        data["architecture"] = b.arch
    data["inputs"] = b.inputs
    data["steps"] = b.steps
    out: dict[str, Any] = {"step": final}
    if output:
        out["path"] = output
    data["outputs"] = [out]
    return data, b.warnings


def mecha_to_toml(text: str, source: str = "recipe.mecha", *, output: str | None = None,
                  base_dir: Path | None = None, header: Sequence[str] | None = None) -> tuple[str, list[str]]:
    """An sd-mecha recipe as blockmerge recipe TOML (checked by blockmerge's recipe parser) and warnings."""
    from .schema import parse_recipe

    data, warnings = mecha_to_recipe_data(text, source, output=output, base_dir=base_dir)
    toml = to_toml(data, header if header is not None else (f"imported from the sd-mecha recipe {source}",))
    parse_recipe(toml, source)  # what we write must be a valid recipe
    return toml, warnings
