"""A family's blocks drawn in its layout, and a heat map of one number per block as SVG.

Positions come from the family description (:attr:`Architecture.layout`, built by
:mod:`blockmerge.architectures.layout`): for U-Nets the article's U (IN00 at the top of the left
arm going down, the middle block at the bottom, OUT00 at the bottom of the right arm going up to
the last OUT block), for transformer stacks the blocks in execution order, column after column.
Row 1 is for whatever is not a block (the baseline image in the report; BASE / text encoder / VAE
values in a heat map). The HTML report and ``compare`` use the same positions, so the picture
means the same everywhere.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape as _escape
from xml.sax.saxutils import quoteattr as _quoteattr

from ..architectures import Layout
from ..architectures.layout import u_layout
from ..errors import BlockmergeError

# Characters XML 1.0 forbids even as references (C0 controls but tab/newline/CR, lone surrogates, FFFE/FFFF).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def escape(text: str) -> str:
    """Text for an SVG text node: markup escaped, and characters XML cannot hold at all replaced by U+FFFD
    (a model name with a control character must not make the file unreadable)."""
    return _escape(_NOT_XML.sub("\ufffd", str(text)))


def quoteattr(text: str) -> str:
    """A quoted SVG attribute value, with the same replacement as :func:`escape`."""
    return _quoteattr(_NOT_XML.sub("\ufffd", str(text)))


# ColorBrewer OrRd (light -> dark): "more change" reads as darker and warmer.
PALETTE: tuple[tuple[int, int, int], ...] = ((255, 247, 236), (253, 212, 158), (252, 141, 89), (215, 48, 31), (127, 0, 0))
NO_DATA = "#dddddd"
# Marks the SVG as blockmerge's own output, so re-rendering a report may replace it without --overwrite.
GENERATOR = "blockmerge heat map"


def u_positions(block_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(row, column), 1-based, for each U-Net block id in a 3-column grid; row 1 is left for the top cell.

    IN<i> -> (2 + i, 1); M<k> -> (bottom + k, 2); OUT<j> -> (bottom - 1 - j, 3), where bottom is
    2 + the longer arm, so IN00 and the last OUT block share the top row of the arms.
    """
    try:
        return dict(u_layout(block_ids).positions)
    except ValueError as e:
        raise BlockmergeError(str(e)) from None


def layout_positions(block_ids: Sequence[str], layout: Layout | None) -> tuple[dict[str, tuple[int, int]], int]:
    """Positions and column count for ``block_ids``: the family's layout, or the U for U-Net ids."""
    if layout is None:
        return u_positions(block_ids), 3
    missing = [b for b in block_ids if b not in layout.positions]
    if missing:
        raise BlockmergeError(f"block ids {missing} have no place in the {layout.kind} layout")
    return {b: layout.positions[b] for b in block_ids}, layout.columns


def colour_for(t: float) -> str:
    """Hex colour for t in [0, 1] on :data:`PALETTE` (NaN -> grey "no data")."""
    if math.isnan(t):
        return NO_DATA
    t = min(1.0, max(0.0, t))
    x = t * (len(PALETTE) - 1)
    i = min(int(x), len(PALETTE) - 2)
    f = x - i
    c = [round(a + (b - a) * f) for a, b in zip(PALETTE[i], PALETTE[i + 1], strict=True)]
    return "#{:02x}{:02x}{:02x}".format(*c)


def text_colour_for(t: float) -> str:
    return "#ffffff" if not math.isnan(t) and t > 0.62 else "#000000"


