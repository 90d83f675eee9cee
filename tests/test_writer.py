"""The streaming safetensors writer: exact bytes, preallocation, early writeback, no partial files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from blockmerge.io import SafetensorsStreamWriter, atomic_write
from blockmerge.io.atomic import EarlyWriteback, memory_backed, preallocate


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_all_finite_agrees_with_isfinite(dtype) -> None:
    """The writer's finiteness check against ``isfinite().all()``: NaN, +inf and -inf at every kind of
    position (first, last, inside the vectorised body, in the tail), tensors of odd lengths, empty."""
    from blockmerge.merge.executor import all_finite

    g = torch.Generator().manual_seed(1)
    bad = [float("nan"), float("inf"), float("-inf")]
    cases = [torch.zeros(0)]
    for n in (1, 7, 64, 1000, 70_001):
        cases.append(torch.randn(n, generator=g))
        for v in bad:
            for pos in {0, n - 1, n // 2, max(0, n - 3)}:
                t = torch.randn(n, generator=g)
                t[pos] = v
                cases.append(t)
    cases.append(torch.randn(300, 7, generator=g)[:, ::2])  # not contiguous
    for t in cases:
        x = t.to(dtype)  # float8 e4m3fn has no inf: +-inf become NaN there
        expect = bool(torch.isfinite(x.float()).all())
        assert all_finite(x) == expect, (dtype, t.numel())
        assert all_finite(x.chunk(1)[0], chunk=5) == expect


def _entries() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(300, 70, generator=g).half()),
        ("b.bias", torch.randn(13, generator=g)),
        ("c.ids", torch.arange(77, dtype=torch.int64)),
        ("d.empty", torch.zeros(0, 4, dtype=torch.float16)),
    ]


def test_stream_writer_output_matches_tensors_and_has_its_exact_size(tmp_path) -> None:
    tensors = _entries()
    out = tmp_path / "w.safetensors"
    with atomic_write(out) as f:
        w = SafetensorsStreamWriter(f, [(k, t.dtype, tuple(t.shape)) for k, t in tensors], {"x": "1"})
        for k, t in tensors:
            if k == "a.weight":  # in parts, as the executor writes big tensors
                flat = t.reshape(-1)
                w.write_part(k, flat[:5000], False)
                w.write_part(k, flat[5000:], True)
            else:
                w.write(k, t)
        w.finish()
    # preallocated to the exact size: no trailing zeros, nothing missing
    assert out.stat().st_size == w.total_bytes
    back = load_file(out)
    assert sorted(back) == sorted(k for k, _ in tensors)
    for k, t in tensors:
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    with safe_open(out, "pt") as f:
        assert f.metadata() == {"x": "1"}


def test_stream_writer_refuses_to_finish_short(tmp_path) -> None:
    tensors = _entries()
    out = tmp_path / "short.safetensors"
    with pytest.raises(RuntimeError, match="got 1 of 4 tensors"), atomic_write(out) as f:
        w = SafetensorsStreamWriter(f, [(k, t.dtype, tuple(t.shape)) for k, t in tensors])
        w.write(*tensors[0])
        w.finish()
    assert list(tmp_path.iterdir()) == []  # the preallocated temporary file is gone too


def _fs_type(path) -> str:
    """The filesystem type as coreutils' ``stat -f`` names it (an independent reference)."""
    import subprocess

    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mountinfo and tmpfs are Linux's")
def test_preallocate_reserves_blocks_on_disk_and_nothing_on_tmpfs(tmp_path) -> None:
    """On a disk the blocks are reserved up front; on tmpfs (where fallocate would zero every page
    in memory before the writes) nothing is, and ``memory_backed`` tells the two apart as
    ``stat -f`` does."""
    folders = [tmp_path]
    shm = tmp_path.parent / "shm-unused"
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        shm = Path("/dev/shm") / f"blockmerge-test-{os.getpid()}"
        shm.mkdir()
        folders.append(shm)
    try:
        seen = set()
        for folder in folders:
            p = folder / "p.bin"
            with open(p, "wb") as f:
                in_memory = memory_backed(f.fileno())
                preallocate(f, 3 << 20)
            assert in_memory == (_fs_type(folder) in ("tmpfs", "ramfs")), folder
            seen.add(in_memory)
            st = p.stat()
            if in_memory:
                assert st.st_size == 0  # nothing reserved, nothing zeroed
            else:
                assert st.st_size == 3 << 20
                if hasattr(os, "posix_fallocate"):
                    assert st.st_blocks * 512 >= 3 << 20  # blocks really reserved, not a sparse file
            p.unlink()
        assert True in seen or len(folders) == 1  # /dev/shm is tmpfs where it exists
    finally:
        if shm.exists():
            shm.rmdir()


