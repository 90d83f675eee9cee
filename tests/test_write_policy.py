"""The one write policy (``blockmerge.io.atomic``) and every command that writes through it.

Class 1 of issue 10 (data loss): no input of any kind is ever written over, an existing output only
with ``--overwrite``, two outputs naming one file are an error before any work, two writers of one
new file do not both succeed. Class 2 (debris): nothing partial after a failure, and temporary
files of dead processes are recognised and removed. Cases are generated: every writing command x
every way of naming an input, every output format x a full disk, hypothesis over file names.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockmerge.cli import main
from blockmerge.errors import BlockmergeError, BlockmergeWarning
from blockmerge.io import (
    atomic_write,
    check_output_dir,
    check_output_path,
    input_guard,
    note_input,
    write_text,
)
from blockmerge.io.atomic import _TEMP, _name_hash, _name_max, _temp_name, remove_stale_partials

SRC = str(Path(__file__).resolve().parents[1] / "src")


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (dot files too) with its sha256: what "untouched" means."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_symlink():
            out[str(p.relative_to(folder))] = "-> " + os.readlink(p)
    return out


def cli(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *must: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("blockmerge: error: "), err
    for m in must:
        assert m in lines[0], (m, err)


@pytest.fixture
def work(tmp_path: Path, tiny_sd1_paths):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(tiny_sd1_paths[0].read_bytes())
    b.write_bytes(tiny_sd1_paths[1].read_bytes())
    (tmp_path / "board.txt").write_text("mix = __A__ + __B__, 0.3\n", encoding="utf-8")
    (tmp_path / "presets.tsv").write_text("MINE\t" + ",".join(["0.5"] * 25) + "\n", encoding="utf-8")
    (tmp_path / "r.toml").write_text(
        'version = 1\n[inputs.A]\npath = "a.safetensors"\n[inputs.B]\npath = "b.safetensors"\n'
        '[[steps]]\nmodels = ["A", "B"]\nalpha = 0.5\n', encoding="utf-8")
    return tmp_path


# Every command that writes a file, as (argv with OUT for the output, the files it reads).
WRITERS = {
    "merge": (["merge", "{a}", "{b}", "-o", "OUT", "--alpha", "MINE", "--presets", "{presets}", "-q"],
              ["a.safetensors", "b.safetensors", "presets.tsv"]),
    "merge-vae": (["merge", "{a}", "{b}", "-o", "OUT", "--alpha", "0.5", "--vae", "{b}", "-q"],
                  ["a.safetensors", "b.safetensors"]),
    "merge-ckpt": (["merge", "{a}", "{b}", "-o", "OUT", "--alpha", "0.5", "--format", "ckpt", "-q"],
                   ["a.safetensors", "b.safetensors"]),
    "run": (["run", "{recipe}", "-o", "OUT", "-q"], ["a.safetensors", "b.safetensors", "r.toml"]),
    "import-mergeboard": (["import-mergeboard", "{board}", "-o", "OUT", "-q"], ["board.txt"]),
    "compare-svg": (["compare", "{a}", "{b}", "--svg", "OUT", "-q"], ["a.safetensors", "b.safetensors"]),
}


def _argv(work: Path, argv: list[str], out: object) -> list[str]:
    subst = {"{a}": work / "a.safetensors", "{b}": work / "b.safetensors", "{presets}": work / "presets.tsv",
             "{recipe}": work / "r.toml", "{board}": work / "board.txt"}
    return [str(out) if x == "OUT" else str(subst.get(x, x)) for x in argv]


def _spellings(work: Path, name: str) -> dict[str, Path]:
    """Ways of naming the input ``name`` as an output: itself, via ./ and .., a symlink, a hard link."""
    link, hard = work / "link.out", work / "hard.out"
    link.symlink_to(work / name)
    os.link(work / name, hard)
    sub = work / "sub"
    sub.mkdir(exist_ok=True)
    return {"same": work / name, "dot": work / "." / name, "dotdot": sub / ".." / name,
            "symlink": link, "hardlink": hard}


@pytest.mark.parametrize("way", ["same", "dot", "dotdot", "symlink", "hardlink"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_no_command_writes_over_any_of_its_inputs_even_with_overwrite(work, capsys, writer, way) -> None:
    argv, reads = WRITERS[writer]
    for name in reads:
        out = _spellings(work, name)[way]
        before = tree(work)
        code, _, err = cli(capsys, *_argv(work, argv, out), "--overwrite")
        assert_one_line_error(code, err, "is an input file", "even with --overwrite")
        assert tree(work) == before, f"{writer} wrote over {name} named {way}"
        (work / "link.out").unlink()
        (work / "hard.out").unlink()


@pytest.mark.parametrize("writer", sorted(WRITERS) + ["synthetic"])
def test_an_existing_output_needs_overwrite_and_is_then_replaced_whole(work, capsys, writer) -> None:
    argv = ["synthetic", "OUT", "-q"] if writer == "synthetic" else WRITERS[writer][0]
    out = work / ("existing.ckpt" if "ckpt" in writer else "existing.toml" if writer.startswith(("run", "import"))
                  else "existing.out")
    if writer == "run":
        out = work / "existing.safetensors"
    out.write_bytes(b"the user's file")
    before = tree(work)
    code, _, err = cli(capsys, *_argv(work, argv, out))
    assert_one_line_error(code, err, str(out), "already exists (use --overwrite")
    assert tree(work) == before
    code, _, err = cli(capsys, *_argv(work, argv, out), "--overwrite")
    assert code == 0, err
    assert out.read_bytes() != b"the user's file" and out.stat().st_size > 100
    assert not [p for p in work.iterdir() if p.name.endswith("blockmerge-partial")]


def _fifo(work: Path) -> Path:
    p = work / "fifo.out"
    os.mkfifo(p)
    return p


@pytest.mark.parametrize("target,must", [
    (lambda w: w / "afolder", "is a folder"),
    (_fifo, "FIFO"),
    (lambda w: w / "missing" / "x.out", "does not exist"),
    (lambda w: w / "a.safetensors" / "x.out", "is not a folder"),
    (lambda w: w / ("n" * 300 + ".out"), "too long"),
])
@pytest.mark.parametrize("writer", sorted(WRITERS) + ["synthetic"])
def test_outputs_that_cannot_be_written_fail_before_any_work(work, capsys, writer, target, must) -> None:
    (work / "afolder").mkdir()
    out = target(work)
    argv = ["synthetic", "OUT", "-q"] if writer == "synthetic" else WRITERS[writer][0]
    before = tree(work)
    t0 = time.perf_counter()
    code, _, err = cli(capsys, *_argv(work, argv, out), "--overwrite")
    assert_one_line_error(code, err, must)
    assert tree(work) == before
    assert time.perf_counter() - t0 < 30  # a FIFO must not block


@pytest.fixture
def read_only_folder(tmp_path: Path):
    """A folder nobody may create files in. Root may write anywhere despite the mode bits, so as root
    the folder is made immutable (``chattr +i``), which the kernel enforces for root too."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    immutable = False
    if os.geteuid() == 0:
        immutable = subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0
    try:
        try:
            (ro / "probe").write_bytes(b"")
            (ro / "probe").unlink()
            pytest.skip("this filesystem lets the test user write into a read-only folder")
        except PermissionError:
            pass
        yield ro
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(ro)], check=True)
        ro.chmod(0o755)


