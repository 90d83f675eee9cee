"""What an interactive front end does, as plain functions over the library: one :class:`Workbench`.

Every action of the web UI (``blockmerge ui``) is one method here, and each method is a few lines
over the public functions the command line uses (:func:`~blockmerge.merge.merge`,
:func:`~blockmerge.experiments.sweep.run_sweep`, :func:`~blockmerge.compare.compare`,
:func:`~blockmerge.recipes.run_recipe`), so a notebook can drive the same session and the tests
check it without a browser. What the workbench adds is what a server needs and a command does not:

- names instead of paths (:class:`~.workspace.Workspace`: models only from the models folder and
  the bundled models, outputs only into the output folder);
- loaded pipelines kept between previews (:class:`~.preview.Previewer`);
- one job at a time, with progress and cancel (:class:`~.jobs.JobControl`);
- a history of every preview and merge (:class:`~.history.History`).

Errors are :class:`~blockmerge.errors.BlockmergeError` with the message the CLI would print.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..architectures import Architecture, detect
from ..errors import BlockmergeError
from ..merge.presets import PresetBook, load_presets
from .history import History, HistoryEntry
from .jobs import Job, JobControl
from .preview import Preview, Previewer
from .settings import MergeSettings, initial_settings, settings_from_record
from .workspace import Workspace

__all__ = ["MergeOutcome", "ModelInfo", "SweepOutcome", "Workbench"]

DEFAULT_PROMPT = "a large red circle on the left, white background\nSteps: 15, Sampler: Euler a, CFG scale: 6, Size: 64x64"
MERGE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class ModelInfo:
    """A row of the Models tab."""

    name: str
    architecture: str
    title: str
    size_bytes: int
    short_hash: str
    sha256: str
    bundled: bool


@dataclass
class MergeOutcome:
    output: Path
    name: str  # in the output folder
    sha256: str
    short_hash: str
    legacy_hash: str
    record: dict[str, Any]
    command: str
    warnings: list[str]
    entry: HistoryEntry


@dataclass
class SweepOutcome:
    folder: Path
    name: str  # the folder's name in the output folder
    index: Path | None
    images: int
    made: int
    reused: int
    warnings: list[str] = field(default_factory=list)


class Workbench:
    """One user's session over a :class:`Workspace`; safe to call from several threads (jobs queue)."""

    def __init__(self, workspace: Workspace, *, presets: PresetBook | None = None, device: str | None = None,
                 dtype: Any = None) -> None:
        self.workspace = workspace
        self.presets = presets if presets is not None else load_presets()
        self.jobs = JobControl()
        self.previewer = Previewer(device=device, dtype=dtype)
        self.history = History(workspace.output_dir)
        self._info: dict[tuple, ModelInfo] = {}

    # -- models -----------------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """Every model on offer with its family, size and A1111 short hash (hashes are cached)."""
        out = []
        for e in self.workspace.list_models():
            try:
                out.append(self.model_info(e.name))
            except BlockmergeError:
                continue  # not a checkpoint blockmerge reads: not offered
        return out

    def model_info(self, name: str) -> ModelInfo:
        from ..inspect import checkpoint_info

        path = self.workspace.model_path(name)
        st = os.stat(path)
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._info:
            info = checkpoint_info(path, hashes=True)
            bundled = not (self.workspace.models_dir and str(path).startswith(str(self.workspace.models_dir) + os.sep))
            self._info[key] = ModelInfo(name, info["architecture"], info["title"], info["size_bytes"],
                                        info["model_hash"], info["sha256"], bundled)
        return self._info[key]

    def paths(self, names: Sequence[str]) -> list[Path]:
        return [self.workspace.model_path(n) for n in names]

    def architecture(self, names: Sequence[str]) -> Architecture:
        """The family of the models (all must be one family), from their key names."""
        from ..io import open_checkpoint

        arch = None
        first = None
        for n, p in zip(names, self.paths(names), strict=True):
            with open_checkpoint(p) as r:
                a = detect([k for k in r.keys() if not k.startswith("model_ema.")], n)
            if arch is None:
                arch, first = a, n
            elif a is not arch:
                raise BlockmergeError(f"model {n!r} is {a.title} but {first!r} is {arch.title}; "
                                      "models of different architectures cannot be merged")
        if arch is None:
            raise BlockmergeError("choose at least model A")
        return arch

    def new_settings(self, method: str, names: Sequence[str], dtype: str = "fp16",
                     previous: MergeSettings | None = None) -> tuple[MergeSettings, Architecture]:
        arch = self.architecture(names)
        return initial_settings(method, list(names), arch, dtype, previous), arch

    # -- merge ------------------------------------------------------------------------------------

    def merge(self, settings: MergeSettings, output: str, *, overwrite: bool = False,
              job: Job | None = None) -> MergeOutcome:
        """Write the merge the sliders hold: the same file, byte for byte, as
        :meth:`MergeSettings.command_line` (``blockmerge merge``) writes."""
        from ..io import file_hashes, input_guard
        from ..merge import merge

        paths = self.paths(settings.models)
        out = self.workspace.output_path(output, suffixes=MERGE_SUFFIXES)
        with input_guard():
            result = merge(paths, out, method=settings.method, params=settings.specs(), dtype=settings.dtype,
                           clamp=settings.clamp, presets=self.presets, overwrite=overwrite,
                           on_progress=job.bytes_progress if job is not None else None)
        h = file_hashes(result.output)
        record = json.loads(result.metadata.get("blockmerge", "{}"))
        entry = self.history.add(
            kind="merge", method=result.method, architecture=result.architecture,
            models=self._model_records(settings.models, paths), params={n: w.as_dict() for n, w in result.params.items()},
            rules={n: [r.text for r in w.rules] for n, w in result.params.items() if w.rules},
            dtype=settings.dtype, clamp=settings.clamp, output=self.workspace.relative_output(result.output),
            output_sha256=h.sha256,
        )
        return MergeOutcome(result.output, self.workspace.relative_output(result.output), h.sha256, h.short,
                            h.legacy, record, settings.command_line([str(p) for p in paths], str(result.output)),
                            list(result.report.warnings), entry)

    def _model_records(self, names: Sequence[str], paths: Sequence[Path]) -> list[dict[str, str]]:
        from ..io import file_hashes

        return [{"role": chr(ord("A") + i), "name": n, "sha256": file_hashes(p).sha256}
                for i, (n, p) in enumerate(zip(names, paths, strict=True))]

    # -- preview ----------------------------------------------------------------------------------

    def generation(self, prompt: str, seeds: str | Sequence[int]) -> Any:
        """Generation parameters from A1111 infotext (or a bare prompt) and seeds (``1-4``, ``1,5``)."""
        from ..experiments.sweep import prompt_params
        from ..generation.generate import parse_seeds

        if not (prompt or "").strip():
            raise BlockmergeError("prompt: empty (type a prompt or paste A1111 infotext)")
        seed_list = parse_seeds(seeds, "seeds") if isinstance(seeds, str) else [int(s) for s in seeds]
        if len(seed_list) > 64:
            raise BlockmergeError(f"seeds: {len(seed_list)} seeds; a preview takes at most 64")
        return prompt_params(prompt, seed_list)

    def preview(self, settings: MergeSettings, prompt: str, seeds: str | Sequence[int], *,
                job: Job | None = None) -> Preview:
        """Images of the merge the sliders hold, applied in place to the loaded pipeline (nothing is
        written but the history), beside A's and B's images for the same seeds."""
        gen = self.generation(prompt, seeds)
        paths = self.paths(settings.models)
        arch = self.architecture(settings.models)
        params = settings.resolve(arch, self.presets)
        pv = self.previewer.render(paths, settings.method, params, gen, dtype=settings.dtype, clamp=settings.clamp,
                                   job=job)
        self.history.add(
            kind="preview", method=settings.method, architecture=arch.name,
            models=self._model_records(settings.models, paths), params={n: w.as_dict() for n, w in params.items()},
            rules={n: [r.text for r in w.rules] for n, w in params.items() if w.rules}, dtype=settings.dtype,
            clamp=settings.clamp, prompt=prompt, seeds=list(gen.seeds),
        )
        return pv

    # -- sweeps -----------------------------------------------------------------------------------

    def sweep(self, model: str, folder: str, prompt: str, seeds: str | Sequence[int], *,
              donor: str | None = None, scale: Sequence[float] = (), bypass: bool = False, swap: bool = False,
              custom: Sequence[tuple[str, str]] = (), method: str | None = None, blocks: str | None = None,
              params: Mapping[str, str] | None = None, clamp: bool = False,
              overwrite: bool = False, job: Job | None = None) -> SweepOutcome:
        """A sweep into ``folder`` (inside the output folder) and its U-shaped report, on the pipelines
        the previews keep loaded. A cancelled sweep keeps its finished images; rerunning resumes.
        ``params`` (name -> spec) and ``clamp`` go to the custom variants, as ``sweep --param``/``--clamp``."""
        from ..experiments.report import write_report
        from ..experiments.sweep import parse_blocks, plan_variants, run_sweep

        if not (scale or bypass or swap or custom):
            raise BlockmergeError("choose at least one experiment: scale, bypass, swap or custom")
        if swap and not donor:
            raise BlockmergeError("swap: choose a donor model (B) to take the blocks from")
        gen = self.generation(prompt, seeds)
        out = self.workspace.output_folder(folder, what="sweep folder")
        if job is not None:
            job.progress(0.0, "loading the models")
        path_a = self.workspace.model_path(model)
        loaded = self.previewer.model(path_a)
        arch = loaded.architecture
        donors: dict[str, Any] = {}
        dname = None
        if donor:
            dname = re.sub(r"[^A-Za-z0-9._+-]", "_", Path(donor).stem)[:40] or "B"
            if dname == path_a.stem:
                dname += "-donor"
            donors[dname] = self.previewer.model(self.workspace.model_path(donor))
            if donors[dname].architecture is not arch:
                raise BlockmergeError(f"donor {donor!r} is {donors[dname].architecture.title}, "
                                      f"{model!r} is {arch.title}")
        chosen = parse_blocks(blocks or None, arch)
        variants = plan_variants(arch, chosen, scale=scale, bypass=bypass, swap_donor=dname if swap else None,
                                 custom=custom, method=method, params=params, donors=list(donors),
                                 presets=self.presets, clamp=clamp)
        from ..io import input_guard

        with input_guard():
            result = run_sweep(loaded, variants, [gen], out, seeds=list(gen.seeds), donors=donors, progress=False,
                               model_name=path_a.stem, overwrite=overwrite,
                               on_progress=job.images_progress if job is not None else None)
            index = write_report(out, result, overwrite=overwrite)
        m = result.meta
        return SweepOutcome(out, self.workspace.relative_output(out), index, len(result.images),
                            int(m.get("images_made", 0)), int(m.get("images_reused", 0)))

    # -- compare ----------------------------------------------------------------------------------

    def compare(self, a: str, b: str, base: str | None = None, metric: str = "distance") -> tuple[str, str, Any]:
        """``(table text, heat map SVG, result)`` of ``blockmerge compare`` on two models (and a base)."""
        from ..compare import METRICS, compare, format_table, heatmap_svg

        if metric not in METRICS:
            raise BlockmergeError(f"metric {metric!r}: choose one of {', '.join(METRICS)}")
        if metric.startswith("change") and not base:
            raise BlockmergeError(f"metric {metric}: needs a base model C")
        paths = self.paths([a, b] + ([base] if base else []))
        r = compare(paths[0], paths[1], paths[2] if base else None)
        return format_table(r), heatmap_svg(r, metric), r

    # -- recipes ----------------------------------------------------------------------------------

    def mergeboard(self, text: str) -> str:
        """Merge Board text as a recipe (TOML), its ``__NAME__`` variables bound to the models on offer
        whose name (or file name without suffix) matches."""
        from ..recipes import mergeboard_to_toml

        bind: dict[str, str] = {}
        for e in self.workspace.list_models():
            stem = Path(e.name).name
            for suf in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
                stem = stem.removesuffix(suf)
            bind.setdefault(e.name, e.name)
            bind.setdefault(stem, e.name)
        return mergeboard_to_toml(text, source="Merge Board text", models=bind)

    def _recipe(self, text: str) -> Any:
        """The recipe with every input resolved through the models policy and every output through
        the output policy (names only: no absolute paths, no '..')."""
        from ..recipes import RecipeError, recipe_from_text
        from ..recipes.schema import InputSpec

        rec = recipe_from_text(text, self.workspace.output_dir, source="recipe")
        spec = rec.spec
        inputs = {}
        for n in spec.inputs:
            i = spec.input(n)
            try:
                path = self.workspace.model_path(i.path)
            except BlockmergeError as e:
                raise RecipeError(f"recipe: input {n!r}: {e}") from None
            inputs[n] = InputSpec(path=str(path), sha256=i.sha256, keep_ema=i.keep_ema)
        outputs = []
        for j, o in enumerate(spec.outputs):
            if not o.path:
                raise RecipeError(f"recipe: output #{j + 1} has no path (give a file name in the output folder)")
            try:
                p = self.workspace.output_path(o.path, suffixes=MERGE_SUFFIXES, what=f"output #{j + 1}")
            except BlockmergeError as e:
                raise RecipeError(f"recipe: {e}") from None
            outputs.append(o.model_copy(update={"path": str(p)}))
        rec.spec = spec.model_copy(update={"inputs": inputs, "outputs": outputs})
        return rec

    def validate_recipe(self, text: str) -> str:
        """Every check ``blockmerge run --dry-run`` makes (names, lines, files, weights, hashes, outputs),
        nothing written; the one-line error names the line or step."""
        from ..recipes import run_recipe

        rec = self._recipe(text)
        run_recipe(rec, dry_run=True, presets=self.presets)
        outs = ", ".join(Path(o.path).relative_to(self.workspace.output_dir).as_posix() for o in rec.spec.outputs)
        return f"OK: {len(rec.spec.steps)} step(s), writes {outs}"

    def run_recipe(self, text: str, *, overwrite: bool = False, job: Job | None = None) -> list[Any]:
        from ..io import input_guard
        from ..recipes import run_recipe

        rec = self._recipe(text)
        with input_guard():
            return run_recipe(rec, presets=self.presets, overwrite=overwrite,
                              on_progress=job.bytes_progress if job is not None else None)

    # -- history ----------------------------------------------------------------------------------

    def settings_from_history(self, entry_id: int) -> tuple[MergeSettings, Architecture]:
        """An entry back in the sliders (its models must still be on offer)."""
        from ..architectures import by_name

        e = self.history.get(entry_id)
        names = [m["name"] for m in e.models]
        self.paths(names)  # still there?
        try:
            arch = by_name(e.architecture)
        except KeyError:
            raise BlockmergeError(f"history #{entry_id}: unknown architecture {e.architecture}") from None
        return settings_from_record(e.params, e.rules, e.method, names, arch, e.dtype, e.clamp), arch