def test_early_writeback_starts_every_chunk_and_keeps_the_bytes(tmp_path) -> None:
    p = tmp_path / "wb.bin"
    data = os.urandom(1 << 20)
    linux = sys.platform.startswith("linux")
    with open(p, "wb") as f:
        wb = EarlyWriteback(f)
        assert wb.enabled == linux  # sync_file_range is Linux-only; elsewhere advance() does nothing
        wb.CHUNK = 256 << 10
        started = []
        for i in range(0, len(data), 100_000):
            f.write(data[i:i + 100_000])
            started.append(wb.advance())
        # 100 kB writes, 256 kB chunks: writeback starts on every third write or so, not on each
        assert (3 <= sum(started) <= 4 and not started[0]) if linux else not any(started)
    assert p.read_bytes() == data


def test_early_writeback_turns_itself_off_where_the_kernel_refuses() -> None:
    with open(os.devnull, "wb") as f:  # not a regular file: sync_file_range fails with ESPIPE
        wb = EarlyWriteback(f)
        wb.CHUNK = 0
        f.write(b"xy")
        assert wb.advance() is False
        assert wb.enabled is False


def test_a_too_small_disk_fails_before_any_tensor_is_written(tmp_path) -> None:
    """Preallocation meets the size limit at once: the writer raises from its constructor."""
    import subprocess
    import textwrap

    code = textwrap.dedent(f"""
        import errno, resource, signal, torch
        from blockmerge.io import SafetensorsStreamWriter
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        with open({str(tmp_path / "big.safetensors")!r}, "wb") as f:
            try:
                SafetensorsStreamWriter(f, [("w", torch.float16, (1000, 1000))])
            except OSError as e:
                print("refused", errno.errorcode[e.errno], f.tell())
            else:
                print("accepted")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["refused", "EFBIG", "0"], out.stdout + out.stderr


def test_placed_parts_from_threads_in_any_order_equal_the_sequential_file(tmp_path) -> None:
    """``place`` from several threads, parts in a random order, accounted in file order afterwards:
    the same bytes as writing every tensor in order; a part that overruns its tensor is refused."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(5)
    g = torch.Generator().manual_seed(5)
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.int64, torch.bool, torch.float8_e4m3fn]
    for case in range(6):
        tensors = []
        for i in range(rng.randint(1, 7)):
            dt = rng.choice(dtypes)
            shape = tuple(rng.randint(0, 40) for _ in range(rng.randint(1, 3)))
            t = torch.randn(shape, generator=g) * 3
            tensors.append((f"k{i}.weight", t.to(dt) if dt not in (torch.int64, torch.bool) else (t > 0).to(dt)))
        entries = [(k, t.dtype, tuple(t.shape)) for k, t in tensors]
        seq, placed = tmp_path / f"seq{case}.safetensors", tmp_path / f"placed{case}.safetensors"
        with atomic_write(seq) as f:
            w = SafetensorsStreamWriter(f, entries, {"case": str(case)})
            for k, t in tensors:
                w.write(k, t)
            w.finish()
        parts = []  # (key, element offset, flat part, last)
        for k, t in tensors:
            flat, n = t.reshape(-1), t.numel()
            cuts = sorted({0, n, *(rng.randint(0, n) for _ in range(rng.randint(0, 3)))})
            for lo, hi in zip(cuts, cuts[1:], strict=False) if n else [(0, 0)]:
                parts.append((k, lo, flat[lo:hi], hi == n))
        with atomic_write(placed) as f:
            w = SafetensorsStreamWriter(f, entries, {"case": "?" * len(str(case))})
            order = list(parts)
            rng.shuffle(order)
            with ThreadPoolExecutor(3) as ex:
                list(ex.map(lambda p, w=w: w.place(p[0], p[1] * p[2].element_size(), p[2]), order))
            for k, _, part, last in parts:
                w.write_part(k, part, last, placed=True)
            w.rewrite_metadata({"case": str(case)})
            w.finish()
        assert placed.read_bytes() == seq.read_bytes(), case
        assert placed.stat().st_size == w.total_bytes
    with pytest.raises(RuntimeError, match="do not fit"), atomic_write(tmp_path / "over.safetensors") as f:
        w = SafetensorsStreamWriter(f, [("a", torch.float16, (10,))])
        w.place("a", 4, torch.zeros(9, dtype=torch.float16))
    assert not (tmp_path / "over.safetensors").exists()


