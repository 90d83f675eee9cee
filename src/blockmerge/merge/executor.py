"""The streaming executor: pull each output tensor through a source graph and write it.

Tensors are produced in sorted key order with a small bounded look-ahead on worker threads (file
reads and torch kernels release the GIL, so reading the next tensor overlaps the arithmetic on
this one), and written in that same fixed order: the bytes of the output never depend on thread
timing. Only the tensors in flight are in memory, never a whole model.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import BlockmergeError
from ..io import (
    OUTPUT_DTYPES,
    SafetensorsStreamWriter,
    atomic_write,
    cast_into,
    cast_to,
    check_output_path,
    dtype_name,
    file_hashes,
    saturates,
)
from ..io import output_dtype as output_dtype
from ..io.hashes import cached_hashes
from ..io.memory import release_free_memory
from .metadata import InputRecord, build_metadata, placeholder_sha
from .methods import get_method
from .nodes import (
    TRIM_AT,
    FileSource,
    MergeNode,
    MergeReport,
    OverlayNode,
    Scratch,
    Source,
    is_weight,
    vae_prefix,
)
from .params import merged_params, resolve_params
from .presets import PresetBook, load_presets
from .weights import BlockWeights

OUT_DTYPES = OUTPUT_DTYPES  # the table lives in blockmerge.io.dtypes
LOOKAHEAD = 4  # tasks in flight whose results the caller still has to take (whole tensors)
# Tasks in flight when each worker writes its own results: those results hold no memory, so the
# window only needs to outlast the slowest task (a large LoRA product) so that the other workers
# never wait for it; with 4, the workers of a LoRA apply sat idle a fifth of the time.
PLACED_WINDOW = 32
SLICE = 1 << 22  # elements per slice: 8 MiB of fp16, 16 MiB of float32 scratch per operand
# Whole-tensor tasks computed at once hold at most this many times the elements of the largest
# whole tensor of the output. A whole-tensor method's working memory is several float32 copies of
# its tensor (operands, scratch, temporaries), so two large tensors on two threads at once add up:
# SD1.5's 38M-element token embedding beside one of its 29.5M-element convolutions took TIES past
# 1.5 GB. With 1.5x, the largest tensor runs beside tensors up to half its size only, and peak
# memory stays within 1.5x of computing the largest tensor alone, whatever the thread count; the
# many small tensors still run in parallel.
WHOLE_BUDGET = 1.5


def output_format(path: Path, fmt: str | None) -> str:
    if fmt:
        if fmt not in ("safetensors", "ckpt"):
            raise BlockmergeError(f"--format {fmt}: choose safetensors or ckpt")
        return fmt
    return "ckpt" if path.suffix.lower() in (".ckpt", ".pt", ".pth") else "safetensors"


def _cast(key: str, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """The stored form of a whole tensor and how many of its values were clamped (float8 outputs)."""
    if not is_weight(key, t.dtype) or t.dtype == dtype:
        return t, 0
    return cast_to(t, dtype) if saturates(dtype) else (t.to(dtype), 0)


@dataclass(frozen=True)
class _Task:
    key: str
    lo: int  # element range of the flat tensor; whole tensor when ``whole``
    hi: int
    last: bool
    whole: bool


def _plan_tasks(
    source: Source, entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], out_dt: torch.dtype
) -> list[_Task]:
    """Slices for the weights of sliceable sources; everything else (ints, position ids, channel-
    partial merges) as whole tensors."""
    tasks: list[_Task] = []
    can = getattr(source, "sliceable", None)
    for key, dt, shape in entries:
        n = _numel(shape)
        if can is not None and n > 0 and dt == out_dt and can(key):
            for lo in range(0, n, SLICE):
                hi = min(n, lo + SLICE)
                tasks.append(_Task(key, lo, hi, hi == n, False))
        else:
            tasks.append(_Task(key, 0, n, True, True))
    return tasks


def all_finite(t: torch.Tensor, chunk: int = 1 << 18) -> bool:
    """Whether a float tensor holds no inf/NaN, without a temporary the size of the tensor.

    fp16/bf16/float32/float64: one ``aminmax`` pass (NaN makes both ends NaN, ±inf is an end):
    0.5 ms for a 4M-element fp16 slice, against 1.1 ms for the chunked sums below, which remain
    for the float8 dtypes ``aminmax`` does not take: any non-finite element makes a sum
    non-finite, and the sum of finite values cannot overflow the wider accumulator (fp16 into
    float32, everything else into float64), in 256K-element chunks because ``sum(dtype=...)``
    converts its whole input first (``isfinite().all()``: 6.4 ms and a 4 MB mask)."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return True
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        lo, hi = torch.aminmax(flat)
        return math.isfinite(lo.item()) and math.isfinite(hi.item())
    acc = torch.float32 if t.dtype == torch.float16 else torch.float64
    return all(bool(torch.isfinite(torch.sum(flat[i:i + chunk], dtype=acc))) for i in range(0, flat.numel(), chunk))


