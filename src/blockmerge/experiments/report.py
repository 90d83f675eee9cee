"""The U-shaped report of a sweep: the article's picture, with the numbers it lacked.

``write_report`` writes a folder that opens from file:// with no server and no network:
``index.html`` (the U of image cells, tinted by the selected metric, with switches for variant
group, prompt and metric), ``table.html`` (every number, sortable, and the block rankings),
``heatmaps/*.svg`` (one U heat map per group and metric), ``results.json`` and ``results.csv``
(per image and aggregated), thumbnails, and the page's CSS/JS copied from package data.

The page is rendered complete in Python for the first selection (so it reads without
JavaScript and can be checked by parsing), and the script only swaps in precomputed text,
colours and image paths; no number is computed in the browser.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import html
import io
import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from ..architectures import Layout, by_name
from ..errors import BlockmergeError
from ..io import atomic_write, check_output_dir, made_folders_guard, note_input, write_text
from ..io.atomic import utf8
from .heatmap import colour_for, format_value, layout_positions, normalise, text_colour_for, u_heatmap_svg
from .metrics import METRICS, AggregateRow, Metric, MetricsTable, json_number, rank_blocks, sweep_metrics
from .outputs import HTML_GENERATOR, THUMB_COMMENT, own_output
from .results import SweepResult

ASSETS = ("report.css", "report.js")
def _slug(s: str, n: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")[:n] or "x"


def _url(target: Path, start: Path) -> str:
    rel = os.path.relpath(target, start).replace(os.sep, "/")
    return quote(rel)


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _json_island(data: Any) -> str:
    """JSON for a ``<script type="application/json">`` element. Every ``<``, ``>`` and ``&`` is written
    as a ``\\u`` escape (the same string to JSON.parse), so no text in it (``</script>``, ``<!--``,
    ``<script>``) can end the element or switch the HTML tokenizer into its escaped states."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") \
        .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def safe_href(href: str) -> str | None:
    """``href`` if it is a same-site relative link or an absolute http(s) URL, else None.

    Refused: other schemes (``javascript:``, ``data:``, ``file:``), anything with control characters,
    and off-site links that look relative: ``//evil.com/x`` (protocol-relative), and ``\\evil/x`` or
    ``/\\evil.com``, because browsers read a backslash as a slash in http(s) and file URLs.
    """
    h = str(href).strip()
    if not h or any(ord(c) < 0x20 or ord(c) == 0x7F for c in h):
        return None
    as_browser = h.replace("\\", "/")  # what a browser parses (tabs and newlines were refused above)
    try:
        parts = urlsplit(as_browser)
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme:
        return h if scheme in ("http", "https") and parts.netloc else None
    if as_browser.startswith("//"):
        return None  # another host, whatever scheme the page was opened with
    if ":" in as_browser.split("/", 1)[0]:
        return None  # "javascript&colon;..." style tricks the browser may read as a scheme
    return h


def _data_v(v: float) -> str:
    """A sort key the page's Number() parses; empty for no data."""
    if math.isnan(v):
        return ""
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return repr(float(v))


class _Pending:
    """The report's files, computed in full before the first one is written: a bad image or block id
    found half way must not leave half a report behind."""

    def __init__(self, overwrite: bool) -> None:
        self.overwrite = overwrite
        self.items: list[tuple[Path, bytes | Path]] = []  # (target, content or a file to copy)

    def add(self, target: Path, content: bytes | str | Path) -> None:
        self.items.append((target, utf8(content) if isinstance(content, str) else content))

    def write_all(self) -> None:
        from ..io import check_output_path

        for target, _ in self.items:  # every name checked before anything is written
            if target.parent.is_dir():
                check_output_path(target, (), self.overwrite, "report file", replace_if=own_output)
            else:
                check_output_dir(target.parent, "report folder", make=False)
        created: list[Path] = []
        try:
            for target, content in self.items:
                check_output_dir(target.parent, "report folder")
                new = not os.path.lexists(target)
                with atomic_write(target, overwrite=self.overwrite, replace_if=own_output) as f:
                    if isinstance(content, Path):
                        with open(content, "rb") as fin:
                            shutil.copyfileobj(fin, f)
                    else:
                        f.write(content)
                if new:
                    created.append(target)
        except BaseException:
            for p in created:  # files this run added; those it replaced cannot be brought back
                with contextlib.suppress(OSError):
                    os.unlink(p)
            raise