def test_the_merge_workers_write_their_own_slices_and_hold_none(tiny_sd1_paths, tmp_path, monkeypatch) -> None:
    """Each slice is written by the worker thread that computed it, never by the thread that
    accounts for the file; the bytes do not depend on the worker count; the results that wait to be
    accounted hold no data (meta tensors)."""
    import threading

    from blockmerge.merge import executor
    from blockmerge.merge.executor import merge

    a, b, _ = tiny_sd1_paths
    monkeypatch.setattr(executor, "SLICE", 1000)  # many slices per tensor
    writers: list[str] = []
    real_place = SafetensorsStreamWriter.place

    def place(self, key, byte_offset, data):
        writers.append(threading.current_thread().name)
        return real_place(self, key, byte_offset, data)

    monkeypatch.setattr(SafetensorsStreamWriter, "place", place)
    results = []
    real_run = executor._Worker.run

    def run(self, t):
        r = real_run(self, t)
        results.append(r.device.type)
        return r

    monkeypatch.setattr(executor._Worker, "run", run)
    outs = [merge([a, b], tmp_path / f"t{n}.safetensors", alpha="0.3,IN04=0.9", threads=n).output for n in (1, 3)]
    assert outs[0].read_bytes() == outs[1].read_bytes()
    n_tensors = len(load_file(outs[0]))
    assert len(writers) > 2 * n_tensors  # sliced: several parts per tensor on average
    three = writers[len(writers) // 2:]  # the second merge's writes
    assert all(w.startswith("blockmerge") for w in three) and len(set(three)) > 1, set(three)
    assert set(results) == {"meta"}


def test_a_full_disk_in_a_workers_write_fails_cleanly(tiny_sd1_paths, tmp_path, monkeypatch) -> None:
    """ENOSPC raised in a worker thread's positional write (after the header was written) is the
    one-line "disk full" error, and no file is left behind."""
    import errno
    import threading

    from blockmerge.errors import BlockmergeError
    from blockmerge.io import atomic
    from blockmerge.merge.executor import merge

    a, b, _ = tiny_sd1_paths
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    seen: list[str] = []
    real = atomic._TrackedFile.pwrite

    def pwrite(self, data, offset):
        seen.append(threading.current_thread().name)
        if len(seen) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data, offset)

    monkeypatch.setattr(atomic._TrackedFile, "pwrite", pwrite)
    with pytest.raises(BlockmergeError, match="disk full"):
        merge([a, b], out_dir / "m.safetensors", alpha=0.5, threads=2)
    assert any(n.startswith("blockmerge") for n in seen[5:])
    assert list(out_dir.iterdir()) == []


def _slow_places(monkeypatch, fail_at: int | None = None):
    """Make every slice write slow (so finished slices queue behind the thread writing) and record
    who computed and who wrote each slice; optionally fail the ``fail_at``-th write with ENOSPC.
    Returns (computed, wrote, workers): (key, byte offset) -> thread name (whole tensors' offset is
    None), and the _Worker made."""
    import errno
    import threading
    import time

    from blockmerge.merge import executor

    monkeypatch.setattr(executor, "SLICE", 1000)  # many slices per tensor
    computed: dict[tuple[str, int], str] = {}
    wrote: dict[tuple[str, int], str] = {}
    workers: list = []
    real_place, real_run, real_init = SafetensorsStreamWriter.place, executor._Worker.run, executor._Worker.__init__

    def place(self, key, byte_offset, data):
        if fail_at is not None and len(wrote) + 1 >= fail_at:
            time.sleep(0.05)  # the other worker queues slices meanwhile, behind the failing write
            raise OSError(errno.ENOSPC, "No space left on device")
        time.sleep(0.002)
        whole = (key, None) in computed
        wrote[key, None if whole else byte_offset] = threading.current_thread().name
        return real_place(self, key, byte_offset, data)

    def run(self, t):
        computed[t.key, None if t.whole else t.lo * self.out_dt.itemsize] = threading.current_thread().name
        return real_run(self, t)

    def init(self, *a, **k):
        real_init(self, *a, **k)
        workers.append(self)

    monkeypatch.setattr(SafetensorsStreamWriter, "place", place)
    monkeypatch.setattr(executor._Worker, "run", run)
    monkeypatch.setattr(executor._Worker, "__init__", init)
    return computed, wrote, workers


