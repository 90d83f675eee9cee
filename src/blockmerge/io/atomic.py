"""The write policy: every file blockmerge writes goes through :func:`atomic_write`.

What it guarantees, for checkpoints, images, latents, reports, heat maps, recipes and caches alike:

- **Nothing partial under the output's name.** Data goes to a temporary file beside the target,
  is flushed and fsynced, and only then takes the target's name (the folder is fsynced after).
  On any failure (an exception, a full disk, SIGTERM/SIGINT/SIGHUP, which the CLI turns into
  exceptions) the temporary file is removed.
- **No file is replaced by accident.** An existing target is replaced only with ``overwrite`` (or
  when ``replace_if`` proves it is this tool's own earlier output, e.g. a report being re-rendered),
  and never a file the command reads, even with ``overwrite``: identity is the device and inode, so
  ``./x``, symlinks and hard links are caught (:mod:`blockmerge.io.inputs` records what was read).
  FIFOs, devices and folders are never replaced.
- **Two writers of one new file do not both succeed.** A new file is published with ``link(2)``,
  which fails when the name exists, so a second merge racing to the same output gets an error
  instead of silently replacing the first one's file; and a writer that finds another live
  writer's temporary file for the same target stops at once.
- **Debris after a SIGKILL is recognised and removed.** The temporary file's name carries the tool
  tag, the writer's pid and process start time, and the writer holds an exclusive ``flock`` on it
  for its whole life. A later write into the same folder removes any such file whose lock is free
  and whose process is gone (or whose pid now belongs to another process), and says so.

Why not ``tempfile.mkstemp`` + ``os.replace`` alone: a random temporary name cannot be proven dead
by a later run, and ``os.replace`` silently replaces a file another process created meanwhile.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import BlockmergeError, BlockmergeWarning
from .inputs import file_kind, read_by_command
from .libc import get_errno, libc_function

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

TAG = "blockmerge-partial"
_TEMP = re.compile(
    r"^\.(?P<name>.*)\.(?P<h>[0-9a-f]{8})\.(?P<pid>\d+)-(?P<start>\d+)-(?P<ns>[0-9a-f]+)\." + TAG + r"$", re.S
)
DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _default_mode()


# ---- process identity, for proving a temporary file's writer is gone --------------------------

def _proc_start(pid: int) -> int:
    """The process's start time in clock ticks since boot (Linux ``/proc/PID/stat`` field 22), or 0."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


_SELF: tuple[int, int] = (0, 0)


def _self_id() -> tuple[int, int]:
    global _SELF
    pid = os.getpid()
    if _SELF[0] != pid:  # first call, or a forked child
        _SELF = (pid, _proc_start(pid))
    return _SELF


