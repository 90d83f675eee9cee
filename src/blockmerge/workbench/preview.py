"""Preview a merge without writing it: the sliders' values applied in place to a loaded pipeline.

Why: a merge tool is tuned by moving sliders and looking at images. Merging to a file and loading
it for every try costs seconds to minutes per try on real models; the sweeps' in-place engine
(:mod:`blockmerge.experiments.inplace`) changes the loaded weights in milliseconds and restores
them bit-exactly. The preview rounds every merged tensor through the output dtype
(:attr:`MergeEdit.dtype`), so its weights are exactly those of ``blockmerge merge --dtype D`` loaded
back, and its pixels those of generating from that file.

The pipelines stay loaded between previews (model A with the other operands as donors), and the
images of A and B alone are kept per prompt and seeds, so after the first preview a click costs
the edit and one batch of images.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BlockmergeError
from ..merge.declare import MODEL
from ..merge.methods import get_method
from ..merge.params import ParamValues

__all__ = ["Preview", "Previewer"]

#: Donor names the edits use for operands 2, 3, ... (model A is the loaded model itself).
DONOR_NAMES = ("B", "C", "D", "E", "F", "G", "H")


@dataclass
class Preview:
    """What one preview made: the merged images, the operands' own images for the same seeds
    (``refs``: ``{"A": [...], "B": [...]}``), and where the time went."""

    images: list[Any]
    refs: dict[str, list[Any]]
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)


def _file_id(path: Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


class Previewer:
    """Loaded pipelines, kept between previews; at most ``keep`` of them (least recently used go).

    Not thread-safe: a session runs one job at a time (:class:`~.jobs.JobControl`).
    """

    def __init__(self, *, device: str | None = None, dtype: Any = None, keep: int = 3) -> None:
        self.device = device
        self.dtype = dtype
        self.keep = keep
        self._loaded: dict[tuple, Any] = {}
        self._inplace: tuple[tuple, Any] | None = None
        self._refs: dict[tuple, list[Any]] = {}
        self._emb: dict[tuple, Any] = {}

    # -- models -----------------------------------------------------------------------------------

    def model(self, path: str | os.PathLike[str]) -> Any:
        """The loaded pipeline of ``path`` (loaded once; again if the file changed)."""
        from ..generation.loader import load_pipeline

        key = _file_id(Path(path))
        if key in self._loaded:
            self._loaded[key] = self._loaded.pop(key)  # most recently used last
            return self._loaded[key]
        loaded = load_pipeline(path, device=self.device, dtype=self.dtype)
        self._loaded[key] = loaded
        while len(self._loaded) > self.keep:
            old = next(iter(self._loaded))
            self._drop(old)
        return loaded

    def _drop(self, key: tuple) -> None:
        self._loaded.pop(key, None)
        if self._inplace is not None and key in self._inplace[0]:
            self._inplace = None
        self._refs = {k: v for k, v in self._refs.items() if k[0] != key}
        self._emb = {k: v for k, v in self._emb.items() if k[0] != key}

    def inplace(self, paths: Sequence[str | os.PathLike[str]]) -> Any:
        """An :class:`~blockmerge.experiments.inplace.InPlaceModel` of ``paths[0]`` with the other
        paths loaded as donors ``B``, ``C``, ... (kept while the same models are asked for)."""
        from ..experiments.inplace import InPlaceModel

        if len(paths) - 1 > len(DONOR_NAMES):
            raise BlockmergeError(f"preview: at most {len(DONOR_NAMES) + 1} models")
        keys = tuple(_file_id(Path(p)) for p in paths)
        if self._inplace is not None and self._inplace[0] == keys:
            return self._inplace[1]
        if self.keep < len(keys):
            self.keep = len(keys)
        loaded = [self.model(p) for p in paths]
        self._inplace = (keys, InPlaceModel(loaded[0], dict(zip(DONOR_NAMES, loaded[1:], strict=False))))
        return self._inplace[1]

    # -- images -----------------------------------------------------------------------------------

    def _images(self, loaded: Any, gen: Any, emb: Any = None) -> list[Any]:
        from ..generation.generate import generate

        return generate(loaded, gen, embeddings=emb)

    def _embeddings(self, loaded: Any, gen: Any) -> Any:
        from ..generation.generate import _embedding_key, encode_prompts

        key = (_file_id(Path(loaded.path)), _embedding_key(gen))
        if key not in self._emb:
            self._emb[key] = encode_prompts(loaded, gen)
        return self._emb[key]

    def reference(self, path: str | os.PathLike[str], gen: Any) -> list[Any]:
        """One model's own images for these generation parameters (kept for the next preview)."""
        loaded = self.model(path)
        key = (_file_id(Path(path)), gen)
        if key not in self._refs:
            self._refs[key] = self._images(loaded, gen, self._embeddings(loaded, gen))
        return self._refs[key]

    def render(
        self,
        paths: Sequence[str | os.PathLike[str]],
        method: str,
        params: ParamValues,
        gen: Any,
        *,
        dtype: str | None = "fp16",
        clamp: bool = False,
        references: Sequence[int] = (0, 1),
        job: Any = None,
    ) -> Preview:
        """Images of ``gen`` (a :class:`~blockmerge.generation.generate.GenerationParams`, its seeds
        included) from the merge of ``paths`` with ``method`` and ``params``, applied in place and
        restored afterwards; plus the images of the operands listed in ``references`` (A, B).

        ``dtype`` is the output dtype the merge would be written in (the preview rounds to it);
        ``clamp`` clips to the models' per-element range as ``blockmerge merge --clamp``.
        """
        from ..experiments.inplace import MergeEdit

        m = get_method(method)
        m.check_count(len(paths), "models")
        for role in m.roles(len(paths)):
            if role.space != MODEL and role.space != "task":
                raise BlockmergeError(f"preview: {m.name}'s operand {role.name} is a delta (a difference file); "
                                      "a preview needs models (merge it to a file instead)")
        t0 = time.perf_counter()
        if job is not None:
            job.progress(0.0, "loading the models" if not self._inplace else "preview")
        ipm = self.inplace(paths)
        t_load = time.perf_counter() - t0
        loaded = ipm.loaded
        arch = loaded.architecture
        edit = MergeEdit(m.name, dict(params), DONOR_NAMES[: len(paths) - 1], ids=arch.all_ids, dtype=dtype,
                         clamp=clamp)
        refs: dict[str, list[Any]] = {}
        t1 = time.perf_counter()
        for i in references:
            if i < len(paths):
                if job is not None:
                    job.progress(0.1, f"images of {chr(ord('A') + i)}")
                refs[chr(ord("A") + i)] = self.reference(paths[i], gen)
        t_refs = time.perf_counter() - t1
        if job is not None:
            job.progress(0.5, "merging in place")
        t2 = time.perf_counter()
        with ipm.applied(edit):
            t_apply = time.perf_counter() - t2
            if job is not None:
                job.check()
            emb = None if ipm.touches_text_encoder(edit) else self._embeddings(loaded, gen)
            t3 = time.perf_counter()
            images = self._images(loaded, gen, emb)
            t_gen = time.perf_counter() - t3
            t4 = time.perf_counter()
        t_restore = time.perf_counter() - t4
        return Preview(images, refs, list(gen.seeds), {
            "load_s": t_load, "references_s": t_refs, "apply_s": t_apply, "generate_s": t_gen,
            "restore_s": t_restore, "total_s": time.perf_counter() - t0,
        })
