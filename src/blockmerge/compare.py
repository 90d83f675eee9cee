"""Where two models differ, per component and per block (``blockmerge compare A B [--base C]``).

Before choosing block weights a user wants to see which blocks of A and B actually differ. For each
group (text encoder(s), VAE, and every block of the family's diffusion model, with the same key ->
block rule the merge uses)
the group's tensors are treated as one long vector and we report:

- relative distance ``||A - B|| / ||A||`` (0 = identical; 1 = as large as A itself),
- cosine similarity ``A·B / (||A|| ||B||)``,
- with a base C that both were fine-tuned from: each model's change from it, ``||A - C|| / ||C||``
  and ``||B - C|| / ||C||``, and the cosine between the two changes ``(A-C)·(B-C)`` (near 1: they
  pull the same way, so adding both differences doubles one direction; near 0: independent
  changes that merge without interfering; negative: they undo each other),

plus the tensors that change most. It streams like the merge engine: one key at a time per worker
thread, read by positioned reads, reduced in chunks of a million elements to a handful of float64
sums, so memory stays at a few tensors whatever the model size, and the numbers do not depend on
thread timing (each key's sums are computed alone and added up in key order).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .architectures import BASE, Architecture, Layout, by_name
from .errors import BlockmergeError
from .experiments.heatmap import u_heatmap_svg
from .merge.executor import worker_pool
from .merge.nodes import FileSource, is_weight

CHUNK = 1 << 20
METRICS = {
    # name: (GroupStats field, title, higher value means more difference)
    "distance": ("rel_distance", "‖A−B‖ / ‖A‖", True),
    "cosine": ("cosine", "cos(A, B)", False),
    "change_a": ("change_a", "‖A−C‖ / ‖C‖", True),
    "change_b": ("change_b", "‖B−C‖ / ‖C‖", True),
    "change_cosine": ("change_cosine", "cos(A−C, B−C)", False),
}
_SUMS = ("aa", "bb", "ab", "dd", "cc", "xa", "xb", "xab")


@dataclass
class GroupStats:
    """One component or block: its size and how A and B (and their changes from C) differ."""

    group: str
    tensors: int = 0
    parameters: int = 0
    rel_distance: float = math.nan
    cosine: float = math.nan
    change_a: float | None = None
    change_b: float | None = None
    change_cosine: float | None = None
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_SUMS, 0.0), repr=False)


@dataclass(frozen=True)
class TensorChange:
    key: str
    group: str
    parameters: int
    rel_distance: float
    cosine: float


@dataclass
class CompareResult:
    a: str
    b: str
    base: str | None
    architecture: str
    block_ids: tuple[str, ...]
    groups: list[GroupStats]
    top: list[TensorChange]
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)

    def group(self, name: str) -> GroupStats:
        for g in self.groups:
            if g.group == name:
                return g
        raise KeyError(name)

    def values(self, metric: str = "distance") -> tuple[dict[str, float], dict[str, float]]:
        """(per-block values, per-component values) of one metric, for a heat map."""
        if metric not in METRICS:
            raise BlockmergeError(f"--metric {metric}: choose from {', '.join(METRICS)}")
        attr = METRICS[metric][0]
        if attr.startswith("change") and self.base is None:
            raise BlockmergeError(f"--metric {metric} needs --base C")
        blocks, comps = {}, {}
        for g in self.groups:
            v = getattr(g, attr)
            (blocks if g.group in self.block_ids else comps)[g.group] = math.nan if v is None else float(v)
        return blocks, comps

    def to_json(self) -> dict[str, Any]:
        """Plain data (non-finite numbers as null, since JSON has none)."""
        def clean(d: dict[str, Any]) -> dict[str, Any]:
            return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in d.items() if k != "sums"}

        return {
            "a": self.a, "b": self.b, "base": self.base, "architecture": self.architecture,
            "groups": [clean(asdict(g)) for g in self.groups],
            "top": [clean(asdict(t)) for t in self.top],
            "only_in_a": self.only_in_a, "only_in_b": self.only_in_b, "shape_mismatch": self.shape_mismatch,
        }


def _key_sums(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None) -> dict[str, float]:
    """The dot products of one tensor pair (triple), chunked so temporaries stay small."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    fc = c.reshape(-1) if c is not None else None
    s = dict.fromkeys(_SUMS, 0.0)
    for i in range(0, fa.numel(), CHUNK):
        x = fa[i : i + CHUNK].to(torch.float32)
        y = fb[i : i + CHUNK].to(torch.float32)
        d = x - y
        s["aa"] += float(torch.dot(x, x))
        s["bb"] += float(torch.dot(y, y))
        s["ab"] += float(torch.dot(x, y))
        s["dd"] += float(torch.dot(d, d))
        if fc is not None:
            z = fc[i : i + CHUNK].to(torch.float32)
            xa, xb = x - z, y - z  # not in place: x may be a view of a float32 input
            s["cc"] += float(torch.dot(z, z))
            s["xa"] += float(torch.dot(xa, xa))
            s["xb"] += float(torch.dot(xb, xb))
            s["xab"] += float(torch.dot(xa, xb))
    return s


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return math.sqrt(num) / math.sqrt(den)
    return 0.0 if num == 0 else math.inf


