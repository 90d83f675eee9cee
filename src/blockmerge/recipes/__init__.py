"""Merge recipes: chains of merges kept as TOML text, run in one streaming pass, embedded in outputs.

``schema`` checks a recipe without touching files, ``runner`` runs it, ``mergeboard`` imports the
text format of the Merge Board extension.
"""

from __future__ import annotations

from .mergeboard import mergeboard_to_toml, parse_mergeboard
from .runner import (
    Recipe,
    RecipeOutput,
    embedded_recipe,
    load_recipe,
    recipe_files,
    recipe_from_text,
    run_recipe,
)
from .schema import RecipeError, RecipeSpec, parse_recipe, to_toml

__all__ = [
    "Recipe",
    "RecipeError",
    "RecipeOutput",
    "RecipeSpec",
    "embedded_recipe",
    "load_recipe",
    "mergeboard_to_toml",
    "parse_mergeboard",
    "parse_recipe",
    "recipe_files",
    "recipe_from_text",
    "run_recipe",
    "to_toml",
]