def test_slices_queued_behind_a_slow_write_are_all_written_by_one_thread_at_a_time(
        tiny_sd1_paths, tmp_path, monkeypatch) -> None:
    """A worker that finishes a slice while another writes leaves it queued and computes on; the
    writing thread writes it. Every slice lands once (same bytes as one worker), writes never
    overlap, and every buffer is back in the pool at the end."""
    import threading

    from blockmerge.merge.executor import merge

    a, b, _ = tiny_sd1_paths
    computed, wrote, workers = _slow_places(monkeypatch)
    active, overlap = [0], [False]
    guard = threading.Lock()
    place = SafetensorsStreamWriter.place

    def exclusive(self, key, byte_offset, data):
        if (key, None) in computed:  # a whole tensor is written by its own worker, beside the slices
            return place(self, key, byte_offset, data)
        with guard:
            active[0] += 1
            overlap[0] |= active[0] > 1
        try:
            return place(self, key, byte_offset, data)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(SafetensorsStreamWriter, "place", exclusive)
    one = merge([a, b], tmp_path / "one.safetensors", alpha="0.3,IN04=0.9", threads=1).output
    computed.clear()
    wrote.clear()
    two = merge([a, b], tmp_path / "two.safetensors", alpha="0.3,IN04=0.9", threads=2).output
    assert one.read_bytes() == two.read_bytes()
    assert set(wrote) == set(computed) and len(wrote) > 100
    handed = [k for k in computed if wrote[k] != computed[k]]
    assert handed, "no slice was ever queued for the writing thread"
    assert not overlap[0], "two slice writes ran at once"
    for w in workers:
        assert w.pool.qsize() == w.n_buffers and w._queued.empty()


def test_a_failed_queued_write_stops_the_merge_and_returns_every_buffer(tiny_sd1_paths, tmp_path, monkeypatch) -> None:
    """A disk-full error in a write that another worker queued is the command's one error; the
    queued slices behind it are dropped with their buffers returned (no worker waits forever for
    one), and no file is left behind. Failing at several points covers a failure in the first,
    a middle and a late write."""
    from blockmerge.errors import BlockmergeError
    from blockmerge.merge.executor import merge

    a, b, _ = tiny_sd1_paths
    for at in (1, 7, 60):
        out_dir = tmp_path / f"o{at}"
        out_dir.mkdir()
        with monkeypatch.context() as mp:
            _, wrote, workers = _slow_places(mp, fail_at=at)
            with pytest.raises(BlockmergeError, match="disk full"):
                merge([a, b], out_dir / "m.safetensors", alpha=0.5, threads=2)
        assert len(wrote) == at - 1
        assert list(out_dir.iterdir()) == []
        w = workers[-1]
        assert w.pool.qsize() == w.n_buffers and w._queued.empty()


def test_pwrite_all_stops_on_a_filesystem_that_accepts_nothing(tmp_path, monkeypatch) -> None:
    """A write that returns 0 bytes (a broken FUSE/network filesystem) is an error, not a loop."""
    import errno

    from blockmerge.io import atomic

    calls = []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 20:
            raise AssertionError("pwrite_all kept retrying a write of nothing")
        return 0 if len(calls) > 1 else 3

    monkeypatch.setattr(atomic.os, "pwrite", pwrite)
    with pytest.raises(OSError) as e:
        atomic.pwrite_all(5, b"abcdefgh", 100)
    assert e.value.errno == errno.EIO and calls == [100, 103]


