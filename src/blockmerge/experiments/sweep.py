"""Sweeps: one variant per block (scaled, bypassed, swapped) or named custom merges, same prompts and
seeds for all, on a pipeline loaded once.

The runner applies each variant in place (:mod:`.inplace`), generates every prompt's seeds as one
batch, restores the block, and records everything in a :class:`~.results.SweepResult`
(``sweep.json``) that the metrics and the report read.

Resumable: an image's file name ends in a hash of everything that determines it (model and donor
hashes, the variant's edit, the prompt's generation parameters, the seed, device and dtype), so
rerunning the same sweep into the same folder reuses every image already made, and changing a
parameter makes new ones instead of silently mixing.

Fast on a CPU: the text encoder runs once per prompt (embeddings are reused by every variant
that leaves the text encoder alone), seeds are batched, the VAE encoder never runs, and the
pipeline is never copied: a variant costs a copy of the one block it changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..architectures import BASE, Architecture
from ..errors import BlockmergeError
from ..io.atomic import made_folders_guard
from ..merge.methods import get_method
from ..merge.params import merged_params, resolve_params
from ..merge.presets import PresetBook
from ..merge.weights import BlockWeights, parse_weights
from .inplace import BypassEdit, Edit, InPlaceModel, MergeEdit
from .results import SweepResult, Variant

__all__ = [
    "DEFAULT_SEEDS",
    "PlannedVariant",
    "bypass_variants",
    "custom_variant",
    "lora_variants",
    "parse_blocks",
    "prompt_params",
    "run_sweep",
    "scale_variants",
    "swap_variants",
]

DEFAULT_SEEDS = (1, 2, 3, 4)
# Bump when the image file naming, the meaning of a cache key, or what an image of the same key
# looks like changes (2: the per-step noise stream fix in generation.generate; 3: A1111's own sampling loop).
CACHE_VERSION = 3
#: Appended to the label of a bypass that cannot be exact (the notes say why).
APPROX = " (approx.)"


@dataclass(frozen=True)
class PlannedVariant:
    """A variant as the report sees it (:class:`Variant`) plus what it does to the weights."""

    variant: Variant
    edit: Edit | None


# ----------------------------------------------------------------------------------------------
# Variant builders
# ----------------------------------------------------------------------------------------------


def parse_blocks(spec: str | Sequence[str] | None, arch: Architecture, arg: str = "--blocks") -> list[str]:
    """A block subset in the weight-spec id grammar (``IN04-IN08,M00``, ``OUT``, ``ALL``), block order.

    Reuses :func:`parse_weights` (every name it accepts is accepted here) rather than a second parser.
    """
    if spec is None:
        return list(arch.block_ids)
    items = [t for t in re.split(r"[,\s]+", spec if isinstance(spec, str) else ",".join(spec)) if t]
    if not items:
        raise BlockmergeError(f"{arg}: no blocks given")
    w = parse_weights("0," + ",".join(f"{t}=1" for t in items), arch, arg=arg)
    if w[BASE] == 1:
        raise BlockmergeError(f"{arg}: BASE is not a block a sweep can vary one at a time")
    return [b for b in arch.block_ids if w[b] == 1]


def _only(arch: Architecture, block: str, value: float, rest: float) -> BlockWeights:
    return BlockWeights.from_mapping(arch, {b: (value if b == block else rest) for b in arch.all_ids})


def scale_variants(arch: Architecture, blocks: Sequence[str], ks: Sequence[float] = (0.75,)) -> list[PlannedVariant]:
    """For each k and block: that block's tensors times k, every other block (and BASE) untouched.

    The article's experiment 2 (``M_A = 0.75, M_B = 0``), as the merge engine's ``scaled_sum``.
    """
    out = []
    for k in ks:
        for b in blocks:
            edit = MergeEdit("scaled_sum", {"alpha": _only(arch, b, float(k), 1.0)})
            out.append(PlannedVariant(Variant.scale(b, k), edit))
    return out


def bypass_variants(blocks: Sequence[str]) -> list[PlannedVariant]:
    """For each block: its residual branches add zero (see :mod:`.bypass` for what cannot be exact)."""
    return [PlannedVariant(Variant.bypass(b), BypassEdit(b)) for b in blocks]


def swap_variants(arch: Architecture, blocks: Sequence[str], donor: str, ratio: float = 1.0) -> list[PlannedVariant]:
    """For each block: that block from ``donor`` (at ``ratio``; 1 = the donor's block), the rest from
    the loaded model. The merge engine's ``weighted_sum`` with α = ratio on that block only."""
    out = []
    r = float(ratio)
    for b in blocks:
        v = Variant.swap(b, donor)
        if r != 1.0:
            v = Variant(f"{v.id}:{r:g}", "swap", b, {"donor": donor, "ratio": r}, f"{b} {r:g}×{donor}")
        out.append(PlannedVariant(v, MergeEdit("weighted_sum", {"alpha": _only(arch, b, r, 0.0)}, donors=(donor,))))
    return out


def custom_variant(
    name: str,
    arch: Architecture,
    alpha: str | float | Sequence[float] | BlockWeights | None = None,
    *,
    method: str | None = None,
    beta: str | float | Sequence[float] | BlockWeights | None = None,
    params: Mapping[str, Any] | None = None,
    donors: Sequence[str] = (),
    presets: PresetBook | None = None,
    clamp: bool = False,
) -> PlannedVariant:
    """A named variant from a full weight spec (number, list, preset, ``IN04-IN08=0.5``, rules...)
    of any merge method and its parameters.

    ``method`` defaults to ``weighted_sum`` with a donor (α = the donor's share per block, as in
    ``blockmerge merge``) and ``scaled_sum`` without one (α = the factor per block). ``clamp`` clips
    the result to the per-element range of the models, as ``blockmerge merge --clamp``.
    """
    if not re.fullmatch(r"[A-Za-z0-9._+-]{1,60}", name or ""):
        raise BlockmergeError(f"--custom {name!r}: names are 1-60 letters, digits, '.', '_', '+' or '-'")
    m = get_method(method or ("weighted_sum" if donors else "scaled_sum"))
    n = 1 + len(donors)
    try:
        m.check_count(n, "models (the sweep's model and its donors)")
    except BlockmergeError as e:
        raise BlockmergeError(f"--custom {name}: {e}") from None
    given, given_as = merged_params(params, alpha, beta)
    pv = resolve_params(m, arch, n, given, presets=presets, given_as=given_as, where=f"--custom {name}")
    vparams: dict[str, Any] = {"method": m.name}
    for pname, w in pv.items():
        vparams[pname] = ",".join(f"{v:g}" for v in w.values) + "".join(f"; {r.text}" for r in w.rules)
    if donors:
        vparams["donors"] = ",".join(donors)
    if clamp:
        vparams["clamp"] = "1"
    try:
        edit = MergeEdit(m.name, pv, tuple(donors), ids=arch.all_ids, clamp=clamp)
    except BlockmergeError as e:
        raise BlockmergeError(f"--custom {name}: {e}") from None
    v = Variant(f"custom:{name}", "custom", None, vparams, name, group="custom")
    return PlannedVariant(v, edit)


def plan_variants(
    arch: Architecture,
    blocks: Sequence[str],
    *,
    scale: Sequence[float] = (),
    bypass: bool = False,
    swap_donor: str | None = None,
    swap_ratios: Sequence[float] = (1.0,),
    custom: Sequence[tuple[str, str]] = (),
    method: str | None = None,
    params: Mapping[str, Any] | None = None,
    donors: Sequence[str] = (),
    presets: PresetBook | None = None,
    clamp: bool = False,
) -> list[PlannedVariant]:
    """The variants of a sweep, in report order: each ``scale`` k, ``bypass``, the swaps from
    ``swap_donor`` at each ratio, then the ``custom`` ``(name, spec)`` merges of ``method`` over
    ``donors``. One planner for the command line and the web UI."""
    variants: list[PlannedVariant] = []
    if scale:
        variants += scale_variants(arch, blocks, list(scale))
    if bypass:
        variants += bypass_variants(blocks)
    if swap_donor is not None:
        for r in swap_ratios:
            variants += swap_variants(arch, blocks, swap_donor, r)
    for name, spec in custom:
        variants.append(custom_variant(name, arch, spec, method=method, params=params, donors=tuple(donors),
                                       presets=presets, clamp=clamp))
    return variants


def lora_variants(arch: Architecture, lora: str | os.PathLike[str], model: str | os.PathLike[str] | None = None,
                  strength: float = 1.0, blocks: Sequence[str] | None = None) -> list[PlannedVariant]:
    """The article's experiment on a LoRA (LoRA Block Weight's "effective block analyzer", measured).

    The baseline is the model with the whole LoRA; a card shows the model alone (how much the LoRA
    does at all); for every block the LoRA touches (of ``blocks``), one variant without that block
    (how much of the LoRA's effect it carries) and one with only that block (what it does alone).
    BASE (the text encoder) gets the same two, as cards beside the U. All in place, restored bit-exactly.
    """
    from ..lora import lora_blocks
    from ..lora.library import lora_hash
    from .inplace import LoraEdit

    path = Path(lora)
    rep = lora_blocks(path, model)
    if rep.architecture != arch.name:
        raise BlockmergeError(f"--lora {path}: is a {rep.architecture} LoRA, the model is {arch.name}")
    touched = [b.block for b in rep.blocks if b.modules]
    chosen = set(blocks) if blocks is not None else set(arch.block_ids)
    name = path.stem
    h = lora_hash(path)
    s = float(strength)

    def weights(on: Mapping[str, float]) -> BlockWeights:
        return BlockWeights.from_mapping(arch, {b: on.get(b, 0.0) for b in arch.all_ids})

    full = {b: s for b in arch.all_ids}
    base = PlannedVariant(Variant("baseline", "baseline", None, {"lora": name, "strength": s},
                                  f"model + {name} ×{s:g}"), LoraEdit(str(path), weights(full), h))
    out = [base, PlannedVariant(Variant("lora:none", "lora", None, {"lora": name, "mode": "none"},
                                        "model alone (no LoRA)", group="lora:cards"), None)]
    for b in touched:
        if b != BASE and b not in chosen:
            continue
        without = weights({**full, b: 0.0})
        only = weights({b: s})
        where = "the text encoder (BASE)" if b == BASE else b
        block = None if b == BASE else b
        out.append(PlannedVariant(
            Variant(f"lora:without:{b}", "lora", block, {"lora": name, "mode": "without", "strength": s},
                    f"without {where}", group="lora:cards" if block is None else f"lora:{name}:without"),
            LoraEdit(str(path), without, h)))
        out.append(PlannedVariant(
            Variant(f"lora:only:{b}", "lora", block, {"lora": name, "mode": "only", "strength": s},
                    f"only {where}", group="lora:cards" if block is None else f"lora:{name}:only"),
            LoraEdit(str(path), only, h)))
    return out


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------


def prompt_params(prompt: Any, seeds: Sequence[int], overrides: Mapping[str, Any] | None = None) -> Any:
    """A prompt given as A1111 infotext (or as :class:`GenerationParams`) -> the parameters it is made with.

    ``overrides`` (steps, width, ...; None values ignored) win over the infotext; the sweep's seeds
    always replace an infotext's ``Seed``.
    """
    from ..generation.generate import GenerationParams
    from ..generation.infotext import parse_infotext

    ov = {k: v for k, v in (overrides or {}).items() if v is not None}
    if isinstance(prompt, GenerationParams):
        return replace(prompt, **ov, seeds=tuple(seeds)).checked()
    info = parse_infotext(str(prompt), source="prompt", require_params=False)
    return GenerationParams.from_infotext(info, **ov, seeds=tuple(seeds))


def _prompt_text(params: Any, width: int, height: int) -> str:
    """The infotext describing a prompt of the sweep (no seed: the sweep's seeds are listed apart)."""
    from ..generation.infotext import format_infotext

    info = params.infotext(0, width=width, height=height)
    info.params.pop("Seed", None)
    info.params.pop("Version", None)
    return format_infotext(info)


def _gen_key(params: Any, width: int, height: int) -> dict[str, Any]:
    skip = {"seeds", "ignored", "width", "height"}
    d = {f.name: getattr(params, f.name) for f in fields(params) if f.name not in skip}
    d["width"], d["height"] = width, height
    return d


# ----------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")[:60] or "x"


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _model_id(loaded: Any) -> str:
    # The file's sha256 identifies the weights; without it (hash_file=False) path + size + mtime.
    if loaded.sha256:
        return loaded.sha256
    st = os.stat(loaded.path)
    return f"{Path(loaded.path).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _save_latent(path: Path, latent: Any) -> None:
    from ..io import atomic_write

    # overwrite: the name is content-addressed (a digest of everything that made the image), so a file
    # there is this sweep's own; it is only rewritten when it failed the check in _trusted().
    with atomic_write(path, overwrite=True) as f:
        np.save(f, latent.numpy().astype(np.float32), allow_pickle=False)


def _trusted(png: Path, latent: Path | None) -> bool:
    """Whether a cached image (and latent) may be reused: both regular files that read back whole.

    The write policy never leaves a half-written file under these names, even after SIGKILL (only a
    temporary file, removed at the start of the next run); this also catches files damaged later.
    Checking costs a CRC pass over the PNG (Pillow's verify) and the .npy header against its size.
    """
    from PIL import Image

    try:
        if not png.is_file():
            return False
        with Image.open(png) as im:
            im.verify()
        if latent is not None:
            if not latent.is_file():
                return False
            arr = np.load(latent, mmap_mode="r", allow_pickle=False)
            if arr.ndim < 3 or arr.dtype != np.float32:
                return False
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return False
    return True


class _Progress:
    """A tqdm bar over all images of the sweep (cached ones counted at once), with ETA."""

    def __init__(self, total: int, done: int, enabled: bool, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, unit="img", desc=desc, disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        if postfix is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


@made_folders_guard()  # a failure removes the (empty) folders this call made, as the CLI does
def run_sweep(
    model: Any,
    variants: Sequence[PlannedVariant],
    prompts: Sequence[Any],
    out_dir: str | os.PathLike[str],
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    donors: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    save_latents: bool = True,
    progress: bool = True,
    inplace: InPlaceModel | None = None,
    model_name: str | None = None,
    on_variant: Callable[[PlannedVariant, float], None] | None = None,
    overwrite: bool = False,
    lora_dir: str | os.PathLike[str] | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> SweepResult:
    """Generate every (variant, prompt, seed) image into ``out_dir`` and return the sweep description
    (also written as ``out_dir/sweep.json``).

    ``model`` is a :class:`~blockmerge.generation.loader.LoadedModel` (loaded once; its weights are
    restored bit-exactly after each variant). ``donors`` are loaded models that swap / custom
    variants take blocks from, by the names their edits use. ``prompts`` are A1111 infotext
    strings (or :class:`GenerationParams`); ``overrides`` (e.g. ``{"steps": 20}``) apply to all.
    A baseline variant is added first when absent. ``inplace`` reuses an :class:`InPlaceModel`
    (its block map) across sweeps on the same model. ``on_progress(images_done, images_total,
    variant_label)`` is called after each image (and once at the start, with the cached ones
    counted); what it raises (a UI's "cancel") stops the sweep with the block restored and every
    image written so far complete, so a rerun resumes.
    """
    from ..generation.generate import encode_prompts, generate, save_png

    t_start = time.perf_counter()
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise BlockmergeError("--seeds: no seeds given")
    if len(set(seeds)) != len(seeds):
        raise BlockmergeError("--seeds: a seed is given twice")
    if not prompts:
        raise BlockmergeError("sweep: give at least one prompt")
    donors = dict(donors or {})
    ipm = inplace if inplace is not None else InPlaceModel(model, donors)
    if ipm.loaded is not model:
        raise BlockmergeError("sweep: the in-place model wraps a different loaded model")
    for name, d in donors.items():
        if name not in ipm.donors:
            ipm.add_donor(name, d)
    planned = list(variants)
    if not any(p.variant.kind == "baseline" for p in planned):
        planned.insert(0, PlannedVariant(Variant.baseline(), None))
    for p in planned:
        if isinstance(p.edit, MergeEdit):
            for n in p.edit.donors:
                if n not in ipm.donors:
                    raise BlockmergeError(f"variant {p.variant.id}: model {n!r} was not given as a donor")
    arch: Architecture = model.architecture
    from ..io import check_output_dir, check_output_path, remove_stale_partials
    from .outputs import own_output
    from .results import SWEEP_FILE

    out = check_output_dir(out_dir)
    # A rerun resumes: first remove what a killed run left (temporary files of dead processes only).
    remove_stale_partials(out, recursive=True)
    check_output_path(out / SWEEP_FILE, (), overwrite, "sweep file", replace_if=own_output)

    gparams = [prompt_params(p, seeds, overrides) for p in prompts]
    sizes = [(g.width or model.resolution, g.height or model.resolution) for g in gparams]
    prompt_texts = [_prompt_text(g, w, h) for g, (w, h) in zip(gparams, sizes, strict=True)]
    name = model_name or Path(model.path).stem
    result = SweepResult(arch.name, list(arch.block_ids), prompt_texts, seeds, [p.variant for p in planned],
                         root=out)
    notes: dict[str, str] = {}
    for j, p in enumerate(planned):
        if isinstance(p.edit, BypassEdit):
            plan = ipm.bypass_plan(p.edit.block)
            notes[p.variant.id] = plan.describe()
            if not plan.exact and not p.variant.label.endswith(APPROX):
                planned[j] = PlannedVariant(replace(p.variant, label=p.variant.label + APPROX), p.edit)
    result.variants = [p.variant for p in planned]
    result.validate()

    base_key = {"cache": CACHE_VERSION, "model": _model_id(model), "device": str(model.device.type),
                "dtype": str(model.dtype)}
    donor_ids = {n: _model_id(d) for n, d in donors.items()}

    def image_paths(p: PlannedVariant, i: int, seed: int) -> tuple[str, str]:
        edit = p.edit.key() if p.edit is not None else None
        used = sorted(p.edit.donors) if isinstance(p.edit, MergeEdit) else []
        key = {**base_key, "edit": edit, "donors": {n: donor_ids.get(n) for n in used},
               "gen": _gen_key(gparams[i], *sizes[i]), "seed": seed}
        stem = f"images/{_slug(p.variant.id)}/p{i}-s{seed}-{_digest(key)}"
        return stem + ".png", stem + ".npy"

    todo: list[tuple[PlannedVariant, int, list[int]]] = []
    n_total = len(planned) * len(prompts) * len(seeds)
    n_cached = 0
    for p in planned:
        for i in range(len(prompts)):
            missing = []
            for s in seeds:
                png, lat = image_paths(p, i, s)
                if _trusted(out / png, out / lat if save_latents else None):
                    n_cached += 1
                else:
                    missing.append(s)
            if missing:
                todo.append((p, i, missing))

    base_emb: dict[int, Any] = {}
    gen_notes: list[str] = []
    bar = _Progress(n_total, n_cached, progress, f"sweep {name}")
    n_done = n_cached
    if on_progress is not None:
        on_progress(n_done, n_total, "")
    timings = {"generate_s": 0.0, "switch_s": 0.0, "encode_s": 0.0}
    try:
        by_variant: dict[str, list[tuple[int, list[int]]]] = {}
        for p, i, missing in todo:
            by_variant.setdefault(p.variant.id, []).append((i, missing))
        for p in planned:
            jobs = by_variant.get(p.variant.id)
            if not jobs:
                continue
            t0 = time.perf_counter()
            with ipm.applied(p.edit):
                timings["switch_s"] += time.perf_counter() - t0
                fresh_text = p.edit is not None and ipm.touches_text_encoder(p.edit)
                for i, missing in jobs:
                    t1 = time.perf_counter()
                    if fresh_text:
                        emb = encode_prompts(model, gparams[i])
                    else:
                        if i not in base_emb:  # the edit leaves the text encoder as loaded
                            base_emb[i] = encode_prompts(model, gparams[i])
                        emb = base_emb[i]
                    timings["encode_s"] += time.perf_counter() - t1
                    extra = {"Blockmerge variant": p.variant.label}
                    if p.variant.kind == "baseline":
                        extra = {"Blockmerge variant": "baseline"}

                    def save(img: Any, p: PlannedVariant = p, i: int = i) -> None:
                        nonlocal n_done
                        png, lat = image_paths(p, i, img.seed)
                        check_output_dir((out / png).parent)
                        if save_latents:
                            _save_latent(out / lat, img.latent)
                        # last: a PNG present means the pair is complete; overwrite as for the latent
                        save_png(img, out / png, overwrite=True)
                        bar.update(1, p.variant.label)
                        n_done += 1
                        if on_progress is not None:
                            on_progress(n_done, n_total, p.variant.label)

                    t2 = time.perf_counter()
                    generate(model, gparams[i], seeds=missing, batch_size=batch_size, embeddings=emb,
                             extra_infotext=extra, on_image=save, lora_dir=lora_dir, notes=gen_notes)
                    timings["generate_s"] += time.perf_counter() - t2
                t3 = time.perf_counter()
            timings["switch_s"] += time.perf_counter() - t3
            if on_variant is not None:
                on_variant(p, time.perf_counter() - t0)
    finally:
        bar.close()

    from .results import ImageRecord

    for p in planned:
        for i in range(len(prompts)):
            for s in seeds:
                png, lat = image_paths(p, i, s)
                if (out / png).is_file():
                    result.images.append(ImageRecord(p.variant.id, i, s, png, lat if save_latents else None))
    result.meta.update({
        "model": name,
        "model_file": Path(model.path).name,
        "model_hash": model.short_hash,
        "donors": {n: {"model": Path(d.path).stem, "model_hash": d.short_hash} for n, d in donors.items()},
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "blockmerge": __version__,
        "notes": notes,
        "warnings": list(dict.fromkeys(gen_notes)),
        "images_made": n_total - n_cached,
        "images_reused": n_cached,
        "timings": {**{k: round(v, 3) for k, v in timings.items()},
                    "total_s": round(time.perf_counter() - t_start, 3)},
    })
    result.validate()
    result.save(overwrite=overwrite)
    return result
