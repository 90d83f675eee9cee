"""A method's parameters as users give them -> one :class:`BlockWeights` per parameter name.

One function for every caller (``merge``, recipes, sweeps' custom variants, ``blocks``, the UI), so
a parameter means the same everywhere: any weight-spec form per parameter, the method's defaults
for parameters not given, the identity values for blocks a readable spec does not name, and
range checks that name the parameter, the block and the rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from ..architectures import Architecture
from ..errors import BlockmergeError, WeightSpecError
from .declare import MergeMethod
from .presets import PresetBook
from .weights import BlockWeights, base_arg_name, parse_weights

__all__ = ["ParamValues", "check_rules", "merged_params", "parse_name_specs", "parse_param_args", "resolve_params", "values_for"]

#: Parameter name -> its per-block values (and rules). Per-operand parameters are expanded (w1, w2).
ParamValues = dict[str, BlockWeights]


def parse_name_specs(items: Iterable[str] | None, arg: str, example: str) -> dict[str, str]:
    """``NAME=SPEC`` items (``--param``, ``--custom``, the UI's lines of either), split at the first
    ``=`` (a SPEC holds more of them), in order; an error naming ``arg`` for an item without a name
    or a spec, and for a name given twice. ``example`` is shown in the error."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, spec = item.partition("=")
        name = name.strip()
        if not sep or not name or not spec.strip():
            raise BlockmergeError(f"{arg} {item!r}: expected NAME=SPEC (e.g. {example})")
        if name in out:
            raise BlockmergeError(f"{arg} {name}: given twice")
        out[name] = spec
    return out


def parse_param_args(items: Iterable[str] | None, arg: str = "--param") -> dict[str, str]:
    """``["k=0.3", "alpha=IN04-IN08=0.5"]`` -> ``{"k": "0.3", "alpha": "IN04-IN08=0.5"}``."""
    return parse_name_specs(items, arg, "--param k=0.3" if arg == "--param" else "k=0.3")


def merged_params(
    params: Mapping[str, Any] | None, alpha: Any = None, beta: Any = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """``params`` plus ``alpha``/``beta`` given by name; an error if one is given both ways."""
    given: dict[str, Any] = {k: v for k, v in (params or {}).items() if v is not None}
    given_as = {k: f"--param {k}" for k in given}
    for name, value in (("alpha", alpha), ("beta", beta)):
        if value is None:
            continue
        if name in given:
            raise BlockmergeError(f"--{name} and --param {name}: give {name} once")
        given[name] = value
        given_as[name] = f"--{name}"
    given_as.setdefault("alpha", "--alpha")
    given_as.setdefault("beta", "--beta")
    given_as.setdefault("base_alpha", "--base-alpha")
    given_as.setdefault("base_beta", "--base-beta")
    return given, given_as


def _arg_name(name: str, given_as: Mapping[str, str]) -> str:
    return given_as.get(name, f"--param {name}")


def resolve_params(
    method: MergeMethod,
    arch: Architecture,
    n_operands: int,
    given: Mapping[str, Any] | None = None,
    *,
    bases: Mapping[str, float | None] | None = None,
    presets: PresetBook | None = None,
    given_as: Mapping[str, str] | None = None,
    where: str = "",
) -> ParamValues:
    """Every parameter of ``method`` for a merge of ``n_operands`` models on ``arch``.

    ``given`` maps parameter names to specs (number, list, preset, readable form, rules, or
    :class:`BlockWeights`); ``bases`` the separately given BASE values (``--base-alpha``);
    ``given_as`` how each name was spelled on the command line (``--alpha``), for messages.
    Raises a one-line error naming the parameter for an unknown or missing parameter, or a value
    outside its range.
    """
    method.check_count(n_operands)
    given = {k: v for k, v in (given or {}).items() if v is not None}
    bases = {k: v for k, v in (bases or {}).items() if v is not None}
    as_ = dict(given_as or {})
    prefix = f"{where}: " if where else ""
    names = method.param_names(n_operands)
    for name in list(given) + list(bases):
        if name not in names:
            try:
                method.lookup(name, n_operands)
            except BlockmergeError as e:
                raise BlockmergeError(f"{prefix}{_arg_name(name, as_)}: {e}") from None
    out: ParamValues = {}
    for name in names:
        p = method.lookup(name, n_operands)
        arg = prefix + _arg_name(name, as_)
        # The BASE value's own name (--base-alpha, a recipe's base_alpha): a bad one is named as given.
        base_arg = prefix + as_.get(f"base_{name}", base_arg_name(_arg_name(name, as_)))
        fill = method.fill_value(name, n_operands)
        if name in given:
            w = parse_weights(given[name], arch, arg=arg, base=bases.get(name),
                              keep_a=math.nan if fill is None else fill, presets=presets, base_arg=base_arg)
            unset = [b for b, v in zip(w.ids, w.values, strict=True) if math.isnan(v)]
            if unset:
                raise WeightSpecError(f"{arg}: {', '.join(unset[:4])}{'...' if len(unset) > 4 else ''} get no value "
                                      f"({method.name}'s {name} has no default: start the spec with one)")
        elif p.default is None:
            flag = as_.get(name, f"--param {name}=SPEC")
            raise BlockmergeError(f"{prefix}{method.name} needs {flag} ({name}: {p.meaning})")
        else:
            w = parse_weights(float(p.default), arch, arg=arg, base=bases.get(name), presets=presets,
                              base_arg=base_arg)
        for b, v in zip(w.ids, w.values, strict=True):
            p.check(v, f"{arg} ({b})")
        for r in w.rules:
            p.check(r.value, f"{arg} (rule {r.text!r})")
        out[name] = w
    return out


def values_for(params: ParamValues, key: str, block: str) -> dict[str, float]:
    """Every parameter's value for one tensor (its block's, or its last matching rule's)."""
    return {name: w.value(key, block) for name, w in params.items()}


def check_rules(params: ParamValues, keys: Iterable[str], block_of: Any, where: str = "") -> None:
    """Every elemental rule must match at least one tensor: a rule that matches nothing is a typo."""
    ks = list(keys)
    blocks = {k: block_of(k) for k in ks}
    for name, w in params.items():
        for r in w.rules:
            if not any(r.matches(k, blocks[k]) for k in ks):
                pre = f"{where}: " if where else ""
                raise WeightSpecError(f"{pre}{name}: elemental rule {r.text!r} matches no tensor of this model")
