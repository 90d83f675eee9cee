"""Running a recipe: every output tensor is pulled through the whole chain of steps in one pass.

The steps become a graph of lazy :class:`~blockmerge.merge.MergeNode` objects over the input
files, and each output is written by the merge engine's streaming executor, so a chain of three
merges holds no intermediate model and writes no temporary file: per key, A and B are read, merged,
the result fed to the next step with C and D, and only the final tensor is written. A step (or a
file) used by several later steps is computed (read) once per key, not once per use.

Everything that can fail without arithmetic fails before the first byte is written: the recipe's
names and cycles (``schema``), then the files, their architectures, the weights of every step, the
output paths, and last the sha256 of every input that states one.
"""

from __future__ import annotations

import contextlib
import os
import threading
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..architectures import Architecture
from ..errors import BlockmergeError
from ..io import check_output_path, file_hashes, input_guard, open_checkpoint
from ..io.text import read_user_text
from ..merge.executor import (
    check_position_ids,
    input_record,
    method_record,
    output_dtype,
    output_format,
    write_hashed,
)
from ..merge.metadata import build_metadata, read_record
from ..merge.methods import get_method
from ..merge.nodes import FileSource, Info, MergeNode, MergeReport, OverlayNode, Scratch, Source
from ..merge.params import ParamValues, resolve_params
from ..merge.presets import PresetBook, load_presets
from ..merge.weights import BlockWeights
from .schema import RecipeError, RecipeSpec, check_graph, parse_recipe, step_names, to_toml

EMBED_HEADER = (
    "blockmerge recipe, as embedded in the file it made (input sha256s are checked before merging).",
    "Rerun: blockmerge run THIS.toml -o OUTPUT.safetensors   (input paths: relative to this file's folder)",
    "parameter lists: BASE first, then the blocks IN00.., M00, OUT00.. (blockmerge blocks FILE lists them);",
    "elemental rules follow the list after ';'",
)


@dataclass
class Recipe:
    """A checked recipe and where its relative paths start."""

    spec: RecipeSpec
    base_dir: Path
    source: str = "recipe"
    path: Path | None = None  # the recipe file, never to be written over


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    p = Path(path)
    text = read_user_text(p, str(p), RecipeError)
    return Recipe(parse_recipe(text, str(p)), p.resolve().parent, str(p), p)


def recipe_from_text(text: str, base_dir: str | os.PathLike[str] = ".", source: str = "recipe") -> Recipe:
    return Recipe(parse_recipe(text, source), Path(base_dir).resolve(), source)


