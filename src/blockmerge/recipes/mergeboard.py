"""Import Merge Board's text recipes (the article author's A1111 extension) as blockmerge recipes.

Merge Board keeps a chain of A1111 checkpoint merges as lines of text::

    # Sample Recipe
    a14 = __SD14__ + __F222__, 0.5                          weighted sum: (1-M)·A + M·B
    mix14 = __O1__ + __WD13__ + __SD14__, 1.0, safetensors  add difference: A + M·(B - C)
    mix15 = __O2__ + __WD13__ + __SD14__, 1.0, fp16, safetensors

    __F222__ # You can use F111 instead.                    a variable and its note

``NAME`` is the output checkpoint's name, ``__O<n>__`` the output of the n-th recipe line,
``__X__`` a user variable (a model the user picks), a bare word a checkpoint's name; trailing
options are ``fp16`` (save as half; otherwise full precision) and ``safetensors`` (otherwise
``.ckpt``, Merge Board's default). ``#`` starts a comment anywhere on a line. Merge Board wrote
every line's output to disk because A1111 could only merge files; here each line becomes a step
and, by default, only the lines no later line uses become output files (the chain streams).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..io.text import split_lines
from .schema import RecipeError, recipe_from_data, to_toml

_SYSTEM = re.compile(r"^__O(\d+)__$")
_USER = re.compile(r"^__(.+)__$")
_A1111_TITLE = re.compile(r"^(.*?)\s*\[[0-9a-fA-F]{8,10}\]$")  # "name.safetensors [abcd1234]"
_MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
_BAD_NAME = re.compile(r'[\\/:?"<>|*\s\x00-\x1f\x7f]')  # Merge Board replaces these in output names (and controls)


def _input_name(token: str) -> str:
    m = _A1111_TITLE.match(token)
    name = m.group(1) if m else token
    u = _USER.match(name)
    if u:
        return u.group(1)
    for suf in _MODEL_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _find(name: str, token: str, models: Mapping[str, str], models_dir: Path | None) -> str:
    for key in (token, name, f"__{name}__"):
        if key in models:
            return str(models[key])
    if models_dir is not None and models_dir.is_dir():
        # case-insensitive, as A1111 finds checkpoints by name
        files = {p.name.lower(): p for p in sorted(models_dir.iterdir()) if p.is_file()}
        for cand in (name + s for s in ("", *_MODEL_SUFFIXES)):
            if cand.lower() in files:
                return str(files[cand.lower()])
    return ""


def _is_recipe_line(raw: str) -> bool:
    line = raw.split("#", 1)[0].strip()
    return bool(line) and not (line.startswith("_") and "=" not in line)


def parse_mergeboard(
    text: str,
    *,
    source: str = "recipe.txt",
    models: Mapping[str, str] | None = None,
    models_dir: str | os.PathLike[str] | None = None,
    all_outputs: bool = False,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge Board text -> (recipe data in the TOML schema, notes per input from variable lines).

    ``models`` binds variables or model names to files (``{"SD15": "v1-5.safetensors"}``; the
    ``__SD15__`` spelling works too); ``models_dir`` is searched for ``NAME.safetensors`` /
    ``NAME.ckpt`` otherwise. An input left unbound gets an empty path, which the recipe check
    reports until it is filled in. Errors name the line.
    """
    models = dict(models or {})
    mdir = Path(models_dir) if models_dir is not None else None
    inputs: dict[str, dict[str, Any]] = {}
    notes: dict[str, str] = {}
    steps: list[dict[str, Any]] = []
    outputs: list[dict[str, Any]] = []
    line_of: list[int] = []
    used: set[str] = set()
    lines = split_lines(text)
    n_lines = sum(1 for ln in lines if _is_recipe_line(ln))
    for lineno, raw in enumerate(lines, 1):
        where = f"{source}:{lineno}"
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        comment = line.split("#", 1)[1].strip() if "#" in line else ""
        line = line.split("#", 1)[0].strip()
        if line.startswith("_") and "=" not in line:
            # A variable's description: "__F222__ # note" or "__F222__, note".
            var, _, note = line.partition(",")
            u = _USER.match(var.strip())
            if not u:
                raise RecipeError(f"{where}: {var.strip()!r} is not a variable (expected __NAME__)")
            notes[u.group(1)] = (note.strip() or comment).strip()
            continue
        if "=" not in line:
            raise RecipeError(f"{where}: expected 'NAME = A + B, M' (or a __VARIABLE__ line), got {raw.strip()!r}")
        lhs, rhs = (x.strip() for x in line.split("=", 1))
        parts = [x.strip() for x in rhs.split(",")]
        if len(parts) < 2 or not parts[1]:
            raise RecipeError(f"{where}: the multiplier is missing (expected 'NAME = A + B, M')")
        operands = [x.strip() for x in parts[0].split("+")]
        if len(operands) not in (2, 3) or not all(operands):
            raise RecipeError(f"{where}: expected 'A + B' (weighted sum) or 'A + B + C' (add difference), "
                              f"got {parts[0]!r}")
        try:
            mult = float(parts[1])
        except ValueError:
            raise RecipeError(f"{where}: multiplier {parts[1]!r} is not a number") from None
        if not math.isfinite(mult):
            raise RecipeError(f"{where}: multiplier {parts[1]!r} is not a finite number")
        half, fmt = False, "ckpt"
        for opt in parts[2:]:
            o = opt.lower()
            if o == "fp16":
                half = True
            elif o in ("safetensors", "ckpt"):
                fmt = o
            elif o:
                raise RecipeError(f"{where}: unknown option {opt!r} (Merge Board knows fp16, safetensors, ckpt)")
        n = len(steps) + 1
        name = _BAD_NAME.sub("-", lhs) if lhs else f"O{n}"
        refs: list[str] = []
        for tok in operands:
            sm = _SYSTEM.match(tok)
            if sm:
                k = int(sm.group(1))
                if not 1 <= k <= n_lines:
                    raise RecipeError(f"{where}: {tok}: there is no recipe line {k} (the recipe has {n_lines})")
                if k >= n:
                    raise RecipeError(f"{where}: {tok} is the output of recipe line {k}, which comes later; "
                                      "only earlier lines' outputs can be used")
                ref = steps[k - 1]["name"]
                used.add(ref)
                refs.append(ref)
                continue
            iname = _input_name(tok)
            if iname not in inputs:
                inputs[iname] = {"path": _find(iname, tok, models, mdir)}
            refs.append(iname)
        steps.append({
            "name": name,
            "method": "add_difference" if len(refs) == 3 else "weighted_sum",
            "models": refs,
            "alpha": mult,
        })
        outputs.append({"path": f"{name}.{fmt}", "step": name, "dtype": "fp16" if half else "fp32", "format": fmt})
        line_of.append(lineno)
    if not steps:
        raise RecipeError(f"{source}: no recipe lines (expected 'NAME = A + B, M')")
    # A step named like an input (``sd15 = __sd15__ + ...``) would shadow it: rename the input.
    step_set = {s["name"] for s in steps}
    for old in [n for n in inputs if n in step_set]:
        new = f"{old}_in"
        inputs[new] = inputs.pop(old)
        if old in notes:
            notes[new] = notes.pop(old)
        for s in steps:
            s["models"] = [new if r == old else r for r in s["models"]]
    names = [s["name"] for s in steps]
    for i, nm in enumerate(names):
        if nm in names[:i]:
            raise RecipeError(f"{source}:{line_of[i]}: output name {nm!r} is already used on line "
                              f"{line_of[names.index(nm)]}")
    if not all_outputs:
        outputs = [o for o in outputs if o["step"] not in used]
    return {"version": 1, "inputs": inputs, "steps": steps, "outputs": outputs}, notes