def test_read_only_output_folder(read_only_folder: Path, work, capsys) -> None:
    ro = read_only_folder
    a = work / "a.safetensors"
    for argv, must in [(["merge", a, a, "-o", ro / "o.safetensors", "--alpha", "0.5"], "not writable"),
                       (["synthetic", ro / "s.safetensors"], "not writable"),
                       (["import-mergeboard", work / "board.txt", "-o", ro / "r.toml"], "not writable"),
                       (["generate", "-o", ro / "gen", "--prompt", "x"], "not writable"),
                       (["sweep", "tiny-a", "-o", ro / "sw", "--prompt", "x", "--scale", "0.5"], "not writable")]:
        code, _, err = cli(capsys, *argv)
        assert_one_line_error(code, err, must, str(ro))
        assert list(ro.iterdir()) == []


def test_two_outputs_of_a_recipe_naming_one_file_are_an_error_before_any_work(work, capsys) -> None:
    base = (work / "r.toml").read_text()
    (work / "d.safetensors").write_bytes(b"old")
    os.link(work / "d.safetensors", work / "hard.safetensors")
    (work / "sym.safetensors").symlink_to(work / "d2.safetensors")
    for first, second in [("d.safetensors", "./d.safetensors"), ("d.safetensors", "sub/../d.safetensors"),
                          ("d2.safetensors", "sym.safetensors"), ("d.safetensors", "hard.safetensors"),
                          (str(work / "d.safetensors"), "d.safetensors")]:
        (work / "sub").mkdir(exist_ok=True)
        (work / "two.toml").write_text(base + f'[[outputs]]\npath = "{first}"\n[[outputs]]\npath = "{second}"\n')
        before = tree(work)
        for extra in ([], ["--dry-run"]):
            code, _, err = cli(capsys, "run", work / "two.toml", "--overwrite", "-q", *extra)
            assert_one_line_error(code, err, "outputs #1", "#2", "are the same file")
        assert tree(work) == before