class NonFiniteError(BlockmergeError):
    """A merged tensor with inf/NaN values: never written silently."""


class ElementBudget:
    """A counting semaphore in elements: :meth:`hold` waits until ``n`` are free and takes them.

    A request above the capacity takes the whole capacity (it then runs alone). Holders never wait
    on one another while holding, so there is no deadlock: every holder finishes and gives back.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, int(capacity))
        self.free = self.capacity
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int):
        n = min(max(0, int(n)), self.capacity)
        with self._cond:
            self._cond.wait_for(lambda: self.free >= n)
            self.free -= n
        try:
            yield
        finally:
            with self._cond:
                self.free += n
                self._cond.notify_all()


class _Worker:
    """Computes tasks into output buffers from a bounded pool; one Scratch per thread."""

    def __init__(self, source: Source, out_dt: torch.dtype, n_buffers: int, allow_non_finite: bool = False,
                 budget: ElementBudget | None = None) -> None:
        self.source = source
        # (key, byte offset, tensor): set by write_source to the writer's ``place``, so each result
        # is written by the thread that made it; None (ckpt outputs): whole results are returned.
        self.sink: Callable[[str, int, torch.Tensor], None] | None = None
        self.budget = budget
        self.out_dt = out_dt
        self.local = threading.local()
        self.pool: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        self.n_buffers = n_buffers
        for _ in range(n_buffers):
            self.pool.put(torch.empty(SLICE, dtype=out_dt))
        self.allow_non_finite = allow_non_finite
        self.non_finite: dict[str, int] = {}
        self.clamped = 0  # values beyond a float8 output's range, clamped to it
        self._lock = threading.Lock()
        # finished slices (key, byte offset, data, its pool buffer) waiting for the thread now writing
        self._queued: queue.SimpleQueue[tuple[str, int, torch.Tensor, torch.Tensor]] = queue.SimpleQueue()
        self._writing = threading.Lock()
        self._failure: BaseException | None = None  # the first failed write: later tasks stop with it

    def _count(self, n: int) -> None:
        if n:
            with self._lock:
                self.clamped += n

    def _check(self, key: str, t: torch.Tensor) -> None:
        if not t.dtype.is_floating_point or all_finite(t):
            return
        n = int((~torch.isfinite(t.float() if t.element_size() == 1 else t)).sum())
        if self.allow_non_finite:
            with self._lock:
                self.non_finite[key] = self.non_finite.get(key, 0) + n
            return
        explain = getattr(self.source, "explain", None)
        where = f" ({explain(key)})" if explain is not None else ""
        raise NonFiniteError(
            f"{key}{where}: the result has {n} non-finite values (inf/NaN) in {dtype_name(self.out_dt)}; a weight may "
            "be too large for the output dtype, or an input already holds inf/NaN (--allow-non-finite writes it "
            "anyway, with a warning)"
        )

    def run(self, t: _Task) -> torch.Tensor:
        """The task's result; with a sink, only its shape and dtype (a meta tensor), so finished
        tasks hold no memory while they wait to be accounted in file order. A slice may then still
        wait in the write queue (see :meth:`_emit`); every queued slice is written before the last
        task that queued one returns, so once all tasks are done, all their bytes are in the file."""
        if self._failure is not None:  # a write failed: the output is lost, compute nothing more
            raise self._failure
        if t.whole:
            with self.budget.hold(t.hi - t.lo) if self.budget is not None else contextlib.nullcontext():
                out, n = _cast(t.key, self.source.get(t.key), self.out_dt)
            self._count(n)
            if is_weight(t.key, out.dtype):
                self._check(t.key, out)
            if self.sink is not None:
                self.sink(t.key, 0, out)
                out = torch.empty_like(out, device="meta")  # the data is freed here, then trimmed
            if t.hi - t.lo >= TRIM_AT:
                release_free_memory()
            return out
        scratch = getattr(self.local, "scratch", None)
        if scratch is None:
            scratch = self.local.scratch = Scratch(SLICE)
        buf = self.pool.get()
        view = buf[: t.hi - t.lo]
        scratch.dest = view
        handed = False
        try:
            try:
                result = self.source.get_range(t.key, t.lo, t.hi, scratch)  # type: ignore[attr-defined]
            finally:
                scratch.dest = None
            if result.data_ptr() != view.data_ptr() or result.dtype != view.dtype:  # else read into it already
                self._count(cast_into(view, result))
            self._check(t.key, view)
            handed = True  # from here the buffer goes back to the pool once the slice is written
            self._emit(t.key, t.lo * view.element_size(), view, buf)
            return torch.empty_like(view, device="meta")
        finally:
            if not handed:
                self.pool.put(buf)

    def _emit(self, key: str, offset: int, view: torch.Tensor, buf: torch.Tensor) -> None:
        """Write a finished slice, or leave it to the thread writing now and go on to the next task.

        Why: the kernel serializes buffered writes to one file (the inode lock), and a thread
        waiting there spun: 21% of a 2-core LoRA apply's CPU samples were ``rwsem_spin_on_owner``.
        A plain lock made the waiting thread sleep instead (apply 0.78x -> 0.53x of load-everything);
        here it does not wait at all: the thread holding the write lock writes every queued slice
        before it lets go, and looks at the queue again after, so none is left behind (a slice
        queued while it held the lock is seen by that look). Once a write failed the rest are
        dropped, their buffers returned, so no worker waits forever for one."""
        self._queued.put((key, offset, view, buf))
        failure: BaseException | None = None
        # The look at the queue after each release also runs after a failure: skipping it left
        # slices queued meanwhile with no thread to drop them, and their buffers out of the pool.
        while not self._queued.empty() and self._writing.acquire(blocking=False):
            try:
                while True:
                    try:
                        k, o, v, b = self._queued.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        if self._failure is None:
                            self.sink(k, o, v)  # type: ignore[misc]
                    except BaseException as e:
                        self._failure = e
                        failure = failure or e
                    finally:
                        self.pool.put(b)
            finally:
                self._writing.release()
        if failure is not None:
            raise failure

    def warn(self, report: Any) -> None:
        """Add what the output's writing did beyond the arithmetic to a merge report: values clamped
        to a float8 output's range, non-finite values written (``allow_non_finite``)."""
        if report is None:
            return
        if self.clamped:
            lim = torch.finfo(self.out_dt).max
            report.warnings.append(f"{self.clamped:,} values were beyond the {dtype_name(self.out_dt)} range "
                                   f"and were clamped to ±{lim:g}")
        if self.non_finite:
            total = sum(self.non_finite.values())
            first = sorted(self.non_finite)[0]
            report.warnings.append(f"wrote {total} non-finite values (inf/NaN) in {len(self.non_finite)} tensors, "
                                   f"e.g. {first} (--allow-non-finite)")