def _cos(ab: float, aa: float, bb: float) -> float:
    if aa <= 0 or bb <= 0:
        return math.nan
    return max(-1.0, min(1.0, ab / math.sqrt(aa * bb)))


def _group_of(arch: Architecture, key: str) -> str:
    b = arch.block_of(key)
    return arch.component_of(key) if b == BASE else b


def compare(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    base: str | os.PathLike[str] | None = None,
    *,
    top: int = 10,
    threads: int = 2,
    progress: bool = False,
) -> CompareResult:
    """Compare two checkpoints (and optionally their changes from a common base), streaming."""
    with contextlib.ExitStack() as stack:
        srcs: list[FileSource] = []
        for p in [a, b] + ([base] if base is not None else []):
            s = FileSource(p)
            stack.callback(s.close)
            srcs.append(s)
        sa, sb = srcs[0], srcs[1]
        sc = srcs[2] if base is not None else None
        arch = sa.arch
        for s in srcs[1:]:
            if s.arch is not arch:
                raise BlockmergeError(f"{s.path}: is {s.arch.title} but {sa.path} is {arch.title}; "
                                      "models of different architectures cannot be compared")
        b_keys, c_keys = set(sb.keys()), set(sc.keys()) if sc else None
        keys: list[str] = []
        mismatch: list[str] = []
        for k in sorted(sa.keys()):
            ia = sa.info(k)
            if not is_weight(k, ia.dtype) or k not in b_keys or (c_keys is not None and k not in c_keys):
                continue
            shapes = [sb.info(k).shape] + ([sc.info(k).shape] if sc else [])
            if any(s != ia.shape for s in shapes):
                mismatch.append(k)
                continue
            keys.append(k)

        def job(k: str) -> dict[str, float]:
            return _key_sums(sa.get(k), sb.get(k), sc.get(k) if sc else None)

        # map() yields in key order, so the float sums below are added in one fixed order.
        bar = tqdm(total=len(keys), desc="compare", unit="tensor", disable=not progress, file=sys.stderr,
                   leave=False)
        groups: dict[str, GroupStats] = {}
        per_key: list[TensorChange] = []
        with worker_pool(threads, "compare") as pool:
            results = pool.map(job, keys) if threads > 1 else map(job, keys)
            for k, s in zip(keys, results, strict=True):
                g = _group_of(arch, k)
                gs = groups.setdefault(g, GroupStats(g))
                n = math.prod(sa.info(k).shape)
                gs.tensors += 1
                gs.parameters += n
                for name, v in s.items():
                    gs.sums[name] += v
                per_key.append(TensorChange(k, g, n, _ratio(s["dd"], s["aa"]), _cos(s["ab"], s["aa"], s["bb"])))
                bar.update()
        bar.close()
        only_a = sorted(set(sa.keys()) - b_keys)
        only_b = sorted(b_keys - set(sa.keys()))
    for gs in groups.values():
        m = gs.sums
        gs.rel_distance = _ratio(m["dd"], m["aa"])
        gs.cosine = _cos(m["ab"], m["aa"], m["bb"])
        if base is not None:
            gs.change_a = _ratio(m["xa"], m["cc"])
            gs.change_b = _ratio(m["xb"], m["cc"])
            gs.change_cosine = _cos(m["xab"], m["xa"], m["xb"])
    comp_order = [c.name for c in arch.components]
    order = comp_order + sorted(g for g in groups if g not in comp_order and g not in arch.block_ids) + list(
        arch.block_ids)
    ordered = [groups[g] for g in order if g in groups]
    ranked = sorted(per_key, key=lambda t: (-t.rel_distance if not math.isnan(t.rel_distance) else math.inf, t.key))
    return CompareResult(str(a), str(b), str(base) if base is not None else None, arch.name, arch.block_ids,
                         ordered, ranked[: max(0, top)], only_a, only_b, mismatch)