def _process_gone(pid: int, start: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, as another user's process
        pass
    now = _proc_start(pid)
    return bool(start and now and now != start)  # the pid was reused by a later process


def _lock_is_free(path: Path) -> tuple[bool, int | None]:
    """(True, fd holding the lock) when no process holds ``path``'s flock; the caller closes fd."""
    if fcntl is None:
        return True, None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False, None
    return True, fd


def _partials(folder: Path) -> Iterator[tuple[Path, re.Match[str]]]:
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith(".") and entry.name.endswith(TAG):
                    m = _TEMP.match(entry.name)
                    if m and entry.is_file(follow_symlinks=False):
                        yield Path(entry.path), m
    except OSError:
        return


def _is_dead(path: Path, m: re.Match[str]) -> bool:
    return _process_gone(int(m["pid"]), int(m["start"])) and _lock_is_free_closed(path)


def _lock_is_free_closed(path: Path) -> bool:
    free, fd = _lock_is_free(path)
    if fd is not None:
        os.close(fd)
    return free


def remove_stale_partials(folder: str | os.PathLike[str], *, recursive: bool = False) -> list[Path]:
    """Remove the temporary files that blockmerge processes which no longer run left in ``folder``.

    A file is removed only when its name is blockmerge's (tool tag, pid, start time), nobody holds
    its lock, and its process is gone. Each removal is reported as a :class:`BlockmergeWarning`.
    """
    removed: list[Path] = []
    folders = [Path(folder)]
    if recursive:
        with contextlib.suppress(OSError):
            folders += [Path(d) for d, _, _ in os.walk(folder) if d != str(folder)]
    for d in folders:
        for path, m in _partials(d):
            if not _process_gone(int(m["pid"]), int(m["start"])):
                continue
            free, fd = _lock_is_free(path)
            if not free:
                continue
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
            except OSError:
                continue
            finally:
                if fd is not None:
                    os.close(fd)
            warnings.warn(f"removed {path}: a partial file left by blockmerge process {m['pid']}, "
                          "which no longer runs", BlockmergeWarning, stacklevel=2)
    return removed


# ---- names ---------------------------------------------------------------------------------------

def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def _name_hash(name: str) -> str:
    return hashlib.sha1(os.fsencode(name)).hexdigest()[:8]


def _temp_name(target: Path, ns: int) -> str:
    pid, start = _self_id()
    tail = f".{_name_hash(target.name)}.{pid}-{start}-{ns:x}.{TAG}"
    room = max(0, _name_max(target.parent) - 1 - len(tail))
    # A long target name is cut (bytes, as the filesystem counts them); the hash keeps targets apart.
    head = os.fsdecode(os.fsencode(target.name)[:room])
    return "." + head + tail


def _where(path: Path, arg: str | None) -> str:
    return f"{arg} {path}" if arg else str(path)


# ---- the checks ----------------------------------------------------------------------------------

def _same_file(st: os.stat_result, inputs: Iterable[str | os.PathLike[str]]) -> str | None:
    for inp in inputs:
        try:
            s = os.stat(inp)
        except OSError:
            continue
        if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
            return str(inp)
    return read_by_command(st)


def check_output_path(
    output: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
    arg: str | None = "-o/--output",
    *,
    replace_if: Callable[[Path], bool] | None = None,
) -> None:
    """Refuse, with one line naming ``arg`` and the path, an output that cannot or may not be written.

    Refused: a name that is empty, ``.``/``..`` or too long for the filesystem; a folder that is
    missing, not a folder, or not writable; an existing folder, FIFO, device or socket at the name;
    one of ``inputs`` or of the files the running command has read (even with ``overwrite``); an
    existing file without ``overwrite`` unless ``replace_if(path)`` says it is our own output.
    """
    out = Path(output)
    where = _where(out, arg)
    name = out.name
    if not name or name in (".", "..") or str(output).endswith(os.sep):
        raise BlockmergeError(f"{where}: is not a file name")
    parent = out.parent
    try:
        pst = os.stat(parent)
    except FileNotFoundError:
        raise BlockmergeError(f"{where}: folder {parent} does not exist") from None
    except NotADirectoryError:
        raise BlockmergeError(f"{where}: {parent} is not a folder") from None
    except OSError as e:
        raise BlockmergeError(f"{where}: folder {parent}: {e.strerror or e}") from None
    if not stat.S_ISDIR(pst.st_mode):
        raise BlockmergeError(f"{where}: {parent} is not a folder")
    limit = _name_max(parent)
    if len(os.fsencode(name)) > limit:
        raise BlockmergeError(f"{where}: the file name is too long ({len(os.fsencode(name))} bytes; "
                              f"this filesystem allows {limit})")
    if not os.access(parent, os.W_OK | os.X_OK):
        ro = _read_only_fs(parent)
        raise BlockmergeError(f"{where}: folder {parent} is {'on a read-only filesystem' if ro else 'not writable'}")
    try:
        lst = os.lstat(out)
    except FileNotFoundError:
        return
    except OSError as e:
        raise BlockmergeError(f"{where}: {e.strerror or e}") from None
    try:
        st = os.stat(out)
    except OSError:  # a dangling symbolic link
        if not overwrite:
            raise BlockmergeError(f"{where}: already exists (a symbolic link; use --overwrite to replace it)") from None
        return
    if stat.S_ISDIR(st.st_mode):
        raise BlockmergeError(f"{where}: is a folder")
    if not stat.S_ISREG(st.st_mode):
        raise BlockmergeError(f"{where}: exists and is {file_kind(st.st_mode)}; refusing to replace it")
    same = _same_file(st, inputs)
    if same is not None:
        how = "" if os.path.abspath(same) == os.path.abspath(out) else f" ({same}{', through a link' if stat.S_ISLNK(lst.st_mode) or st.st_nlink > 1 else ''})"
        raise BlockmergeError(f"{where}: is an input file{how}; refusing to write over an input, even with --overwrite")
    if not overwrite and not (replace_if is not None and _safe_call(replace_if, out)):
        raise BlockmergeError(f"{where}: already exists (use --overwrite to replace it)")


def _safe_call(pred: Callable[[Path], bool], p: Path) -> bool:
    try:
        return bool(pred(p))
    except (OSError, ValueError):
        return False


def _read_only_fs(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_output_dir(folder: str | os.PathLike[str], arg: str = "-o/--output", *, make: bool = True) -> Path:
    """An output folder that exists, or can be made (and, with ``make``, is made now), to write in.

    Refused with one line: a path that exists and is not a folder, a folder that is not writable or
    on a read-only filesystem, a name too long for the filesystem, a part of the path that is a file.
    With ``make=False`` a missing folder is only checked (its nearest existing parent must be a
    writable folder), so a command can validate before slow work and create it after.
    """
    d = Path(folder)
    where = f"{arg} {d}"
    for part in d.parts:
        if len(os.fsencode(part)) > 255:
            raise BlockmergeError(f"{where}: the name {part[:40]!r}... is too long ({len(os.fsencode(part))} bytes)")
    try:
        st = os.stat(d)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise BlockmergeError(f"{where}: a part of the path is not a folder") from None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise BlockmergeError(f"{where}: the name is too long") from None
        raise BlockmergeError(f"{where}: {e.strerror or e}") from None
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise BlockmergeError(f"{where}: exists and is not a folder")
        if not os.access(d, os.W_OK | os.X_OK):
            raise BlockmergeError(f"{where}: the folder is {'on a read-only filesystem' if _read_only_fs(d) else 'not writable'}")
        return d
    parent = d.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BlockmergeError(f"{where}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BlockmergeError(f"{where}: cannot create it: {parent} is "
                              f"{'on a read-only filesystem' if _read_only_fs(parent) else 'not writable'}")
    if not make:
        return d
    missing = []  # the folders this call creates, deepest first
    p = d.absolute()
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        d.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise BlockmergeError(f"{where}: exists and is not a folder") from None
    except NotADirectoryError:
        raise BlockmergeError(f"{where}: a part of the path is not a folder") from None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise BlockmergeError(f"{where}: the name is too long") from None
        if e.errno in DISK_FULL:
            raise BlockmergeError(f"{where}: disk full ({e.strerror})") from None
        raise BlockmergeError(f"{where}: cannot create the folder: {e.strerror or e}") from None
    _note_made(reversed(missing))
    return d


# ---- folders made by a command that then fails ------------------------------------------------------

_MADE_LOCK = threading.Lock()
_MADE_DEPTH = 0
_MADE: list[Path] = []  # in the order they were made (a parent before its children)


def _note_made(folders: Iterable[Path]) -> None:
    with _MADE_LOCK:
        if _MADE_DEPTH:
            _MADE.extend(folders)


@contextlib.contextmanager
def made_folders_guard() -> Iterator[None]:
    """While active, the folders :func:`check_output_dir` creates are remembered; if the block fails
    (an exception, a full disk, SIGTERM/SIGINT/SIGHUP turned into exceptions), those still empty are
    removed again, deepest first.

    Why here and not in each command: every command that makes an output folder (report, sweep,
    demo, generate) makes it through :func:`check_output_dir`, so one record covers them all, and a
    failed ``report`` no longer leaves ``rep/`` and ``rep/heatmaps/`` behind. Only empty folders go
    (``rmdir`` refuses the others): images a failed sweep already finished are kept for its resume.
    Nested guards share one record, acted on by the outermost, as :func:`~.inputs.input_guard`.
    """
    global _MADE_DEPTH
    with _MADE_LOCK:
        _MADE_DEPTH += 1
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        with _MADE_LOCK:
            _MADE_DEPTH -= 1
            outermost = _MADE_DEPTH == 0
            made = list(_MADE) if outermost else []
            if outermost:
                _MADE.clear()
        if failed:
            for folder in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


# ---- writing ---------------------------------------------------------------------------------------

class _TrackedFile:
    """The temporary file, remembering the first write error: torch.save, Pillow and numpy may wrap an
    ENOSPC in their own exception types (torch: "unexpected pos 704 vs 598"), and we want to say
    "disk full" whatever the library said."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.error: OSError | None = None
        self._lock = threading.Lock()

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def pwrite(self, data: Any, offset: int) -> None:
        """Write all of ``data`` at ``offset``; threads may call this for other ranges at the same time,
        and take turns here. Why: the kernel serializes buffered writes to one file anyway (the inode
        lock on tmpfs, ext4, xfs, btrfs), and a thread waiting for it there spins on the other core
        (``rwsem_spin_on_owner``: 21% of a 2-core LoRA apply's CPU); waiting on this lock it sleeps."""
        try:
            with self._lock:
                pwrite_all(self._f.fileno(), data, offset)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def pwrite_all(fd: int, data: Any, offset: int) -> None:
    """``os.pwrite`` until every byte of ``data`` is at ``offset`` onwards (a write may be partial)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # a regular file never does this; a broken FUSE/network filesystem could, forever
            raise OSError(errno.EIO, "the filesystem accepted no bytes of a write")
        view, offset = view[n:], offset + n


def write_error(where: str, e: OSError) -> BlockmergeError:
    """The one-line error for a failed write of ``where``."""
    if e.errno in DISK_FULL:
        return BlockmergeError(f"{where}: disk full while writing ({e.strerror}); nothing was written")
    if e.errno == errno.EROFS:
        return BlockmergeError(f"{where}: cannot write: read-only filesystem")
    if e.errno == errno.ENAMETOOLONG:
        return BlockmergeError(f"{where}: the file name is too long")
    return BlockmergeError(f"{where}: cannot write: {e.strerror or e}")


def _create_temp(target: Path, where: str, state: dict[str, Any]) -> tuple[int, Path, int]:
    """Create the temporary file exclusively. Its name goes into ``state`` *before* it exists, so a
    signal that arrives at any instant after the file appears still finds it to remove."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        ns = time.time_ns()
        tmp = target.parent / _temp_name(target, ns)
        state["tmp"] = tmp
        try:
            fd = state["fd"] = os.open(tmp, flags, 0o600)
        except FileExistsError:
            state["tmp"] = None  # not ours (cannot happen: pid and nanoseconds are in the name)
            continue
        except OSError as e:
            state["tmp"] = None
            raise write_error(where, e) from None
        try:
            os.fchmod(fd, _MODE)  # a finished output gets the usual permissions
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # a filesystem without flock: the pid in the name still identifies us
        return fd, tmp, ns
    raise BlockmergeError(f"{where}: cannot create a temporary file")  # pragma: no cover


def _other_writer(target: Path, tmp: Path, ns: int) -> int | None:
    """The pid of a live blockmerge process that started writing ``target`` before us, if any."""
    own_pid = os.getpid()
    h = _name_hash(target.name)
    for path, m in _partials(target.parent):
        if path == tmp or m["h"] != h:
            continue
        pid, their_ns = int(m["pid"]), int(m["ns"], 16)
        if _is_dead(path, m):
            continue
        if (their_ns, pid) < (ns, own_pid):
            return pid
    return None


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _link_noreplace(tmp: Path, target: Path, where: str) -> None:
    """Give ``tmp``'s inode the name ``target`` only if that name is free (atomically)."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise BlockmergeError(f"{where}: was created by another process while this one was writing it; "
                              "left as it is (use --overwrite to replace it)") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS, errno.EACCES):
            raise
        # A filesystem without hard links (FAT, some FUSE mounts): rename without replacing.
        if not _rename_noreplace(tmp, target):
            if os.path.lexists(target):
                raise BlockmergeError(f"{where}: was created by another process while this one was writing it; "
                                      "left as it is (use --overwrite to replace it)") from None
            os.replace(tmp, target)
        return
    os.unlink(tmp)


_RENAMEAT2 = libc_function("renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint])
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _rename_noreplace(tmp: Path, target: Path) -> bool:
    """Linux renameat2(RENAME_NOREPLACE); False where it is not available."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
        return True
    err = get_errno()
    if err == errno.EEXIST:
        raise FileExistsError(errno.EEXIST, os.strerror(err), str(target))
    return False


@contextlib.contextmanager
def atomic_write(
    target: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
    replace_if: Callable[[Path], bool] | None = None,
    arg: str | None = None,
) -> Iterator[BinaryIO]:
    """Yield a binary file; on success it becomes ``target``, on any failure it disappears.

    ``overwrite`` allows replacing an existing file; ``replace_if(path)`` allows it for files that
    are provably the caller's own earlier output; ``inputs`` (and every file the running command
    read, see :func:`blockmerge.io.inputs.input_guard`) are never replaced. ``arg`` names the
    option in error messages (``-o/--output``).
    """
    target = Path(target)
    where = _where(target, arg)
    input_list = list(inputs)
    check_output_path(target, input_list, overwrite, arg, replace_if=replace_if)
    existed = os.path.lexists(target)
    remove_stale_partials(target.parent)
    state: dict[str, Any] = {"tmp": None, "fd": None}
    raw: BinaryIO | None = None
    published = False
    try:
        fd, tmp, ns = _create_temp(target, where, state)
        raw = os.fdopen(fd, "wb")
        state["fd"] = None  # owned by ``raw`` now
        f = _TrackedFile(raw)
        pid = _other_writer(target, tmp, ns)
        if pid is not None:
            raise BlockmergeError(f"{where}: blockmerge process {pid} is writing this file right now; "
                                  "try again when it has finished")
        try:
            yield f  # type: ignore[misc]
        except BaseException as e:
            if f.error is not None:
                raise write_error(where, f.error) from None
            if isinstance(e, OSError) and e.errno in DISK_FULL:
                raise write_error(where, e) from None
            raise
        try:
            raw.flush()
            os.fsync(raw.fileno())
            # The world may have changed while we wrote: check again, then publish.
            if os.path.lexists(target):
                if not existed and not overwrite:
                    raise BlockmergeError(f"{where}: was created by another process while this one was writing "
                                          "it; left as it is (use --overwrite to replace it)")
                check_output_path(target, input_list, overwrite, arg, replace_if=replace_if)
                os.replace(tmp, target)
            else:
                _link_noreplace(tmp, target, where)
            published = True
        except OSError as e:
            raise write_error(where, e) from None
        _fsync_dir(target.parent)
    finally:
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.close()
        elif state["fd"] is not None:
            with contextlib.suppress(OSError):
                os.close(state["fd"])
        if not published and state["tmp"] is not None:
            with contextlib.suppress(OSError):
                os.unlink(state["tmp"])


def utf8(text: str) -> bytes:
    """``text`` as UTF-8; characters UTF-8 cannot hold (lone surrogates, which is how Python carries a
    file name's undecodable bytes) become U+FFFD instead of failing the write."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text).encode("utf-8")


def write_bytes(target: str | os.PathLike[str], data: bytes, **policy: Any) -> Path:
    """Write ``data`` to ``target`` through :func:`atomic_write` (same keyword arguments)."""
    with atomic_write(target, **policy) as f:
        f.write(data)
    return Path(target)


def write_text(target: str | os.PathLike[str], text: str, **policy: Any) -> Path:
    """Write ``text`` as UTF-8 to ``target`` through :func:`atomic_write` (same keyword arguments)."""
    return write_bytes(target, utf8(text), **policy)


def file_has_marker(path: Path, marker: bytes, within: int = 4096) -> bool:
    """Whether ``marker`` occurs in the first ``within`` bytes of the regular file ``path`` (the
    generator marks that let a writer recognise its own earlier output)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return False
        with open(path, "rb") as fh:
            return marker in fh.read(within)
    except OSError:
        return False


def preallocate(f: BinaryIO, size: int) -> None:
    """Reserve ``size`` bytes for the file behind ``f`` before writing it.

    Why: on ext4 here, writing 2 GB into a preallocated file took 0.35-0.6 s against 1-4 s for
    the same writes growing the file block by block; and a disk too small fails now, before any
    work, with the same "disk full" error. Filesystems that cannot preallocate are written as usual.
    The caller must then write exactly ``size`` bytes (the file is ``size`` long from here on).
    Not on tmpfs/ramfs: there ``fallocate`` zeroes every page in memory before the writes fill
    them again (2 GB: 0.6 s of fallocate and 2.3-5.1 s of writes, against 1.05 s of writes alone),
    and a full tmpfs fails the write with the same "disk full" error.
    """
    if not hasattr(os, "posix_fallocate") or size <= 0 or memory_backed(f.fileno()):
        return
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise
        # EOPNOTSUPP / EINVAL (tmpfs of old kernels, network filesystems): nothing reserved, no harm.


_MEMORY_FS = frozenset({"tmpfs", "ramfs"})


def memory_backed(fd: int) -> bool:
    """Whether the open file ``fd`` lives on a filesystem kept in memory (tmpfs, ramfs; Linux's
    ``/proc/self/mountinfo``, matched by device number). False where that cannot be told."""
    try:
        dev = os.fstat(fd).st_dev
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as m:
            for line in m:
                fields = line.split()
                if len(fields) < 7 or " - " not in line:
                    continue
                major, _, minor = fields[2].partition(":")
                if os.makedev(int(major), int(minor)) == dev:
                    return line.split(" - ", 1)[1].split()[0] in _MEMORY_FS
    except (OSError, ValueError):
        pass
    return False


_SYNC_FILE_RANGE = libc_function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
_SYNC_FILE_RANGE_WRITE = 2


class EarlyWriteback:
    """Start the disk writes of a big output while it is still being produced.

    Why: ``atomic_write`` fsyncs before the rename, and fsyncing 2 GB of dirty pages at the end took
    0.6-0.7 s here, all on the critical path. Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)``
    starts writeback of what has been written so far without waiting for it, so the final fsync
    finds almost nothing left (0.06 s). Python's ``os`` module has no binding for it, hence ctypes;
    elsewhere this does nothing and the final fsync does all the work, as before.
    """

    CHUNK = 64 << 20

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._done = f.tell()
        self.enabled = _SYNC_FILE_RANGE is not None

    def advance(self, pos: int | None = None) -> bool:
        """Call after writes; every ``CHUNK`` bytes, start writeback of them. True if it did.
        ``pos``: where the written part of the file ends (default: the file position; positional
        writes leave that alone, so their writer says how far the file is complete)."""
        if not self.enabled:
            return False
        if pos is None:
            pos = self._f.tell()
        if pos - self._done < self.CHUNK:
            return False
        self._f.flush()
        if _SYNC_FILE_RANGE(self._f.fileno(), self._done, pos - self._done, _SYNC_FILE_RANGE_WRITE) != 0:
            self.enabled = False  # e.g. ESPIPE on a pipe: only an optimisation, so stop trying
            return False
        self._done = pos
        return True