def _run_tasks(worker: _Worker, tasks: Sequence[_Task], threads: int, window: int = LOOKAHEAD):
    """Yield ``(task, result)`` in task order, computing up to ``window`` tasks ahead."""
    if threads <= 1:
        for t in tasks:
            yield t, worker.run(t)
        return
    ex = worker_pool(threads, "blockmerge")
    pending: deque[tuple[_Task, Future]] = deque()
    try:
        for t in tasks:
            pending.append((t, ex.submit(worker.run, t)))
            if len(pending) >= window:
                task, fut = pending.popleft()
                yield task, fut.result()
        while pending:
            task, fut = pending.popleft()
            yield task, fut.result()
    finally:
        _shutdown(ex)


def worker_pool(threads: int, name: str) -> ThreadPoolExecutor:
    """Threads for tensor arithmetic, each set to the caller's intra-op thread count. Why: a new
    thread's MKL does not see the main thread's setting, and its matmuls of a few rows, and its dot
    products, then took other kernel paths (other last bits), so merge bytes depended on the worker
    count and ``compare``'s numbers on which thread took which tensor."""
    return ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix=name,
                              initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))


def _shutdown(ex: ThreadPoolExecutor) -> None:
    """Cancel the tasks not started and wait for the running ones, even through a second signal
    (raised once they are done). Why: workers write into the output file, which the write policy
    closes and removes right after: a write after that could land in a reused file descriptor."""
    late: BaseException | None = None
    while True:
        try:
            ex.shutdown(wait=True, cancel_futures=True)
            break
        except BaseException as e:  # KeyboardInterrupt / Interrupted in the middle of the join
            late = late or e
    if late is not None:
        raise late


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """One intra-op thread: the slices are too small for OpenMP to pay (its spinning threads burned
    3x the CPU of the arithmetic on a busy 2-core machine), and worker threads use the cores."""
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def write_source(
    source: Source,
    output: str | os.PathLike[str],
    *,
    dtype: str = "fp16",
    fmt: str | None = None,
    metadata: Mapping[str, str] | None = None,
    finalize_metadata: Callable[[], Mapping[str, str]] | None = None,
    progress: bool = False,
    threads: int | None = None,
    allow_non_finite: bool = False,
    report: Any = None,
    stats: dict[str, int] | None = None,
    overwrite: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> int:
    """Compute every tensor of ``source`` and write it atomically to ``output``; return bytes written.

    Floating tensors of sources that can slice are computed and written in slices of ``SLICE``
    elements through reused buffers, so memory stays flat whatever the tensor sizes. Slices are
    written in a fixed order, so the bytes never depend on ``threads``.
    ``finalize_metadata``, if given, is called after the tensors are written and must return metadata
    no longer than ``metadata`` (fixed-width hashes computed meanwhile). ``stats``, if given, gets
    ``clamped``: how many values a float8 output clamped to its range. ``on_progress(done, total)``
    (bytes) is called as slices are done (written, or queued for the thread writing); an exception
    it raises (a UI's "cancel") stops the write, and the write policy removes the temporary file.
    """
    out = Path(output)
    out_dt = output_dtype(dtype)
    if threads is None:  # nothing hashes beside a plain write (write_hashed decides for itself)
        threads = default_workers(hashing=False)
    keys = sorted(source.keys())
    entries = []
    for k in keys:
        i = source.info(k)
        entries.append((k, out_dt if is_weight(k, i.dtype) else i.dtype, tuple(i.shape)))
    total = sum(d.itemsize * _numel(s) for _, d, s in entries)
    bar = tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"merge {out.name}",
        disable=not progress, file=sys.stderr, leave=False,
    )
    ckpt = output_format(out, fmt) == "ckpt"
    tasks = (_plan_tasks(source, entries, out_dt) if not ckpt
             else [_Task(k, 0, _numel(s), True, True) for k, _, s in entries])
    whole = [t.hi - t.lo for t in tasks if t.whole]
    budget = ElementBudget(int(WHOLE_BUDGET * max(whole))) if threads > 1 and whole else None
    # Slices are only planned for safetensors outputs, where the workers write them: two buffers per
    # worker, one it computes into while the other waits for its write (see _Worker._emit).
    worker = _Worker(source, out_dt, 0 if ckpt else 2 * max(1, threads), allow_non_finite, budget)
    if stats is not None:
        stats["clamped"] = 0
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        bar.update(n)
        done += n
        if on_progress is not None:
            on_progress(done, total)

    try:
        with _torch_threads(1):
            if ckpt:
                sd: dict[str, torch.Tensor] = {}
                for t, tensor in _run_tasks(worker, tasks, threads):
                    sd[t.key] = tensor.contiguous()
                    advance(tensor.numel() * tensor.element_size())
                with atomic_write(out, overwrite=overwrite) as f:
                    torch.save({"state_dict": sd}, f)
                worker.warn(report)
                return total
            with atomic_write(out, overwrite=overwrite) as f:
                writer = SafetensorsStreamWriter(f, entries, metadata)
                # Each worker writes what it computed at its place in the file. Why: on a 2-core VM
                # the page writes of a 2 GB output (fresh page-cache or tmpfs pages) took 2.5-5 s of
                # kernel time, more than the arithmetic of a LoRA apply, all on this thread.
                # closing(): on an error here the workers stop before the file is removed.
                worker.sink = writer.place
                with contextlib.closing(_run_tasks(worker, tasks, threads, PLACED_WINDOW)) as done_tasks:
                    for t, shape in done_tasks:  # meta tensors: the bytes are written (or queued, see _Worker.run)
                        if t.whole:
                            writer.write(t.key, shape, placed=True)
                        else:
                            writer.write_part(t.key, shape, t.last, placed=True)
                        advance(shape.numel() * shape.element_size())
                writer.finish()
                if finalize_metadata is not None:
                    writer.rewrite_metadata(finalize_metadata())
        worker.warn(report)
        return total
    finally:
        if stats is not None:
            stats["clamped"] = worker.clamped
        bar.close()


