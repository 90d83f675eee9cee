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

Below block level, **elemental rules** (supermerger's elemental merge, sd-mecha's per-key
weights) follow the block part after a ``;`` (or on their own lines):
``BLOCKS:ELEMENTS:VALUE``, where BLOCKS is a space-separated list of block ids, ranges and groups
(empty: every block) and ELEMENTS a space-separated list of parts of the tensor's key name
(``attn2``, ``attn1.to_out``; empty: every tensor); either list may start with ``NOT`` to invert
it (``OUT:NOT attn:0.3``; ``OUT:NOT:attn:0.3`` is the same). Several rules are separated by
commas, ``;`` or newlines; they apply after the block values, and the last matching rule wins.
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
class ElementalRule:
    """``BLOCKS:ELEMENTS:VALUE``: the value of tensors in those blocks whose key contains an element."""

    text: str
    blocks: frozenset[str]  # empty: every block
    not_blocks: bool
    parts: tuple[str, ...]  # empty: every tensor
    not_parts: bool
    value: float

    def matches(self, key: str, block: str) -> bool:
        in_blocks = not self.blocks or block in self.blocks
        if self.not_blocks:
            in_blocks = not in_blocks
        if not in_blocks:
            return False
        in_parts = not self.parts or any(p in key for p in self.parts)
        return in_parts != self.not_parts

    def covers(self, block: str) -> bool:
        """Whether the rule can apply to some tensor of ``block`` (its block part matches)."""
        return (not self.blocks or block in self.blocks) != self.not_blocks


@dataclass(frozen=True)
class BlockWeights:
    """One value per block id of an architecture, BASE included, and elemental rules below that."""

    arch: str
    ids: tuple[str, ...]
    values: tuple[float, ...]
    rules: tuple[ElementalRule, ...] = ()

    def __getitem__(self, block: str) -> float:
        return self.values[self.ids.index(block)]

    def value(self, key: str, block: str) -> float:
        """The value tensor ``key`` (of ``block``) gets: the last matching rule's, else its block's."""
        for rule in reversed(self.rules):
            if rule.matches(key, block):
                return rule.value
        return self[block]

    def all_values(self) -> list[float]:
        """Every value this can give (the blocks' and the rules'), for range checks."""
        return [*self.values, *(r.value for r in self.rules)]

    def with_rules(self, rules: Sequence[ElementalRule]) -> BlockWeights:
        return BlockWeights(self.arch, self.ids, self.values, tuple(rules))

    def spec_text(self) -> str:
        """A spec that parses back to exactly these values (BASE-first list, then the rules)."""
        vals = list(self.values)
        if all(v == vals[0] for v in vals):
            head = repr(vals[0])
        else:  # every id named: reads back the same in every family, whatever its list forms
            head = ",".join(f"{i}={v!r}" for i, v in zip(self.ids, vals, strict=True))
        return head + "".join(f"; {r.text}" for r in self.rules)

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


FLOAT32_MAX = 3.4028234663852886e38


def parse_number(text: str, arg: str) -> float:
    """A user's number (a weight, a LoRA strength): finite and within float32, or a one-line error
    naming ``arg`` and the text."""
    return _number(text, arg)


def _number(text: str, arg: str) -> float:
    t = text.strip()
    try:
        v = float(t)
    except ValueError:
        raise WeightSpecError(f"{arg}: {t!r} is not a number") from None
    if not math.isfinite(v):
        raise WeightSpecError(f"{arg}: {t!r} is not a finite number")
    if abs(v) > FLOAT32_MAX:
        raise WeightSpecError(f"{arg}: {t!r} overflows float32 (the merge arithmetic's precision)")
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
    base_arg: str | None = None,
) -> BlockWeights:
    """Turn a user's weight spec into :class:`BlockWeights` for ``arch``.

    ``base`` is the separately given BASE value (``--base-alpha``); ``keep_a`` is the value that keeps
    model A for the method in use, given to blocks (and BASE) that nothing names. ``base_arg`` names
    ``base`` in messages (default: ``arg``'s base form, ``--base-alpha`` or a recipe's ``base_alpha``).
    """
    if base is not None:
        base = _number(str(base), base_arg or base_arg_name(arg))
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
    head, rule_texts = _split_rules(text, arg)
    if not re.sub(r"[,\s]+", "", head):
        head = ""  # commas and spaces alone are no block part either
    if not head and not rule_texts:
        # ';', ',;' or a newline: nothing but separators. Taken as "rules only" this gave every block
        # the value that keeps model A - a merge that silently did nothing.
        raise WeightSpecError(f"{arg}: {text!r} holds no weights (only separators); give a number, a list, "
                              "a preset or ID=VALUE entries")
    book = presets if presets is not None else load_presets()
    if head:
        weights = _parse_block_part(head, arch, arg, base, keep_a, book)
    else:  # rules only: the blocks keep model A (or the parameter's default)
        b = keep_a if base is None else base
        weights = BlockWeights(arch.name, arch.all_ids, (b,) * len(arch.base_ids) + (keep_a,) * arch.n_blocks)
    if rule_texts:
        weights = weights.with_rules([parse_rule(r, arch, arg) for r in rule_texts])
    return weights


