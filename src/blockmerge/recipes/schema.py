"""The recipe file: its TOML schema, the checks that need no model file, and its canonical text.

A recipe names its inputs (checkpoint paths, optionally with the sha256 they must have), its steps
(a merge method over inputs or earlier steps, with per-block α/β) and its outputs (which step, to
which file, in which dtype and format). Structure and types are checked by pydantic (field names,
types, unknown keys); names, references, cycles and model counts are checked here, all before any
file is opened, so a bad recipe fails in milliseconds with a message naming the step.

Example::

    version = 1

    [inputs.A]
    path = "anything-v3.safetensors"
    sha256 = "…"                       # optional: the file must still be this one

    [inputs.B]
    path = "sd-v1-5.safetensors"

    [[steps]]
    name = "ab"
    method = "weighted_sum"            # any method of `blockmerge methods`
    models = ["A", "B"]                # inputs or other steps, in the method's operand order
    alpha = "GRAD_V"                   # number, 25/26 values, preset, "IN04-IN08=0.5", rules after ';'
    params = { }                       # the method's other parameters, e.g. { k = 0.3, w2 = "IN=0.5" }

    [inputs.style]
    path = "style-lora.safetensors"    # a LoRA file, for a LoRA step

    [[steps]]
    name = "styled"                    # a LoRA step: its one model with LoRAs baked in, no method
    models = ["ab"]
    loras = [{ lora = "style", strength = 0.8, blocks = "OUTD" }]

    [[outputs]]
    path = "ab.safetensors"
    step = "styled"                    # default: the last step
    dtype = "fp16"
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import BlockmergeError
from ..merge.methods import METHODS

RECIPE_VERSION = 1
# Each step adds a few Python frames to the computation of every key (nodes call their operands),
# and Python's default limit of 1000 frames is reached at about 300 chained steps.
MAX_STEPS = 200
Number = float | int
WeightValue = Number | list[Number] | str
_SHA = re.compile(r"^[0-9a-f]{64}$")


class RecipeError(BlockmergeError):
    """A recipe that cannot run: the message names the file and the step, input or line."""


class _Strict(BaseModel):
    # strict: a TOML string is never silently taken as a number, nor a bool as 1; forbid: a typo in
    # a field name is an error, not an ignored option.
    model_config = ConfigDict(extra="forbid", strict=True)


class InputSpec(_Strict):
    path: str
    sha256: str | None = None
    keep_ema: bool = False

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v is not None and not _SHA.match(v.lower()):
            raise ValueError("must be 64 hex digits")
        return v.lower() if v else v


class LoraStepSpec(_Strict):
    """One LoRA of a LoRA step: an input holding a LoRA file, its strength (and the text encoder's,
    default the same), its block weights (any weight-spec form; blocks left out get 0)."""

    lora: str
    strength: Number = 1.0
    te: Number | None = None
    blocks: WeightValue | None = None
    dyn: int | None = None


class StepSpec(_Strict):
    name: str | None = None
    method: str = "weighted_sum"
    models: list[str] = Field(min_length=1)
    alpha: WeightValue | None = None
    base_alpha: Number | None = None
    beta: WeightValue | None = None
    base_beta: Number | None = None
    params: dict[str, WeightValue] = Field(default_factory=dict)
    clamp: bool = False
    fix_position_ids: bool = False
    # A LoRA step: its one model with these LoRAs baked in, in order (``lora apply``); no method.
    loras: list[LoraStepSpec] = Field(default_factory=list)

    def given_params(self) -> dict[str, WeightValue]:
        """Every parameter the step gives, α and β included (an error if one is given twice)."""
        out = dict(self.params)
        for name in ("alpha", "beta"):
            v = getattr(self, name)
            if v is not None:
                if name in out:
                    raise ValueError(f"{name} is given both as {name} and in params")
                out[name] = v
        return out


class OutputSpec(_Strict):
    path: str | None = None
    step: str | None = None
    dtype: Literal["fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2"] = "fp16"
    format: Literal["safetensors", "ckpt"] | None = None
    vae: str | None = None


class RecipeSpec(_Strict):
    version: int = RECIPE_VERSION
    architecture: str | None = None
    inputs: dict[str, InputSpec | str]
    steps: list[StepSpec] = Field(min_length=1)
    outputs: list[OutputSpec] = Field(default_factory=list)

    def input(self, name: str) -> InputSpec:
        v = self.inputs[name]
        return InputSpec(path=v) if isinstance(v, str) else v


def step_names(spec: RecipeSpec) -> list[str]:
    """Each step's name; an unnamed step is ``O<n>`` (1-based), like Merge Board's ``__O1__``."""
    return [s.name if s.name else f"O{i + 1}" for i, s in enumerate(spec.steps)]


_WEIGHTS = "must be a number, a list of numbers (25/26; SDXL 19/20), a preset name or a spec like 'IN04-IN08=0.5'"
_EXPECT = {
    "alpha": _WEIGHTS,
    "beta": _WEIGHTS,
    "params": _WEIGHTS,
    "inputs": 'must be a path ("model.safetensors") or a table { path = "...", sha256 = "..." }',
}


def _loc(loc: Sequence[int | str], data: Mapping[str, Any]) -> str:
    """A pydantic error location as the user reads their file: ``step 'mix' (#2) alpha``."""
    parts = list(loc)
    if len(parts) >= 2 and parts[0] in ("steps", "outputs") and isinstance(parts[1], int):
        kind, i = str(parts[0]), int(parts[1])
        item = data.get(kind, [])
        name = item[i].get("name") if kind == "steps" and i < len(item) and isinstance(item[i], dict) else None
        head = f"step {name!r} (#{i + 1})" if name else f"{kind[:-1]} #{i + 1}"
        rest = [str(p) for p in parts[2:] if not _is_union_tag(p)]
        return " ".join([head, ".".join(rest)]).strip()
    if len(parts) >= 2 and parts[0] == "inputs":
        rest = [str(p) for p in parts[2:] if not _is_union_tag(p)]
        return " ".join([f"input {parts[1]!r}", ".".join(rest)]).strip()
    return ".".join(str(p) for p in parts if not _is_union_tag(p)) or "recipe"


def _is_union_tag(p: int | str) -> bool:
    # pydantic names the union member it tried (``float``, ``list[...]``, ``InputSpec``) in the loc
    return isinstance(p, str) and (p in ("float", "int", "str", "bool") or "[" in p or p.endswith("Spec"))


def parse_recipe(text: str, source: str = "recipe") -> RecipeSpec:
    """Parse and check a recipe's TOML text; raise :class:`RecipeError` naming what is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{source}: not valid TOML: {e}") from None
    except RecursionError:
        raise RecipeError(f"{source}: not valid TOML: nested too deeply") from None
    return recipe_from_data(data, source)


def recipe_from_data(data: Mapping[str, Any], source: str = "recipe") -> RecipeSpec:
    try:
        spec = RecipeSpec.model_validate(dict(data))
    except ValidationError as e:
        errs = e.errors()
        where = _loc(errs[0]["loc"], data)
        # A union (alpha: number | list | text) fails once per member: one message for all of them.
        same = [x for x in errs if _loc(x["loc"], data) == where]
        rest = len(errs) - len(same)
        more = f" (and {rest} more)" if rest else ""
        msg = errs[0]["msg"]
        if errs[0]["type"] == "extra_forbidden":
            msg = "unknown field"
        elif len(same) > 1:
            field = next((str(p) for p in reversed(errs[0]["loc"]) if isinstance(p, str) and not _is_union_tag(p)), "")
            msg = _EXPECT.get(field if field in _EXPECT else str(errs[0]["loc"][0]), msg)
        raise RecipeError(f"{source}: {where}: {msg}{more}") from None
    if spec.version != RECIPE_VERSION:
        raise RecipeError(f"{source}: version {spec.version} is not supported (this blockmerge reads version 1)")
    check_graph(spec, source)
    return spec


def check_graph(spec: RecipeSpec, source: str = "recipe") -> list[int]:
    """Names, references, model counts and cycles; returns the step indices in an order where every
    step comes after the steps it uses."""
    if len(spec.steps) > MAX_STEPS:
        raise RecipeError(f"{source}: {len(spec.steps)} steps; a recipe may have at most {MAX_STEPS}")
    names = step_names(spec)
    for n in list(spec.inputs) + names:
        if not n or n != n.strip() or any(c.isspace() for c in n):
            raise RecipeError(f"{source}: name {n!r} must be non-empty and contain no spaces")
    seen: dict[str, str] = {n: "input" for n in spec.inputs}
    for i, n in enumerate(names):
        if n in seen:
            raise RecipeError(f"{source}: step {n!r} (#{i + 1}): the name is already used by {'an input' if seen[n] == 'input' else 'another step'}")
        seen[n] = "step"
    for name, inp in spec.inputs.items():
        if not (inp if isinstance(inp, str) else inp.path).strip():
            raise RecipeError(f"{source}: input {name!r}: path is empty (set it to the checkpoint file)")
    index = {n: i for i, n in enumerate(names)}
    for i, (s, n) in enumerate(zip(spec.steps, names, strict=True)):
        where = f"{source}: step {n!r} (#{i + 1})"
        if s.loras:
            _check_lora_step(spec, s, where, names, index)
            continue
        m = METHODS.get(s.method)
        if m is None:
            raise RecipeError(f"{where}: unknown method {s.method!r} (choose from {', '.join(METHODS)})")
        try:
            m.check_count(len(s.models))
        except BlockmergeError as e:
            raise RecipeError(f"{where}: {e}") from None
        for ref in s.models:
            if ref not in spec.inputs and ref not in index:
                raise RecipeError(f"{where}: unknown model {ref!r} (inputs: {', '.join(spec.inputs) or 'none'}; "
                                  f"steps: {', '.join(names)})")
        try:
            given = s.given_params()
        except ValueError as e:
            raise RecipeError(f"{where}: {e}") from None
        known = m.param_names(len(s.models))
        for pname in [*given, *(n for n, b in (("alpha", s.base_alpha), ("beta", s.base_beta)) if b is not None)]:
            if pname not in known:
                raise RecipeError(f"{where}: {m.name} has no parameter {pname!r} (its parameters: "
                                  f"{', '.join(known) or 'none'})")
        for pname in known:
            p = m.lookup(pname, len(s.models))
            if p.default is None and pname not in given:
                raise RecipeError(f"{where}: {pname} is missing ({m.name}'s {pname}: {p.meaning})")
    order = _topological(spec, names, index, source)
    for j, o in enumerate(spec.outputs):
        where = f"{source}: output #{j + 1}"
        if o.step is not None and o.step not in index:
            raise RecipeError(f"{where}: unknown step {o.step!r} (steps: {', '.join(names)})")
        if o.vae is not None and o.vae not in spec.inputs:
            raise RecipeError(f"{where}: vae {o.vae!r} is not an input")
    paths = [o.path for o in spec.outputs if o.path]
    dup = {p for p in paths if paths.count(p) > 1}
    if dup:
        raise RecipeError(f"{source}: two outputs write {sorted(dup)[0]!r}")
    return order


def _check_lora_step(spec: RecipeSpec, s: StepSpec, where: str, names: list[str], index: dict[str, int]) -> None:
    if len(s.models) != 1:
        raise RecipeError(f"{where}: a LoRA step takes one model (got {len(s.models)})")
    ref = s.models[0]
    if ref not in spec.inputs and ref not in index:
        raise RecipeError(f"{where}: unknown model {ref!r} (inputs: {', '.join(spec.inputs) or 'none'}; "
                          f"steps: {', '.join(names)})")
    given = [k for k in ("alpha", "beta", "base_alpha", "base_beta") if getattr(s, k) is not None]
    if s.method != "weighted_sum" or given or s.params or s.clamp:
        what = ", ".join([*given, *(["params"] if s.params else []), *(["clamp"] if s.clamp else []),
                          *([f"method = {s.method!r}"] if s.method != "weighted_sum" else [])])
        raise RecipeError(f"{where}: a LoRA step bakes LoRAs into its model and takes no {what}")
    for j, lo in enumerate(s.loras):
        if lo.lora not in spec.inputs:
            raise RecipeError(f"{where}: loras[{j}]: {lo.lora!r} is not an input (declare the LoRA file under "
                              f"[inputs])")
        if lo.lora == ref:
            raise RecipeError(f"{where}: loras[{j}]: {lo.lora!r} is the step's model")
        if lo.dyn is not None and lo.dyn < 1:
            raise RecipeError(f"{where}: loras[{j}]: dyn must be at least 1")


def _topological(spec: RecipeSpec, names: list[str], index: dict[str, int], source: str) -> list[int]:
    """Depth-first order of the steps; a cycle is reported as the loop of names it makes."""
    state = [0] * len(names)  # 0 new, 1 on the path, 2 done
    order: list[int] = []
    path: list[int] = []

    def visit(i: int) -> None:
        if state[i] == 2:
            return
        if state[i] == 1:
            loop = [names[k] for k in path[path.index(i):]] + [names[i]]
            raise RecipeError(f"{source}: step {names[i]!r} (#{i + 1}): cycle {' -> '.join(loop)}")
        state[i] = 1
        path.append(i)
        for ref in spec.steps[i].models:
            if ref in index and ref not in spec.inputs:
                visit(index[ref])
        path.pop()
        state[i] = 2
        order.append(i)

    for i in range(len(names)):
        visit(i)
    return order


# --- canonical TOML text ------------------------------------------------------------------------
# tomllib only reads. The text written into output metadata must be canonical (the same recipe
# always gives the same bytes, so a rerun reproduces the file byte for byte) and carries a few
# comments for the reader, which TOML writers (tomli-w) do not do; the schema is small and flat,
# so a dozen lines serve. Every emitted text is read back with tomllib in the tests.

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


_LINE_BREAKERS = re.compile("[\x7f-\x9f\u2028\u2029]")


def toml_key(k: str) -> str:
    return k if _BARE.match(k) else toml_value(k)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            raise RecipeError(f"{v} cannot be written to a recipe")
        return repr(v)
    if isinstance(v, str):
        if any("\ud800" <= c <= "\udfff" for c in v):
            # A file name's undecodable bytes: TOML (UTF-8 only) cannot hold them, and writing U+FFFD
            # would name another file.
            raise RecipeError(f"{v.encode('utf-8', 'backslashreplace').decode()!r} is not valid UTF-8 and "
                              "cannot be written to a recipe (rename the file)")
        # JSON string escapes are a subset of TOML's basic-string escapes; DEL is the one control
        # character JSON leaves raw and TOML forbids. The C1 controls and the Unicode line and
        # paragraph separators are legal raw in TOML, but Python's splitlines and many editors break
        # lines at NEL, LS and PS: escaped, a written recipe is one line per line for every reader.
        return _LINE_BREAKERS.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(v, ensure_ascii=False))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        items = [f"{toml_key(str(k))} = {toml_value(x)}" for k, x in v.items() if x is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


_COMMENT_BAD = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def toml_comment(text: str) -> str:
    """``text`` as the body of one TOML comment line: a newline (or any control character, which TOML
    forbids in comments) in a file name or a note must not end the comment and start TOML of its own."""
    return _COMMENT_BAD.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), str(text))


def to_toml(data: Mapping[str, Any], header: Sequence[str] = ()) -> str:
    """A recipe mapping (``RecipeSpec.model_dump`` shape, None values left out) as TOML text."""
    lines = [f"# {toml_comment(h)}" if h else "#" for h in header]
    for k, v in data.items():
        if v is None or k in ("inputs", "steps", "outputs"):
            continue
        lines.append(f"{toml_key(k)} = {toml_value(v)}")
    for name, inp in (data.get("inputs") or {}).items():
        lines += ["", f"[inputs.{toml_key(name)}]"]
        fields = {"path": inp} if isinstance(inp, str) else inp
        lines += [f"{toml_key(k)} = {toml_value(x)}" for k, x in fields.items() if x is not None]
    for table in ("steps", "outputs"):
        for item in data.get(table) or []:
            lines += ["", f"[[{table}]]"]
            lines += [f"{toml_key(k)} = {toml_value(x)}" for k, x in item.items() if x is not None]
    return "\n".join(lines) + "\n"
