"""Bake LoRAs into a checkpoint, streaming: the merge engine's ``add_delta`` with a LoRA as the delta.

Each LoRA becomes a :class:`~.delta.LoraDelta` and one ``add_delta`` node (``A + α·ΔW``, α per
block from the LoRA's strength and block spec) on top of the model, LoRA after LoRA as A1111 adds
them. The streaming writer then computes each output tensor once, through the whole chain, in
float32: peak memory is a few tensors, whatever the model's size, and the bytes are the same on
every run and for any thread count.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BlockmergeError
from ..io import check_output_path
from ..merge.executor import input_record, output_format, write_hashed
from ..merge.metadata import build_metadata
from ..merge.methods import get_method
from ..merge.nodes import FileSource, MergeNode, MergeReport, Source
from ..merge.presets import PresetBook, load_presets
from ..merge.weights import BlockWeights
from .delta import LoraDelta
from .formats import open_lora
from .names import name_table
from .spec import LoraSpec

__all__ = ["ApplyResult", "apply_loras", "lora_chain"]


@dataclass
class ApplyResult:
    output: Path
    architecture: str
    loras: list[dict[str, Any]]
    n_tensors: int
    bytes_written: int
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def lora_chain(model: Source, specs: Sequence[LoraSpec], stack: contextlib.ExitStack, *,
               presets: PresetBook | None = None, model_name: str = "the model",
               shapes: Mapping[str, tuple[int, ...]] | None = None) -> tuple[Source, list[dict[str, Any]], list[str]]:
    """``model`` with each LoRA of ``specs`` added in turn (lazy), a record per LoRA, and warnings.

    Opened LoRA files are closed by ``stack``. Used by ``lora apply`` and by recipe steps.
    """
    arch = model.arch
    shapes = dict(shapes) if shapes is not None else {k: tuple(model.info(k).shape) for k in model.keys()}
    table = name_table(arch, shapes)
    add = get_method("add_delta")
    node: Source = model
    records: list[dict[str, Any]] = []
    warnings: list[str] = []
    for i, spec in enumerate(specs, 1):
        lf = open_lora(spec.path)
        stack.callback(lf.close)
        delta = LoraDelta(lf, table, shapes, base=node, dyn=spec.dyn, name=spec.label, model_name=model_name)
        weights: BlockWeights = spec.weights(arch, presets, f"LoRA {i} ({spec.label}): blocks")
        node = MergeNode(add, [node, delta], {"alpha": weights}, name=f"LoRA {spec.label}")
        if delta.unmatched:
            warnings.append(f"{spec.path}: {len(delta.unmatched)} of {len(lf.modules)} modules fit nothing in "
                            f"{model_name} and are left out (e.g. {delta.unmatched[0]})")
        if lf.unknown:
            warnings.append(f"{spec.path}: {len(lf.unknown)} keys are no LoRA module and are ignored "
                            f"(e.g. {lf.unknown[0]})")
        records.append({
            "name": spec.label, "file": spec.path.name, "te": spec.te, "unet": spec.unet,
            "blocks": weights.as_dict(), "dyn": spec.dyn,
            "rules": [r.text for r in weights.rules],
            "modules": len(delta.matched), "unmatched": len(delta.unmatched),
            "kinds": sorted({m.module.kind or "" for m in delta.matched} | ({"dora"} if any(m.module.dora for m in delta.matched) else set())),
        })
    return node, records, warnings


LORA_HASHES = "lora hashes"  # the name of the LoRA hash job in ``write_hashed``'s results


def lora_hash_job(paths: Sequence[Path]) -> dict[str, Any]:
    """The background job that gives each LoRA file's A1111 short hash (``write_hashed``'s
    ``more_hashes``): run beside the input hashes while the tensors are written."""
    from .library import lora_hash

    paths = list(paths)
    return {LORA_HASHES: lambda: [lora_hash(p) for p in paths]}


def fill_lora_hashes(records: Sequence[dict[str, Any]], hashes: Mapping[Any, Any] | None) -> None:
    """Each LoRA record's ``lora_hash``: from the finished hash jobs, or before they are done (``None``)
    a placeholder of the same width, so the header rewritten later keeps its length."""
    values = hashes[LORA_HASHES] if hashes is not None else ["0" * 12] * len(records)
    for rec, h in zip(records, values, strict=True):
        rec["lora_hash"] = h


def apply_loras(
    model: str | os.PathLike[str],
    loras: Sequence[LoraSpec],
    output: str | os.PathLike[str],
    *,
    dtype: str = "fp16",
    fmt: str | None = None,
    overwrite: bool = False,
    presets: PresetBook | None = None,
    progress: bool = False,
    threads: int | None = None,
    allow_non_finite: bool = False,
) -> ApplyResult:
    """Bake ``loras`` into ``model`` and write ``output`` (the library form of ``blockmerge lora apply``).

    Math in float32; the output's metadata records each LoRA (file, sha256, A1111's short hash,
    strengths and every block's value) beside the model's hashes.
    """
    if not loras:
        raise BlockmergeError("lora apply: give at least one LoRA")
    mpath = Path(model)
    out = Path(output)
    paths = [mpath, *(s.path for s in loras)]
    check_output_path(out, paths, overwrite)
    fmt = output_format(out, fmt)
    book = presets if presets is not None else load_presets()
    with contextlib.ExitStack() as stack:
        src = FileSource(mpath)
        stack.callback(src.close)
        node, records, warnings = lora_chain(src, loras, stack, presets=book, model_name=str(mpath))
        report = MergeReport()
        roles = ["A", *(f"LoRA{i}" for i in range(1, len(loras) + 1))]
        record: dict[str, Any] = {
            "method": "lora", "formula": "A + Σ α·ΔW (each LoRA's ΔW per block, A1111's order)",
            "architecture": src.arch.name, "space": "model", "loras": records, "dtype": dtype, "format": fmt,
        }

        def meta(hashes: Mapping[Any, Any] | None) -> dict[str, str]:
            fill_lora_hashes(records, hashes)
            inputs = [input_record(i, roles[i], p, hashes, src.metadata if i == 0 else None) for i, p in enumerate(paths)]
            return build_metadata(record, inputs, a1111_method="LoRA", multiplier=loras[0].unet, half=dtype == "fp16",
                                  a1111_roles=("A", None, None))

        # compute_bound: the LoRA products use every core, at most 2, hashing or not
        written, final = write_hashed(node, out, paths, meta, more_hashes=lora_hash_job([s.path for s in loras]),
                                      compute_bound=True, dtype=dtype, fmt=fmt, progress=progress,
                                      threads=threads, allow_non_finite=allow_non_finite, report=report,
                                      overwrite=overwrite)
        warnings.extend(report.warnings)
        return ApplyResult(out, src.arch.name, records, len(node.keys()), written, warnings, final)
