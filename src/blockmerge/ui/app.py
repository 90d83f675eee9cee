"""The gradio page of ``blockmerge ui``: components and events, each event a few lines over a
:class:`~blockmerge.workbench.Workbench` method.

Conventions here:

- every handler returns a dict ``{component: value}`` (only what changed) and ends in
  :func:`_guarded`, which turns any failure into the one line the CLI would print, shown in the
  tab's status box; the server keeps running and the page keeps its values;
- long jobs (merge, preview, sweep, recipe run, compare) share one queue (``concurrency_id="job"``,
  one at a time: they share the loaded pipeline) and report through ``gr.Progress``; every Cancel
  button stops the running one through :meth:`JobControl.cancel`;
- the sliders' truth is the ``MergeSettings`` in a ``gr.State``; a slider's ``input`` event changes
  one value and rewrites the text box; the text box's ``submit``/``blur`` rewrites the sliders
  (programmatic updates fire no ``input`` event, so the two never loop).
"""

from __future__ import annotations

import functools
import html
import json
import sys
from collections.abc import Callable
from typing import Any

from ..architectures import BASE, Architecture, by_name
from ..cli.common import one_line
from ..errors import BlockmergeError, Cancelled
from ..workbench import DEFAULT_PROMPT, MergeSettings, Workbench
from ..workbench.settings import format_blocks, read_blocks_text, slider_params, slider_range

#: Every slider the page has: the largest U-Net (SD1/SD2: 12 + 1 + 12) and BASE; SDXL hides the
#: blocks it lacks.
IN_IDS = tuple(f"IN{i:02d}" for i in range(12))
OUT_IDS = tuple(f"OUT{i:02d}" for i in range(12))
SLIDER_IDS = (BASE, *IN_IDS, "M00", *OUT_IDS)
DTYPES = ("fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2")
NONE = "(none)"

