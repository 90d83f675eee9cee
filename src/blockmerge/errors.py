"""User-facing errors.

Everything the command line should report as a one-line message (bad file, bad argument, bad
weights) is raised as :class:`BlockmergeError`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BlockmergeError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class CheckpointError(BlockmergeError):
    """A file that is missing, unreadable, corrupt, unsafe or not a checkpoint."""


class WeightSpecError(BlockmergeError):
    """A block-weight specification that cannot be parsed or does not fit the architecture."""
