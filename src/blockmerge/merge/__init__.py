"""Merge methods, weight specifications, presets and the streaming executor."""

from __future__ import annotations

from .executor import MergeResult, merge, write_source
from .methods import METHODS, MergeMethod, get_method
from .nodes import FileSource, MergeNode, MergeReport, OverlayNode, Source
from .presets import PresetBook, load_presets
from .weights import BlockWeights, parse_weights

__all__ = [
    "METHODS",
    "BlockWeights",
    "FileSource",
    "MergeMethod",
    "MergeNode",
    "MergeReport",
    "MergeResult",
    "OverlayNode",
    "PresetBook",
    "Source",
    "get_method",
    "load_presets",
    "merge",
    "parse_weights",
    "write_source",
]
