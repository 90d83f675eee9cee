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


class Cancelled(BlockmergeError):
    """A long job (merge, sweep, recipe, preview) stopped because its user asked it to.

    Raised from a progress callback, so it unwinds like any error: the write policy removes the
    temporary file and nothing partial is left under an output's name."""


class BlockmergeWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints it as
    ``blockmerge: warning: ...``)."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM / SIGHUP / SIGINT arrived: raised in the main thread so that every ``finally`` (above
    all the write policy's removal of its temporary file) runs before the process exits.

    A subclass of ``KeyboardInterrupt`` so that ``except Exception`` never swallows it."""

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        try:
            self.signame = signal.Signals(signum).name
        except ValueError:
            self.signame = f"signal {signum}"
        super().__init__(self.signame)
