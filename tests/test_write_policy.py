"""The one write policy (``blockmerge.io.atomic``) and every command that writes through it.

Class 1 of issue 10 (data loss): no input of any kind is ever written over, an existing output only
with ``--overwrite``, two outputs naming one file are an error before any work, two writers of one
new file do not both succeed. Class 2 (debris): nothing partial after a failure, and temporary
files of dead processes are recognised and removed. Cases are generated: every writing command x
every way of naming an input, every output format x a full disk, hypothesis over file names.
"""

from __future__ import annotations

import contextlib
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
    (tmp_path / "r.mecha").write_text(  # sd-mecha's serialised form, naming the two checkpoints
        f'version 0.1.0\nmodel "{a}" model_config="sd1-ldm" merge_space="weight"\n'
        f'model "{b}" model_config="sd1-ldm" merge_space="weight"\ndict key=0.3\n'
        'literal &2 model_config="singleton-mecha" merge_space=null\nmerge "convert_singleton" &3\n'
        'merge "weighted_sum" &0 &1 &4\n', encoding="utf-8")
    # Inputs named as a folder writer names its outputs: a prompt file called results.csv (a sweep's
    # report writes one), an infotext called 00000-1.png (generate's first image of seed 1), and a
    # sweep image kept as index.html (the report's page).
    (tmp_path / "results.csv").write_text("a red circle\n", encoding="utf-8")
    (tmp_path / "00000-1.png").write_text("a red circle\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: 1, "
                                          "Size: 64x64\n", encoding="utf-8")
    _sweep_with_an_image_named(tmp_path / "sw", "index.html")
    return tmp_path


def _sweep_with_an_image_named(root: Path, name: str) -> None:
    from blockmerge.experiments.results import ImageRecord, SweepResult
    from test_report import make_sweep

    res = make_sweep(root, "SD1", ["IN00"], prompts=1, seeds=[1])
    first = res.images[0]
    (root / first.path).rename(root / name)
    res.images[0] = ImageRecord(first.variant, first.prompt, first.seed, name, None)
    res.save(overwrite=True)
    assert SweepResult.load(root).images[0].path == name


# Every command that writes a file, as (argv with OUT for the output, the files it reads, and for a
# command whose output is a folder the name it writes in it). A recipe importer's inputs include the
# checkpoints the recipe it writes names: the TOML must never replace them.
WRITERS = {
    "merge": (["merge", "{a}", "{b}", "-o", "OUT", "--alpha", "MINE", "--presets", "{presets}", "-q"],
              ["a.safetensors", "b.safetensors", "presets.tsv"], None),
    "merge-vae": (["merge", "{a}", "{b}", "-o", "OUT", "--alpha", "0.5", "--vae", "{b}", "-q"],
                  ["a.safetensors", "b.safetensors"], None),
    "merge-ckpt": (["merge", "{a}", "{b}", "-o", "OUT", "--alpha", "0.5", "--format", "ckpt", "-q"],
                   ["a.safetensors", "b.safetensors"], None),
    "run": (["run", "{recipe}", "-o", "OUT", "-q"], ["a.safetensors", "b.safetensors", "r.toml"], None),
    "import-mergeboard": (["import-mergeboard", "{board}", "--model", "A={a}", "--model", "B={b}", "-o", "OUT", "-q"],
                          ["board.txt", "a.safetensors", "b.safetensors"], None),
    "import-mecha": (["import-mecha", "{mecha}", "-o", "OUT", "-q"], ["r.mecha", "a.safetensors", "b.safetensors"],
                     None),
    "compare-svg": (["compare", "{a}", "{b}", "--svg", "OUT", "-q"], ["a.safetensors", "b.safetensors"], None),
    # Folder writers: OUT is the folder; the input lies in it under the name the command writes.
    "report": (["report", "{sweep}", "-o", "OUT"], ["sw/index.html"], "index.html"),
    "sweep": (["sweep", "tiny-a", "-o", "OUT", "--prompt-file", "{work}/results.csv", "--scale", "0.5", "--seeds",
               "1", "--blocks", "IN00", "--steps", "1", "-q"], ["results.csv"], "results.csv"),
    "generate": (["generate", "tiny-a", "-o", "OUT", "--infotext-file", "{work}/00000-1.png", "-q"],
                 ["00000-1.png"], "00000-1.png"),
}
FILE_WRITERS = sorted(w for w, (_, _, inside) in WRITERS.items() if inside is None)