#: Only local font names: the page must load no web font.
SYSTEM_FONTS = ("system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif")
SYSTEM_MONO = ("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "DejaVu Sans Mono", "monospace")

THEME_CSS = """
.bm-u .bm-slider { min-width: 0 !important; }
.bm-u input[type=number] { width: 5.5em !important; }
.bm-mid-spacer { flex-grow: 1; }
.bm-status textarea { font-family: ui-monospace, monospace; }
.bm-mono textarea { font-family: ui-monospace, monospace; font-size: 12px; }
"""


def theme() -> Any:
    import gradio as gr

    return gr.themes.Base(font=list(SYSTEM_FONTS), font_mono=list(SYSTEM_MONO))


def _err(e: BaseException) -> str:
    """The status line of a failure: the CLI's one line for expected errors, never a traceback."""
    if isinstance(e, Cancelled):
        return f"cancelled: {one_line(str(e))}"
    if isinstance(e, BlockmergeError):
        return f"error: {one_line(str(e))}"
    if isinstance(e, OSError) and (e.filename or e.errno):
        where = f"{e.filename}: " if e.filename else ""
        return f"error: {one_line(where + (e.strerror or str(e)))}"
    if isinstance(e, MemoryError):
        return "error: out of memory"
    msg = str(e).splitlines()[0] if str(e) else ""
    print(f"blockmerge ui: internal error: {type(e).__name__}: {one_line(msg)}", file=sys.stderr)
    return f"internal error: {type(e).__name__}: {one_line(msg)}"


def _guarded(status: Any) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    """Run a handler; on any failure show one line in ``status`` and change nothing else."""

    def wrap(fn: Callable[..., dict]) -> Callable[..., dict]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> dict:
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # the server must keep running whatever a handler hits
                return {status: _err(e)}

        return run

    return wrap


def _arch(settings: MergeSettings | None) -> Architecture | None:
    if settings is None:
        return None
    try:
        return by_name(settings.architecture)
    except KeyError:
        return None


def _models_of(a: str | None, b: str | None, c: str | None, n_max: int | None, n_min: int) -> list[str]:
    """The operands the method takes from the A/B/C pickers, in order."""
    picked = [m for m in (a, b, c) if m and m != NONE]
    if n_max is not None:
        picked = picked[:n_max]
    if len(picked) < n_min:
        raise BlockmergeError(f"this method needs {n_min} models: choose them in the Models tab (A, B, C)")
    return picked


def build_app(wb: Workbench) -> Any:
    """The page. ``wb`` is shared by every browser session (one user's tool, one job at a time)."""
    import gradio as gr

    from ..merge.methods import METHODS

    model_names = [m.name for m in wb.models()]
    default_a = model_names[0] if model_names else None
    default_b = model_names[1] if len(model_names) > 1 else None
    methods = list(METHODS)

    progress_marker = gr.Progress()  # gradio gives each event its own tracker in its place

    def job_progress(progress: Any) -> Callable[[float | None, str], None]:
        def report(fraction: float | None, text: str) -> None:
            if fraction is not None:
                progress(fraction, desc=text)

        return report

    with gr.Blocks(title="blockmerge", analytics_enabled=False) as demo:
        settings_state = gr.State(None)
        refs_shown = gr.State(None)  # which reference images this page already shows (not sent again)
        gr.Markdown("## blockmerge\nBlock-weighted merging, previews without a file, sweeps, comparisons and "
                    "recipes; everything stays on this machine.")
        with gr.Tabs():
            # ---------------------------------------------------------------- Models
            with gr.Tab("Models", id="models"):
                with gr.Row():
                    pick_a = gr.Dropdown(model_names, value=default_a, label="A", elem_id="model-a")
                    pick_b = gr.Dropdown([NONE, *model_names], value=default_b or NONE, label="B", elem_id="model-b")
                    pick_c = gr.Dropdown([NONE, *model_names], value=NONE, label="C", elem_id="model-c")
                refresh_models = gr.Button("Rescan the models folder", size="sm")
                models_table = gr.Dataframe(headers=["name", "architecture", "size (MiB)", "short hash", "bundled"],
                                            value=[], interactive=False, elem_id="models-table")
                models_status = gr.Textbox(label="messages", interactive=False, elem_classes=["bm-status"])

            # ---------------------------------------------------------------- Merge & preview
            with gr.Tab("Merge & Preview", id="merge"):
                with gr.Row():
                    method = gr.Dropdown(methods, value="weighted_sum", label="method", elem_id="method")
                    param = gr.Radio(["alpha"], value="alpha", label="parameter (each has its own sliders)",
                                     elem_id="param")
                    preset = gr.Dropdown(choices=[NONE, *wb.presets.names()], value=NONE, label="preset",
                                         elem_id="preset")
                    dtype = gr.Dropdown(list(DTYPES), value="fp16", label="output dtype", elem_id="dtype")
                    clamp = gr.Checkbox(False, label="clamp to the models' range (merge --clamp)", elem_id="clamp")
                method_info = gr.Markdown("", elem_id="method-info")
                with gr.Row():
                    with gr.Column(scale=3):
                        sliders: dict[str, Any] = {}
                        with gr.Row(elem_classes=["bm-u"]):
                            with gr.Column(min_width=160):
                                for b in IN_IDS:
                                    sliders[b] = gr.Slider(0, 1, 0, step=0.01, label=b, elem_id=f"slider-{b}",
                                                           elem_classes=["bm-slider"])
                            with gr.Column(min_width=160):
                                sliders[BASE] = gr.Slider(0, 1, 0, step=0.01, label="BASE (text encoder, VAE)",
                                                          elem_id=f"slider-{BASE}", elem_classes=["bm-slider"])
                                gr.HTML("<div style='height: 52em'></div>", elem_classes=["bm-mid-spacer"])
                                sliders["M00"] = gr.Slider(0, 1, 0, step=0.01, label="M00", elem_id="slider-M00",
                                                           elem_classes=["bm-slider"])
                            with gr.Column(min_width=160):
                                for b in reversed(OUT_IDS):
                                    sliders[b] = gr.Slider(0, 1, 0, step=0.01, label=b, elem_id=f"slider-{b}",
                                                           elem_classes=["bm-slider"])
                        weights_text = gr.Textbox(label="block values as Merge Block Weighted writes them (25; "
                                                  "SDXL 19) — also 26/20 with BASE first, a preset, or IN04-IN08=0.5; "
                                                  "Enter applies", elem_id="weights-text")
                        rules_text = gr.Textbox(label="elemental rules of this parameter (BLOCKS:ELEMENTS:VALUE, e.g. "
                                                "IN04-IN08:attn2:0, OUT:NOT attn:0.3); Enter applies",
                                                elem_id="rules-text")
                    with gr.Column(scale=2):
                        prompt = gr.Textbox(DEFAULT_PROMPT, lines=4, label="prompt (or A1111 infotext)",
                                            elem_id="prompt")
                        seeds = gr.Textbox("1-4", label="seeds", elem_id="seeds")
                        with gr.Row():
                            preview_btn = gr.Button("Preview", variant="primary", elem_id="preview-btn")
                            cancel_preview = gr.Button("Cancel", variant="stop", elem_id="cancel-preview")
                        gal_merged = gr.Gallery(label="merged (in place, no file)", columns=4, format="png",
                                                elem_id="gallery-merged", height=190)
                        gal_a = gr.Gallery(label="A", columns=4, format="png", elem_id="gallery-a", height=190)
                        gal_b = gr.Gallery(label="B", columns=4, format="png", elem_id="gallery-b", height=190)
                        preview_info = gr.Textbox(label="preview", interactive=False, elem_id="preview-info")
                with gr.Row():
                    out_name = gr.Textbox("merged.safetensors", label="output file (in the output folder)",
                                          elem_id="output-name")
                    overwrite = gr.Checkbox(False, label="overwrite", elem_id="overwrite")
                    merge_btn = gr.Button("Merge to file", variant="primary", elem_id="merge-btn")
                    cancel_merge = gr.Button("Cancel", variant="stop", elem_id="cancel-merge")
                merge_result = gr.Textbox(label="written file: hashes, command line, record", lines=8,
                                          interactive=False, elem_id="merge-result", elem_classes=["bm-mono"])
                merge_status = gr.Textbox(label="messages", interactive=False, elem_id="merge-status",
                                          elem_classes=["bm-status"])

            # ---------------------------------------------------------------- Sweep
            with gr.Tab("Sweep", id="sweep"):
                gr.Markdown("Model A is the one swept; B is the donor for swap and custom merges.")
                with gr.Row():
                    sw_scale = gr.Checkbox(True, label="scale each block by", elem_id="sweep-scale")
                    sw_k = gr.Textbox("0.75", label="K (comma-separated)", elem_id="sweep-k")
                    sw_bypass = gr.Checkbox(False, label="bypass each block", elem_id="sweep-bypass")
                    sw_swap = gr.Checkbox(False, label="swap each block from B", elem_id="sweep-swap")
                with gr.Row():
                    sw_custom = gr.Textbox("", lines=2, label="custom variants, one NAME=SPEC a line "
                                           "(e.g. gradv=GRAD_V)", elem_id="sweep-custom")
                    sw_method = gr.Dropdown([NONE, *methods], value=NONE, label="method of the custom variants")
                    sw_blocks = gr.Textbox("", label="blocks (default all; e.g. IN04-IN08,M00)", elem_id="sweep-blocks")
                with gr.Row():
                    sw_params = gr.Textbox("", lines=1, label="other parameters of that method, one NAME=SPEC a line "
                                           "(e.g. k=0.3)", elem_id="sweep-params")
                    sw_clamp = gr.Checkbox(False, label="clamp the custom variants to the models' range",
                                           elem_id="sweep-clamp")
                with gr.Row():
                    sw_prompt = gr.Textbox(DEFAULT_PROMPT, lines=3, label="prompt (A1111 infotext)",
                                           elem_id="sweep-prompt")
                    sw_seeds = gr.Textbox("1-4", label="seeds", elem_id="sweep-seeds")
                    sw_folder = gr.Textbox("sweep", label="folder (in the output folder)", elem_id="sweep-folder")
                    sw_overwrite = gr.Checkbox(False, label="overwrite", elem_id="sweep-overwrite")
                with gr.Row():
                    sweep_btn = gr.Button("Run sweep", variant="primary", elem_id="sweep-btn")
                    cancel_sweep = gr.Button("Cancel", variant="stop", elem_id="cancel-sweep")
                sweep_status = gr.Textbox(label="messages", interactive=False, elem_id="sweep-status",
                                          elem_classes=["bm-status"])
                sweep_report = gr.HTML("", elem_id="sweep-report", js_on_load=None)

            # ---------------------------------------------------------------- Compare
            with gr.Tab("Compare", id="compare"):
                gr.Markdown("A against B (and their changes from C, when C is chosen) per component and block.")
                with gr.Row():
                    cmp_metric = gr.Dropdown(["distance", "cosine", "change_a", "change_b", "change_cosine"],
                                             value="distance", label="heat map metric", elem_id="compare-metric")
                    compare_btn = gr.Button("Compare", variant="primary", elem_id="compare-btn")
                with gr.Row():
                    cmp_map = gr.HTML("", elem_id="compare-map", js_on_load=None)
                    cmp_table = gr.Textbox(label="table", lines=24, interactive=False, elem_id="compare-table",
                                           elem_classes=["bm-mono"])
                compare_status = gr.Textbox(label="messages", interactive=False, elem_id="compare-status",
                                            elem_classes=["bm-status"])

            # ---------------------------------------------------------------- Recipes
            with gr.Tab("Recipes", id="recipes"):
                gr.Markdown("Inputs are model names (as in the Models tab); outputs are file names in the output "
                            "folder.")
                with gr.Row():
                    with gr.Column(scale=3):
                        recipe_text = gr.Textbox("", lines=18, label="recipe (TOML)", elem_id="recipe-text",
                                                 elem_classes=["bm-mono"])
                    with gr.Column(scale=2):
                        board_text = gr.Textbox("", lines=8, label="Merge Board text (NAME = __A__ + __B__, 0.3)",
                                                elem_id="board-text", elem_classes=["bm-mono"])
                        board_btn = gr.Button("Import Merge Board text into the recipe", elem_id="board-btn")
                with gr.Row():
                    validate_btn = gr.Button("Validate", elem_id="validate-btn")
                    recipe_overwrite = gr.Checkbox(False, label="overwrite", elem_id="recipe-overwrite")
                    run_btn = gr.Button("Run", variant="primary", elem_id="run-btn")
                    cancel_recipe = gr.Button("Cancel", variant="stop", elem_id="cancel-recipe")
                recipe_status = gr.Textbox(label="messages", interactive=False, elem_id="recipe-status",
                                           elem_classes=["bm-status"])

            # ---------------------------------------------------------------- History
            with gr.Tab("History", id="history"):
                with gr.Row():
                    hist_pick = gr.Dropdown([], label="entry", elem_id="history-pick", scale=4)
                    hist_refresh = gr.Button("Refresh", size="sm")
                with gr.Row():
                    hist_load = gr.Button("Load into the sliders", elem_id="history-load")
                    hist_recipe = gr.Button("Copy as recipe (to the Recipes tab)", elem_id="history-recipe")
                hist_detail = gr.Textbox(label="entry", lines=14, interactive=False, elem_id="history-detail",
                                         elem_classes=["bm-mono"])
                hist_status = gr.Textbox(label="messages", interactive=False, elem_id="history-status",
                                         elem_classes=["bm-status"])

        slider_list = [sliders[b] for b in SLIDER_IDS]

        # ---------------------------------------------------------------- helpers
        def slider_updates(s: MergeSettings, pname: str) -> dict:
            """Every slider, the text box and the rules box showing parameter ``pname`` of ``s``."""
            arch = _arch(s)
            out: dict[Any, Any] = {}
            if arch is None or pname not in s.values:
                return out
            ids = list(arch.all_ids)
            sp = next(p for p in slider_params(s.method, len(s.models)) if p.name == pname)
            vals = s.values[pname]
            lo, hi = slider_range(sp, vals)
            u_net = all(b in SLIDER_IDS for b in arch.block_ids)
            for b in SLIDER_IDS:
                visible = u_net and b in ids
                v = vals[ids.index(b)] if b in ids else sp.fill
                out[sliders[b]] = gr.update(value=v, minimum=lo, maximum=hi, step=sp.step if sp.kind != "float" else 0.01,
                                            visible=visible)
            out[weights_text] = format_blocks(vals, arch)
            out[rules_text] = s.rules.get(pname, "")
            return out

        def header(s: MergeSettings) -> str:
            m = METHODS[s.method]
            ps = "; ".join(f"**{p.name}** {p.meaning} ({p.kind}, {m.lookup(p.name, len(s.models)).range_text()})"
                           for p in slider_params(m, len(s.models)))
            names = ", ".join(f"{chr(65 + i)} = {n}" for i, n in enumerate(s.models))
            return f"`{m.formula}` — {names} ({s.architecture})" + (f"<br>{ps}" if ps else "")

        def fresh(meth: str, a: str | None, b: str | None, c: str | None, dt: str,
                  previous: MergeSettings | None) -> tuple[MergeSettings, Architecture]:
            m = METHODS[meth]
            names = _models_of(a, b, c, m.max_operands, m.min_operands)
            return wb.new_settings(meth, names, dt, previous)

        def all_for(s: MergeSettings, pname: str | None = None) -> dict:
            names = list(s.values)
            p = pname if pname in names else (names[0] if names else None)
            out = {settings_state: s, method_info: header(s),
                   param: gr.update(choices=names or ["(no parameters)"], value=p or "(no parameters)")}
            if p is not None:
                out.update(slider_updates(s, p))
            else:
                out.update({sliders[b]: gr.update(visible=False) for b in SLIDER_IDS})
                out.update({weights_text: "", rules_text: ""})
            return out

        # ---------------------------------------------------------------- Models tab
        @_guarded(models_status)
        def load_models() -> dict:
            rows = [[m.name, m.title, round(m.size_bytes / 2**20, 1), m.short_hash, "yes" if m.bundled else ""]
                    for m in wb.models()]
            names = [r[0] for r in rows]
            return {models_table: rows, pick_a: gr.update(choices=names),
                    pick_b: gr.update(choices=[NONE, *names]), pick_c: gr.update(choices=[NONE, *names]),
                    models_status: f"{len(rows)} models (bundled, and {wb.workspace.models_dir or 'no models folder'})"}

        model_outputs = [models_table, pick_a, pick_b, pick_c, models_status]
        refresh_models.click(load_models, None, model_outputs, concurrency_limit=None)

        setup_outputs = [settings_state, method_info, param, *slider_list, weights_text, rules_text, merge_status]

        @_guarded(merge_status)
        def on_setup(meth: str, a: str, b: str, c: str, dt: str, s: MergeSettings | None, pname: str) -> dict:
            new, _ = fresh(meth, a, b, c, dt, s)
            return {**all_for(new, pname), merge_status: ""}

        setup_inputs = [method, pick_a, pick_b, pick_c, dtype, settings_state, param]
        for comp in (method, pick_a, pick_b, pick_c):
            comp.change(on_setup, setup_inputs, setup_outputs, concurrency_limit=None)

        @_guarded(merge_status)
        def on_dtype(dt: str, s: MergeSettings | None) -> dict:
            from dataclasses import replace

            return {settings_state: replace(s, dtype=dt) if s is not None else s}

        dtype.change(on_dtype, [dtype, settings_state], [settings_state, merge_status], concurrency_limit=None)

        @_guarded(merge_status)
        def on_clamp(on: bool, s: MergeSettings | None) -> dict:
            from dataclasses import replace

            return {settings_state: replace(s, clamp=bool(on)) if s is not None else s}

        clamp.change(on_clamp, [clamp, settings_state], [settings_state, merge_status], concurrency_limit=None)

        @_guarded(merge_status)
        def on_param(pname: str, s: MergeSettings | None) -> dict:
            if s is None:
                return {}
            return slider_updates(s, pname)

        param.input(on_param, [param, settings_state], [*slider_list, weights_text, rules_text, merge_status],
                    concurrency_limit=None)

        # one slider moved -> state and text box
        def on_slider(block: str) -> Callable[..., dict]:
            @_guarded(merge_status)
            def moved(value: float, s: MergeSettings | None, pname: str) -> dict:
                arch = _arch(s)
                if s is None or arch is None or pname not in s.values:
                    return {}
                new = s.with_value(pname, block, float(value), arch)
                return {settings_state: new, weights_text: format_blocks(new.values[pname], arch), merge_status: ""}

            return moved

        for b in SLIDER_IDS:
            sliders[b].input(on_slider(b), [sliders[b], settings_state, param],
                             [settings_state, weights_text, merge_status], concurrency_limit=None,
                             trigger_mode="always_last")

        # the text box edited -> sliders
        @_guarded(merge_status)
        def on_text(text: str, s: MergeSettings | None, pname: str) -> dict:
            arch = _arch(s)
            if s is None or arch is None or pname not in s.values:
                return {}
            vals, rules = read_blocks_text(text, arch, s.values[pname], param=pname, presets=wb.presets)
            new = s.with_values(pname, vals)
            if rules:
                old = new.rules.get(pname, "")
                new = new.with_rules(pname, f"{old}, {rules}" if old else rules)
            new.resolve(arch, wb.presets)  # out of the parameter's range: an error now, nothing changes
            return {settings_state: new, **slider_updates(new, pname), merge_status: ""}

        text_outputs = [settings_state, *slider_list, weights_text, rules_text, merge_status]
        weights_text.submit(on_text, [weights_text, settings_state, param], text_outputs, concurrency_limit=None)
        weights_text.blur(on_text, [weights_text, settings_state, param], text_outputs, concurrency_limit=None)

        @_guarded(merge_status)
        def on_rules(text: str, s: MergeSettings | None, pname: str) -> dict:
            arch = _arch(s)
            if s is None or arch is None or pname not in s.values:
                return {}
            new = s.with_rules(pname, text)
            new.resolve(arch, wb.presets)
            return {settings_state: new, merge_status: ""}

        rules_text.submit(on_rules, [rules_text, settings_state, param], [settings_state, merge_status],
                          concurrency_limit=None)
        rules_text.blur(on_rules, [rules_text, settings_state, param], [settings_state, merge_status],
                        concurrency_limit=None)

        @_guarded(merge_status)
        def on_preset(name: str, s: MergeSettings | None, pname: str) -> dict:
            if not name or name == NONE:
                return {}
            return on_text.__wrapped__(name, s, pname)

        preset.input(on_preset, [preset, settings_state, param], text_outputs, concurrency_limit=None)

        # ---------------------------------------------------------------- merge and preview jobs
        @_guarded(merge_status)
        def do_merge(s: MergeSettings | None, name: str, ow: bool, progress: Any = progress_marker) -> dict:
            if s is None:
                raise BlockmergeError("choose the models first (Models tab)")
            with wb.jobs.run("merge", job_progress(progress)) as job:
                o = wb.merge(s, name, overwrite=ow, job=job)
            text = "\n".join([
                f"wrote {o.name} ({o.output})",
                f"sha256 {o.sha256}",
                f"model hash {o.short_hash} (legacy {o.legacy_hash})",
                f"same file from the command line: {o.command}",
                *(f"warning: {w}" for w in o.warnings),
                "record: " + json.dumps(o.record, indent=1),
            ])
            return {merge_result: text, merge_status: f"wrote {o.name} (history #{o.entry.id})"}

        merge_btn.click(do_merge, [settings_state, out_name, overwrite], [merge_result, merge_status],
                        concurrency_id="job", concurrency_limit=1, api_name="merge")

        @_guarded(preview_info)
        def do_preview(s: MergeSettings | None, text: str, seed_text: str, shown: Any,
                       progress: Any = progress_marker) -> dict:
            if s is None:
                raise BlockmergeError("choose the models first (Models tab)")
            with wb.jobs.run("preview", job_progress(progress)) as job:
                pv = wb.preview(s, text, seed_text, job=job)
            t = pv.timings
            info = (f"seeds {','.join(map(str, pv.seeds))}: {t['total_s']:.2f} s (edit {t['apply_s'] * 1000:.0f} ms, "
                    f"images {t['generate_s']:.2f} s, restore {t['restore_s'] * 1000:.0f} ms"
                    + (f", loading {t['load_s']:.1f} s" if t["load_s"] > 0.05 else "")
                    + f"); history #{wb.history.entries[-1].id}")
            out = {gal_merged: [(g.image, f"seed {g.seed}") for g in pv.images], preview_info: info}
            key = tuple(id(v) for v in pv.refs.values())  # kept lists: the same objects while unchanged
            if key != shown:  # A's and B's images only when they changed (each one costs a PNG)
                out[gal_a] = [(g.image, f"A, seed {g.seed}") for g in pv.refs.get("A", [])]
                out[gal_b] = [(g.image, f"B, seed {g.seed}") for g in pv.refs.get("B", [])]
                out[refs_shown] = key
            return out

        preview_btn.click(do_preview, [settings_state, prompt, seeds, refs_shown],
                          [gal_merged, gal_a, gal_b, preview_info, refs_shown],
                          concurrency_id="job", concurrency_limit=1, api_name="preview")

        # ---------------------------------------------------------------- sweep
        @_guarded(sweep_status)
        def do_sweep(a: str, b: str, scale: bool, k: str, byp: bool, swp: bool, custom: str, meth: str,
                     blocks: str, params: str, clamp: bool, text: str, seed_text: str, folder: str, ow: bool,
                     progress: Any = progress_marker) -> dict:
            from urllib.parse import quote

            from ..merge.params import parse_name_specs, parse_param_args

            ks: list[float] = []
            if scale:
                for t in (k or "").replace(" ", "").split(","):
                    if t:
                        try:
                            ks.append(float(t))
                        except ValueError:
                            raise BlockmergeError(f"K: {t!r} is not a number") from None
                if not ks:
                    raise BlockmergeError("K: give at least one factor (e.g. 0.75)")
            def lines(text: str | None) -> list[str]:
                return [ln.strip() for ln in (text or "").splitlines() if ln.strip()]

            customs = [(n, spec.strip()) for n, spec in parse_name_specs(lines(custom), "custom", "gradv=GRAD_V").items()]
            donor = b if b and b != NONE else None
            with wb.jobs.run("sweep", job_progress(progress)) as job:
                r = wb.sweep(a, folder, text, seed_text, donor=donor, scale=ks, bypass=byp, swap=swp,
                             custom=customs, method=None if meth == NONE else meth, blocks=blocks or None,
                             params=parse_param_args(lines(params), "parameters"),
                             clamp=bool(clamp), overwrite=ow, job=job)
            url = "/outputs/" + quote(r.name) + "/"
            frame = (f'<p><a href="{html.escape(url)}index.html" target="_blank" id="sweep-report-link">open the '
                     f'report</a> · <a href="{html.escape(url)}?list" target="_blank" id="sweep-folder-link">the '
                     f'folder</a> ({html.escape(str(r.folder))})</p>'
                     f'<iframe id="sweep-frame" src="{html.escape(url)}index.html" '
                     'style="width:100%; height:900px; border:1px solid #ccc"></iframe>')
            return {sweep_report: frame,
                    sweep_status: f"{r.images} images in {r.name} ({r.made} made, {r.reused} reused)"}

        sweep_btn.click(do_sweep, [pick_a, pick_b, sw_scale, sw_k, sw_bypass, sw_swap, sw_custom, sw_method,
                                   sw_blocks, sw_params, sw_clamp, sw_prompt, sw_seeds, sw_folder, sw_overwrite],
                        [sweep_report, sweep_status], concurrency_id="job", concurrency_limit=1, api_name="sweep")

        # ---------------------------------------------------------------- compare
        @_guarded(compare_status)
        def do_compare(a: str, b: str, c: str, metric: str, progress: Any = progress_marker) -> dict:
            if not b or b == NONE:
                raise BlockmergeError("compare: choose model B (Models tab)")
            with wb.jobs.run("compare", job_progress(progress)) as job:
                job.progress(0.0, "comparing")
                table, svg, _ = wb.compare(a, b, None if not c or c == NONE else c, metric)
            return {cmp_table: table, cmp_map: svg, compare_status: f"compared {a} and {b}"}

        compare_btn.click(do_compare, [pick_a, pick_b, pick_c, cmp_metric], [cmp_map, cmp_table, compare_status],
                          concurrency_id="job", concurrency_limit=1, api_name="compare")

        # ---------------------------------------------------------------- recipes
        @_guarded(recipe_status)
        def do_board(text: str) -> dict:
            toml = wb.mergeboard(text)
            return {recipe_text: toml, recipe_status: "imported; check the input names, then Validate"}

        board_btn.click(do_board, [board_text], [recipe_text, recipe_status], concurrency_limit=None)

        @_guarded(recipe_status)
        def do_validate(text: str) -> dict:
            return {recipe_status: wb.validate_recipe(text)}

        validate_btn.click(do_validate, [recipe_text], [recipe_status], concurrency_id="job", concurrency_limit=1,
                           api_name="validate_recipe")

        @_guarded(recipe_status)
        def do_run(text: str, ow: bool, progress: Any = progress_marker) -> dict:
            with wb.jobs.run("recipe", job_progress(progress)) as job:
                outs = wb.run_recipe(text, overwrite=ow, job=job)
            names = ", ".join(wb.workspace.relative_output(o.output) for o in outs)
            return {recipe_status: f"wrote {names}"}

        run_btn.click(do_run, [recipe_text, recipe_overwrite], [recipe_status], concurrency_id="job",
                      concurrency_limit=1, api_name="run_recipe")

        # ---------------------------------------------------------------- cancel (not queued behind the job)
        def cancel() -> str:
            name = wb.jobs.cancel()
            return f"cancelling {name}…" if name else "nothing is running"

        cancel_preview.click(cancel, None, [preview_info], concurrency_limit=None, queue=False)
        cancel_merge.click(cancel, None, [merge_status], concurrency_limit=None, queue=False)
        cancel_sweep.click(cancel, None, [sweep_status], concurrency_limit=None, queue=False)
        cancel_recipe.click(cancel, None, [recipe_status], concurrency_limit=None, queue=False)

        # ---------------------------------------------------------------- history
        @_guarded(hist_status)
        def hist_list() -> dict:
            entries = list(reversed(wb.history.entries))
            choices = [(e.summary(), e.id) for e in entries]
            return {hist_pick: gr.update(choices=choices, value=entries[0].id if entries else None),
                    hist_status: f"{len(entries)} entries" + (f" ({wb.history.load_error})" if wb.history.load_error else "")}

        hist_refresh.click(hist_list, None, [hist_pick, hist_status], concurrency_limit=None)

        @_guarded(hist_status)
        def hist_show(entry_id: int | None) -> dict:
            if entry_id is None:
                return {hist_detail: ""}
            from dataclasses import asdict

            return {hist_detail: json.dumps(asdict(wb.history.get(int(entry_id))), indent=1)}

        hist_pick.change(hist_show, [hist_pick], [hist_detail, hist_status], concurrency_limit=None)

        @_guarded(hist_status)
        def hist_to_sliders(entry_id: int | None) -> dict:
            if entry_id is None:
                raise BlockmergeError("history: choose an entry")
            s, _ = wb.settings_from_history(int(entry_id))
            out = all_for(s)
            picks = list(s.models) + [NONE] * (3 - len(s.models))
            out.update({method: s.method, pick_a: picks[0], pick_b: picks[1], pick_c: picks[2], dtype: s.dtype,
                        clamp: s.clamp, hist_status: f"entry #{entry_id} is in the sliders (Merge & Preview tab)"})
            return out

        hist_load.click(hist_to_sliders, [hist_pick],
                        [settings_state, method_info, param, *slider_list, weights_text, rules_text, method, pick_a,
                         pick_b, pick_c, dtype, clamp, hist_status], concurrency_limit=None)

        @_guarded(hist_status)
        def hist_to_recipe(entry_id: int | None) -> dict:
            if entry_id is None:
                raise BlockmergeError("history: choose an entry")
            text = wb.history.as_recipe(wb.history.get(int(entry_id)))
            return {recipe_text: text, hist_status: f"entry #{entry_id} is in the Recipes tab"}

        hist_recipe.click(hist_to_recipe, [hist_pick], [recipe_text, hist_status], concurrency_limit=None)

        # ---------------------------------------------------------------- first load
        @_guarded(merge_status)
        def on_load(meth: str, a: str, b: str, c: str, dt: str, s: MergeSettings | None) -> dict:
            out = load_models.__wrapped__()
            new = s
            if new is None:
                new, _ = fresh(meth, a, b, c, dt, None)
            out.update(all_for(new))
            out.update(hist_list.__wrapped__())
            return out

        demo.load(on_load, [method, pick_a, pick_b, pick_c, dtype, settings_state],
                  [*model_outputs, settings_state, method_info, param, *slider_list, weights_text, rules_text,
                   hist_pick, hist_status, merge_status], concurrency_limit=None)
    return demo
