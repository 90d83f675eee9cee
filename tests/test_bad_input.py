"""Bad input: a one-line error naming the file or argument, exit code 2, no traceback, inputs
untouched, and no output or temporary file left behind."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from blockmerge.cli import main
from blockmerge.errors import CheckpointError

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
    assert code == 0, err
    assert o.stat().st_size > 1000 and o.read_bytes() != b"keep me"


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---- generated cases, one class each (issue 10, class 3) ------------------------------------------

WRONG_KINDS = {
    "empty": (b"", "an empty file"),
    "text": (b"model weights, honest\n" * 20, "a text file"),
    "html": (b"<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>\n", "an HTML/XML page"),
    "git-lfs": (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 2132625894\n",
                "a Git LFS pointer"),
    "gzip": (b"\x1f\x8b\x08\x00" + bytes(60), "a gzip archive"),
    "png": (b"\x89PNG\r\n\x1a\n" + bytes(60), "a PNG image"),
    "gguf": (b"GGUF\x03\x00\x00\x00" + bytes(60), "a GGUF file"),
    "random": (bytes((i * 37 + 11) % 256 for i in range(4096)), "not a"),
}


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt", ".pt", ".pth", ".bin"])
@pytest.mark.parametrize("kind", sorted(WRONG_KINDS))
@pytest.mark.parametrize("command", ["merge", "info", "blocks", "compare"])
def test_a_file_of_the_wrong_kind_is_called_what_it_is(work, capsys, kind, suffix, command):
    folder, a, _ = work
    data, says = WRONG_KINDS[kind]
    bad = folder / f"model{suffix}"
    bad.write_bytes(data)
    argv = {"merge": ["merge", a, bad, "-o", folder / "o.safetensors", "--alpha", "0.5"],
            "info": ["info", bad, "--no-hash"], "blocks": ["blocks", bad], "compare": ["compare", a, bad, "-q"]}
    check(work, capsys, [bad], argv[command], f"model{suffix}")
    code, _, err = run_cli(argv[command], capsys)  # once more, to read what the message says
    assert code == 2 and says in err, err
    assert "unsafe" not in err and "refused" not in err  # never "an unsafe pickle" for what is not one


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".model"])
def test_a_safetensors_file_under_another_name_is_read_as_safetensors(work, capsys, suffix):
    folder, a, b = work
    renamed = folder / f"really-safetensors{suffix}"
    renamed.write_bytes(b.read_bytes())
    o1, o2 = folder / "o1.safetensors", folder / "o2.safetensors"
    assert run_cli(["merge", a, b, "-o", o1, "--alpha", "0.5", "-q"], capsys)[0] == 0
    assert run_cli(["merge", a, renamed, "-o", o2, "--alpha", "0.5", "-q"], capsys)[0] == 0
    from safetensors.torch import load_file

    x, y = load_file(o1), load_file(o2)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    code, out, _ = run_cli(["info", renamed, "--no-hash"], capsys)
    assert code == 0 and "format:       safetensors" in out


def test_a_pickle_named_safetensors_is_read_as_a_pickle(work, capsys, tiny_sd1_ckpt_path):
    folder, a, _ = work
    misnamed = folder / "pickled.safetensors"
    misnamed.write_bytes(tiny_sd1_ckpt_path.read_bytes())
    code, out, err = run_cli(["info", misnamed, "--no-hash"], capsys)
    assert code == 0 and "format:       pickle" in out, err


def _special(folder: Path, kind: str) -> Path:
    if kind == "fifo":
        p = folder / "special.fifo"
        os.mkfifo(p)
        return p
    if kind == "device":
        return Path("/dev/zero")
    if kind == "folder":
        p = folder / "a-folder"
        p.mkdir()
        return p
    p = folder / "dangling.safetensors"
    p.symlink_to(folder / "gone")
    return p


# Every option that reads a file, with X for the file.
FILE_OPTIONS = {
    "merge MODEL": ["merge", "{a}", "X", "-o", "{o}", "--alpha", "0.5"],
    "merge --vae": ["merge", "{a}", "{b}", "-o", "{o}", "--alpha", "0.5", "--vae", "X"],
    "merge --presets": ["merge", "{a}", "{b}", "-o", "{o}", "--alpha", "0.5", "--presets", "X"],
    "presets --presets": ["presets", "--presets", "X"],
    "info": ["info", "X"],
    "blocks": ["blocks", "X"],
    "hash": ["hash", "X"],
    "compare --base": ["compare", "{a}", "{b}", "--base", "X"],
    "run RECIPE": ["run", "X"],
    "import-mergeboard TEXT": ["import-mergeboard", "X"],
    "generate MODEL": ["generate", "X", "-o", "{g}", "--prompt", "p"],
    "generate --infotext-file": ["generate", "-o", "{g}", "--infotext-file", "X"],
    "generate --from-png": ["generate", "-o", "{g}", "--from-png", "X"],
    "sweep MODEL": ["sweep", "X", "-o", "{g}", "--prompt", "p", "--scale", "0.5"],
    "sweep --prompt-file": ["sweep", "tiny-a", "-o", "{g}", "--prompt-file", "X", "--scale", "0.5"],
    "sweep --donor": ["sweep", "tiny-a", "-o", "{g}", "--prompt", "p", "--swap", "--donor", "X"],
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "dangling"])
@pytest.mark.parametrize("option", sorted(FILE_OPTIONS))
def test_non_regular_inputs_are_refused_without_hanging(work, capsys, option, kind):
    folder, a, b = work
    x = _special(folder, kind)
    subst = {"{a}": str(a), "{b}": str(b), "{o}": str(folder / "o.safetensors"), "{g}": str(folder / "gen"),
             "X": str(x)}
    argv = [subst.get(t, t) for t in FILE_OPTIONS[option]]
    files = {p.name for p in folder.iterdir()}
    code, _, err = run_cli(argv, capsys)
    assert_clean_failure(code, err, x.name, folder, files)
    what = {"fifo": "FIFO", "device": "character device", "folder": "folder", "dangling": "no such file"}[kind]
    assert what in err or (kind == "folder" and "sweep description" in err), err


BAD_RECORDS = {
    "not JSON": "{not json",
    "a list": "[1, 2]",
    "method a number": json.dumps({"method": 5}),
    "alpha text": json.dumps({"method": "weighted_sum", "alpha": "GRAD_V"}),
    "alpha values text": json.dumps({"alpha": {"IN00": "half"}}),
    "inputs not a list": json.dumps({"inputs": "A"}),
    "input without role": json.dumps({"inputs": [{"name": "a", "sha256": "0" * 64, "legacy_hash": "0" * 8}]}),
    "recipe a table": json.dumps({"recipe": {"steps": []}}),
}


@pytest.mark.parametrize("how", sorted(BAD_RECORDS))
@pytest.mark.parametrize("command", [["info", "--no-hash"], ["info", "--json", "--no-hash"], ["info", "--recipe"]])
def test_a_merge_record_of_the_wrong_shape_is_a_clean_error(work, capsys, how, command):
    from safetensors.torch import load_file

    folder, a, _ = work
    rec = folder / "record.safetensors"
    save_file(load_file(a), rec, metadata={"blockmerge": BAD_RECORDS[how]})
    check(work, capsys, [rec], [*command, rec], "record.safetensors: its blockmerge merge record")


CORRUPT_CACHES = {
    "not JSON": b"{{{",
    "binary": bytes(range(256)),
    "a list": b"[1, 2, 3]",
    "entry a string": None,
    "entry with a text size": None,
    "hash of the wrong length": None,
    "deep": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("how", sorted(CORRUPT_CACHES))
def test_a_corrupt_hash_cache_is_ignored_and_rebuilt(work, capsys, monkeypatch, how):
    folder, a, _ = work
    cache_dir = folder / "cache"
    cache_dir.mkdir()
    monkeypatch.setenv("BLOCKMERGE_CACHE", str(cache_dir))
    key = str(a.resolve())
    st = a.stat()
    data = CORRUPT_CACHES[how]
    if data is None:
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": "f" * 64, "legacy": "f" * 8}
        if how == "entry a string":
            entry = "sha"
        elif how == "entry with a text size":
            entry["size"] = str(st.st_size)
        else:
            entry["sha256"] = "f" * 63
        data = json.dumps({key: entry}).encode()
    (cache_dir / "hashes.json").write_bytes(data)
    code, out, err = run_cli(["hash", a], capsys)
    true_sha = hashlib.sha256(a.read_bytes()).hexdigest()
    assert code == 0 and true_sha in out, err
    rebuilt = json.loads((cache_dir / "hashes.json").read_text())
    assert rebuilt[key]["sha256"] == true_sha  # rebuilt, with the right value


BAD_ARGS = [
    (["merge", "{a}", "{b}", "-o", "{o}", "--alpha", "0.5", "--threads", "0"], "--threads"),
    (["merge", "{a}", "{b}", "-o", "{o}", "--alpha", "0.5", "--threads", "-2"], "--threads"),
    (["merge", "{a}", "{b}", "-o", "{o}", "--alpha", "0.5", "--threads", "many"], "--threads"),
    (["merge", "{a}", "{b}", "-o", "", "--alpha", "0.5"], "-o/--output"),
    (["merge", "{a}", "{b}", "-o", "{folder}/", "--alpha", "0.5"], "-o/--output"),
    (["run", "{a}", "--threads", "0"], "--threads"),
    (["compare", "{a}", "{b}", "--top", "-1"], "--top"),
    (["compare", "{a}", "{b}", "--svg", ""], "--svg"),
    (["generate", "-o", "{g}", "--device", "quantum"], "--device"),
    (["generate", "-o", "{g}", "--device", "cuda:99"], "--device"),
    (["generate", "-o", "{g}", "--device", "meta"], "--device"),
    (["generate", "-o", "{g}", "--width", "100"], "--width"),
    (["generate", "-o", "{g}", "--width", "0"], "--width"),
    (["generate", "-o", "{g}", "--height", "999999992"], "--height"),
    (["generate", "-o", "{g}", "--steps", "0"], "--steps"),
    (["generate", "-o", "{g}", "--steps", "10000000"], "--steps"),
    (["generate", "-o", "{g}", "--batch-size", "0"], "--batch-size"),
    (["generate", "-o", "{g}", "--cfg-scale", "nan"], "--cfg-scale"),
    (["generate", "-o", "{g}", "--clip-skip", "0"], "--clip-skip"),
    (["sweep", "tiny-a", "-o", "{g}", "--prompt", "p", "--scale", "0.5", "--threads", "0"], "--threads"),
    (["sweep", "tiny-a", "-o", "{g}", "--prompt", "p", "--scale", "0.5", "--device", "cuda:7"], "--device"),
    (["sweep", "tiny-a", "-o", "{g}", "--prompt", "p", "--scale", "inf"], "--scale"),
    (["sweep", "tiny-a", "-o", "{g}", "--prompt", "p", "--scale", "0.5", "--width", "13"], "--width"),
    (["demo", "-o", "{g}", "--threads", "-1"], "--threads"),
    ([], "no command"),
    (["frobnicate"], "frobnicate"),
]


@pytest.mark.parametrize("argv,name", BAD_ARGS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_ARGS])
def test_bad_arguments_are_one_line_errors_naming_the_argument(work, capsys, argv, name):
    folder, a, b = work
    subst = {"{a}": str(a), "{b}": str(b), "{o}": str(folder / "o.safetensors"), "{g}": str(folder / "gen"),
             "{folder}": str(folder)}
    args = [t.replace("{folder}", str(folder)) if "{folder}" in t else subst.get(t, t) for t in argv]
    check(work, capsys, [], args, name)


@pytest.mark.parametrize("name", ["new\nline.safetensors", "esc\x1b[31mred.safetensors", "cr\rreturn.safetensors",
                                  os.fsdecode(b"bad-\xff\xfe-utf8.safetensors")])
def test_hostile_file_names_still_give_one_line(work, capsys, name):
    folder, a, _ = work
    p = folder / name
    p.write_bytes(b"not a model")
    code, _, err = run_cli(["info", p], capsys)
    assert code == 2 and err.count("\n") == 1 and "\x1b" not in err and "\r" not in err, repr(err)
    code, _, err = run_cli(["merge", a, folder / name.replace("safetensors", "missing"), "-o",
                            folder / "o.safetensors", "--alpha", "0.5"], capsys)
    assert code == 2 and err.count("\n") == 1 and "\x1b" not in err, repr(err)


def test_terminal_escapes_in_a_models_metadata_are_not_printed_raw(work, capsys):
    from safetensors.torch import load_file

    folder, a, _ = work
    m = folder / "ansi.safetensors"
    save_file(load_file(a), m, metadata={"note": "\x1b]0;pwned\x07\x1b[2Jcleared"})
    code, out, _ = run_cli(["info", m, "--no-hash"], capsys)
    assert code == 0 and "\x1b" not in out and "\\x1b]0;pwned" in out


def test_a_tensor_larger_than_the_memory_is_refused_before_allocating(tmp_path):
    """A sparse file can claim any size; the reader checks the memory before the buffer exists (with
    Linux's overcommit the allocation would succeed and the kernel kill the process later)."""
    from blockmerge.io import open_checkpoint
    from blockmerge.io.safetensors_io import _available_memory

    avail = _available_memory()
    if avail is None:
        pytest.skip("no /proc/meminfo here")
    n = (avail * 2 // 8 + 1) * 8
    header = json.dumps({"big": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    header += b" " * (-len(header) % 8)
    p = tmp_path / "sparse.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + n)
    with open_checkpoint(p) as r, pytest.raises(CheckpointError, match=r"tensor 'big' needs .* GiB of memory"):
        r.get("big")


# ---- tensors a pickle can hold and blockmerge cannot merge or write ---------------------------------

def _torch_dtypes_outside_safetensors() -> list[torch.dtype]:
    """Every dtype of this torch that a checkpoint can store and blockmerge does not read (complex,
    unsigned 16-64 bit, quantized, the float8 variants safetensors lacks): generated, so a dtype a
    new torch adds is tested too."""
    import io

    from blockmerge.io.safetensors_io import DTYPE_NAMES

    out = []
    for d in sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)} - set(DTYPE_NAMES), key=str):
        try:
            t = _tensor_of(d)
            buf = io.BytesIO()
            torch.save({"x": t}, buf)
            buf.seek(0)
            torch.load(buf, weights_only=True)
        except Exception:  # noqa: BLE001 - not constructible or not storable here: nothing to test
            continue
        out.append(d)
    return out


def _tensor_of(dtype: torch.dtype, shape=(4, 4)) -> torch.Tensor:
    if dtype.is_complex:
        return torch.zeros(shape, dtype=dtype)
    if str(dtype).startswith("torch.q"):
        return torch.quantize_per_tensor(torch.zeros(shape), 0.1, 0, dtype)
    return torch.zeros(shape).to(dtype)


UNSUPPORTED_DTYPES = _torch_dtypes_outside_safetensors()
LAYOUTS = {"sparse_coo": lambda t: t.to_sparse(), "sparse_csr": lambda t: t.to_sparse_csr(),
           "sparse_csc": lambda t: t.to_sparse_csc(), "sparse_bsr": lambda t: t.to_sparse_bsr((1, 1))}
READERS = {
    "merge": lambda f, a, o: ["merge", a, f, "-o", o / "o.safetensors", "--alpha", "0.5"],
    "merge-first": lambda f, a, o: ["merge", f, a, "-o", o / "o.ckpt", "--alpha", "0.5"],
    "info": lambda f, a, o: ["info", f, "--no-hash"],
    "blocks": lambda f, a, o: ["blocks", f],
    "compare": lambda f, a, o: ["compare", a, f, "-q"],
    "generate": lambda f, a, o: ["generate", f, "-o", o / "gen", "--prompt", "x", "--steps", "1"],
}
KEY = "model.diffusion_model.input_blocks.0.0.weight"


def _ckpt_with(folder: Path, source: Path, key: str, tensor_of) -> Path:
    from safetensors.torch import load_file

    sd = load_file(source)
    sd[key] = tensor_of(sd[key])
    p = folder / "odd.ckpt"
    torch.save({"state_dict": sd}, p)
    return p


def test_the_generated_dtypes_include_the_ones_the_audit_found() -> None:
    names = {str(d) for d in UNSUPPORTED_DTYPES}
    assert {"torch.complex64", "torch.uint16", "torch.qint8"} <= names, names


@pytest.mark.parametrize("command", sorted(READERS))
@pytest.mark.parametrize("dtype", UNSUPPORTED_DTYPES, ids=str)
def test_an_unsupported_dtype_in_a_pickle_is_named_by_every_command(work, capsys, command, dtype):
    """Was: merge -> "internal error: KeyError: torch.complex64"; info -> exit 0 listing complex64."""
    folder, a, _ = work
    odd = _ckpt_with(folder, a, KEY, lambda t: _tensor_of(dtype, tuple(t.shape)))
    name = str(dtype).removeprefix("torch.")
    check(work, capsys, [odd], READERS[command](odd, a, folder), f"odd.ckpt: tensor {KEY!r} has unsupported dtype {name}")


@pytest.mark.parametrize("command", sorted(READERS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_sparse_tensor_in_a_pickle_is_refused_naming_its_key(work, capsys, command, layout):
    """Was: "internal error: RuntimeError: reshape is not implemented for sparse tensors"."""
    folder, a, _ = work
    odd = _ckpt_with(folder, a, KEY, lambda t: LAYOUTS[layout](t.float().reshape(t.shape[0], -1)))
    check(work, capsys, [odd], READERS[command](odd, a, folder), f"odd.ckpt: tensor {KEY!r} has layout {layout}")


PLAIN_PICKLES = {**{f"protocol {n}": ({"a": 1}, n) for n in (2, 3, 4, 5)}, "a list": ([1.0, 2.0], 5)}


@pytest.mark.parametrize("how", sorted(PLAIN_PICKLES))
def test_a_plain_pickle_is_called_a_pickle_that_is_not_a_checkpoint(work, capsys, how):
    folder, a, _ = work
    p = folder / "plain.ckpt"
    obj, protocol = PLAIN_PICKLES[how]
    p.write_bytes(pickle.dumps(obj, protocol=protocol))
    for argv in (["info", p, "--no-hash"], ["merge", a, p, "-o", folder / "o.safetensors", "--alpha", "0.5"]):
        check(work, capsys, [p], argv, "plain.ckpt: not a checkpoint: it is a Python pickle")
        code, _, err = run_cli(argv, capsys)
        assert "not a PyTorch checkpoint" in err and "damaged" not in err, err


@pytest.mark.parametrize("protocol", [4, 5])
def test_a_legacy_checkpoint_in_a_newer_pickle_protocol_says_so(work, capsys, protocol):
    folder, a, _ = work
    from safetensors.torch import load_file

    p = folder / "legacy.ckpt"
    torch.save({"state_dict": load_file(a)}, p, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    check(work, capsys, [p], ["info", p, "--no-hash"], f"legacy.ckpt: a PyTorch legacy checkpoint saved with pickle "
                                                        f"protocol {protocol}")


def test_a_legacy_checkpoint_in_protocol_2_still_reads(work, capsys):
    folder, a, _ = work
    from safetensors.torch import load_file

    p = folder / "legacy2.ckpt"
    torch.save({"state_dict": load_file(a)}, p, _use_new_zipfile_serialization=False)
    code, out, err = run_cli(["info", p, "--no-hash"], capsys)
    assert code == 0 and "pickle" in out, err


BAD_RECORDS_DEEP = {**BAD_RECORDS, "nested past the recursion limit": "[" * 100_000 + "]" * 100_000}


@pytest.mark.parametrize("how", sorted(BAD_RECORDS_DEEP))
@pytest.mark.parametrize("role", ["A", "B", "recipe input", "compare"])
def test_a_garbled_merge_record_does_not_block_using_the_weights(work, capsys, how, role):
    """Was: "error: file: its blockmerge merge record ... is not valid JSON" - naming no file, and
    refusing a valid checkpoint over metadata a merge does not need. Now: a warning naming the file,
    and the weights merged as a model's, exactly as the same file without the record."""
    from safetensors.torch import load_file

    folder, a, b = work
    rec = folder / "record.safetensors"
    save_file(load_file(a), rec, metadata={"blockmerge": BAD_RECORDS_DEEP[how],
                                           "sd_merge_recipe": BAD_RECORDS_DEEP[how]})
    clean = folder / "clean.safetensors"
    save_file(load_file(a), clean)
    outs = []
    for src in (rec, clean):
        out = folder / f"o-{src.stem}.safetensors"
        if role == "compare":
            argv = ["compare", src, b, "-q", "--json"]
        elif role == "recipe input":
            r = folder / f"r-{src.stem}.toml"
            r.write_text(f'version = 1\n[inputs.A]\npath = "{src.name}"\n[inputs.B]\npath = "b.safetensors"\n'
                         f'[[steps]]\nmodels = ["A", "B"]\nalpha = 0.3\n[[outputs]]\npath = "{out.name}"\n')
            argv = ["run", r, "-q"]
        else:
            pair = [src, b] if role == "A" else [b, src]
            argv = ["merge", *pair, "-o", out, "--alpha", "0.3", "-q"]
        code, stdout, err = run_cli(argv, capsys)
        assert code == 0, err
        if src == rec:
            warn = [ln for ln in err.splitlines() if "merge record" in ln]
            assert len(warn) == 1 and str(rec) in warn[0] and warn[0].startswith("blockmerge: warning:"), err
        else:
            assert "merge record" not in err
        outs.append(json.loads(stdout) if role == "compare" else load_file(out))
    if role == "compare":
        assert {**outs[0], "a": None} == {**outs[1], "a": None}  # the same numbers; only A's name differs
    else:
        assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    code, _, err = run_cli(["info", rec, "--no-hash"], capsys)  # info still reports the record
    assert code == 2 and "record.safetensors: its blockmerge merge record" in err, err


BAD_EMBEDDED_RECIPES = {
    "not TOML": "version = 1\n[[steps]\nmodels = [",
    "a TOML value error": 'version = = 1',
    "no steps": "version = 1\n[inputs.A]\npath = \"a.safetensors\"\n",
    "unknown method": 'version = 1\n[inputs.A]\npath = "a"\n[inputs.B]\npath = "b"\n[[steps]]\nmethod = "nope"\n'
                      'models = ["A", "B"]\n',
    "a cycle": 'version = 1\n[inputs.A]\npath = "a"\n[[steps]]\nname = "x"\nmodels = ["y", "A"]\n[[steps]]\n'
               'name = "y"\nmodels = ["x", "A"]\n',
    "escape codes": 'version = 1\n\x1b[2J[inputs.A]\n',
}


@pytest.mark.parametrize("how", sorted(BAD_EMBEDDED_RECIPES))
def test_info_recipe_refuses_an_embedded_recipe_that_would_not_run(work, capsys, how):
    """Was: the text printed with exit code 0, as if it could be rerun."""
    from safetensors.torch import load_file

    folder, a, _ = work
    rec = folder / "embedded.safetensors"
    save_file(load_file(a), rec, metadata={"blockmerge": json.dumps({"recipe": BAD_EMBEDDED_RECIPES[how]})})
    check(work, capsys, [rec], ["info", "--recipe", rec], "embedded.safetensors: its embedded recipe")
    code, out, _ = run_cli(["info", "--recipe", rec], capsys)
    assert out == ""  # nothing of it printed
