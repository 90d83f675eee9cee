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
