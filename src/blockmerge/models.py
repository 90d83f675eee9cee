"""The bundled tiny models: names -> files, so examples and tests run with nothing downloaded.

Two SD1-layout single-file checkpoints ship in ``blockmerge/data/models`` (see
``training/README.md``): ``tiny-a`` (flat-filled shapes) and ``tiny-b`` (fine-tuned from tiny-a on
outlined shapes). They are ordinary checkpoints; everything that takes a checkpoint path also
takes one of these names through :func:`resolve_model`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import CheckpointError

__all__ = ["BundledLora", "BundledModel", "find_bundled_lora", "list_bundled_loras", "list_models", "models_dir",
           "resolve_model"]


@dataclass(frozen=True)
class BundledModel:
    name: str
    path: Path
    style: str
    sha256: str
    image_size: int
    vocabulary: dict[str, list[str]]
    example_prompt: str
    parent: str | None


def models_dir() -> Path:
    return Path(str(resources.files("blockmerge") / "data" / "models"))


@lru_cache(maxsize=1)
def _registry() -> tuple[BundledModel, ...]:
    index = models_dir() / "models.json"
    try:
        data: dict[str, Any] = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ()
    return tuple(
        BundledModel(
            name=e["name"], path=models_dir() / e["file"], style=e["style"], sha256=e["sha256"],
            image_size=int(e["image_size"]), vocabulary={k: list(v) for k, v in e["vocabulary"].items()},
            example_prompt=e["example_prompt"], parent=e.get("parent"),
        )
        for e in data["models"]
    )


@dataclass(frozen=True)
class BundledLora:
    name: str
    path: Path
    style: str
    sha256: str
    base: str  # the bundled model it was made for


@lru_cache(maxsize=1)
def _lora_registry() -> tuple[BundledLora, ...]:
    index = models_dir() / "models.json"
    try:
        data: dict[str, Any] = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ()
    return tuple(BundledLora(e["name"], models_dir() / e["file"], e["style"], e["sha256"], e["base"])
                 for e in data.get("loras", []))


def list_bundled_loras() -> list[BundledLora]:
    """The bundled LoRAs (``tiny-b-outline``: tiny-b's outline as a LoRA for tiny-a)."""
    return list(_lora_registry())


def find_bundled_lora(name: str) -> Path | None:
    """A bundled LoRA's file by its name (the name ``<lora:NAME:1>`` and ``lora apply`` take)."""
    return next((lo.path for lo in _lora_registry() if lo.name == name), None)


def list_models() -> list[BundledModel]:
    """The bundled models, in the order they were trained (tiny-a, then its fine-tune tiny-b)."""
    return list(_registry())


DEFAULT_MODEL = "tiny-a"


def resolve_model(name_or_path: str | os.PathLike[str] | None = None) -> Path:
    """A bundled model's file for its name (``tiny-a``), else the argument as an existing path;
    ``None`` is the default bundled model.

    An existing file wins over a bundled name, so a local file called ``tiny-a`` is never shadowed.
    """
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    p = Path(name_or_path)
    if p.is_file():
        return p
    for m in _registry():
        if str(name_or_path) == m.name:
            return m.path
    if os.path.lexists(p):  # a folder, FIFO, device or dangling link: say which
        from .io import check_input_file

        check_input_file(p, error=CheckpointError)
    names = ", ".join(m.name for m in _registry()) or "none"
    raise CheckpointError(f"{name_or_path}: no such file, and not a bundled model (bundled: {names})")