def mergeboard_to_toml(
    text: str,
    *,
    source: str = "recipe.txt",
    models: Mapping[str, str] | None = None,
    models_dir: str | os.PathLike[str] | None = None,
    all_outputs: bool = False,
    relative_to: str | os.PathLike[str] | None = None,
) -> str:
    """Merge Board text as a blockmerge recipe (TOML text), with the variables' notes as comments.

    ``relative_to``: the folder the recipe will be saved in. A recipe's relative paths start at
    its own folder, while the paths given here (``models``, ``models_dir``) start at the current
    one, so they are rewritten to be relative to that folder.
    """
    data, notes = parse_mergeboard(text, source=source, models=models, models_dir=models_dir,
                                   all_outputs=all_outputs)
    if relative_to is not None:
        here = Path.cwd()
        for v in data["inputs"].values():
            if v["path"] and not Path(v["path"]).expanduser().is_absolute():
                v["path"] = os.path.relpath(here / v["path"], Path(relative_to).resolve())
    check = {**data, "inputs": {k: {"path": v["path"] or "unset"} for k, v in data["inputs"].items()}}
    recipe_from_data(check, source)  # names, references and cycles are right before we write anything
    header = [f"blockmerge recipe imported from Merge Board text ({Path(source).name})."]
    unset = [n for n, v in data["inputs"].items() if not v["path"]]
    if unset:
        header.append(f"Set the path of: {', '.join(unset)} (or import with --model NAME=FILE).")
    for n, note in notes.items():
        if note:
            header.append(f"{n}: {note}")
    return to_toml(data, header)