def test_the_guard_protects_every_file_the_command_read(tmp_path: Path) -> None:
    """Library level: inside ``input_guard`` a file noted as read cannot be replaced, by any name."""
    f = tmp_path / "read.txt"
    f.write_text("input")
    (tmp_path / "alias.txt").symlink_to(f)
    with input_guard():
        note_input(f)
        for name in (f, tmp_path / "alias.txt", tmp_path / "." / "read.txt"):
            with pytest.raises(BlockmergeError, match="is an input file"):
                write_text(name, "x", overwrite=True)
    write_text(f, "free again", overwrite=True)  # outside the command, the file is the user's to replace
    assert f.read_text() == "free again"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1,
                    max_size=120).filter(lambda s: s not in (".", "..")),
       long=st.integers(0, 200))
def test_temp_names_fit_the_filesystem_and_identify_their_target(tmp_path_factory, name: str, long: int) -> None:
    folder = tmp_path_factory.getbasetemp()
    target = folder / (name + "x" * long)
    if len(os.fsencode(target.name)) > _name_max(folder):
        return
    tmp = _temp_name(target, time.time_ns())
    assert len(os.fsencode(tmp)) <= _name_max(folder)
    m = _TEMP.match(tmp)
    assert m and m["h"] == _name_hash(target.name) and int(m["pid"]) == os.getpid()
    assert tmp.startswith(".")  # hidden, beside the target


def test_a_failed_write_leaves_nothing_and_the_old_file_intact(tmp_path: Path) -> None:
    out = tmp_path / "o.bin"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_write(out, overwrite=True) as f:
        f.write(b"new partial data")
        raise RuntimeError("boom")
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["o.bin"]


def test_a_file_created_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    """The publish is link(2), which fails when the name exists: the other writer's file survives."""
    out = tmp_path / "new.bin"
    with pytest.raises(BlockmergeError, match="created by another process"), atomic_write(out) as f:
        f.write(b"mine")
        out.write_bytes(b"theirs")  # another program creates the output while we write
    assert out.read_bytes() == b"theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["new.bin"]


HOLD = textwrap.dedent("""
    import sys
    from blockmerge.io import atomic_write
    with atomic_write(sys.argv[1], overwrite=True) as f:
        f.write(b"first")
        print("writing", flush=True)
        sys.stdin.readline()
    print("done", flush=True)
""")


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_writers_of_one_file_do_not_both_succeed(tmp_path: Path, overwrite: bool) -> None:
    out = tmp_path / "race.bin"
    env = {**os.environ, "PYTHONPATH": SRC}
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=env)
    try:
        assert first.stdout.readline().strip() == "writing"
        with pytest.raises(BlockmergeError, match=f"process {first.pid} is writing this file right now"), \
                atomic_write(out, overwrite=overwrite) as f:
            f.write(b"second")
        assert not out.exists()
    finally:
        first.stdin.write("\n")
        first.stdin.close()
        first.wait(60)
    assert first.returncode == 0 and out.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["race.bin"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporary_files_are_removed_only_when_provably_dead(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC}
    live = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "held.bin")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert live.stdout.readline().strip() == "writing"
        dead = tmp_path / f".x.safetensors.{_name_hash('x.safetensors')}.{_dead_pid()}-0-1.blockmerge-partial"
        dead.write_bytes(b"left by a SIGKILL")
        reused = tmp_path / f".y.{_name_hash('y')}.{os.getppid()}-1-2.blockmerge-partial"  # live pid, other start
        reused.write_bytes(b"pid reused")
        foreign = tmp_path / ".z.partial"  # not ours
        foreign.write_bytes(b"someone else's")
        held = [p for p in tmp_path.iterdir() if p.name.startswith(".held.bin.")]
        assert len(held) == 1
        with pytest.warns(BlockmergeWarning, match="no longer runs"):
            write_text(tmp_path / "other.txt", "x")
        names = {p.name for p in tmp_path.iterdir()}
        assert dead.name not in names  # dead pid, lock free
        assert held[0].name in names  # its writer is alive and holds the lock
        assert foreign.name in names  # not blockmerge's name: never touched
        if Path(f"/proc/{os.getppid()}/stat").exists():
            assert reused.name not in names  # the pid lives, but as a process started at another time
    finally:
        live.stdin.write("\n")
        live.stdin.close()
        live.wait(60)
    assert (tmp_path / "held.bin").read_bytes() == b"first"


def test_recursive_cleanup_reports_what_it_removed(tmp_path: Path) -> None:
    sub = tmp_path / "images" / "v"
    sub.mkdir(parents=True)
    stale = sub / f".p0.png.{_name_hash('p0.png')}.{_dead_pid()}-0-5.blockmerge-partial"
    stale.write_bytes(b"x")
    with pytest.warns(BlockmergeWarning, match=str(stale)):
        assert remove_stale_partials(tmp_path, recursive=True) == [stale]