def base_arg_name(arg: str) -> str:
    """The name of the separately given BASE value of the parameter ``arg`` names, as the user wrote
    it: ``--alpha`` -> ``--base-alpha``, a recipe's ``...: alpha`` -> ``...: base_alpha``."""
    head, sep, last = arg.rpartition(" ")
    if last.startswith("--"):
        return f"{head}{sep}--base-{last[2:]}"
    return f"{head}{sep}base_{last}"


def _numeric(token: str) -> bool:
    """A number, or a word float() reads as one (nan, inf): never taken for a preset name."""
    return bool(_NUM.match(token)) or token.lower().lstrip("+-") in ("nan", "inf", "infinity")


def _split_rules(text: str, arg: str) -> tuple[str, list[str]]:
    """``BLOCK PART; RULE, RULE`` -> the block part and the rules (parts with a ``:`` are rules)."""
    head: list[str] = []
    rules: list[str] = []
    for part in re.split(r"[;\r\n]", text):  # a line break is \n, \r\n or \r, never \x0b or U+2028
        part = part.strip()
        if not part:
            continue
        if ":" in part:
            for r in (r.strip() for r in part.split(",")):
                if r and ":" not in r:
                    raise WeightSpecError(f"{arg}: {r!r} among elemental rules; put the block part first and "
                                          "separate it from the rules with ';' (e.g. '0.5; IN04-IN08:attn2:0')")
                if r:
                    rules.append(r)
        else:
            head.append(part)
    if len(head) > 1:
        raise WeightSpecError(f"{arg}: {head[1]!r}: only one block part may come before the elemental rules")
    return (head[0] if head else ""), rules


def parse_rule(text: str, arch: Architecture, arg: str) -> ElementalRule:
    """One elemental rule, ``BLOCKS:ELEMENTS:VALUE`` (or ``BLOCKS:NOT:ELEMENTS:VALUE``)."""
    fields = [f.strip() for f in text.split(":")]
    not_blocks = not_parts = False
    if len(fields) == 4 and fields[1].upper() == "NOT":
        fields = [fields[0], "NOT " + fields[2], fields[3]]
    elif len(fields) == 4 and fields[0].upper() == "NOT":
        fields = ["NOT " + fields[1], fields[2], fields[3]]
    if len(fields) != 3:
        raise WeightSpecError(f"{arg}: elemental rule {text!r}: expected BLOCKS:ELEMENTS:VALUE "
                              "(e.g. 'IN04-IN08:attn2:0' or 'OUT:NOT attn:0.3')")
    btoks, ptoks = fields[0].split(), fields[1].split()
    if btoks and btoks[0].upper() == "NOT":
        not_blocks, btoks = True, btoks[1:]
        if not btoks:
            raise WeightSpecError(f"{arg}: elemental rule {text!r}: NOT needs blocks after it")
    if ptoks and ptoks[0].upper() == "NOT":
        not_parts, ptoks = True, ptoks[1:]
        if not ptoks:
            raise WeightSpecError(f"{arg}: elemental rule {text!r}: NOT needs key parts after it")
    blocks: set[str] = set()
    for t in btoks:
        blocks.update(_targets(t, arch, f"{arg}: elemental rule {text!r}"))
    value = _number(fields[2], f"{arg}: elemental rule {text!r}")
    canon = ":".join([" ".join((["NOT"] if not_blocks else []) + btoks),
                      " ".join((["NOT"] if not_parts else []) + ptoks), fields[2].strip()])
    return ElementalRule(canon, frozenset(blocks), not_blocks, tuple(ptoks), not_parts, value)


def _parse_block_part(
    text: str, arch: Architecture, arg: str, base: float | None, keep_a: float, book: PresetBook
) -> BlockWeights:
    tokens = [t for t in re.split(r"[,\s]+", text) if t]
    if "=" not in text:
        if len(tokens) == 1 and not _numeric(tokens[0]):
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
            if _numeric(first)
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
