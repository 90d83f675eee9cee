"""A merge as sliders hold it: one value per block (and BASE) for every parameter of a method.

The front end keeps a :class:`MergeSettings`; everything that reads it goes through the same
library paths the command line uses. :meth:`MergeSettings.specs` writes each parameter as the
BASE-first list (plus elemental rules) that ``blockmerge merge --param NAME=SPEC`` takes, and
:meth:`MergeSettings.resolve` is :func:`~blockmerge.merge.params.resolve_params` on those specs,
so a merge from the sliders, a preview and the equivalent command line get the same values, the
same range checks and the same one-line errors.

The text box of Merge Block Weighted holds the block values only (25 for SD1/SD2, 19 for SDXL;
BASE has its own slider); :func:`read_blocks_text` also takes the BASE-first list supermerger
writes (26 / 20), a preset name or a readable spec (``IN04-IN08=0.5``), and edits the values the
sliders hold, so pasting from either tool works.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..architectures import Architecture
from ..errors import BlockmergeError, WeightSpecError
from ..merge.declare import MergeMethod
from ..merge.methods import get_method
from ..merge.params import ParamValues, resolve_params
from ..merge.presets import PresetBook, load_presets
from ..merge.weights import parse_weights

__all__ = [
    "MergeSettings",
    "SliderParam",
    "fmt_value",
    "format_blocks",
    "initial_settings",
    "read_blocks_text",
    "settings_from_record",
    "slider_params",
    "slider_range",
]


def fmt_value(v: float) -> str:
    """The shortest text that reads back as exactly ``v`` (``1`` rather than ``1.0``)."""
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


@dataclass(frozen=True)
class SliderParam:
    """How one parameter of a method is shown: its range, its step and what it means."""

    name: str
    meaning: str
    lo: float
    hi: float
    step: float
    kind: str
    fill: float  # the value blocks start at (keeps model A where the method has such a value)


def _finite(x: float, fallback: float) -> float:
    return x if math.isfinite(x) else fallback


def slider_params(method: str | MergeMethod, n_operands: int) -> list[SliderParam]:
    """Every parameter a merge of ``n_operands`` models with ``method`` takes, as sliders.

    Unbounded ranges are shown as 0..1 (the range MBW users know); values typed beyond it widen
    the slider (:func:`slider_range`), the method's own range is what is checked.
    """
    m = method if isinstance(method, MergeMethod) else get_method(method)
    out = []
    for name in m.param_names(n_operands):
        p = m.lookup(name, n_operands)
        fill = m.fill_value(name, n_operands)
        fill = 0.0 if fill is None else fill
        if p.kind == "bool":
            lo, hi, step = 0.0, 1.0, 1.0
        elif p.kind == "int":
            lo, hi, step = _finite(p.lo, 0.0), min(_finite(p.hi, 1000.0), 2.0**31 - 1), 1.0
        else:
            lo, hi, step = _finite(p.lo, 0.0), _finite(p.hi, 1.0), 0.001
        out.append(SliderParam(name, p.meaning, lo, hi, step, p.kind, fill))
    return out


def slider_range(param: SliderParam, values: Sequence[float]) -> tuple[float, float]:
    """The slider's range for these values: the parameter's range, widened to show every value."""
    return min(param.lo, *values), max(param.hi, *values)


@dataclass(frozen=True)
class MergeSettings:
    """A method, its operands (model names, in operand order), and per parameter one value per id of
    the architecture (BASE first, then the blocks) plus elemental rules text."""

    method: str
    models: tuple[str, ...]
    architecture: str
    values: Mapping[str, tuple[float, ...]]
    rules: Mapping[str, str] = field(default_factory=dict)
    dtype: str = "fp16"
    clamp: bool = False  # clip the result to the models' per-element range (merge --clamp)

    def specs(self) -> dict[str, str]:
        """Each parameter as the weight spec ``--param NAME=SPEC`` takes (BASE-first list; rules)."""
        out = {}
        for name, vals in self.values.items():
            spec = ",".join(fmt_value(v) for v in vals)
            rules = (self.rules.get(name) or "").strip()
            if rules:
                spec += "; " + rules
            out[name] = spec
        return out

    def resolve(self, arch: Architecture, presets: PresetBook | None = None) -> ParamValues:
        """Every parameter's per-block values and rules, checked as ``blockmerge merge`` checks them."""
        if arch.name != self.architecture:
            raise BlockmergeError(f"the sliders are for {self.architecture}, the models are {arch.name}")
        return resolve_params(get_method(self.method), arch, len(self.models), self.specs(),
                              presets=presets, given_as={n: n for n in self.values})

    def with_value(self, param: str, block: str, value: float, arch: Architecture) -> MergeSettings:
        """One slider moved."""
        vals = list(self._values(param))
        vals[list(arch.all_ids).index(block)] = float(value)
        return replace(self, values={**self.values, param: tuple(vals)})

    def with_values(self, param: str, values: Sequence[float]) -> MergeSettings:
        return replace(self, values={**self.values, param: tuple(float(v) for v in values)})

    def with_rules(self, param: str, rules: str) -> MergeSettings:
        return replace(self, rules={**self.rules, param: rules.strip()})

    def _values(self, param: str) -> tuple[float, ...]:
        if param not in self.values:
            raise BlockmergeError(f"{self.method} has no parameter {param!r} (its parameters: {', '.join(self.values)})")
        return self.values[param]

    def command_line(self, paths: Sequence[str], output: str) -> str:
        """The ``blockmerge merge`` command that writes the same file (byte for byte, from the same files)."""
        args = ["blockmerge", "merge", *paths, "-o", output, "--method", self.method]
        for name, spec in self.specs().items():
            args += ["--param", f"{name}={spec}"]
        args += ["--dtype", self.dtype]
        if self.clamp:
            args.append("--clamp")
        return " ".join(shlex.quote(a) for a in args)