def normalise(values: Mapping[str, float], higher_is_more: bool = True) -> dict[str, float]:
    """Each value as t in [0, 1]: 0 = least change among them, 1 = most; NaN stays NaN.

    Infinite values (PSNR of an unchanged image) are the extreme they say they are and do not
    stretch the scale of the finite ones.
    """
    finite = [v for v in values.values() if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    out: dict[str, float] = {}
    for k, v in values.items():
        if math.isnan(v):
            out[k] = math.nan
            continue
        if math.isinf(v):
            t = 1.0 if v > 0 else 0.0
        else:
            t = (v - lo) / (hi - lo) if hi > lo else 0.0
        out[k] = t if higher_is_more else 1.0 - t
    return out


def format_value(v: float) -> str:
    """Short text for a number: three significant digits, ∞ and – for inf and NaN."""
    if math.isnan(v):
        return "–"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    a = abs(v)
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def u_heatmap_svg(
    block_ids: Sequence[str],
    values: Mapping[str, float],
    title: str,
    *,
    extra: Mapping[str, float] | None = None,
    higher_is_more: bool = True,
    unit: str = "",
    layout: Layout | None = None,
) -> str:
    """An SVG document: one coloured ``<rect data-block=...>`` per block in its place, with its value.

    ``values`` maps block ids to numbers (missing -> grey "no data"); ``extra`` adds cells in
    the top row for BASE or components (``{"BASE": ..., "TE": ..., "VAE": ...}``), coloured on
    the same scale. ``higher_is_more`` says which end is dark (False for PSNR / SSIM, where a
    lower value is the bigger change). ``layout`` is the family's (default: the U of U-Net ids);
    a stack layout says under the title how to read it.
    """
    extra = dict(extra or {})
    pos, n_cols = layout_positions(block_ids, layout)
    allv = {b: float(values.get(b, math.nan)) for b in block_ids}
    allv.update({f"extra:{k}": float(v) for k, v in extra.items()})
    ts = normalise(allv, higher_is_more)
    cw, ch, gap, mx = 118, 34, 6, 10
    stack = layout is not None and layout.kind != "u"
    top = 58 if stack else 40
    skip = 0 if extra else 1  # without extras the top row is not drawn
    n_rows = max(r for r, _ in pos.values()) - skip
    width = 2 * mx + n_cols * cw + (n_cols - 1) * gap
    legend_y = top + n_rows * (ch + gap) + 8
    height = legend_y + 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12" data-generator="{GENERATOR}">',
        f"<title>{escape(title)}</title>",
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    if stack:
        out.append(f'<text class="layout-note" x="{width / 2}" y="40" text-anchor="middle" fill="#555">'
                   f"{escape(layout.note)}</text>")

    def cell(x: float, y: float, w: float, key: str, label: str, attr: str) -> None:
        v, t = allv[key], ts[key]
        txt = format_value(v) + (f" {unit}" if unit and math.isfinite(v) else "")
        out.append(
            f'<rect {attr} x="{x}" y="{y}" width="{w}" height="{ch}" rx="4" fill="{colour_for(t)}" '
            f'stroke="#888" stroke-width="0.5"><title>{escape(label)}: {escape(txt)}</title></rect>'
        )
        out.append(
            f'<text x="{x + w / 2}" y="{y + ch / 2 + 4}" text-anchor="middle" fill="{text_colour_for(t)}">'
            f"<tspan font-weight=\"bold\">{escape(label)}</tspan> {escape(txt)}</text>"
        )

    for b in block_ids:
        r, c = pos[b]
        cell(mx + (c - 1) * (cw + gap), top + (r - 1 - skip) * (ch + gap), cw, b, b, f"data-block={quoteattr(b)}")
    if extra:
        w = (width - 2 * mx - (len(extra) - 1) * gap) / len(extra)
        for i, k in enumerate(extra):
            cell(mx + i * (w + gap), top, w, f"extra:{k}", k, f"data-extra={quoteattr(k)}")
    finite = [v for v in allv.values() if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        left, right = (lo, hi) if higher_is_more else (hi, lo)
        out.append('<defs><linearGradient id="ramp">')
        for i, rgb in enumerate(PALETTE):
            out.append(f'<stop offset="{i / (len(PALETTE) - 1):.2f}" stop-color="rgb{rgb}"/>')
        out.append("</linearGradient></defs>")
        lw = width - 2 * mx - 120
        out.append(f'<rect class="legend" x="{mx + 60}" y="{legend_y}" width="{lw}" height="10" fill="url(#ramp)"/>')
        out.append(f'<text x="{mx + 55}" y="{legend_y + 9}" text-anchor="end">{escape(format_value(left))}</text>')
        out.append(f'<text x="{mx + 65 + lw}" y="{legend_y + 9}">{escape(format_value(right))}</text>')
        out.append(
            f'<text x="{width / 2}" y="{legend_y + 26}" text-anchor="middle" fill="#555">'
            "less change → more change</text>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"
