"""Block-weight specifications: parse what users write into one value per block (and BASE).

Accepted forms (``ARG`` is ``--alpha`` or ``--beta``):

- one number: every block and BASE (unless ``--base-alpha`` sets BASE);
- a plain list in one of the family's list forms (:attr:`Architecture.list_forms`): SD1/SD2 25
  numbers (SDXL 19) in block order IN00..IN11, M00, OUT00..OUT11 with BASE from ``--base-alpha``
  or "keep A", or 26 (20) with BASE first as supermerger writes them (then ``--base-alpha`` is an
  error); Flux also 61 (CLIP, T5, IN, D00..D18, S00..S37, OUT), as supermerger and LoRA Block
  Weight write them;
- a preset name (Merge Block Weighted presets or a user preset file);
- a readable form: an optional default (number or preset) followed by ``ID=VALUE`` entries, where
  ID is a block (``IN04``), a range (``IN04-IN08``), a group of the family (``IN``, ``OUT``, ``M``;
  Flux ``D``, ``S``; ``ALL``), ``BASE`` (everything outside the diffusion model) or a weighted
  component (Flux ``CLIP``, ``T5``); e.g. ``IN04-IN08=0.5,M00=1`` or ``GRAD_V,OUT=0``. Blocks not
  named take the default, or, without one, the value that keeps model A.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..architectures import BASE, Architecture, families_for_list_length
from ..errors import WeightSpecError
from .presets import PresetBook, load_presets


@dataclass(frozen=True)
class BlockWeights:
    """One value per block id of an architecture, BASE included."""

    arch: str
    ids: tuple[str, ...]
    values: tuple[float, ...]

    def __getitem__(self, block: str) -> float:
        return self.values[self.ids.index(block)]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.ids, self.values, strict=True))

    def blocks_list(self) -> list[float]:
        """The values without BASE, in block order (the 25 / 19 list)."""
        return [v for i, v in zip(self.ids, self.values, strict=True) if i != BASE]

    @classmethod
    def uniform(cls, arch: Architecture, value: float) -> BlockWeights:
        return cls(arch.name, arch.all_ids, tuple(float(value) for _ in arch.all_ids))

    @classmethod
    def from_mapping(cls, arch: Architecture, values: Mapping[str, float]) -> BlockWeights:
        missing = [b for b in arch.all_ids if b not in values]
        if missing:
            raise WeightSpecError(f"weights for {arch.name} miss {', '.join(missing)}")
        return cls(arch.name, arch.all_ids, tuple(float(values[b]) for b in arch.all_ids))


_NUM = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_ID = re.compile(r"^([A-Z]+)(\d{1,2})$")


def _number(text: str, arg: str) -> float:
    t = text.strip()
    try:
        v = float(t)
    except ValueError:
        raise WeightSpecError(f"{arg}: {t!r} is not a number") from None
    if not math.isfinite(v):
        raise WeightSpecError(f"{arg}: {t!r} is not a finite number")
    return v


def _norm_id(token: str, arch: Architecture, arg: str) -> str:
    t = token.strip().upper()
    if t in arch.all_ids:
        return t
    m = _ID.match(t)
    if m:
        kind, num = m.group(1), int(m.group(2))
        bid = f"{arch.id_aliases.get(kind, kind)}{num:02d}"
        if bid in arch.all_ids:
            return bid
    raise WeightSpecError(
        f"{arg}: unknown block {token.strip()!r} for {arch.name} "
        f"(blocks: {arch.block_ids[0]}..{arch.block_ids[-1]}, {', '.join(arch.base_ids)})"
    )


def _targets(lhs: str, arch: Architecture, arg: str) -> list[str]:
    t = lhs.strip().upper()
    groups = {**{k: list(v) for k, v in arch.groups.items()}, "ALL": list(arch.block_ids), "*": list(arch.block_ids)}
    if t in groups:
        return groups[t]
    if t == BASE:  # BASE is everything outside the diffusion model, weighted components included
        return list(arch.base_ids)
    if "-" in t:
        lo, hi = (_norm_id(x, arch, arg) for x in t.split("-", 1))
        ids = list(arch.block_ids)
        if lo not in ids or hi not in ids or ids.index(hi) < ids.index(lo):
            eg = f"{ids[min(4, len(ids) - 2)]}-{ids[min(8, len(ids) - 1)]}"
            raise WeightSpecError(f"{arg}: range {lhs.strip()!r} must go forward through the blocks (e.g. {eg})")
        return ids[ids.index(lo) : ids.index(hi) + 1]
    return [_norm_id(t, arch, arg)]


def _lengths(arch: Architecture) -> str:
    forms = [f"{f.length} ({f.label})" for f in arch.list_forms]
    return ", ".join(["1", *forms[:-1]]) + " or " + forms[-1]


def _from_list(
    values: Sequence[float], arch: Architecture, arg: str, base: float | None, keep_a: float, what: str
) -> BlockWeights:
    form = arch.list_form(len(values))
    if form is None:
        raise WeightSpecError(f"{arg}: {what} has {len(values)} values; {arch.name} needs {_lengths(arch)}")
    if BASE in form.ids and base is not None:
        raise WeightSpecError(
            f"{arg}: {what} has {form.length} values with BASE first; do not also give the base value separately"
        )
    given = dict(zip(form.ids, values, strict=True))
    fill = keep_a if base is None else base
    # The BASE group: ids the form leaves out follow BASE when the form has it, else the fill value.
    group = given.get(BASE, fill)
    return BlockWeights(
        arch.name, arch.all_ids,
        tuple(float(given.get(i, group if i in arch.base_ids else fill)) for i in arch.all_ids),
    )


def parse_weights(
    spec: str | float | Sequence[float] | BlockWeights,
    arch: Architecture,
    *,
    arg: str = "--alpha",
    base: float | None = None,
    keep_a: float = 0.0,
    presets: PresetBook | None = None,
) -> BlockWeights:
    """Turn a user's weight spec into :class:`BlockWeights` for ``arch``.

    ``base`` is the separately given BASE value (``--base-alpha``); ``keep_a`` is the value that keeps
    model A for the method in use, given to blocks (and BASE) that nothing names.
    """
    if base is not None:
        base = _number(str(base), arg.replace("--", "--base-"))
    if isinstance(spec, BlockWeights):
        if spec.arch != arch.name:
            raise WeightSpecError(f"{arg}: weights are for {spec.arch}, the models are {arch.name}")
        return spec
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        v = _number(str(spec), arg)
        b = v if base is None else base
        return BlockWeights(arch.name, arch.all_ids, (b,) * len(arch.base_ids) + (v,) * arch.n_blocks)
    if not isinstance(spec, str):
        vals = [_number(str(x), arg) for x in spec]
        if len(vals) == 1:
            return parse_weights(vals[0], arch, arg=arg, base=base, keep_a=keep_a, presets=presets)
        return _from_list(vals, arch, arg, base, keep_a, "the list")
    text = spec.strip()
    if not text:
        raise WeightSpecError(f"{arg}: empty weight specification")
    book = presets if presets is not None else load_presets()
    tokens = [t for t in re.split(r"[,\s]+", text) if t]
    if "=" not in text:
        if len(tokens) == 1 and not _NUM.match(tokens[0]):
            return _preset(tokens[0], arch, arg, base, keep_a, book)
        vals = [_number(t, arg) for t in tokens]
        if len(vals) == 1:
            return parse_weights(vals[0], arch, arg=arg, base=base, keep_a=keep_a, presets=book)
        return _from_list(vals, arch, arg, base, keep_a, "the list")
    # Readable form.
    default: BlockWeights | None = None
    rest = tokens
    if "=" not in tokens[0]:
        first = tokens[0]
        default = (
            parse_weights(_number(first, arg), arch, arg=arg, base=base, keep_a=keep_a, presets=book)
            if _NUM.match(first) or first.lower() in ("nan", "inf", "-inf")
            else _preset(first, arch, arg, base, keep_a, book)
        )
        rest = tokens[1:]
    values = default.as_dict() if default else {b: keep_a for b in arch.all_ids}
    if default is None and base is not None:
        values.update(dict.fromkeys(arch.base_ids, base))
    for tok in rest:
        if "=" not in tok:
            raise WeightSpecError(f"{arg}: {tok!r}: expected ID=VALUE (only the first item may be a default)")
        lhs, rhs = tok.split("=", 1)
        v = _number(rhs, arg)
        if lhs.strip().upper() == BASE and base is not None:
            raise WeightSpecError(f"{arg}: BASE is given both in the spec and separately")
        for b in _targets(lhs, arch, arg):
            values[b] = v
    return BlockWeights.from_mapping(arch, values)


def _preset(
    name: str, arch: Architecture, arg: str, base: float | None, keep_a: float, book: PresetBook
) -> BlockWeights:
    p = book.get(name)
    if p is None:
        raise WeightSpecError(f"{arg}: unknown preset {name!r} (see `blockmerge presets`)")
    if arch.list_form(len(p.values)) is None:
        fits = "/".join(a.name for a in families_for_list_length(len(p.values))) or "no known family"
        need = " or ".join(str(f.length) for f in arch.list_forms)
        raise WeightSpecError(
            f"{arg}: preset {p.name} has {len(p.values)} values and is not for {arch.name} "
            f"(needs {need}); it is for {fits}"
        )
    return _from_list(list(p.values), arch, arg, base, keep_a, f"preset {p.name}")
