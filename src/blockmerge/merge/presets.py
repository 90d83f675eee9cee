"""Block-weight presets: the Merge Block Weighted extension's set, plus user preset files.

A preset file is the extension's own format: one preset per line, ``NAME<TAB>v1,v2,...`` (a header
line ``preset_name<TAB>preset_weights`` and ``#`` comments are skipped), or LoRA Block Weight's,
``NAME:v1,v2,...``. Which family a preset
applies to follows from its length and the families' list forms: 25 values are for SD1/SD2, 19
for SDXL; 26 (20) carry BASE first; Flux takes 59, 60 (BASE first) or 61 (CLIP, T5 first, as
supermerger and LoRA Block Weight write Flux lists).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..architectures import families_for_list_length, list_lengths
from ..errors import WeightSpecError
from ..io.text import read_user_text, split_lines


@dataclass(frozen=True)
class Preset:
    name: str
    values: tuple[float, ...]
    source: str


@dataclass
class PresetBook:
    presets: dict[str, Preset] = field(default_factory=dict)

    def get(self, name: str) -> Preset | None:
        return self.presets.get(name.upper())

    def add_text(self, text: str, source: str) -> None:
        for lineno, line in enumerate(split_lines(text), 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            if "\t" in s:
                parts = s.split("\t", 1)
            elif ":" in s.split(",", 1)[0]:  # LoRA Block Weight's format, NAME:v1,v2,...
                parts = s.split(":", 1)
            else:
                parts = s.split(None, 1)
            if len(parts) != 2:
                raise WeightSpecError(f"{source}:{lineno}: expected 'NAME<TAB>v1,v2,...' or 'NAME:v1,v2,...'")
            name, vals = parts[0].strip(), parts[1].strip()
            if name.lower() == "preset_name":
                continue
            try:
                values = tuple(float(v) for v in vals.replace(" ", "").split(","))
            except ValueError:
                # LBW's random/inherited entries (R, U, X) have no fixed value to merge with
                raise WeightSpecError(f"{source}:{lineno}: preset {name}: values must be numbers "
                                      "(LoRA Block Weight's R, U and X draw or inherit values at run time)") from None
            if not all(math.isfinite(v) for v in values):
                raise WeightSpecError(f"{source}:{lineno}: preset {name}: values must be finite")
            if len(values) not in list_lengths():
                raise WeightSpecError(f"{source}:{lineno}: preset {name} has {len(values)} values (need {_needs()})")
            self.presets[name.upper()] = Preset(name, values, source)

    def add_file(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        self.add_text(read_user_text(p, f"--presets {p}", WeightSpecError), str(p))

    def names(self) -> list[str]:
        return [p.name for p in self.presets.values()]


def _needs() -> str:
    """``25/26 for SD1/SD2, 19/20 for SDXL, ...``: the list lengths of every registered family."""
    by_fams: dict[str, list[int]] = {}
    for n in list_lengths():
        by_fams.setdefault("/".join(a.name for a in families_for_list_length(n)), []).append(n)
    return ", ".join(f"{'/'.join(map(str, ns))} for {fams}" for fams, ns in by_fams.items())


def preset_families(preset: Preset) -> str:
    """The families a preset's length fits (``SD1/SD2``), for listings."""
    return "/".join(a.name for a in families_for_list_length(len(preset.values))) or "none"


def builtin_presets() -> PresetBook:
    """Merge Block Weighted's presets (25 values, SD1/SD2) and LoRA Block Weight's (17, and FLUXALL)."""
    book = PresetBook()
    data = resources.files("blockmerge").joinpath("data")
    book.add_text(data.joinpath("mbw-presets.tsv").read_text(encoding="utf-8"), "built-in presets")
    book.add_text(data.joinpath("lbw-presets.txt").read_text(encoding="utf-8"), "LoRA Block Weight presets")
    return book


def load_presets(extra_files: Iterable[str | os.PathLike[str]] = ()) -> PresetBook:
    """Built-in presets, then files from ``$BLOCKMERGE_PRESETS`` (os.pathsep-separated), then ``extra_files``;
    a later definition of a name replaces an earlier one."""
    book = builtin_presets()
    env = os.environ.get("BLOCKMERGE_PRESETS")
    files: list[str | os.PathLike[str]] = [f for f in env.split(os.pathsep) if f] if env else []
    for f in [*files, *extra_files]:
        book.add_file(f)
    return book