@pytest.fixture
def shm_dir():
    """A folder on a memory-backed filesystem (Linux's /dev/shm), removed afterwards."""
    import shutil
    import tempfile

    if not sys.platform.startswith("linux"):
        pytest.skip("tmpfs at /dev/shm is Linux's")
    folder = Path(tempfile.mkdtemp(prefix="bm-test-", dir="/dev/shm"))
    fd = os.open(folder, os.O_RDONLY)
    try:
        assert memory_backed(fd), "/dev/shm is not memory-backed here"
    finally:
        os.close(fd)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("where", ["disk without preallocation", "preallocated disk", "tmpfs"])
def test_finish_refuses_a_tensor_accounted_but_never_placed(tmp_path, monkeypatch, request, where) -> None:
    """A tensor accounted as placed but never written (a worker bug) is refused by finish(), also
    where the file's size cannot give it away (a preallocated disk file has its full size from the
    start): the writer counts the bytes placed."""
    from blockmerge.io import safetensors_io

    folder = request.getfixturevalue("shm_dir") if where == "tmpfs" else tmp_path
    out = folder / "short.safetensors"
    entries = [("a", torch.float16, (4,)), ("b", torch.float16, (6,))]
    if where == "disk without preallocation":
        monkeypatch.setattr(safetensors_io, "preallocate", lambda f, size: None)
    with pytest.raises(RuntimeError, match="placed 8 bytes of tensor data, expected 20"), atomic_write(out) as f:
        w = SafetensorsStreamWriter(f, entries)
        w.place("a", 0, torch.ones(4, dtype=torch.float16))
        w.write("a", torch.empty(4, dtype=torch.float16, device="meta"), placed=True)
        w.write("b", torch.empty(6, dtype=torch.float16, device="meta"), placed=True)  # never placed
        w.finish()
    assert list(folder.iterdir()) == []


def test_the_workers_are_waited_for_even_through_a_second_interrupt() -> None:
    """The join at the end of a merge survives a signal arriving during it: the running task finishes
    (it writes into the output file, which is removed right after), then the signal is raised."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from blockmerge.merge.executor import _shutdown

    done = threading.Event()

    class Once(ThreadPoolExecutor):
        interrupted = 0

        def shutdown(self, wait=True, *, cancel_futures=False):
            if not Once.interrupted:
                Once.interrupted += 1
                raise KeyboardInterrupt  # as a SIGINT during the join
            return super().shutdown(wait=wait, cancel_futures=cancel_futures)

    ex = Once(max_workers=1)
    ex.submit(lambda: (time.sleep(0.3), done.set()))
    queued = ex.submit(done.set)  # not started yet: cancelled
    with pytest.raises(KeyboardInterrupt):
        _shutdown(ex)
    assert done.is_set() and Once.interrupted == 1 and queued.cancelled()


def test_positional_writes_to_one_file_take_turns(tmp_path, monkeypatch) -> None:
    """Threads writing other ranges of one output go through pwrite one at a time (the kernel would
    serialize them anyway, with the waiter spinning on a core); every byte still lands."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from blockmerge.io import atomic

    inside, overlap = [0], [False]
    guard = threading.Lock()
    real = atomic.pwrite_all

    def slow(fd, data, offset):
        with guard:
            inside[0] += 1
            overlap[0] |= inside[0] > 1
        time.sleep(0.002)
        try:
            return real(fd, data, offset)
        finally:
            with guard:
                inside[0] -= 1

    monkeypatch.setattr(atomic, "pwrite_all", slow)
    out = tmp_path / "t.bin"
    with atomic_write(out) as f:
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(lambda i: f.pwrite(bytes([i]) * 100, i * 100), range(40)))
        f.seek(4000)
    assert not overlap[0]
    assert out.read_bytes() == b"".join(bytes([i]) * 100 for i in range(40))


def test_after_a_failed_write_no_task_computes(tiny_sd1_paths) -> None:
    """Once a write failed, a task that starts raises that failure before reading or computing."""
    from blockmerge.merge import executor
    from blockmerge.merge.nodes import FileSource

    src = FileSource(tiny_sd1_paths[0])
    try:
        w = executor._Worker(src, torch.float16, 2)
        key = sorted(src.keys())[0]
        failure = OSError(28, "No space left on device")
        w._failure = failure
        reads = []
        src.get = lambda k: reads.append(k)  # type: ignore[method-assign]
        with pytest.raises(OSError) as e:
            w.run(executor._Task(key, 0, 1, True, True))
        assert e.value is failure and reads == []
    finally:
        src.close()
