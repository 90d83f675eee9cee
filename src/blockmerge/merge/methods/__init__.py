"""The merge methods blockmerge offers: each one declaration (see :mod:`blockmerge.merge.declare`).

Importing this package registers every method in :data:`METHODS`: the elementwise sums and
delta arithmetic (:mod:`.linear`), the methods that need whole tensors (:mod:`.whole`) and the
task-vector methods (:mod:`.task_vectors`).
"""

from __future__ import annotations

from ..declare import METHODS, Context, MergeMethod, Param, compute_dtype, derive_seed, get_method
from . import linear, task_vectors, whole  # noqa: F401  (registers the methods)

__all__ = ["METHODS", "Context", "MergeMethod", "Param", "compute_dtype", "derive_seed", "get_method"]