def default_workers(compute_bound: bool = False, hashing: bool = True) -> int:
    """Worker threads when none are asked for: every core, at most two (reading and the arithmetic
    are memory-bound; more were never measured), less one core left to the thread that hashes the
    inputs meanwhile (``hashing``) unless the work is ``compute_bound`` (a LoRA's up @ down products).

    Measured on 2 cores with the workers writing their own slices (issue 13's session 5): an SD1.5
    merge with the inputs' hashes cached, 2 workers 6.2-7.9 s vs 1 worker 7.3-13.9 s; with both
    2.1 GB inputs hashed meanwhile, 1 worker 6.9-8.4 s vs 2 workers 7.9-8.6 s (issue 14's SDXL pair:
    1 worker 11.2-13.8 s vs 2 workers 21.6-26.6 s). Baking a rank-128 LoRA into SD1.5, hashes or
    not, is faster on every core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    spare = 1 if hashing and not compute_bound else 0
    return max(1, min(2, cores - spare))


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass
class MergeResult:
    output: Path
    architecture: str
    method: str
    params: dict[str, BlockWeights]
    n_tensors: int
    bytes_written: int
    report: MergeReport
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def alpha(self) -> BlockWeights | None:
        return self.params.get("alpha")

    @property
    def beta(self) -> BlockWeights | None:
        return self.params.get("beta")


class _Hasher:
    """Runs hash jobs one after another on a background thread while the merge runs (cache hits are
    instant): each input file's hashes, keyed by its path, then the caller's named jobs (a LoRA's
    A1111 short hash). A daemon thread: a failed merge exits without waiting for a 6 GB hash."""

    def __init__(self, jobs: Sequence[tuple[Any, Callable[[], Any]]]) -> None:
        self.results: dict[Any, Any] = {}
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._run, args=(list(jobs),), daemon=True, name="blockmerge-hash")
        self._t.start()

    def _run(self, jobs: list[tuple[Any, Callable[[], Any]]]) -> None:
        try:
            for key, job in jobs:
                self.results[key] = job()
        except BaseException as e:  # reported when joined
            self.error = e

    def join(self) -> dict[Any, Any]:
        self._t.join()
        if self.error:
            raise self.error
        return self.results


def input_record(
    index: int, role: str, path: Path, hashes: Mapping[Path, Any] | None, metadata: Mapping[str, str] | None
) -> InputRecord:
    """An input's metadata record; before its hash is known, a placeholder of the same width."""
    h = hashes.get(path) if hashes else None
    if h is None:
        return InputRecord(role, path.name, placeholder_sha(index), metadata=metadata)
    return InputRecord(role, path.name, h.sha256, h.legacy, metadata)