def initial_settings(method: str, models: Sequence[str], arch: Architecture, dtype: str = "fp16",
                     previous: MergeSettings | None = None) -> MergeSettings:
    """Sliders for ``method`` on ``models``: each parameter at the value that keeps model A (or the
    method's default); values of parameters that ``previous`` had too are carried over (switching
    weighted_sum -> slerp keeps α's 26 values)."""
    m = get_method(method)
    m.check_count(len(models), "models")
    values = {}
    for sp in slider_params(m, len(models)):
        if previous is not None and previous.architecture == arch.name and sp.name in previous.values:
            values[sp.name] = tuple(previous.values[sp.name])
        else:
            values[sp.name] = (sp.fill,) * len(arch.all_ids)
    rules = {n: r for n, r in (previous.rules.items() if previous is not None else ()) if n in values}
    clamp = previous.clamp if previous is not None else False
    return MergeSettings(m.name, tuple(models), arch.name, values, rules, dtype, clamp)


def format_blocks(values: Sequence[float], arch: Architecture) -> str:
    """The block values as Merge Block Weighted's text box holds them: 25 (SDXL 19) numbers, no BASE."""
    ids = list(arch.all_ids)
    return ",".join(fmt_value(values[ids.index(b)]) for b in arch.block_ids)


def read_blocks_text(text: str, arch: Architecture, current: Sequence[float], *, param: str = "alpha",
                     presets: PresetBook | None = None) -> tuple[tuple[float, ...], str]:
    """The slider values after the text box was edited, and any elemental rules it held.

    Accepts the block list (25 / 19: BASE keeps its slider), the BASE-first list (26 / 20: sets
    BASE too), one number (every block), a preset, or a readable spec (``IN04-IN08=0.5``: the
    named blocks change, the others keep their values). Bad text is a one-line error naming
    ``param``; nothing changes then.
    """
    t = (text or "").strip()
    if not t:
        raise WeightSpecError(f"{param}: the text box is empty (give {arch.n_blocks} values, a preset or IN04=0.5)")
    book = presets if presets is not None else load_presets()
    ids = list(arch.all_ids)
    # NaN marks what the text leaves alone: it keeps the slider's value.
    w = parse_weights(t, arch, arg=param, keep_a=math.nan, presets=book)
    head = re.split(r"[;\n]", t, maxsplit=1)[0].strip()
    one_number = ":" not in head and _is_number(head)
    new = [current[i] if math.isnan(x) or (one_number and b in arch.base_ids) else x
           for i, (b, x) in enumerate(zip(ids, w.values, strict=True))]
    rules = ", ".join(r.text for r in w.rules)
    return tuple(new), rules


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def blocks_of(settings: MergeSettings, param: str, arch: Architecture) -> dict[str, float]:
    """``{id: value}`` of one parameter (BASE first), for tables and tests."""
    return dict(zip(arch.all_ids, settings.values[param], strict=True))


def settings_from_record(params: Mapping[str, Mapping[str, float]], rules: Mapping[str, Sequence[str]],
                         method: str, models: Sequence[str], arch: Architecture, dtype: str,
                         clamp: bool = False) -> MergeSettings:
    """Settings back from a record (a history entry, a merged file's blockmerge record)."""
    values = {}
    for name, per_block in params.items():
        missing = [b for b in arch.all_ids if b not in per_block]
        if missing:
            raise BlockmergeError(f"record of {name}: no value for {', '.join(missing[:4])}")
        values[name] = tuple(float(per_block[b]) for b in arch.all_ids)
    rtext = {n: ", ".join(r) for n, r in rules.items()}
    s = MergeSettings(method, tuple(models), arch.name, values, rtext, dtype, bool(clamp))
    s.resolve(arch)  # a record that does not fit the method is an error here, not at merge time
    return s
