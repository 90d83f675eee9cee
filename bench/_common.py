"""Shared helpers for the benchmarks in bench/: measure a child process, describe the machine,
write one section of bench/RESULTS.md.

Why a child process per contender: peak RSS is a property of a whole process, and a merge that
runs after another one in the same interpreter inherits its allocator state. Each contender runs
alone under ``/usr/bin/time -v`` (the number the issue asks for: "Maximum resident set size"),
falling back to ``resource.getrusage(RUSAGE_CHILDREN)`` where GNU time is not installed.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

GNU_TIME = "/usr/bin/time"
RESULTS = Path(__file__).with_name("RESULTS.md")


@dataclass(frozen=True)
class Measurement:
    """What one child run cost: wall seconds, peak RSS in bytes, CPU seconds, and its output."""

    wall_s: float
    max_rss: int
    user_s: float
    sys_s: float
    returncode: int
    stdout: str
    stderr: str
    load_before: float
    load_after: float

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


def _parse_elapsed(text: str) -> float:
    """``/usr/bin/time -v`` writes wall time as ``[h:]m:ss.ss``."""
    parts = [float(p) for p in text.strip().split(":")]
    s = 0.0
    for p in parts:
        s = s * 60 + p
    return s


def parse_time_v(text: str) -> dict[str, float]:
    """The fields we use from a ``/usr/bin/time -v`` report (rss in bytes, times in seconds)."""
    fields: dict[str, float] = {}
    patterns = {
        "max_rss": r"Maximum resident set size \(kbytes\):\s*(\d+)",
        "user_s": r"User time \(seconds\):\s*([\d.]+)",
        "sys_s": r"System time \(seconds\):\s*([\d.]+)",
        "wall": r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\):\s*([\d:.]+)",
    }
    for name, pat in patterns.items():
        m = re.search(pat, text)
        if m is None:
            raise ValueError(f"/usr/bin/time -v output lacks {name!r}:\n{text[-2000:]}")
        fields[name] = _parse_elapsed(m.group(1)) if name == "wall" else float(m.group(1))
    fields["max_rss"] *= 1024
    return fields


def loadavg() -> float:
    """1-minute load average (how busy the shared machine was around a run)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


class Stopped(RuntimeError):
    """A child the guard of :func:`measure` stopped (the machine ran short of memory, or time ran out)."""

    def __init__(self, reason: str, wall_s: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wall_s = wall_s


def _run_guarded(argv: Sequence[str], env: Mapping[str, str], cwd: str | Path | None,
                 min_available: int | None, timeout: float | None) -> subprocess.CompletedProcess:
    """``subprocess.run`` that kills the child (and raises :class:`Stopped`) when the machine's
    MemAvailable falls below ``min_available`` bytes or ``timeout`` seconds pass.

    Why: on a shared machine a contender that needs more memory than there is would make the
    kernel's OOM killer pick a victim, maybe another user's process; stopping it first and saying
    so is the honest result."""
    if min_available is None and timeout is None:
        return subprocess.run(list(argv), env=dict(env), cwd=cwd, capture_output=True, text=True)
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        # Its own process group, so a kill reaches the contender under /usr/bin/time too.
        child = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdout=out, stderr=err, text=True,
                                 start_new_session=True)
        reason = None
        while child.poll() is None:
            time.sleep(0.2)
            avail = mem_available()
            if min_available is not None and avail and avail < min_available:
                reason = f"stopped: the machine's available memory fell to {fmt_bytes(avail)}"
            elif timeout is not None and time.perf_counter() - t0 > timeout:
                reason = f"stopped: still running after {timeout / 60:.0f} min"
            if reason:
                import signal

                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                raise Stopped(reason, time.perf_counter() - t0)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(list(argv), child.returncode, out.read(), err.read())


def measure(cmd: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | Path | None = None, *,
            min_available: int | None = None, timeout: float | None = None) -> Measurement:
    """Run ``cmd`` in a child process and return its wall time and peak RSS.

    Raises ``RuntimeError`` with the child's stderr when it fails: a benchmark of a crash is no
    number at all. ``min_available`` / ``timeout`` guard the machine (see :class:`Stopped`).
    """
    full_env = {**os.environ, **(env or {})}
    before = loadavg()
    if os.path.exists(GNU_TIME):
        t0 = time.perf_counter()
        p = _run_guarded([GNU_TIME, "-v", *cmd], full_env, cwd, min_available, timeout)
        wall_py = time.perf_counter() - t0
        # GNU time appends its report to the child's stderr; split it off.
        idx = p.stderr.rfind("\tCommand being timed:")
        child_err, report = (p.stderr[:idx], p.stderr[idx:]) if idx >= 0 else (p.stderr, "")
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{child_err[-4000:]}")
        f = parse_time_v(report)
        # GNU time prints wall time with 2 decimals; keep its value (it is what the issue asks for)
        # unless it is missing, and fall back to our own clock.
        wall = f["wall"] or wall_py
        return Measurement(wall, int(f["max_rss"]), f["user_s"], f["sys_s"], p.returncode, p.stdout, child_err,
                           before, loadavg())
    # Fallback: RUSAGE_CHILDREN's ru_maxrss is the max over all waited-for children, so it is only
    # this child's peak if it is the largest so far; good enough where GNU time is missing.
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = _run_guarded(cmd, full_env, cwd, min_available, timeout)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return Measurement(wall, r1.ru_maxrss * 1024, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime,
                       p.returncode, p.stdout, p.stderr, before, loadavg())


def warm_read(paths: Sequence[str | Path], chunk: int = 64 * 1024 * 1024) -> None:
    """Read files once so every contender finds its inputs in the page cache (order-neutral)."""
    buf = bytearray(chunk)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    m = re.search(r"Model name:\s*(.+)", out)
    return m.group(1).strip() if m else "unknown CPU"


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_ram() -> int:
    """Total RAM in bytes (0 when unknown)."""
    return _mem_total()


def mem_available() -> int:
    """Bytes the kernel says a new process could use now (0 when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def machine_info(packages: Sequence[str] = ("torch", "safetensors")) -> dict[str, str]:
    """The facts a reader needs to compare our numbers with theirs."""
    info = {
        "CPU": _lscpu_model(),
        "cores": str(os.cpu_count()),
        "RAM": fmt_bytes(_mem_total()),
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
    }
    for p in packages:
        info[p] = _version(p)
    info["date"] = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return info


def disk_free(path: str | Path) -> int:
    return shutil.disk_usage(path).free


def fmt_bytes(n: float) -> str:
    """Decimal GB like ``/usr/bin/time`` users read them (1 GB = 10^9 bytes)."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.0f} MB"


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_results_section(heading: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the ``## heading`` section of RESULTS.md, leaving other sections alone.

    A section runs from its ``## `` heading to the next ``## `` heading, so each benchmark owns one
    section and several benchmarks can share the file.
    """
    title = f"## {heading}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == title), None)
    new = [title, "", *body.strip("\n").splitlines(), ""]
    if start is None:
        while lines and not lines[-1].strip():
            lines.pop()
        lines += ["", *new]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = new
    path.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")


def python_cmd(script: str | Path, *args: str) -> list[str]:
    """The command that runs ``script`` with this interpreter (children see the same packages)."""
    return [sys.executable, str(script), *args]
