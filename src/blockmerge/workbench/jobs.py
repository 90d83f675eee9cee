"""Long jobs of an interactive session: one at a time, with progress and a cancel that really stops.

Why not the web framework's own cancel: a job runs in a worker thread, and a framework can only
abandon the awaiting side, while the thread would go on merging or sampling. Here every long
library call takes a progress callback; :meth:`Job.progress` reports and, once :meth:`JobControl.cancel`
was called, raises :class:`~blockmerge.errors.Cancelled` inside the job. The exception unwinds like
any error: an in-place edit is restored, the write policy removes its temporary file, a sweep keeps
the images it finished (a rerun resumes).

Jobs are serialised by :attr:`JobControl.lock` (the front end also queues them), because they share
one loaded pipeline whose weights a preview or sweep changes in place.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import Cancelled

__all__ = ["Job", "JobControl", "Reporter"]

#: ``(fraction 0..1 or None, text)``: where a job shows its progress (a progress bar, a log line).
Reporter = Callable[[float | None, str], None]


@dataclass
class Job:
    """The running job's handle, given to library calls as their progress callback."""

    name: str
    cancel_event: threading.Event
    report: Reporter | None = None
    started: float = field(default_factory=time.perf_counter)

    def progress(self, fraction: float | None, text: str = "") -> None:
        """Report progress; raise :class:`Cancelled` when the user asked to stop."""
        if self.cancel_event.is_set():
            raise Cancelled(f"{self.name}: cancelled")
        if self.report is not None:
            self.report(None if fraction is None else max(0.0, min(1.0, fraction)), text)

    def bytes_progress(self, done: int, total: int) -> None:
        """For :func:`blockmerge.merge.merge` and :func:`blockmerge.recipes.run_recipe` (``on_progress``)."""
        self.progress(done / total if total else 1.0, f"{self.name}: {done / 2**20:.1f} of {total / 2**20:.1f} MiB")

    def images_progress(self, done: int, total: int, label: str) -> None:
        """For :func:`blockmerge.experiments.sweep.run_sweep` (``on_progress``)."""
        self.progress(done / total if total else 1.0, f"{self.name}: {done} of {total} images{' · ' + label if label else ''}")

    def check(self) -> None:
        """A cancel point between steps that report nothing."""
        if self.cancel_event.is_set():
            raise Cancelled(f"{self.name}: cancelled")


class JobControl:
    """One lock for the jobs of a session, and the cancel switch of the running one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._cancel = threading.Event()
        self.running: str | None = None

    @contextmanager
    def run(self, name: str, report: Reporter | None = None) -> Iterator[Job]:
        """Run a job: waits for the one before it, then clears the cancel switch for this one."""
        with self.lock:
            self._cancel.clear()
            self.running = name
            try:
                yield Job(name, self._cancel, report)
            finally:
                self.running = None
                self._cancel.clear()

    def cancel(self) -> str | None:
        """Ask the running job to stop (at its next progress report); the name of that job, or None."""
        name = self.running
        if name is not None:
            self._cancel.set()
        return name
