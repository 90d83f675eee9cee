"""An interactive session over the library: what the web UI (``blockmerge ui``) does, without the web.

Below the UI layer and above the library it drives: :class:`Workbench` holds the folders a front
end may touch (:class:`Workspace`), the pipelines a preview keeps loaded (:class:`Previewer`), the
running job (:class:`JobControl`) and the history of previews and merges (:class:`History`).
Every action is a method a notebook can call; the UI only turns events into these calls.
"""

from __future__ import annotations

from .history import History, HistoryEntry
from .jobs import Job, JobControl
from .preview import Preview, Previewer
from .session import DEFAULT_PROMPT, MergeOutcome, ModelInfo, SweepOutcome, Workbench
from .settings import MergeSettings, format_blocks, initial_settings, read_blocks_text, slider_params
from .workspace import ModelEntry, PathPolicyError, Workspace

__all__ = [
    "DEFAULT_PROMPT",
    "History",
    "HistoryEntry",
    "Job",
    "JobControl",
    "MergeOutcome",
    "MergeSettings",
    "ModelEntry",
    "ModelInfo",
    "PathPolicyError",
    "Preview",
    "Previewer",
    "SweepOutcome",
    "Workbench",
    "Workspace",
    "format_blocks",
    "initial_settings",
    "read_blocks_text",
    "slider_params",
]
