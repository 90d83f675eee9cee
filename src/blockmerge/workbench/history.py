"""The log of every preview and merge of a session: what was tried, with which models, when.

Each entry keeps every block's value of every parameter (not the text that was typed), the models
with their sha256, the dtype, and for previews the prompt and seeds, so any entry can be put back
into the sliders or written out as a recipe that ``blockmerge run`` (and the Recipes tab) runs.
The log is one JSON file in the output folder, rewritten through the write policy after each entry
(a marker in it lets a later session replace it without ``--overwrite``; any other file of that
name is left alone).
"""

from __future__ import annotations

import datetime as _dt
import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BlockmergeError
from ..io import write_text
from ..io.atomic import file_has_marker
from ..recipes.schema import to_toml

__all__ = ["HISTORY_FILE", "History", "HistoryEntry"]

HISTORY_FILE = "blockmerge-ui-history.json"
FORMAT = "blockmerge-ui-history/1"
MAX_ENTRIES = 10_000


@dataclass
class HistoryEntry:
    """One preview or merge, as it ran."""

    id: int
    kind: str  # "preview" or "merge"
    time: str  # ISO 8601, local time with offset
    method: str
    architecture: str
    models: list[dict[str, str]]  # [{"role": "A", "name": ..., "sha256": ...}]
    params: dict[str, dict[str, float]]  # parameter -> {id: value}, BASE first
    rules: dict[str, list[str]] = field(default_factory=dict)
    dtype: str = "fp16"
    clamp: bool = False
    output: str | None = None  # merges: the file's name in the output folder
    output_sha256: str | None = None
    prompt: str | None = None  # previews: the infotext
    seeds: list[int] | None = None

    def summary(self) -> str:
        """One line for a list of entries."""
        what = self.output if self.kind == "merge" else f"seeds {','.join(map(str, self.seeds or []))}"
        names = " + ".join(m["name"] for m in self.models)
        return f"#{self.id} {self.time[:19].replace('T', ' ')} {self.kind} {self.method} ({names}) {what}"


def _weights(values: dict[str, float], rules: list[str]) -> float | list[float] | str:
    """A parameter as a recipe writes it: one number, else the BASE-first list (text with rules)."""
    vals = list(values.values())
    if rules:
        from .settings import fmt_value

        return ",".join(fmt_value(v) for v in vals) + "; " + ", ".join(rules)
    return vals[0] if all(v == vals[0] for v in vals) else vals


class History:
    """The entries of ``folder/blockmerge-ui-history.json`` (read at start, appended to as work is done)."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / HISTORY_FILE
        self._lock = threading.Lock()
        self.entries: list[HistoryEntry] = []
        self.load_error: str | None = None
        if self.path.is_file() and file_has_marker(self.path, FORMAT.encode()):
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self.entries = [HistoryEntry(**e) for e in data["entries"]]
            except (OSError, ValueError, KeyError, TypeError) as e:
                # A damaged log must not stop the server; it is replaced by the next entry.
                self.load_error = f"{self.path}: unreadable history ({e}); starting a new one"

    def add(self, **fields: Any) -> HistoryEntry:
        with self._lock:
            nid = (self.entries[-1].id + 1) if self.entries else 1
            now = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
            entry = HistoryEntry(id=nid, time=now, **fields)
            self.entries.append(entry)
            del self.entries[:-MAX_ENTRIES]
            self._save()
            return entry

    def _save(self) -> None:
        text = json.dumps({"format": FORMAT, "entries": [asdict(e) for e in self.entries]}, indent=1)
        write_text(self.path, text, replace_if=lambda p: file_has_marker(p, FORMAT.encode()), arg="history")

    def get(self, entry_id: int) -> HistoryEntry:
        for e in self.entries:
            if e.id == entry_id:
                return e
        raise BlockmergeError(f"history: no entry #{entry_id}")

    def as_recipe(self, entry: HistoryEntry) -> str:
        """The entry as a recipe (TOML): its models by name (relative to the models folder; bundled
        models by their name) with their sha256, one step with every value, one output."""
        roles = [m["role"] for m in entry.models]
        data: dict[str, Any] = {
            "version": 1,
            "architecture": entry.architecture,
            "inputs": {m["role"]: {"path": m["name"], "sha256": m.get("sha256")} for m in entry.models},
            "steps": [{
                "name": "merge",
                "method": entry.method,
                "models": roles,
                "params": {n: _weights(v, entry.rules.get(n, [])) for n, v in entry.params.items()} or None,
                "clamp": True if entry.clamp else None,
            }],
            "outputs": [{"path": entry.output or f"history-{entry.id}.safetensors", "dtype": entry.dtype}],
        }
        header = (
            f"blockmerge UI history entry #{entry.id} ({entry.kind}, {entry.time}).",
            "Input paths are names in the UI's models folder (bundled models by name): run it in the UI's "
            "Recipes tab,",
            "or with `blockmerge run` after setting the paths to the files.",
            "Parameter lists: BASE first, then the blocks IN00.., M00, OUT00..; elemental rules after ';'.",
        )
        return to_toml(data, header)