class _Images:
    """Thumbnails (or copies) of the sweep's images inside the report folder, made once each."""

    def __init__(self, result: SweepResult, out_dir: Path, thumb_size: int | None, copy_images: bool,
                 pending: _Pending) -> None:
        self.result, self.out, self.thumb_size, self.copy = result, out_dir, thumb_size, copy_images
        self.pending = pending
        self._done: dict[str, dict[str, Any]] = {}

    def entry(self, rel: str, seed: int) -> dict[str, Any]:
        if rel in self._done:
            return self._done[rel]
        from PIL import Image

        src = self.result.path_of(rel)
        if not src.is_file():
            raise BlockmergeError(f"{src}: image listed in the sweep is missing")
        note_input(src)
        name = f"{_slug(Path(rel).stem)}-{hashlib.sha1(rel.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
        try:
            with Image.open(src) as im:
                im.load()
                thumb_img = im.convert("RGB") if self.thumb_size else None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise BlockmergeError(f"{src}: cannot read image ({str(e)[:160]})") from None
        if self.copy:
            full = self._copy(src, name)
        else:
            full = src
        try:
            href = _url(full, self.out)
        except ValueError:  # another drive on Windows: no relative path exists
            full = self._copy(src, name)
            href = _url(full, self.out)
        thumb_href = href
        if thumb_img is not None and self.thumb_size:
            thumb = self.out / "thumbs" / (name + ".jpg")
            thumb_img.thumbnail((self.thumb_size, self.thumb_size), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            thumb_img.save(buf, "JPEG", quality=85, comment=THUMB_COMMENT)
            self.pending.add(thumb, buf.getvalue())
            thumb_href = _url(thumb, self.out)
        e = {"src": thumb_href, "href": href, "seed": seed}
        self._done[rel] = e
        return e

    def _copy(self, src: Path, name: str) -> Path:
        full = self.out / "images" / (name + src.suffix.lower())
        self.pending.add(full, src)
        return full


def _shown_metrics(table: MetricsTable) -> list[Metric]:
    """Metrics with at least one measured value (the latent distance only if latents were saved)."""
    return [m for m in METRICS if any(not math.isnan(r.values.get(m.key, math.nan)) for r in table.rows)]


def _value_text(agg: AggregateRow | None, m: Metric) -> tuple[str, str]:
    if agg is None:
        return "–", ""
    mean, std = agg.mean[m.key], agg.std[m.key]
    txt = format_value(mean) + (f" {m.unit}" if m.unit and math.isfinite(mean) else "")
    title = f"{m.label}: mean {format_value(mean)}"
    if math.isfinite(std):
        title += f" ± {format_value(std)} (std over {agg.n})"
    return txt, title


def _build_data(result: SweepResult, table: MetricsTable, shown: list[Metric], images: _Images,
                heatmaps: dict[str, dict[str, str]]) -> dict[str, Any]:
    base = result.baseline
    n_p = len(result.prompts)
    aggs = {(a.variant, a.prompt): a for a in table.aggregate()}

    def imgs_of(variant_id: str) -> list[list[dict[str, Any] | None]]:
        out: list[list[dict[str, Any] | None]] = []
        for p in range(n_p):
            row: list[dict[str, Any] | None] = []
            for s in result.seeds:
                rec = result.image(variant_id, p, s)
                row.append(images.entry(rec.path, s) if rec else None)
            out.append(row)
        return out

    cells: dict[str, dict[str, Any]] = {}
    for g in result.groups():
        gv = [v for v in result.group_variants(g) if v.block is not None]
        cells[g] = {}
        for v in gv:
            cells[g][v.block] = {"variant": v.id, "label": v.label, "imgs": imgs_of(v.id), "v": {}, "vals": [],
                                 "note": _notes(result).get(v.id, "")}
        # Tint: per (prompt, metric), normalised over the blocks of this group.
        for p in [*range(n_p), None]:
            pk = "all" if p is None else str(p)
            for m in shown:
                means = {}
                for v in gv:
                    a = aggs.get((v.id, p))
                    means[v.block] = a.mean[m.key] if a else math.nan
                ts = normalise(means, m.higher_is_more_change)
                for v in gv:
                    txt, title = _value_text(aggs.get((v.id, p)), m)
                    cells[g][v.block]["v"].setdefault(pk, {})[m.key] = [
                        txt, title, colour_for(ts[v.block]), text_colour_for(ts[v.block])
                    ]
            if p is not None:
                for v in gv:
                    a = aggs.get((v.id, p))
                    cells[g][v.block]["vals"].append(
                        " · ".join(f"{m.label} {format_value(a.mean[m.key])}" for m in shown) if a else ""
                    )
    custom = []
    for v in result.variants:
        if v.kind == "baseline" or v.block is not None:
            continue
        vals = []
        for p in range(n_p):
            a = aggs.get((v.id, p))
            vals.append(" · ".join(f"{m.label} {format_value(a.mean[m.key])}" for m in shown) if a else "")
        custom.append({"variant": v.id, "label": v.label, "group": v.group, "imgs": imgs_of(v.id), "vals": vals,
                       "desc": ", ".join(f"{k}: {val}" for k, val in v.params.items())})
    return {
        "custom": custom,
        "groups": result.groups(),
        "prompts": list(result.prompts),
        "seeds": list(result.seeds),
        "metrics": [m.key for m in shown],
        "metricDesc": {m.key: f"{m.label}{' (' + m.unit + ')' if m.unit else ''}: {m.description} "
                       f"{'Higher' if m.higher_is_more_change else 'Lower'} = more change; tint is relative "
                       "to the other blocks in this view." for m in shown},
        "baseline": {"variant": base.id, "imgs": imgs_of(base.id)},
        "cells": cells,
        "heatmaps": heatmaps,
    }


def _render_imgs(imgs: Sequence[dict[str, Any] | None], seeds: Sequence[int], block: str) -> str:
    parts = []
    for s, im in zip(seeds, imgs, strict=True):
        if im is None:
            parts.append(f'<span class="missing">seed {s}: no image</span>')
        else:
            parts.append(
                f'<a class="full" href="{_esc(im["href"])}" data-caption="{_esc(block)} · seed {s}">'
                f'<img src="{_esc(im["src"])}" alt="{_esc(block)} seed {s}" title="seed {s}"></a>'
            )
    return "".join(parts)


def _render_custom(data: dict[str, Any], seeds: Sequence[int]) -> str:
    """Variants that change no single block (custom weight specs) have no place in the U: a row of
    their own, same images and numbers as the cells (the table ranks them too)."""
    if not data["custom"]:
        return ""
    cells = []
    for c in data["custom"]:
        cells.append(
            f'<div class="cell custom" data-variant="{_esc(c["variant"])}"><div class="head">'
            f'<span class="block" title="{_esc(c["desc"])}">{_esc(c["label"])}</span></div>'
            f'<div class="imgs">{_render_imgs(c["imgs"][0], seeds, c["label"])}</div>'
            f'<div class="vals">{_esc(c["vals"][0])}</div></div>'
        )
    return ('<section><h2>Custom variants (several blocks changed; not part of the U)</h2>'
            f'<div class="custom-row">{"".join(cells)}</div></section>')


def _family_layout(result: SweepResult) -> Layout | None:
    """The layout of the sweep's family (None: draw U-Net ids as the U)."""
    try:
        return by_name(result.architecture).layout
    except KeyError:
        return None


def _render_index(result: SweepResult, data: dict[str, Any], shown: list[Metric], title: str) -> str:
    g0 = data["groups"][0] if data["groups"] else ""
    m0 = shown[0].key if shown else ""
    layout = _family_layout(result)
    pos, n_cols = layout_positions(result.block_ids, layout)
    n_rows = max(r for r, _ in pos.values())
    stack = layout is not None and layout.kind != "u"
    # The U's three columns come from report.css; a stack layout says how many it needs.
    grid = f"grid-template-rows:repeat({n_rows},auto)" + (
        f";grid-template-columns:repeat({n_cols},minmax(12em,1fr))" if stack else "")
    cells = [
        f'<div class="cell" data-block="baseline" data-variant="{_esc(data["baseline"]["variant"])}" '
        f'style="grid-row:1;grid-column:{"1 / -1" if stack else "2"}"><div class="head"><span class="block">baseline</span></div>'
        f'<div class="imgs">{_render_imgs(data["baseline"]["imgs"][0], result.seeds, "baseline")}</div></div>'
    ]
    for b in result.block_ids:
        r, c = pos[b]
        cell = data["cells"].get(g0, {}).get(b)
        if cell is None:
            style, inner = "", ""
            val, title_attr, all_txt, vals = "not run", "", "", ""
            var_attr = ""
        else:
            txt, tt, bg, fg = cell["v"]["0"][m0] if m0 else ("–", "", "", "")
            style = f"background:{bg};color:{fg};"
            inner = _render_imgs(cell["imgs"][0], result.seeds, b)
            val, title_attr = txt, tt
            all_txt = "all prompts: " + cell["v"]["all"][m0][0] if m0 else ""
            vals = cell["vals"][0]
            var_attr = f' data-variant="{_esc(cell["variant"])}"'
        note = _notes(result).get(cell["variant"], "") if cell is not None else ""
        cells.append(
            f'<div class="cell" data-block="{_esc(b)}"{var_attr} style="grid-row:{r};grid-column:{c};{style}">'
            f'<div class="head"><span class="block" title="{_esc(note)}">{_esc(b)}</span>'
            f'<span class="metric-value" title="{_esc(title_attr)}">{_esc(val)}</span>'
            f'<span class="metric-all">{_esc(all_txt)}</span></div>'
            f'<div class="imgs">{inner}</div><div class="vals">{_esc(vals)}</div></div>'
        )
    group_opts = "".join(f'<option value="{_esc(g)}">{_esc(g)}</option>' for g in data["groups"])
    prompt_opts = "".join(
        f'<option value="{i}">{i}: {_esc(result.prompt_title(i))}</option>' for i in range(len(result.prompts))
    )
    metric_opts = "".join(f'<option value="{m.key}">{_esc(m.label)}</option>' for m in shown)
    hm = data["heatmaps"].get(g0, {}).get(m0, "")
    blob = _json_island(data)
    desc = data["metricDesc"].get(m0, "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>
<meta name="generator" content="{HTML_GENERATOR}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="report.css"></head>
<body>
<header><h1>{_esc(title)}</h1>
<p class="sub">{_esc(_subtitle(result))}</p>
<nav><a href="index.html">U view</a><a href="table.html">table of all numbers</a><a href="results.json">results.json</a><a href="results.csv">results.csv</a>{_extra_links(result)}</nav>
<div class="controls">
<label>Variants <select id="group">{group_opts}</select></label>
<label>Prompt <select id="prompt">{prompt_opts}</select></label>
<label>Metric <select id="metric">{metric_opts}</select></label>
</div>
<p id="metric-desc" class="desc">{_esc(desc)}</p>
<p id="prompt-text" class="prompt-text">{_esc(result.prompts[0] if result.prompts else "")}</p>
</header>
<main class="u" style="{grid}">
{chr(10).join(cells)}
</main>
{_render_custom(data, result.seeds)}
<section><h2>Heat map (mean over all prompts and seeds)</h2>
<img id="heatmap" src="{_esc(hm)}" alt="U heat map of the selected metric"></section>
<div id="lightbox" hidden><img alt="full size"><div class="caption"></div></div>
<script id="report-data" type="application/json">{blob}</script>
<script src="report.js"></script>
</body></html>
"""


def _extra_links(result: SweepResult) -> str:
    """Links a sweep asks for in ``meta["links"]`` (``[[text, relative href], ...]``), e.g. the demo's
    reverse-swap report."""
    out = []
    for item in result.meta.get("links") or []:
        try:
            text, href = item
        except (TypeError, ValueError):
            continue
        safe = safe_href(href) if isinstance(href, str) else None
        if safe is not None:
            out.append(f'<a href="{_esc(safe)}">{_esc(text)}</a>')
    return "".join(out)


def _notes(result: SweepResult) -> dict[str, str]:
    """Per-variant notes (``meta["notes"]``: what a bypass really does where it cannot be exact)."""
    notes = result.meta.get("notes") or {}
    return {str(k): str(v) for k, v in notes.items()} if isinstance(notes, dict) else {}


def _notes_section(result: SweepResult) -> str:
    notes = _notes(result)
    if not notes:
        return ""
    vmap = {v.id: v for v in result.variants}
    rows = "".join(f"<tr><td>{_esc(vmap[k].label if k in vmap else k)}</td><td>{_esc(v)}</td></tr>"
                   for k, v in notes.items())
    return ("<h2>What each variant really does</h2><p class=\"desc\">Bypass zeroes every residual branch of the "
            "block (exact where the skip path is the identity); where that is impossible the closest honest "
            "substitute is used and listed here.</p>"
            f'<table id="notes"><thead><tr><th>variant</th><th>note</th></tr></thead><tbody>{rows}</tbody></table>')


def _subtitle(result: SweepResult) -> str:
    bits = [result.architecture, f"{len(result.prompts)} prompt(s)", "seeds " + ", ".join(map(str, result.seeds))]
    for k in ("model", "model_hash", "device"):
        if k in result.meta:
            bits.append(f"{k}: {result.meta[k]}")
    return " · ".join(bits)


def _render_table(result: SweepResult, table: MetricsTable, shown: list[Metric], title: str) -> str:
    aggs = table.aggregate()
    heads = "".join(f"<th>{_esc(m.label)}{' (' + _esc(m.unit) + ')' if m.unit else ''}</th>" for m in shown)
    vmap = {v.id: v for v in result.variants}

    def num_cells(vals: dict[str, float], std: dict[str, float] | None = None) -> str:
        out = []
        for m in shown:
            v = vals[m.key]
            t = format_value(v)
            if std is not None and math.isfinite(std[m.key]):
                t += f" ± {format_value(std[m.key])}"
            out.append(f'<td data-v="{_data_v(v)}">{_esc(t)}</td>')
        return "".join(out)

    def vcells(vid: str) -> str:
        v = vmap[vid]
        return f"<td>{_esc(v.group)}</td><td>{_esc(v.block or '')}</td><td>{_esc(v.label)}</td>"

    overall = "".join(
        f"<tr>{vcells(a.variant)}<td data-v=\"{a.n}\">{a.n}</td>{num_cells(a.mean, a.std)}</tr>"
        for a in aggs if a.prompt is None
    )
    per_prompt = "".join(
        f"<tr>{vcells(a.variant)}<td data-v=\"{a.prompt}\">{a.prompt}</td><td data-v=\"{a.n}\">{a.n}</td>"
        f"{num_cells(a.mean, a.std)}</tr>"
        for a in aggs if a.prompt is not None
    )
    per_image = "".join(
        f"<tr>{vcells(r.variant)}<td data-v=\"{r.prompt}\">{r.prompt}</td><td data-v=\"{r.seed}\">{r.seed}</td>"
        f"{num_cells(r.values)}</tr>"
        for r in table.rows
    )
    rank_rows = []
    for g in result.groups():
        for m in shown:
            ranked = rank_blocks(result, table, m.key, g)
            txt = " › ".join(f"{b} ({format_value(v)})" for b, v in ranked)
            rank_rows.append(f"<tr><td>{_esc(g)}</td><td>{_esc(m.label)}</td><td>{_esc(txt)}</td></tr>")
    prompts = "".join(f"<li><pre>{_esc(p)}</pre></li>" for p in result.prompts)
    vh = "<th>group</th><th>block</th><th>variant</th>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}: table</title>
<meta name="generator" content="{HTML_GENERATOR}">
<link rel="stylesheet" href="report.css"></head>
<body>
<header><h1>{_esc(title)}: all numbers</h1><p class="sub">{_esc(_subtitle(result))}</p>
<nav><a href="index.html">U view</a><a href="table.html">table of all numbers</a><a href="results.json">results.json</a><a href="results.csv">results.csv</a>{_extra_links(result)}</nav>
<p class="desc">Click a column heading to sort. Mean ± sample std over seeds (and prompts); every image is compared with the baseline image of the same prompt and seed.</p></header>
<h2>Blocks ranked, most change first (mean over all prompts and seeds)</h2>
<table id="ranking"><thead><tr><th>group</th><th>metric</th><th>blocks</th></tr></thead><tbody>{"".join(rank_rows)}</tbody></table>
<h2>Per variant, all prompts</h2>
<table class="sortable" id="overall"><thead><tr>{vh}<th>n</th>{heads}</tr></thead><tbody>{overall}</tbody></table>
<h2>Per variant and prompt</h2>
<table class="sortable" id="per-prompt"><thead><tr>{vh}<th>prompt</th><th>n</th>{heads}</tr></thead><tbody>{per_prompt}</tbody></table>
<h2>Per image</h2>
<table class="sortable" id="per-image"><thead><tr>{vh}<th>prompt</th><th>seed</th>{heads}</tr></thead><tbody>{per_image}</tbody></table>
{_notes_section(result)}
<h2>Prompts</h2><ol start="0">{prompts}</ol>
<script src="report.js"></script>
</body></html>
"""


def results_dict(result: SweepResult, table: MetricsTable) -> dict[str, Any]:
    """Every number of the report as plain JSON (inf / NaN as the strings "inf" / "nan")."""

    def nums(d: dict[str, float]) -> dict[str, float | str]:
        return {k: json_number(v) for k, v in d.items()}

    aggs = table.aggregate()
    return {
        "format": "blockmerge.report",
        "version": 1,
        "sweep": result.to_dict(),
        "metrics": [{"key": m.key, "label": m.label, "unit": m.unit,
                     "higher_is_more_change": m.higher_is_more_change, "description": m.description}
                    for m in METRICS],
        "per_image": [{"variant": r.variant, "prompt": r.prompt, "seed": r.seed, "values": nums(r.values)}
                      for r in table.rows],
        "per_prompt": [{"variant": a.variant, "prompt": a.prompt, "n": a.n, "mean": nums(a.mean), "std": nums(a.std)}
                       for a in aggs if a.prompt is not None],
        "overall": [{"variant": a.variant, "n": a.n, "mean": nums(a.mean), "std": nums(a.std)}
                    for a in aggs if a.prompt is None],
        "ranking": {g: {m.key: [[b, json_number(v)] for b, v in rank_blocks(result, table, m.key, g)]
                        for m in METRICS} for g in result.groups()},
    }


def write_results_csv(path: Path, result: SweepResult, table: MetricsTable, *, overwrite: bool = False) -> None:
    """:func:`results_csv` written to ``path`` through the write policy."""
    write_text(path, results_csv(result, table), overwrite=overwrite, replace_if=own_output)


def results_csv(result: SweepResult, table: MetricsTable) -> str:
    """One row per image (level "image") and per aggregate (levels "prompt" and "all").

    Numbers are written with Python's repr, so reading them back with float() gives the exact
    values (including "inf" and "nan").
    """
    vmap = {v.id: v for v in result.variants}
    cols = ["level", "group", "variant", "kind", "block", "prompt", "seed", "n"]
    for m in METRICS:
        cols += [m.key, m.key + "_std"]
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(cols)

    def row(level: str, vid: str, prompt: int | None, seed: int | None, n: int,
            vals: dict[str, float], std: dict[str, float] | None) -> None:
        v = vmap[vid]
        out: list[Any] = [level, v.group, v.id, v.kind, v.block or "", "" if prompt is None else prompt,
                          "" if seed is None else seed, n]
        for m in METRICS:
            out += [repr(float(vals[m.key])), "" if std is None else repr(float(std[m.key]))]
        w.writerow(out)

    for r in table.rows:
        row("image", r.variant, r.prompt, r.seed, 1, r.values, None)
    for a in table.aggregate():
        row("prompt" if a.prompt is not None else "all", a.variant, a.prompt, None, a.n, a.mean, a.std)
    return f.getvalue()


def write_heatmaps(out_dir: Path, result: SweepResult, table: MetricsTable,
                   metrics: Sequence[Metric] = METRICS, *, overwrite: bool = False) -> dict[str, dict[str, str]]:
    """One SVG per (group, metric) of the all-prompt means; returns {group: {metric: relative path}}."""
    pending = _Pending(overwrite)
    out = _heatmaps(out_dir, result, table, metrics, pending)
    pending.write_all()
    return out


def _heatmaps(out_dir: Path, result: SweepResult, table: MetricsTable, metrics: Sequence[Metric],
              pending: _Pending) -> dict[str, dict[str, str]]:
    hdir = out_dir / "heatmaps"
    out: dict[str, dict[str, str]] = {}
    for g in result.groups():
        out[g] = {}
        for m in metrics:
            vals = {}
            for v in result.group_variants(g):
                a = table.aggregate_of(v.id, None) if v.block is not None else None
                if a is not None:
                    vals[v.block] = a.mean[m.key]
            title = f"{m.label} — {g} ({result.architecture})"
            svg = u_heatmap_svg(result.block_ids, vals, title, higher_is_more=m.higher_is_more_change, unit=m.unit,
                                layout=_family_layout(result))
            name = f"{_slug(g)}-{hashlib.sha1(g.encode('utf-8', 'surrogateescape')).hexdigest()[:6]}__{m.key}.svg"
            pending.add(hdir / name, svg)
            out[g][m.key] = "heatmaps/" + quote(name)
    return out


@made_folders_guard()  # a failure removes the (empty) folders this call made, as the CLI does
def write_report(out_dir: Path, result: SweepResult, metrics_table: MetricsTable | None = None, *,
                 title: str | None = None, thumb_size: int | None = 256, copy_images: bool = False,
                 overwrite: bool = False) -> Path:
    """Write the report folder and return the path of its ``index.html``.

    ``metrics_table`` defaults to :func:`sweep_metrics` of the sweep. Thumbnails (JPEG, longest
    side ``thumb_size``; None to show the originals) go in ``thumbs/``; full-size links point at
    the sweep's own files by relative path, or at copies in ``images/`` when ``copy_images``
    (a self-contained folder to send to someone).

    Every file goes through the write policy: a file of the same name that an earlier report wrote
    (it carries blockmerge's generator mark) is replaced; any other existing file only with
    ``overwrite``.
    """
    result.validate()
    if result.root is None:
        raise BlockmergeError("report: the sweep's root folder is unknown; load it with SweepResult.load")
    if metrics_table is None:
        metrics_table = sweep_metrics(result)
    out_dir = check_output_dir(Path(out_dir).resolve(), "report folder", make=False)
    title = title or f"blockmerge sweep: {result.meta.get('model', result.architecture)}"
    shown = _shown_metrics(metrics_table) or list(METRICS[:1])
    layout_positions(result.block_ids, _family_layout(result))  # a block id with no place fails here, before any file
    pending = _Pending(overwrite)
    for name in ASSETS:
        pending.add(out_dir / name, files("blockmerge").joinpath("data", "report", name).read_bytes())
    heatmaps = _heatmaps(out_dir, result, metrics_table, shown, pending)
    images = _Images(result, out_dir, thumb_size, copy_images, pending)
    data = _build_data(result, metrics_table, shown, images, heatmaps)
    pending.add(out_dir / "index.html", _render_index(result, data, shown, title))
    pending.add(out_dir / "table.html", _render_table(result, metrics_table, shown, title))
    pending.add(out_dir / "results.json",
                json.dumps(results_dict(result, metrics_table), indent=1, ensure_ascii=False, allow_nan=False))
    pending.add(out_dir / "results.csv", results_csv(result, metrics_table))
    check_output_dir(out_dir, "report folder")
    pending.write_all()
    return out_dir / "index.html"