def _limit_file_size(n: int):
    def f() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
    return f


FULL_DISK = {
    # output format: (argv, file-size limit in bytes that the output exceeds, the output's name)
    "safetensors": (["merge", "{a}", "{b}", "-o", "OUT/o.safetensors", "--alpha", "0.5"], 200_000, "o.safetensors"),
    "ckpt": (["merge", "{a}", "{b}", "-o", "OUT/o.ckpt", "--alpha", "0.5"], 200_000, "o.ckpt"),
    "synthetic ckpt": (["synthetic", "OUT/s.ckpt"], 200_000, "s.ckpt"),
    "recipe output": (["run", "{recipe}", "-o", "OUT/r.safetensors"], 200_000, "r.safetensors"),
    "recipe TOML": (["import-mergeboard", "{board}", "-o", "OUT/r.toml"], 40, "r.toml"),
    "SVG heat map": (["compare", "{a}", "{b}", "--svg", "OUT/m.svg"], 400, "m.svg"),
    "PNG": (["generate", "-o", "OUT/gen", "--prompt", "a red circle", "--steps", "2", "--seed", "1"], 400,
            "gen/00000-1.png"),
}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(FULL_DISK))
def test_a_full_disk_fails_cleanly_for_every_output_format(work, fmt: str) -> None:
    argv, limit, name = FULL_DISK[fmt]
    out = work / "out"
    out.mkdir()
    before = tree(work)
    args = [str(x).replace("OUT", str(out)) for x in _argv(work, argv, "OUT")]
    env = {**os.environ, "PYTHONPATH": SRC, "BLOCKMERGE_CACHE": str(work.parent / f"cache-{fmt}"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, "-m", "blockmerge", *args, "-q"], capture_output=True, text=True, env=env,
                       preexec_fn=_limit_file_size(limit), timeout=600)
    assert_one_line_error(r.returncode, r.stderr, name, "disk full")
    assert tree(work) == before, "a partial file or folder was left"


def test_output_folders_are_checked_before_they_are_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for bad, must in [(tmp_path / "file", "exists and is not a folder"), (tmp_path / "file" / "sub", "not a folder"),
                      (tmp_path / ("d" * 300), "too long")]:
        with pytest.raises(BlockmergeError, match=must):
            check_output_dir(bad)
    new = tmp_path / "a" / "b"
    assert check_output_dir(new, make=False) == new and not (tmp_path / "a").exists()
    assert check_output_dir(new).is_dir()


def test_published_files_get_the_usual_permissions(tmp_path: Path) -> None:
    """The temporary file is created 0600; the published file has the mode a plain open() gives."""
    mask = os.umask(0)
    os.umask(mask)
    p = write_text(tmp_path / "perm.txt", "x")
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask


def test_check_output_path_without_inputs_accepts_a_new_name(tmp_path: Path) -> None:
    check_output_path(tmp_path / "new.safetensors", [tmp_path / "missing-input"], False)


def test_a_report_replaces_its_own_files_but_not_a_users(tmp_path: Path, capsys) -> None:
    from test_report import make_sweep

    sweep = make_sweep(tmp_path / "sw", "SD1", ["IN00", "M00"], prompts=1, seeds=[1])
    out = tmp_path / "rep"
    code, _, err = cli(capsys, "report", sweep.root, "-o", out)
    assert code == 0, err
    first = tree(out)
    code, _, err = cli(capsys, "report", sweep.root, "-o", out)  # a re-render replaces its own files
    assert code == 0, err
    assert tree(out).keys() == first.keys()
    for name in ("index.html", "results.csv", "report.css"):
        (out / name).write_text("the user's own file")
        before = tree(tmp_path)
        code, _, err = cli(capsys, "report", sweep.root, "-o", out)
        assert_one_line_error(code, err, name, "already exists (use --overwrite")
        assert tree(tmp_path) == before, "a report was half written"
        code, _, err = cli(capsys, "report", sweep.root, "-o", out, "--overwrite")
        assert code == 0 and (out / name).read_text() != "the user's own file"


def test_a_sweep_refuses_a_folder_holding_someone_elses_sweep_json_before_loading(tmp_path: Path, capsys) -> None:
    out = tmp_path / "s"
    out.mkdir()
    (out / "sweep.json").write_text('{"mine": true}')
    t0 = time.perf_counter()
    code, _, err = cli(capsys, "sweep", "tiny-a", "-o", out, "--prompt", "x", "--scale", "0.5", "--seeds", "1")
    assert_one_line_error(code, err, "sweep.json", "already exists")
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json"]
    assert time.perf_counter() - t0 < 2  # refused before the model was loaded
