"""Bad input: a one-line error naming the file or argument, exit code 2, no traceback, inputs
untouched, and no output or temporary file left behind."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from blockmerge.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def digest(paths):
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_failure(code, err, must_name, folder: Path, before_files: set[str]):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("blockmerge: error:"), err
    assert "Traceback" not in err
    assert must_name in lines[0], (must_name, err)
    assert {p.name for p in folder.iterdir()} == before_files, "an output or temp file was left behind"


@pytest.fixture
def work(tmp_path, tiny_sd1_paths):
    """A folder holding copies of two tiny SD1 models."""
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    a.write_bytes(tiny_sd1_paths[0].read_bytes())
    b.write_bytes(tiny_sd1_paths[1].read_bytes())
    return tmp_path, a, b


def check(work, capsys, extra_inputs, args, must_name):
    folder, a, b = work
    inputs = [a, b, *extra_inputs]
    before = digest(inputs)
    files = {p.name for p in folder.iterdir()}
    code, _out, err = run_cli(args, capsys)
    assert_clean_failure(code, err, must_name, folder, files)
    assert digest(inputs) == before


def test_missing_file(work, capsys):
    folder, a, _ = work
    check(work, capsys, [], ["merge", a, folder / "nope.safetensors", "-o", folder / "o.safetensors", "--alpha", "0.5"],
          "nope.safetensors: no such file")


def test_not_a_checkpoint(work, capsys):
    folder, a, _ = work
    txt = folder / "notes.safetensors"
    txt.write_text("hello, I am not a model\n" * 10)
    check(work, capsys, [txt], ["merge", a, txt, "-o", folder / "o.safetensors", "--alpha", "0.5"], "notes.safetensors")
    ck = folder / "notes.ckpt"
    ck.write_text("not a pickle either")
    check(work, capsys, [txt, ck], ["merge", a, ck, "-o", folder / "o.safetensors", "--alpha", "0.5"], "notes.ckpt")


def test_truncated_safetensors(work, capsys):
    folder, a, b = work
    t = folder / "trunc.safetensors"
    t.write_bytes(b.read_bytes()[:-1000])
    check(work, capsys, [t], ["merge", a, t, "-o", folder / "o.safetensors", "--alpha", "0.5"], "trunc.safetensors: truncated")


def test_corrupt_header(work, capsys):
    folder, a, b = work
    data = bytearray(b.read_bytes())
    data[8:40] = b"#" * 32
    c = folder / "corrupt.safetensors"
    c.write_bytes(bytes(data))
    check(work, capsys, [c], ["merge", a, c, "-o", folder / "o.safetensors", "--alpha", "0.5"], "corrupt.safetensors")


class _Evil:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(work, capsys):
    folder, a, _ = work
    marker = folder.parent / f"pwned-{os.getpid()}"
    evil = _Evil()
    evil.marker = str(marker)
    p = folder / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "x": evil}, p)
    check(work, capsys, [p], ["merge", p, a, "-o", folder / "o.safetensors", "--alpha", "0.5"], "evil.ckpt: refused")
    assert not marker.exists()


def test_unknown_architecture(work, capsys):
    folder, a, _ = work
    u = folder / "unknown.safetensors"
    save_file({"some.other.model.weight": torch.zeros(4)}, u)
    check(work, capsys, [u], ["merge", a, u, "-o", folder / "o.safetensors", "--alpha", "0.5"], "unknown.safetensors: unknown architecture")


def test_different_architectures(work, capsys, tiny_sdxl_paths):
    folder, a, _ = work
    x = folder / "xl.safetensors"
    x.write_bytes(tiny_sdxl_paths[0].read_bytes())
    check(work, capsys, [x], ["merge", a, x, "-o", folder / "o.safetensors", "--alpha", "0.5"], "xl.safetensors: is Stable Diffusion XL")


@pytest.mark.parametrize(
    "alpha,name",
    [("0.1,0.2,0.3", "--alpha: the list has 3 values"), ("nan", "--alpha"), ("inf", "--alpha"), ("half", "--alpha"),
     ("NO_SUCH_PRESET", "unknown preset 'NO_SUCH_PRESET'")],
)
def test_bad_weights(work, capsys, alpha, name):
    folder, a, b = work
    check(work, capsys, [], ["merge", a, b, "-o", folder / "o.safetensors", "--alpha", alpha], name)


def test_bad_base_alpha(work, capsys):
    folder, a, b = work
    check(work, capsys, [], ["merge", a, b, "-o", folder / "o.safetensors", "--alpha", "0.5", "--base-alpha", "nan"],
          "--base-alpha")


def test_output_is_an_input(work, capsys):
    folder, a, b = work
    check(work, capsys, [], ["merge", a, b, "-o", a, "--alpha", "0.5", "--overwrite"], "is an input file")
    check(work, capsys, [], ["merge", a, b, "-o", folder / "." / "b.safetensors", "--alpha", "0.5", "--overwrite"],
          "is an input file")


def test_existing_output_needs_overwrite(work, capsys):
    folder, a, b = work
    o = folder / "o.safetensors"
    o.write_bytes(b"keep me")
    check(work, capsys, [o], ["merge", a, b, "-o", o, "--alpha", "0.5"], "already exists (use --overwrite")
    assert o.read_bytes() == b"keep me"
    code, _, err = run_cli(["merge", a, b, "-o", o, "--alpha", "0.5", "--overwrite", "-q"], capsys)
    assert code == 0, err and o.stat().st_size > 1000


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_disk_full_during_write_leaves_nothing(work):
    """A file-size limit makes the write fail part way, as a full disk does (EFBIG / ENOSPC)."""
    folder, a, b = work
    assert a.stat().st_size > 400_000
    before = digest([a, b])
    files = {p.name for p in folder.iterdir()}
    env = {**os.environ, "PYTHONPATH": SRC, "BLOCKMERGE_CACHE": str(folder.parent / "hash-cache-df")}
    r = subprocess.run(
        [sys.executable, "-m", "blockmerge", "merge", str(a), str(b), "-o", str(folder / "o.safetensors"),
         "--alpha", "0.5", "-q"],
        capture_output=True, text=True, env=env, preexec_fn=_limit_file_size, timeout=300,
    )
    assert_clean_failure(r.returncode, r.stderr, "o.safetensors: disk full", folder, files)
    assert digest([a, b]) == before


def test_subprocess_error_has_no_traceback_but_debug_does(work):
    folder, a, _ = work
    env = {**os.environ, "PYTHONPATH": SRC}
    args = [sys.executable, "-m", "blockmerge", "merge", str(a), str(folder / "missing.ckpt"), "-o",
            str(folder / "o.safetensors"), "--alpha", "0.5"]
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "missing.ckpt: no such file" in r.stderr
    r = subprocess.run([args[0], "-m", "blockmerge", "--debug", *args[3:]], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_argparse_errors_are_one_line(capsys):
    assert main(["merge", "--alpha", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("blockmerge: error:") and "-o/--output" in err