def _argv(work: Path, argv: list[str], out: object) -> list[str]:
    subst = {"{a}": work / "a.safetensors", "{b}": work / "b.safetensors", "{presets}": work / "presets.tsv",
             "{recipe}": work / "r.toml", "{board}": work / "board.txt", "{mecha}": work / "r.mecha",
             "{sweep}": work / "sw"}
    out_argv = []
    for x in argv:
        x = str(out) if x == "OUT" else str(subst.get(x, x))
        out_argv.append(x.replace("{work}", str(work)).replace("A={a}", f"A={work / 'a.safetensors'}")
                        .replace("B={b}", f"B={work / 'b.safetensors'}"))
    return out_argv


def _spellings(work: Path, name: str) -> dict[str, Path]:
    """Ways of naming the input ``name`` as an output: itself, via ./ and .., a symlink, a hard link."""
    link, hard = work / "link.out", work / "hard.out"
    link.symlink_to(work / name)
    os.link(work / name, hard)
    sub = work / "sub"
    sub.mkdir(exist_ok=True)
    return {"same": work / name, "dot": work / "." / name, "dotdot": sub / ".." / name,
            "symlink": link, "hardlink": hard}


def _folder_spellings(work: Path, rel: str, inside: str) -> dict[str, Path]:
    """Output folders in which ``inside`` is the input ``rel``: its own folder (as is, via ./ and ..),
    a symbolic link to that folder, and another folder holding a hard link of the input."""
    folder = (work / rel).parent
    (folder / "sub").mkdir(exist_ok=True)
    (work / "linkdir").symlink_to(folder, target_is_directory=True)
    (work / "hl").mkdir()
    os.link(work / rel, work / "hl" / inside)
    return {"same": folder, "dot": folder / ".", "dotdot": folder / "sub" / "..", "symlink": work / "linkdir",
            "hardlink": work / "hl"}