def recipe_files(text: str, base_dir: str | os.PathLike[str], source: str = "recipe") -> tuple[list[Path], list[Path]]:
    """The files a recipe text names, as ``run`` would resolve them if it were saved in ``base_dir``:
    (its inputs, its outputs).

    Why: a command that *writes* a recipe (the importers) must treat these as its own inputs. Saving
    the TOML over a checkpoint the recipe reads (``import-mergeboard ... --model A=a.safetensors -o
    a.safetensors --overwrite``) destroys the model the recipe is about, and saving it where the
    recipe writes its merge makes a recipe that would replace itself.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{source}: not valid TOML: {e}") from None
    base = Path(base_dir).resolve()

    def resolve(path: object) -> Path | None:
        # Lenient on purpose: an imported recipe may leave an input's path empty for the user to fill.
        if not isinstance(path, str) or not path.strip():
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() else base / p

    ins = data.get("inputs") if isinstance(data.get("inputs"), dict) else {}
    outs = data.get("outputs") if isinstance(data.get("outputs"), list) else []
    inputs = [resolve(v if isinstance(v, str) else v.get("path") if isinstance(v, dict) else None) for v in ins.values()]
    outputs = [resolve(o.get("path")) for o in outs if isinstance(o, dict)]
    return [p for p in inputs if p is not None], [p for p in outputs if p is not None]


@dataclass
class RecipeOutput:
    """What one output of a recipe run wrote."""

    output: Path
    step: str
    architecture: str
    n_tensors: int
    bytes_written: int
    recipe_text: str
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class _Shared:
    """A source used by several steps: per key it is computed (or read) once.

    A key's whole chain is computed synchronously by the one worker thread that asked for it, so a
    thread-local "last key" memo is exactly the sharing needed, and :class:`_Root` drops it as soon
    as that key is done (no tensor outlives its key). Merge methods never modify their inputs, so
    handing the same tensor to two consumers is safe.
    """

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.name = inner.name
        self.arch = inner.arch
        self.space = getattr(inner, "space", "model")
        self._local = threading.local()

    def keys(self) -> list[str]:
        return self.inner.keys()

    def info(self, key: str) -> Info:
        return self.inner.info(key)

    def get(self, key: str) -> torch.Tensor:
        memo = getattr(self._local, "memo", None)
        if memo is not None and memo[0] == key:
            return memo[1]
        t = self.inner.get(key)
        self._local.memo = (key, t)
        return t

    def sliceable(self, key: str) -> bool:
        return getattr(self.inner, "sliceable", lambda k: False)(key)

    def get_range(self, key: str, lo: int, hi: int, scratch: Scratch) -> torch.Tensor:
        # The memo holds a view of the inner node's scratch buffer, which only the inner node's next
        # call overwrites, and that call happens only on a miss.
        memo = getattr(self._local, "range_memo", None)
        if memo is not None and memo[0] == (key, lo, hi):
            return memo[1]
        t = self.inner.get_range(key, lo, hi, scratch)  # type: ignore[attr-defined]
        self._local.range_memo = ((key, lo, hi), t)
        return t

    def forget(self) -> None:
        self._local.memo = None
        self._local.range_memo = None


class _Root:
    """The output end of the graph: clears the shared memos of the thread that computed a key."""

    def __init__(self, inner: Source, shared: Sequence[_Shared]) -> None:
        self.inner = inner
        self.name = inner.name
        self.arch = inner.arch
        self.space = getattr(inner, "space", "model")
        self.shared = list(shared)

    def explain(self, key: str) -> str:
        explain = getattr(self.inner, "explain", None)
        return explain(key) if explain is not None else ""

    def keys(self) -> list[str]:
        return self.inner.keys()

    def info(self, key: str) -> Info:
        return self.inner.info(key)

    def get(self, key: str) -> torch.Tensor:
        try:
            return self.inner.get(key)
        finally:
            for s in self.shared:
                s.forget()

    def sliceable(self, key: str) -> bool:
        return getattr(self.inner, "sliceable", lambda k: False)(key)

    def get_range(self, key: str, lo: int, hi: int, scratch: Scratch) -> torch.Tensor:
        try:
            return self.inner.get_range(key, lo, hi, scratch)  # type: ignore[attr-defined]
        finally:
            for s in self.shared:
                s.forget()


def _canon_weights(w: BlockWeights | None) -> float | list[float] | str | None:
    """One number when every block (and BASE) agrees, else the full BASE-first list (as text when
    elemental rules follow it): the recipe embedded in a file never depends on a preset file or on
    how the user spelled the weights."""
    if w is None:
        return None
    if w.rules:
        return w.spec_text()
    vals = list(w.values)
    return vals[0] if all(v == vals[0] for v in vals) else vals


@dataclass
class _Plan:
    recipe: Recipe
    arch: Architecture
    names: list[str]
    order: list[int]
    paths: dict[str, Path]
    files: dict[str, FileSource]
    nodes: dict[str, Source]
    weights: dict[str, ParamValues]
    reports: dict[str, MergeReport]
    shared: list[_Shared]
    warnings: list[str]
    loras: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # LoRA step -> what each LoRA did
    lora_blocks: dict[str, list[BlockWeights]] = field(default_factory=dict)  # ... and its block values

    def needed(self, step: str, vae: str | None) -> tuple[list[str], list[str]]:
        """The inputs and steps (in recipe order) that ``step`` depends on."""
        spec = self.recipe.spec
        idx = {n: i for i, n in enumerate(self.names)}
        steps: set[str] = set()
        inputs: set[str] = {vae} if vae else set()
        todo = [step]
        while todo:
            s = todo.pop()
            if s in steps:
                continue
            steps.add(s)
            inputs.update(lo.lora for lo in spec.steps[idx[s]].loras)
            for ref in spec.steps[idx[s]].models:
                if ref in spec.inputs:
                    inputs.add(ref)
                else:
                    todo.append(ref)
        return [n for n in spec.inputs if n in inputs], [n for n in self.names if n in steps]


def _resolve(recipe: Recipe, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else recipe.base_dir / p


def _plan(recipe: Recipe, stack: contextlib.ExitStack, presets: PresetBook | None) -> _Plan:
    spec, src = recipe.spec, recipe.source
    names = step_names(spec)
    order = check_graph(spec, src)
    model_inputs = {ref for s in spec.steps for ref in s.models if ref in spec.inputs}
    paths = {n: _resolve(recipe, spec.input(n).path) for n in spec.inputs}
    files: dict[str, FileSource] = {}
    for n in spec.inputs:
        if n not in model_inputs:
            continue
        try:
            fs = FileSource(paths[n], name=f"input {n!r}", keep_ema=spec.input(n).keep_ema)
        except BlockmergeError as e:
            raise RecipeError(f"{src}: input {n!r}: {e}") from None
        stack.callback(fs.close)
        files[n] = fs
    # Architectures: every step's models must agree, and with the recipe's stated architecture.
    arch_of: dict[str, Architecture] = {n: f.arch for n, f in files.items()}
    for i in order:
        s, name = spec.steps[i], names[i]
        first = s.models[0]
        for ref in s.models[1:]:
            if arch_of[ref] is not arch_of[first]:
                raise RecipeError(
                    f"{src}: step {name!r} (#{i + 1}): {_what(spec, ref)} is {arch_of[ref].name} but "
                    f"{_what(spec, first)} is {arch_of[first].name}; models of different architectures cannot be merged"
                )
        arch_of[name] = arch_of[first]
    arch = arch_of[names[order[-1]]]
    for n, a in arch_of.items():
        if a is not arch:
            raise RecipeError(f"{src}: {_what(spec, n)} is {a.name} but {_what(spec, names[order[-1]])} is "
                              f"{arch.name}; a recipe works on one architecture")
    if spec.architecture is not None and spec.architecture.upper() != arch.name:
        raise RecipeError(f"{src}: architecture = {spec.architecture!r}, but the inputs are {arch.name}")
    # Weights and nodes, in dependency order.
    book = presets if presets is not None else load_presets()
    uses: dict[str, int] = {}
    for s in spec.steps:
        for ref in s.models:
            uses[ref] = uses.get(ref, 0) + 1
    shared: dict[str, _Shared] = {}

    def operand(ref: str) -> Source:
        base: Source = files[ref] if ref in files else nodes[ref]
        if uses.get(ref, 0) > 1:
            if ref not in shared:
                shared[ref] = _Shared(base)
            return shared[ref]
        return base

    nodes: dict[str, Source] = {}
    lora_records: dict[str, list[dict[str, Any]]] = {}
    lora_blocks: dict[str, list[BlockWeights]] = {}
    weights: dict[str, ParamValues] = {}
    reports: dict[str, MergeReport] = {}
    warnings: list[str] = []
    for i in order:
        s, name = spec.steps[i], names[i]
        where = f"{src}: step {name!r} (#{i + 1})"
        if s.loras:
            node, recs, lwarn, blocks = _lora_step(recipe, s, operand(s.models[0]), paths, stack, book, where)
            nodes[name], weights[name], reports[name] = node, {}, MergeReport()
            lora_records[name] = recs
            lora_blocks[name] = blocks
            warnings += [f"step {name!r}: {w}" for w in lwarn]
            continue
        m = get_method(s.method)
        given = s.given_params()
        try:
            pv = resolve_params(m, arch, len(s.models), given, bases={"alpha": s.base_alpha, "beta": s.base_beta},
                                presets=book, given_as={n: n for n in m.param_names(len(s.models))}, where=where)
            node = MergeNode(m, [operand(r) for r in s.models], pv, name=f"step {name!r}",
                             fix_position_ids=s.fix_position_ids, clamp=s.clamp)
        except RecipeError:
            raise
        except BlockmergeError as e:
            msg = str(e)
            raise RecipeError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        nodes[name], weights[name], reports[name] = node, pv, node.report
        first = s.models[0]
        if first in files:
            check_position_ids(files[first], node.report, s.fix_position_ids)
        warnings += [f"step {name!r}: {w}" for w in node.report.warnings]
        if node.report.only_in_others:
            warnings.append(f"step {name!r}: {len(node.report.only_in_others)} tensors exist only in its later "
                            f"models and were left out (e.g. {node.report.only_in_others[0]})")
    for n, f in files.items():
        if f.dropped_ema:
            warnings.append(f"input {n!r}: dropped {f.dropped_ema} model_ema.* tensors (keep_ema = true keeps them)")
    return _Plan(recipe, arch, names, order, paths, files, nodes, weights, reports, list(shared.values()), warnings,
                 lora_records, lora_blocks)


def _lora_step(recipe: Recipe, s: Any, model: Source, paths: Mapping[str, Path], stack: contextlib.ExitStack,
               presets: PresetBook, where: str) -> tuple[Source, list[dict[str, Any]], list[str], list[BlockWeights]]:
    """A step's LoRAs baked into its model (lazily), as ``lora apply`` does; also each LoRA's block
    values without its strengths (what the embedded recipe writes back)."""
    from ..lora import LoraSpec, lora_chain, lora_weights

    specs = []
    for lo in s.loras:
        blocks = lo.blocks
        if isinstance(blocks, list):
            blocks = ",".join(repr(float(v)) for v in blocks)
        elif isinstance(blocks, int | float):
            blocks = repr(float(blocks))
        specs.append(LoraSpec(paths[lo.lora], float(lo.te if lo.te is not None else lo.strength), float(lo.strength),
                              blocks, lo.dyn, lo.lora))
    try:
        node, records, warnings = lora_chain(model, specs, stack, presets=presets, model_name=model.name)
        blocks_only = [lora_weights(model.arch, sp.blocks, 1.0, 1.0, presets, f"{where}: blocks") for sp in specs]
    except BlockmergeError as e:
        msg = str(e)
        raise RecipeError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    return node, records, warnings, blocks_only


def _what(spec: RecipeSpec, ref: str) -> str:
    return f"input {ref!r}" if ref in spec.inputs else f"step {ref!r}"


def run_recipe(
    recipe: Recipe | str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    presets: PresetBook | None = None,
    verify_hashes: bool = True,
    dry_run: bool = False,
    progress: bool = False,
    threads: int | None = None,
    allow_non_finite: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[RecipeOutput]:
    """Check a recipe completely, then write each of its outputs in one streaming pass per output.

    ``output`` replaces the path of a recipe's single output (or adds one for the last step when it
    has none); ``output_dir`` is where relative output paths go (default: the recipe's folder).
    ``verify_hashes=False`` skips the sha256 check of inputs that state one; ``dry_run`` does every
    check and writes nothing (returns an empty list). ``on_progress(bytes_done, bytes_total)``
    follows each output's write; what it raises stops the run (nothing partial is left).
    """
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    spec, src = rec.spec, rec.source
    names = step_names(spec)
    outs = [o.model_copy() for o in spec.outputs]
    if output is not None:
        if len(outs) > 1:
            raise RecipeError(f"{src}: has {len(outs)} outputs; -o/--output replaces the path of a single one")
        if not outs:
            from .schema import OutputSpec

            outs = [OutputSpec()]
        outs[0].path = str(output)
    if not outs:
        raise RecipeError(f"{src}: no [[outputs]] (add one, or give -o/--output)")
    out_dir = Path(output_dir) if output_dir is not None else rec.base_dir
    targets: list[Path] = []
    for j, o in enumerate(outs):
        if not o.path:
            raise RecipeError(f"{src}: output #{j + 1} has no path (give -o/--output)")
        p = Path(o.path).expanduser()
        if output is not None and j == 0:
            targets.append(p)
        else:
            targets.append(p if p.is_absolute() else out_dir / p)
    _check_distinct_outputs(targets, src)
    results: list[RecipeOutput] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(input_guard())
        plan = _plan(rec, stack, presets)
        all_inputs = list(plan.paths.values()) + ([rec.path] if rec.path is not None else [])
        vae_readers: dict[str, Any] = {}
        for j, (o, target) in enumerate(zip(outs, targets, strict=True)):
            check_output_path(target, all_inputs, overwrite, arg=f"output #{j + 1}")
            output_dtype(o.dtype)
            if o.vae and o.vae not in vae_readers:
                try:
                    r = plan.files[o.vae] if o.vae in plan.files else open_checkpoint(plan.paths[o.vae])
                except BlockmergeError as e:
                    raise RecipeError(f"{src}: input {o.vae!r}: {e}") from None
                if o.vae not in plan.files:
                    stack.callback(r.close)
                vae_readers[o.vae] = r
        if verify_hashes:
            for n in spec.inputs:
                want = spec.input(n).sha256
                if want is None:
                    continue
                got = file_hashes(plan.paths[n]).sha256
                if got != want:
                    raise RecipeError(
                        f"{src}: input {n!r} ({plan.paths[n]}): sha256 is {got[:12]}…, the recipe expects "
                        f"{want[:12]}… (the file changed or is another file)"
                    )
        if dry_run:
            return []
        for o, target in zip(outs, targets, strict=True):
            step = o.step or names[-1]
            node: Source = _Root(plan.nodes[step], plan.shared)
            if o.vae:
                try:
                    node = OverlayNode(node, vae_readers[o.vae])
                except BlockmergeError as e:
                    raise RecipeError(f"{src}: output {target.name}: vae {o.vae!r}: {e}") from None
            fmt = output_format(target, o.format)
            results.append(_write_output(plan, node, target, step, o.dtype, fmt, o.vae, progress, threads,
                                         allow_non_finite, overwrite, on_progress))
    return results


def _check_distinct_outputs(targets: Sequence[Path], src: str) -> None:
    """Two outputs naming one file (``d.safetensors`` and ``./d.safetensors``, a symlink to it, a hard
    link of it) would have the second silently replace the first: an error before any work."""
    seen: dict[object, tuple[int, Path]] = {}
    for j, t in enumerate(targets):
        ids: list[object] = [os.path.realpath(t)]
        with contextlib.suppress(OSError):
            st = os.stat(t)
            ids.append((st.st_dev, st.st_ino))
        for ident in ids:
            if ident in seen:
                i, other = seen[ident]
                raise RecipeError(f"{src}: outputs #{i + 1} ({other}) and #{j + 1} ({t}) are the same file")
        for ident in ids:
            seen[ident] = (j, t)


def _write_output(
    plan: _Plan, node: Source, target: Path, step: str, dtype: str, fmt: str, vae: str | None,
    progress: bool, threads: int | None, allow_non_finite: bool = False, overwrite: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> RecipeOutput:
    spec = plan.recipe.spec
    inputs, steps = plan.needed(step, vae)
    hash_paths = [plan.paths[n] for n in inputs]
    idx = {n: i for i, n in enumerate(plan.names)}
    last = spec.steps[idx[step]]
    m = get_method(last.method)
    pv = plan.weights[step]

    def text(hashes: Mapping[Path, Any] | None) -> str:
        data: dict[str, Any] = {"version": spec.version, "architecture": plan.arch.name, "inputs": {}, "steps": []}
        for k, n in enumerate(inputs):
            i = spec.input(n)
            h = input_record(k, n, plan.paths[n], hashes, None).sha256
            data["inputs"][n] = {"path": i.path, "sha256": h, "keep_ema": True if i.keep_ema else None}
        for n in steps:
            s = spec.steps[idx[n]]
            if s.loras:
                data["steps"].append({"name": n, "models": list(s.models), "loras": [
                    {"lora": lo.lora, "strength": float(lo.strength), "te": float(lo.te) if lo.te is not None else None,
                     "blocks": _canon_weights(_lora_weights(plan, n, j)), "dyn": lo.dyn}
                    for j, lo in enumerate(s.loras)]})
                continue
            values = plan.weights[n]
            others = {k: _canon_weights(w) for k, w in values.items() if k not in ("alpha", "beta")}
            data["steps"].append({
                "name": n, "method": s.method, "models": list(s.models),
                "alpha": _canon_weights(values.get("alpha")), "beta": _canon_weights(values.get("beta")),
                "params": others or None,
                "clamp": True if s.clamp else None,
                "fix_position_ids": True if s.fix_position_ids else None,
            })
        data["outputs"] = [{"step": step, "dtype": dtype, "format": fmt, "vae": vae}]
        return to_toml(data, EMBED_HEADER)

    if last.loras:
        method_part: dict[str, Any] = {"method": "lora", "formula": "A + Σ α·ΔW (each LoRA's ΔW per block, in order)",
                                       "architecture": plan.arch.name, "space": "model", "loras": plan.loras[step]}
    else:
        method_part = method_record(m, plan.arch.name, pv)
    record_base = {**method_part, "dtype": dtype, "format": fmt, "steps": len(steps)}
    roles = [r if r in spec.inputs else None for r in last.models]

    from ..lora.apply import fill_lora_hashes, lora_hash_job  # lazily, as the LoRA steps import it

    def meta(hashes: Mapping[Any, Any] | None) -> dict[str, str]:
        if last.loras:
            fill_lora_hashes(plan.loras[step], hashes)
        records = [
            input_record(k, n, plan.paths[n], hashes, plan.files[n].metadata if n in plan.files else None)
            for k, n in enumerate(inputs) if n != vae or n in plan.files
        ]
        vrec = input_record(inputs.index(vae), vae, plan.paths[vae], hashes, None) if vae else None
        record = {**record_base, "recipe": text(hashes)}
        alpha = pv.get("alpha")
        return build_metadata(record, records, a1111_method="LoRA" if last.loras else m.a1111_name,
                              multiplier=alpha["BASE"] if alpha is not None else None,
                              half=dtype == "fp16", vae=vrec, a1111_roles=roles)

    out_report = MergeReport()
    more = lora_hash_job([plan.paths[lo.lora] for lo in last.loras]) if last.loras else None
    # a LoRA step's matmuls are compute-bound, as in ``lora apply``
    written, final = write_hashed(node, target, hash_paths, meta, more_hashes=more, dtype=dtype, fmt=fmt,
                                  compute_bound=any(spec.steps[idx[n]].loras for n in steps), progress=progress,
                                  threads=threads, allow_non_finite=allow_non_finite, report=out_report,
                                  overwrite=overwrite, on_progress=on_progress)
    rec = read_record(final) or {}
    return RecipeOutput(target, step, plan.arch.name, len(node.keys()), written, str(rec.get("recipe", "")),
                        final, [*plan.warnings, *out_report.warnings])


def _lora_weights(plan: _Plan, step: str, j: int) -> BlockWeights:
    """The block values LoRA ``j`` of a LoRA step got, without its strengths (the spec as written back)."""
    return plan.lora_blocks[step][j]


def embedded_recipe(path: str | os.PathLike[str]) -> str | None:
    """The recipe text blockmerge embedded in a merged file (None for files without one).

    The text is checked as ``run`` would check it (TOML, schema, names, steps) before it is handed
    out: ``info --recipe`` exists to print a recipe that can be rerun, so a hand-edited or foreign
    one that cannot is a :class:`RecipeError` naming the file, not text printed with exit code 0.
    """
    with open_checkpoint(path) as r:
        rec = read_record(r.metadata, str(path))
    if not rec or not rec.get("recipe"):
        return None
    text = str(rec["recipe"])
    parse_recipe(text, f"{path}: its embedded recipe")
    return text