def write_hashed(
    source: Source,
    output: Path,
    hash_paths: Sequence[Path],
    make_metadata: Callable[[Mapping[Any, Any] | None], dict[str, str]],
    *,
    more_hashes: Mapping[str, Callable[[], Any]] | None = None,
    compute_bound: bool = False,
    dtype: str,
    fmt: str,
    progress: bool = False,
    threads: int | None = None,
    allow_non_finite: bool = False,
    report: Any = None,
    stats: dict[str, int] | None = None,
    overwrite: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[int, dict[str, str]]:
    """Write ``source`` while ``hash_paths`` are hashed on a background thread; return bytes written
    and the final metadata.

    Why: hashing two 2 GB inputs takes as long as the merge itself, so it overlaps the merge; the
    header is first written with ``make_metadata(None)`` (placeholder hashes of the same width) and
    rewritten with ``make_metadata(hashes)`` once all are done: ``hashes`` maps each path to its
    :class:`~blockmerge.io.FileHashes` and each name of ``more_hashes`` to what its job returned.
    Shared by ``merge``, ``lora apply`` and recipes. Without ``threads``, the workers are
    :func:`default_workers` for ``compute_bound`` work and for whether any input's hashes are
    missing from the cache (then a core is left to the hashing).
    """
    if threads is None:
        hashing = not compute_bound and any(cached_hashes(p) is None for p in hash_paths)
        threads = default_workers(compute_bound, hashing=hashing)
    jobs: list[tuple[Any, Callable[[], Any]]] = [(p, partial(file_hashes, p)) for p in hash_paths]
    hasher = _Hasher([*jobs, *(more_hashes or {}).items()])
    placeholder = make_metadata(None)
    final: dict[str, str] = {}

    def finalize() -> Mapping[str, str]:
        final.update(make_metadata(hasher.join()))
        return final

    written = write_source(
        source, output, dtype=dtype, fmt=fmt, metadata=placeholder, finalize_metadata=finalize,
        progress=progress, threads=threads, allow_non_finite=allow_non_finite, report=report, stats=stats,
        overwrite=overwrite, on_progress=on_progress,
    )
    if not final:
        final.update(make_metadata(hasher.join()))
    return written, final


def merge(
    models: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    method: str = "weighted_sum",
    params: Mapping[str, Any] | None = None,
    alpha: str | float | Sequence[float] | BlockWeights | None = None,
    beta: str | float | Sequence[float] | BlockWeights | None = None,
    base_alpha: float | None = None,
    base_beta: float | None = None,
    clamp: bool = False,
    allow_non_finite: bool = False,
    dtype: str = "fp16",
    fmt: str | None = None,
    overwrite: bool = False,
    vae: str | os.PathLike[str] | None = None,
    keep_ema: bool = False,
    fix_position_ids: bool = False,
    presets: PresetBook | None = None,
    progress: bool = False,
    threads: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> MergeResult:
    """Merge checkpoints block by block and write the result (the library form of ``blockmerge merge``).

    ``models`` are the method's operands in order (``blockmerge methods`` lists them); ``params``
    maps parameter names to weight specs (any form: number, list, preset, ``IN04-IN08=0.5``,
    elemental rules after ``;``). ``alpha``/``beta`` (and ``base_alpha``/``base_beta`` for BASE) are
    the usual first two parameters by name. ``clamp`` clips the result to the range of the model
    operands per element. A result with non-finite values (inf/NaN, e.g. a huge weight overflowing
    fp16) is an error unless ``allow_non_finite``, which writes it with a warning and the count.
    """
    m = get_method(method)
    paths = [Path(p) for p in models]
    m.check_count(len(paths), "models (files)")
    given, given_as = merged_params(params, alpha, beta)
    out = Path(output)
    vae_path = Path(vae) if vae else None
    check_output_path(out, paths + ([vae_path] if vae_path else []), overwrite)
    output_dtype(dtype)
    fmt = output_format(out, fmt)
    book = presets if presets is not None else load_presets()
    with contextlib.ExitStack() as stack:
        sources: list[FileSource] = []
        for p in paths:
            s = FileSource(p, keep_ema=keep_ema)
            stack.callback(s.close)
            sources.append(s)
        arch = sources[0].arch
        for s in sources[1:]:
            if s.arch is not arch:
                raise BlockmergeError(
                    f"{s.path}: is {s.arch.title} but {sources[0].path} is {arch.title}; "
                    "models of different architectures cannot be merged"
                )
        pv = resolve_params(m, arch, len(paths), given, bases={"alpha": base_alpha, "beta": base_beta},
                            presets=book, given_as=given_as)
        node: Source = MergeNode(m, sources, pv, fix_position_ids=fix_position_ids, clamp=clamp)
        report = node.report  # type: ignore[attr-defined]
        vae_src = None
        if vae_path is not None:
            from ..io import open_checkpoint

            vae_src = open_checkpoint(vae_path)
            stack.callback(vae_src.close)
            node = OverlayNode(node, vae_src, prefix=vae_prefix(arch))
        check_position_ids(sources[0], report, fix_position_ids)
        if sources[0].dropped_ema:
            report.warnings.append(f"dropped {sources[0].dropped_ema} model_ema.* tensors (use --keep-ema to keep them)")
        if report.only_in_others:
            report.warnings.append(
                f"{len(report.only_in_others)} tensors exist only in B/C and were left out "
                f"(e.g. {report.only_in_others[0]})"
            )
        roles = operand_labels(m, len(paths))
        hash_paths = paths + ([vae_path] if vae_path else [])
        record = method_record(m, arch.name, pv)
        record.update({"dtype": dtype, "format": fmt,
                       "options": {"keep_ema": keep_ema, "fix_position_ids": fix_position_ids, "clamp": clamp}})

        def meta(hashes: Mapping[Path, Any] | None) -> dict[str, str]:
            inputs = [input_record(i, roles[i], p, hashes, sources[i].metadata) for i, p in enumerate(paths)]
            vrec = input_record(len(paths), "VAE", vae_path, hashes, None) if vae_path else None
            return build_metadata(
                record, inputs, a1111_method=m.a1111_name, multiplier=_multiplier(pv), half=dtype == "fp16",
                vae=vrec, a1111_roles=roles[:3],
            )

        written, final = write_hashed(
            node, out, hash_paths, meta, dtype=dtype, fmt=fmt, progress=progress, threads=threads,
            allow_non_finite=allow_non_finite, report=report, overwrite=overwrite, on_progress=on_progress,
        )
        return MergeResult(out, arch.name, m.name, pv, len(node.keys()), written, report, final)


def operand_labels(method: Any, n: int) -> list[str]:
    """A, B, C ... for the operands as given (the metadata's roles; A1111 records the first three)."""
    return [chr(ord("A") + i) if i < 26 else f"M{i + 1}" for i in range(n)]


def method_record(method: Any, arch: str, params: Mapping[str, BlockWeights]) -> dict[str, Any]:
    """blockmerge's record of what a method did: every block's value of every parameter, and rules."""
    rec: dict[str, Any] = {
        "method": method.name,
        "formula": method.formula,
        "architecture": arch,
        "space": method.result,
        "params": {n: w.as_dict() for n, w in params.items()},
    }
    rules = {n: [r.text for r in w.rules] for n, w in params.items() if w.rules}
    if rules:
        rec["rules"] = rules
    return rec


def _multiplier(params: Mapping[str, BlockWeights]) -> float | None:
    """A1111's ``multiplier``: α's BASE value, where the method has an α."""
    a = params.get("alpha")
    return a["BASE"] if a is not None else None


def check_position_ids(a: FileSource, report: MergeReport, fixing: bool) -> None:
    for key in a.keys():
        if key.endswith("embeddings.position_ids"):
            t = a.get(key)
            expected = torch.arange(t.shape[-1]).reshape(t.shape)
            if not torch.equal(t.to(torch.float64), expected.to(torch.float64)):
                if fixing:
                    report.warnings.append(f"{key}: broken position_ids reset to 0..{t.shape[-1] - 1}")
                else:
                    report.warnings.append(
                        f"{key}: position_ids are not 0..{t.shape[-1] - 1} (broken model A; --fix-position-ids resets them)"
                    )