def _f(v: float | None, width: int = 10) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'-':>{width}}"
    if math.isinf(v):
        return f"{'inf':>{width}}"
    return f"{v:>{width}.4g}" if abs(v) < 1e4 else f"{v:>{width}.3e}"


def format_table(r: CompareResult) -> str:
    """The terminal table: one row per component and block, then the most changed tensors."""
    lines = [f"A: {r.a}", f"B: {r.b}"] + ([f"C (base): {r.base}"] if r.base else [])
    lines.append(f"architecture: {r.architecture}, {sum(g.tensors for g in r.groups)} tensors compared")
    head = f"{'group':<7} {'tensors':>7} {'parameters':>13} {'|A-B|/|A|':>10} {'cos(A,B)':>10}"
    if r.base:
        head += f" {'|A-C|/|C|':>10} {'|B-C|/|C|':>10} {'cos(dA,dB)':>10}"
    lines += ["", head]
    for g in r.groups:
        row = f"{g.group:<7} {g.tensors:>7} {g.parameters:>13,} {_f(g.rel_distance)} {_f(g.cosine)}"
        if r.base:
            row += f" {_f(g.change_a)} {_f(g.change_b)} {_f(g.change_cosine)}"
        lines.append(row)
    if r.top:
        lines += ["", "largest changes (||A-B|| / ||A|| per tensor):"]
        for t in r.top:
            lines.append(f"  {_f(t.rel_distance)}  {t.group:<6} {t.key}")
    notes = []
    if r.only_in_a:
        notes.append(f"{len(r.only_in_a)} tensors only in A (e.g. {r.only_in_a[0]})")
    if r.only_in_b:
        notes.append(f"{len(r.only_in_b)} tensors only in B (e.g. {r.only_in_b[0]})")
    if r.shape_mismatch:
        notes.append(f"{len(r.shape_mismatch)} tensors of different shapes skipped (e.g. {r.shape_mismatch[0]})")
    if notes:
        lines += [""] + [f"note: {n}" for n in notes]
    return "\n".join(lines) + "\n"


def heatmap_svg(r: CompareResult, metric: str = "distance", title: str | None = None) -> str:
    """The heat map of one metric in the family's layout (the U for U-Nets, execution order for
    transformer stacks; the sweep report's layout), components in the top row."""
    blocks, comps = r.values(metric)
    _, label, higher = METRICS[metric]
    pair = f"{Path(r.a).stem} vs {Path(r.b).stem}"
    # the map is ~380 px wide: the file names only where they fit beside the metric
    name = title or (f"{label}: {pair}" if len(pair) + len(label) <= 44 else label)
    return u_heatmap_svg(r.block_ids, blocks, name, extra=comps, higher_is_more=higher, layout=_layout(r.architecture))


def _layout(name: str) -> Layout | None:
    try:
        return by_name(name).layout
    except KeyError:  # a result of a family no longer registered: U-Net ids still draw as the U
        return None


def compare_json_text(r: CompareResult) -> str:
    import json

    return json.dumps(r.to_json(), indent=2) + "\n"