@pytest.mark.parametrize("way", ["same", "dot", "dotdot", "symlink", "hardlink"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_no_command_writes_over_any_of_its_inputs_even_with_overwrite(work, capsys, monkeypatch, writer, way) -> None:
    import blockmerge.generation.loader as loader

    def no_loading(*a, **k):  # the check must come before the slow work
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(loader, "load_pipeline", no_loading)
    argv, reads, inside = WRITERS[writer]
    for name in reads:
        out = _spellings(work, name)[way] if inside is None else _folder_spellings(work, name, inside)[way]
        before = tree(work)
        code, _, err = cli(capsys, *_argv(work, argv, out), "--overwrite")
        assert_one_line_error(code, err, "is an input file", "even with --overwrite")
        assert tree(work) == before, f"{writer} wrote over {name} named {way}"
        for p in ("link.out", "hard.out", "linkdir", "hl/" + str(inside), "hl"):
            if os.path.lexists(work / p):
                (work / p).rmdir() if (work / p).is_dir() and not (work / p).is_symlink() else (work / p).unlink()


@pytest.mark.parametrize("importer", ["import-mergeboard", "import-mecha"])
def test_an_imported_recipe_is_never_saved_where_it_writes_its_merge(work, capsys, importer) -> None:
    """The recipe's own output path, existing or not, is no place for the recipe: running it would
    replace the recipe with the merge (and with --overwrite an old merge there would be lost now)."""
    argv = WRITERS[importer][0]
    extra = ["--model-output", str(work / "merged.safetensors")] if importer == "import-mecha" else []
    target = work / ("mix.ckpt" if importer == "import-mergeboard" else "merged.safetensors")
    for exists in (False, True):
        if exists:
            target.write_bytes(b"an earlier merge")
        before = tree(work)
        code, _, err = cli(capsys, *_argv(work, argv, target), *extra, "--overwrite")
        assert code == 2 and target.name in err and ("recipe itself writes" in err or "is an input file" in err), err
        assert tree(work) == before


@pytest.mark.parametrize("writer", FILE_WRITERS + ["synthetic"])
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
@pytest.mark.parametrize("writer", FILE_WRITERS + ["synthetic"])
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


# ---- folders a failed command made (class 2: debris) ------------------------------------------------

FOLDER_MAKERS = {
    "report": ["report", "{sweep}", "-o", "OUT"],
    "sweep": ["sweep", "tiny-a", "-o", "OUT", "--prompt", "a red circle", "--scale", "0.5", "--seeds", "1",
              "--blocks", "IN00", "--steps", "1", "-q"],
    "demo": ["demo", "-o", "OUT", "--quick", "-q"],
    "generate": ["generate", "tiny-a", "-o", "OUT", "--prompt", "a red circle", "--steps", "1", "--seed", "1", "-q"],
}


def _fail_writes(monkeypatch, how: str, under: Path) -> None:
    """Every write through the write policy into ``under`` fails: a full disk, or a SIGTERM arriving
    mid-write (other writes, such as the hash cache's, go on)."""
    import errno

    from blockmerge.errors import Interrupted
    from blockmerge.io import atomic

    def failing(name: str):
        real = getattr(atomic._TrackedFile, name)

        def write(self, *args):  # write(data), and pwrite(data, offset): tensors go in by position
            if not os.readlink(f"/proc/self/fd/{self._f.fileno()}").startswith(str(under)):
                return real(self, *args)
            if how == "disk full":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise Interrupted(signal.SIGTERM)

        monkeypatch.setattr(atomic._TrackedFile, name, write)

    failing("write")
    failing("pwrite")


@pytest.mark.parametrize("how", ["disk full", "SIGTERM"])
@pytest.mark.parametrize("command", sorted(FOLDER_MAKERS))
def test_a_failed_command_leaves_no_folder_it_made(work, capsys, monkeypatch, command, how) -> None:
    """``report -o rep`` failing on a full disk used to leave ``rep/`` and ``rep/heatmaps/``: every
    folder a command made and left empty goes when it fails, however deep the new path was."""
    out = work / "new" / "deeper" / "out"
    before = tree(work)
    _fail_writes(monkeypatch, how, work / "new")
    code, _, err = cli(capsys, *_argv(work, FOLDER_MAKERS[command], out))
    if how == "disk full":
        assert_one_line_error(code, err, "disk full")
    else:
        assert code == 128 + signal.SIGTERM and "interrupted by SIGTERM" in err, err
    assert not (work / "new").exists(), sorted(str(p) for p in (work / "new").rglob("*"))
    assert tree(work) == before


def test_the_folder_guard_removes_only_the_empty_folders_it_made_and_only_on_failure(tmp_path: Path) -> None:
    from blockmerge.io import made_folders_guard

    (tmp_path / "old").mkdir()
    with pytest.raises(RuntimeError), made_folders_guard():
        check_output_dir(tmp_path / "old" / "a" / "b")
        check_output_dir(tmp_path / "old" / "kept")
        (tmp_path / "old" / "kept" / "image.png").write_bytes(b"finished work")
        check_output_dir(tmp_path / "c")
        raise RuntimeError("fails")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == \
        ["old", "old/kept", "old/kept/image.png"]  # old existed before; kept holds a finished file
    with made_folders_guard():
        with contextlib.suppress(RuntimeError), made_folders_guard():  # nested: the outermost decides
            check_output_dir(tmp_path / "d" / "e")
            raise RuntimeError("an inner step fails, the caller goes on")
        check_output_dir(tmp_path / "f")
    assert (tmp_path / "d" / "e").is_dir() and (tmp_path / "f").is_dir()  # success keeps everything


def test_a_report_writes_only_where_the_sweep_folder_check_looks(tmp_path: Path, capsys) -> None:
    """``check_sweep_folder`` guards the report's files before a sweep starts; a report file added
    under a new name would slip past it, so the report's output is pinned to that list here."""
    from blockmerge.experiments.outputs import FIXED_FILES, SUBFOLDERS
    from test_report import make_sweep

    sweep = make_sweep(tmp_path / "sw", "SD1", ["IN00", "M00"], prompts=1, seeds=[1])
    out = tmp_path / "rep"
    for extra in ([], ["--overwrite"]):
        code, _, err = cli(capsys, "report", sweep.root, "-o", out, *extra)
        assert code == 0, err
    top = {p.name for p in out.iterdir()}
    assert top - set(SUBFOLDERS) <= set(FIXED_FILES), top - set(SUBFOLDERS) - set(FIXED_FILES)
    assert {p.name for p in out.iterdir() if p.is_dir()} <= set(SUBFOLDERS)
