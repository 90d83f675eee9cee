"""LoRAs as low-rank deltas: read every common format, bake by block, extract, merge, resize, inspect.

A LoRA is a delta (task vector) in low-rank form. Reading one (:mod:`.formats`) gives per module
the factors of ΔW; the one block mapping (:mod:`.names`, derived from the family's layout) says
which single-file tensor each module changes; :class:`~.delta.LoraDelta` turns a LoRA into a
lazy delta source, so baking it is the merge engine's ``add_delta`` with per-block strengths.
"""

from __future__ import annotations

from .apply import ApplyResult, apply_loras, lora_chain
from .delta import LoraDelta, match_modules
from .extract import ExtractResult, extract_lora
from .formats import LoraFile, LoraModule, open_lora
from .inspect import detect_lora_family, is_lora_file, lora_blocks, lora_info
from .names import NameTable, Target, family_table, name_table
from .ops import LoraOpResult, merge_loras, resize_lora
from .spec import LoraSpec, lora_weights, parse_lora_arg

__all__ = [
    "ApplyResult",
    "ExtractResult",
    "LoraDelta",
    "LoraFile",
    "LoraModule",
    "LoraOpResult",
    "LoraSpec",
    "NameTable",
    "Target",
    "apply_loras",
    "detect_lora_family",
    "extract_lora",
    "family_table",
    "is_lora_file",
    "lora_blocks",
    "lora_chain",
    "lora_info",
    "lora_weights",
    "match_modules",
    "merge_loras",
    "name_table",
    "open_lora",
    "parse_lora_arg",
    "resize_lora",
]
