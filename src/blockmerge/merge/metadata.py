"""Merge metadata written into safetensors headers.

Two records: A1111's own (``sd_merge_recipe`` and ``sd_merge_models``, as its checkpoint merger
writes them, so A1111's UI and model sites show where a file came from) and blockmerge's full
record under ``blockmerge`` (method, every block's α/β, dtype, inputs with hashes, tool version).
All values are JSON strings, as safetensors metadata must be strings.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..errors import BlockmergeWarning, CheckpointError

RECORD_KEY = "blockmerge"
#: Stability's modelspec fields that describe the weights' kind, not one file: kept from model A
#: (a merge keeps A's family, training resolution and prediction type; the loader reads them, so a
#: merge of 64 px models still draws at 64 px). Title, author, hashes and dates are not copied.
MODELSPEC_KEPT = ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                  "modelspec.resolution", "modelspec.prediction_type")
PLACEHOLDER_LEGACY = "0" * 8


def placeholder_sha(index: int) -> str:
    """A distinct stand-in of a sha256's width, so a header written before the hashes are known is
    at least as long as the final one (equal real hashes only merge entries and shrink it)."""
    return f"{index + 1:064x}"


@dataclass(frozen=True)
class InputRecord:
    role: str
    name: str
    sha256: str = ""
    legacy_hash: str = PLACEHOLDER_LEGACY
    metadata: Mapping[str, str] | None = None

    def as_json(self) -> dict[str, str]:
        return {"role": self.role, "name": self.name, "sha256": self.sha256, "legacy_hash": self.legacy_hash}


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def build_metadata(
    record: Mapping[str, Any],
    inputs: Sequence[InputRecord],
    *,
    a1111_method: str,
    multiplier: float,
    half: bool,
    vae: InputRecord | None = None,
    a1111_roles: Sequence[str | None] = ("A", "B", "C"),
) -> dict[str, str]:
    """The header metadata for a merge output; deterministic for the same inputs and record.

    ``a1111_roles`` names the inputs A1111 records as primary / secondary / tertiary model (a
    recipe's last step may take an earlier step's result, which has no file and no hash: None).
    """
    by_role = {i.role: i for i in inputs}

    def sha(role: str | None) -> str | None:
        return by_role[role].sha256 if role in by_role else None

    roles = [*a1111_roles, None, None, None][:3]
    recipe = {
        "type": "blockmerge",
        "primary_model_hash": sha(roles[0]),
        "secondary_model_hash": sha(roles[1]),
        "tertiary_model_hash": sha(roles[2]),
        "interp_method": a1111_method,
        "multiplier": multiplier,
        "save_as_half": half,
        "custom_name": None,
        "config_source": 0,
        "bake_in_vae": vae.name if vae else "None",
        "discard_weights": "",
        "is_inpainting": False,
        "is_instruct_pix2pix": False,
    }
    models: dict[str, Any] = {}
    for i in inputs:
        meta = i.metadata or {}
        recipe_of_input = meta.get("sd_merge_recipe")
        models[i.sha256] = {
            "name": i.name,
            "legacy_hash": i.legacy_hash,
            "sd_merge_recipe": json.loads(recipe_of_input) if _is_json(recipe_of_input) else None,
        }
        if _is_json(meta.get("sd_merge_models")):
            nested = json.loads(meta["sd_merge_models"])
            if isinstance(nested, dict):
                for k, v in nested.items():
                    models.setdefault(k, v)
    inherited: dict[str, str] = {}
    primary = by_role.get(roles[0]) if roles[0] is not None else None
    primary = primary or (inputs[0] if inputs else None)
    for k in MODELSPEC_KEPT:
        v = (primary.metadata or {}).get(k) if primary is not None else None
        if isinstance(v, str):
            inherited[k] = v
    full = dict(record)
    full["inputs"] = [i.as_json() for i in inputs]
    if vae:
        full["vae"] = vae.as_json()
    full["tool"] = "blockmerge"
    full["version"] = __version__
    return {
        **inherited,
        "format": "pt",
        "sd_merge_recipe": _json(recipe),
        "sd_merge_models": _json(models),
        RECORD_KEY: _json(full),
    }


def _is_json(text: str | None) -> bool:
    if not text:
        return False
    try:
        json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past Python's limit
        return False
    return True


def read_record(metadata: Mapping[str, str], source: str = "file") -> dict[str, Any] | None:
    """blockmerge's own merge record from a file's metadata, if it has one.

    A record that is there but malformed (another tool's, or edited by hand: ``alpha`` a string,
    ``inputs`` not a list...) is a :class:`CheckpointError` naming ``source`` and the field, never a
    crash in whatever reads it next (``info``, ``info --recipe``).
    """
    raw = metadata.get(RECORD_KEY)
    if not raw:
        return None
    bad = f"{source}: its blockmerge merge record (metadata {RECORD_KEY!r})"
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{bad} is not valid JSON") from None
    if not isinstance(rec, dict):
        raise CheckpointError(f"{bad} is not a JSON object")
    for key in ("method", "formula", "architecture", "dtype", "format", "version", "tool", "recipe", "space"):
        if key in rec and rec[key] is not None and not isinstance(rec[key], str):
            raise CheckpointError(f"{bad}: {key!r} must be text, not {_type(rec[key])}")
    params = rec.get("params")
    if params is not None and not isinstance(params, dict):
        raise CheckpointError(f"{bad}: 'params' must map parameter names to block values, not {_type(params)}")
    named = [(k, rec.get(k)) for k in ("alpha", "beta")] + [(f"params.{k}", v) for k, v in (params or {}).items()]
    for key, w in named:
        if w is None:
            continue
        if not isinstance(w, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) for k, v in w.items()
        ):
            raise CheckpointError(f"{bad}: {key!r} must map block names to numbers")
    rules = rec.get("rules")
    if rules is not None and not (isinstance(rules, dict) and all(
            isinstance(v, list) and all(isinstance(r, str) for r in v) for v in rules.values())):
        raise CheckpointError(f"{bad}: 'rules' must map parameter names to lists of rule texts")
    inputs = rec.get("inputs", [])
    if not isinstance(inputs, list):
        raise CheckpointError(f"{bad}: 'inputs' must be a list, not {_type(inputs)}")
    for i, item in enumerate(inputs):
        if not isinstance(item, dict) or not all(
            isinstance(item.get(f), str) for f in ("role", "name", "sha256", "legacy_hash")
        ):
            raise CheckpointError(f"{bad}: inputs[{i}] must have text fields role, name, sha256 and legacy_hash")
    return rec


def _type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, int | float) else type(v).__name__
    )


def space_of(metadata: Mapping[str, str] | None, source: str = "file") -> str:
    """``"delta"`` for a task vector blockmerge wrote (its record says so), else ``"model"``.

    A record that is not blockmerge's valid one (another tool wrote the key, or it was edited by
    hand) does not stop the weights from being used: such a file is a model, with a warning naming
    it. Only ``info`` reports the record as an error; a merge needs nothing from it but this answer.
    """
    try:
        rec = read_record(metadata or {}, source)
    except CheckpointError as e:
        warnings.warn(f"{e}; its weights are used as a model's (the record is ignored)", BlockmergeWarning, stacklevel=2)
        return "model"
    return "delta" if rec and rec.get("space") == "delta" else "model"
