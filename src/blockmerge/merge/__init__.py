"""Merge methods, weight specifications, presets and the streaming executor."""

from __future__ import annotations

from .declare import Delta, Model, Param, TaskVector, merge_method
from .executor import MergeResult, merge, write_source
from .methods import METHODS, MergeMethod, get_method
from .nodes import FileSource, MergeNode, MergeReport, OverlayNode, Source, TensorSource
from .params import resolve_params
from .presets import PresetBook, load_presets
from .weights import BlockWeights, parse_weights

__all__ = [
    "METHODS",
    "BlockWeights",
    "Delta",
    "FileSource",
    "MergeMethod",
    "MergeNode",
    "MergeReport",
    "MergeResult",
    "Model",
    "OverlayNode",
    "Param",
    "PresetBook",
    "Source",
    "TaskVector",
    "TensorSource",
    "get_method",
    "load_presets",
    "merge",
    "merge_method",
    "parse_weights",
    "resolve_params",
    "write_source",
]
