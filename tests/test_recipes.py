"""Recipes on tiny checkpoints with real SD1 / SDXL layouts: a chain streamed in one pass equals the
same merges done step by step through files, a rerun of the embedded recipe is byte-identical,
Merge Board text imports and runs, and every kind of bad recipe fails before any output exists."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from blockmerge.cli import main
from blockmerge.errors import BlockmergeError
from blockmerge.io import SafetensorsReader, sha256_file
from blockmerge.merge import merge
from blockmerge.recipes import (
    RecipeError,
    embedded_recipe,
    load_recipe,
    mergeboard_to_toml,
    parse_mergeboard,
    parse_recipe,
    run_recipe,
)


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKMERGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def sd1(tiny_sd1_paths, tmp_path: Path) -> tuple[Path, Path, Path]:
    """The three tiny SD1 files linked into this test's folder, so recipes can use relative paths."""
    out = []
    for name, p in zip("abc", tiny_sd1_paths, strict=True):
        q = tmp_path / f"{name}.safetensors"
        q.symlink_to(p)
        out.append(q)
    return out[0], out[1], out[2]


CHAIN = """
version = 1

[inputs]
A = "a.safetensors"
B = {{ path = "b.safetensors" }}
C = "c.safetensors"

[[steps]]
name = "ab"
models = ["A", "B"]
alpha = "GRAD_V"
base_alpha = 0.3

[[steps]]
name = "plus"
method = "add_difference"
models = ["ab", "A", "C"]
alpha = 0.5

[[steps]]
name = "mix"
models = ["plus", "ab"]
alpha = "IN04-IN08=0.7,OUT=0.25"

[[outputs]]
path = "{out}"
dtype = "{dtype}"
"""


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text, encoding="utf-8")
    return p


def test_chain_equals_step_by_step_merges(sd1, tmp_path: Path) -> None:
    a, b, c = sd1
    recipe = write(tmp_path, "r.toml", CHAIN.format(out="chain.safetensors", dtype="fp32"))
    [res] = run_recipe(recipe)
    assert res.output == tmp_path / "chain.safetensors" and res.step == "mix" and res.architecture == "SD1"
    # The same three merges, one file each (fp32 files, so nothing is lost between the steps).
    s1, s2, s3 = (tmp_path / f"s{i}.safetensors" for i in (1, 2, 3))
    merge([a, b], s1, alpha="GRAD_V", base_alpha=0.3, dtype="fp32")
    merge([s1, a, c], s2, method="add_difference", alpha=0.5, dtype="fp32")
    merge([s2, s1], s3, alpha="IN04-IN08=0.7,OUT=0.25", dtype="fp32")
    got, want = load_file(res.output), load_file(s3)
    assert got.keys() == want.keys() and len(got) > 900
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k
    # ...and it is a real change: IN05 took 0.7 of ab (not 0 of it as in IN00).
    k_in5 = "model.diffusion_model.input_blocks.5.0.in_layers.2.weight"
    assert not torch.equal(got[k_in5], load_file(s2)[k_in5])


def test_chain_keeps_float32_between_steps(sd1, tmp_path: Path) -> None:
    """fp16 output of the chain == the fp32 step-by-step result rounded once (not three times)."""
    recipe = write(tmp_path, "r.toml", CHAIN.format(out="chain16.safetensors", dtype="fp16"))
    run_recipe(recipe)
    a, b, c = sd1
    s1, s2, s3 = (tmp_path / f"t{i}.safetensors" for i in (1, 2, 3))
    merge([a, b], s1, alpha="GRAD_V", base_alpha=0.3, dtype="fp32")
    merge([s1, a, c], s2, method="add_difference", alpha=0.5, dtype="fp32")
    merge([s2, s1], s3, alpha="IN04-IN08=0.7,OUT=0.25", dtype="fp32")
    got, want = load_file(tmp_path / "chain16.safetensors"), load_file(s3)
    for k, v in want.items():
        assert torch.equal(got[k], v.to(torch.float16) if v.is_floating_point() else v), k


def test_each_file_and_shared_step_read_once_per_key(sd1, tmp_path: Path, monkeypatch) -> None:
    """A and ab are each used twice; per key every input tensor is still read exactly once."""
    reads: dict[tuple[str, str, int], int] = {}
    original_get = SafetensorsReader.get
    original_range = SafetensorsReader.read_range

    def counting_get(self, key):
        reads[(self.path.name, key, 0)] = reads.get((self.path.name, key, 0), 0) + 1
        return original_get(self, key)

    def counting_range(self, key, lo, hi, out):
        reads[(self.path.name, key, lo)] = reads.get((self.path.name, key, lo), 0) + 1
        return original_range(self, key, lo, hi, out)

    monkeypatch.setattr(SafetensorsReader, "get", counting_get)
    monkeypatch.setattr(SafetensorsReader, "read_range", counting_range)
    recipe = write(tmp_path, "r.toml", CHAIN.format(out="o.safetensors", dtype="fp16"))
    run_recipe(recipe, threads=2)
    key = "model.diffusion_model.input_blocks.5.0.in_layers.2.weight"  # IN05: every step computes
    assert reads[("a.safetensors", key, 0)] == 1
    assert reads[("b.safetensors", key, 0)] == 1
    assert reads[("c.safetensors", key, 0)] == 1
    # position_ids are read once more by the broken-position_ids check, nothing else twice
    assert all(n == 1 for (f, k, _), n in reads.items() if not k.endswith("position_ids")), reads


def test_rerun_of_embedded_recipe_is_byte_identical(sd1, tmp_path: Path, capsys) -> None:
    recipe = write(tmp_path, "r.toml", CHAIN.format(out="first.safetensors", dtype="fp16"))
    assert main(["run", str(recipe), "-q"]) == 0
    first = tmp_path / "first.safetensors"
    assert main(["info", "--recipe", str(first)]) == 0
    text = capsys.readouterr().out
    spec = tomllib.loads(text)
    assert spec["inputs"]["A"]["sha256"] == sha256_file(sd1[0])
    assert [s["name"] for s in spec["steps"]] == ["ab", "plus", "mix"]
    assert spec["steps"][0]["alpha"][:3] == [0.3, 1.0, pytest.approx(11 / 12)]  # BASE, IN00, IN01 of GRAD_V
    assert "path" not in spec["outputs"][0]
    again = write(tmp_path, "again.toml", text)
    assert main(["run", str(again), "-o", str(tmp_path / "second.safetensors"), "-q"]) == 0
    assert first.read_bytes() == (tmp_path / "second.safetensors").read_bytes()
    # the blockmerge record says what it is; A1111's record names the last step's file inputs
    meta = safe_open(first, "pt").metadata()
    rec = json.loads(meta["blockmerge"])
    assert rec["method"] == "weighted_sum" and rec["steps"] == 3 and rec["recipe"] == text
    assert {i["role"] for i in rec["inputs"]} == {"A", "B", "C"}
    a1111 = json.loads(meta["sd_merge_recipe"])
    assert a1111["primary_model_hash"] is None and a1111["interp_method"] == "Weighted sum"
    assert set(json.loads(meta["sd_merge_models"])) == {sha256_file(p) for p in sd1}
    # info shows the recipe too
    assert main(["info", "--no-hash", str(first)]) == 0
    assert 'name = "plus"' in capsys.readouterr().out


def test_outputs_pick_steps_and_only_their_inputs(sd1, tmp_path: Path) -> None:
    text = CHAIN.format(out="mix.safetensors", dtype="fp16") + """
[[outputs]]
path = "ab.safetensors"
step = "ab"
dtype = "fp32"
vae = "C"
"""
    res = run_recipe(write(tmp_path, "r.toml", text))
    assert [r.step for r in res] == ["mix", "ab"]
    ab = load_file(tmp_path / "ab.safetensors")
    c = load_file(sd1[2])
    vae_key = next(k for k in c if k.startswith("first_stage_model."))
    assert torch.equal(ab[vae_key], c[vae_key])  # the VAE came from C
    sub = tomllib.loads(res[1].recipe_text)
    assert list(sub["inputs"]) == ["A", "B", "C"] and [s["name"] for s in sub["steps"]] == ["ab"]
    assert sub["outputs"] == [{"step": "ab", "dtype": "fp32", "format": "safetensors", "vae": "C"}]
    ref = tmp_path / "ref.safetensors"
    merge([sd1[0], sd1[1]], ref, alpha="GRAD_V", base_alpha=0.3, dtype="fp32", vae=sd1[2])
    want = load_file(ref)
    assert all(torch.equal(ab[k], want[k]) for k in want)


def test_sdxl_recipe_and_scaled_sum(tiny_sdxl_paths, tmp_path: Path) -> None:
    a, b, _ = tiny_sdxl_paths
    text = f"""
[inputs]
X = "{a}"
Y = "{b}"
[[steps]]
method = "scaled_sum"
models = ["X", "Y"]
alpha = 0.75
beta = "IN=0.5"
[[outputs]]
path = "x.safetensors"
dtype = "fp32"
"""
    [res] = run_recipe(write(tmp_path, "x.toml", text))
    assert res.step == "O1" and res.architecture == "SDXL"
    ref = tmp_path / "ref.safetensors"
    merge([a, b], ref, method="scaled_sum", alpha=0.75, beta="IN=0.5", dtype="fp32")
    got, want = load_file(res.output), load_file(ref)
    assert all(torch.equal(got[k], want[k]) for k in want)


# --- Merge Board ---------------------------------------------------------------------------------

README_SAMPLE = """# Sample Recipe
a14 = __SD14__ + __F222__, 0.5
a15 = __SD15__ + __F222__, 0.5, fp16
mix14 = __O1__ + __WD13__ + __SD14__, 1.0, safetensors
mix15 = __O2__ + __WD13__ + __SD14__, 1.0, fp16, safetensors

# variables
__F222__ # You can use F111 instead.
__SD14__ # use stable diffusion v1.5, as you like.
"""


def test_mergeboard_readme_sample() -> None:
    data, notes = parse_mergeboard(README_SAMPLE, models={"SD14": "sd14.ckpt", "__F222__": "f222.ckpt"})
    assert list(data["inputs"]) == ["SD14", "F222", "SD15", "WD13"]
    assert data["inputs"]["SD14"]["path"] == "sd14.ckpt" and data["inputs"]["F222"]["path"] == "f222.ckpt"
    assert data["inputs"]["SD15"]["path"] == ""
    assert data["steps"] == [
        {"name": "a14", "method": "weighted_sum", "models": ["SD14", "F222"], "alpha": 0.5},
        {"name": "a15", "method": "weighted_sum", "models": ["SD15", "F222"], "alpha": 0.5},
        {"name": "mix14", "method": "add_difference", "models": ["a14", "WD13", "SD14"], "alpha": 1.0},
        {"name": "mix15", "method": "add_difference", "models": ["a15", "WD13", "SD14"], "alpha": 1.0},
    ]
    # a14 and a15 feed later lines; only the final two are written (Merge Board's own dtype/format rules)
    assert data["outputs"] == [
        {"path": "mix14.safetensors", "step": "mix14", "dtype": "fp32", "format": "safetensors"},
        {"path": "mix15.safetensors", "step": "mix15", "dtype": "fp16", "format": "safetensors"},
    ]
    assert notes == {"F222": "You can use F111 instead.", "SD14": "use stable diffusion v1.5, as you like."}
    every, _ = parse_mergeboard(README_SAMPLE, all_outputs=True)
    assert [o["path"] for o in every["outputs"]] == ["a14.ckpt", "a15.ckpt", "mix14.safetensors",
                                                     "mix15.safetensors"]
    text = mergeboard_to_toml(README_SAMPLE)
    assert "# F222: You can use F111 instead." in text and "Set the path of: SD14, F222, SD15, WD13" in text
    assert tomllib.loads(text)["steps"] == every["steps"]
    with pytest.raises(RecipeError, match="input 'SD14': path is empty"):
        parse_recipe(text, "imported.toml")


def test_mergeboard_titles_comments_and_unnamed_lines(tmp_path: Path) -> None:
    (tmp_path / "anything-v3.safetensors").write_bytes(b"x")
    text = """
  # merged on 2023-01-05
= anything-v3.safetensors [8712e20a] + sd-v1-5, 0.35   # no output name
my mix = __O1__ + __waifu__, 0.2, fp16, safetensors
"""
    data, _ = parse_mergeboard(text, models_dir=tmp_path, models={"waifu": "wd.safetensors"})
    assert data["inputs"] == {"anything-v3": {"path": str(tmp_path / "anything-v3.safetensors")},
                              "sd-v1-5": {"path": ""}, "waifu": {"path": "wd.safetensors"}}
    assert [s["name"] for s in data["steps"]] == ["O1", "my-mix"]
    assert data["steps"][1]["models"] == ["O1", "waifu"]
    assert data["outputs"] == [{"path": "my-mix.safetensors", "step": "my-mix", "dtype": "fp16",
                                "format": "safetensors"}]


def test_mergeboard_import_runs_like_a1111_merges(sd1, tmp_path: Path, capsys) -> None:
    a, b, c = sd1
    board = write(tmp_path, "board.txt", """# chain
base = __A__ + __B__, 0.3, fp16, safetensors
final = __O1__ + __B__ + __C__, 0.8, fp16, safetensors
""")
    out_toml = tmp_path / "board.toml"
    assert main(["import-mergeboard", str(board), "-o", str(out_toml), "-q",
                 "--model", f"A={a}", "--model", f"__B__={b}", "--models-dir", str(tmp_path)]) == 0
    spec = tomllib.loads(out_toml.read_text())
    assert spec["inputs"]["C"]["path"] == str(c)
    assert main(["run", str(out_toml), "-q"]) == 0
    s1, s2 = tmp_path / "s1.safetensors", tmp_path / "s2.safetensors"
    merge([a, b], s1, alpha=0.3, dtype="fp32")
    merge([s1, b, c], s2, method="add_difference", alpha=0.8, dtype="fp16")
    got, want = load_file(tmp_path / "final.safetensors"), load_file(s2)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not (tmp_path / "base.safetensors").exists()  # the intermediate is streamed, not written


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a = __X__ + __O2__, 0.5\nb = __X__ + __Y__, 0.5", r"board.txt:1: __O2__ is the output of recipe line 2, which comes later"),
        ("a = __X__ + __Y__, 0.5\nb = __O7__ + __Y__, 0.5", r"board.txt:2: __O7__: there is no recipe line 7 \(the recipe has 2\)"),
        ("a = __X__ + __Y__", r"board.txt:1: the multiplier is missing"),
        ("a = __X__ + __Y__, half", r"board.txt:1: multiplier 'half' is not a number"),
        ("a = __X__ + __Y__, 0.5, fp8", r"board.txt:1: unknown option 'fp8'"),
        ("a = __X__, 0.5", r"board.txt:1: expected 'A \+ B'"),
        ("a = __W__ + __X__ + __Y__ + __Z__, 0.5", r"board.txt:1: expected 'A \+ B'"),
        ("a = __X__ + __Y__, 0.5\n\na = __O1__ + __Y__, 0.5", r"board.txt:3: output name 'a' is already used on line 1"),
        ("# nothing\n", r"board.txt: no recipe lines"),
        ("just words", r"board.txt:1: expected 'NAME = A \+ B, M'"),
    ],
)
def test_mergeboard_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_mergeboard(text, source="board.txt")


# --- validation: every error, before any work ------------------------------------------------------

BASE_RECIPE = """
[inputs]
A = "a.safetensors"
B = "b.safetensors"
C = "c.safetensors"
[[steps]]
name = "ab"
models = ["A", "B"]
alpha = 0.5
[[outputs]]
path = "o.safetensors"
"""


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('["A", "B"]', '["A", "Q"]'), r"step 'ab' \(#1\): unknown model 'Q'"),
        (lambda t: t.replace('models = ["A", "B"]', 'models = ["A", "B", "C"]'), r"step 'ab' \(#1\): weighted_sum needs 2 models \(a \(model\), b \(model\)\), got 3"),
        (lambda t: t.replace('["A", "B"]', '["A", "ab"]'), r"step 'ab' \(#1\): cycle ab -> ab"),
        (lambda t: t.replace('["A", "B"]', '["A", "cd"]') + '[[steps]]\nname = "cd"\nmodels = ["ab", "B"]\nalpha = 1\n',
         r"step 'ab' \(#1\): cycle ab -> cd -> ab"),
        (lambda t: t.replace('name = "ab"', 'name = "A"'), r"step 'A' \(#1\): the name is already used by an input"),
        (lambda t: t.replace('method = "x"', "") .replace('name = "ab"', 'name = "ab"\nmethod = "slurp"'), r"step 'ab' \(#1\): unknown method 'slurp'"),
        (lambda t: t.replace("alpha = 0.5", "alpha = true"), r"step 'ab' \(#1\) alpha: must be a number, a list of numbers"),
        (lambda t: t.replace("alpha = 0.5", "alpha = 0.5\nbeta = 0.2"), r"step 'ab' \(#1\): weighted_sum has no parameter 'beta' \(its parameters: alpha\)"),
        (lambda t: t.replace("alpha = 0.5", "alfa = 0.5"), r"step 'ab' \(#1\) alfa: unknown field"),
        (lambda t: t.replace("alpha = 0.5", ""), r"step 'ab' \(#1\): alpha is missing \(weighted_sum's alpha: B's share"),
        (lambda t: t.replace('path = "o.safetensors"', 'path = "o.safetensors"\nstep = "zz"'), r"output #1: unknown step 'zz'"),
        (lambda t: t.replace('path = "o.safetensors"', 'path = "o.safetensors"\nvae = "V"'), r"output #1: vae 'V' is not an input"),
        (lambda t: t.replace('path = "o.safetensors"', 'path = "o.safetensors"\ndtype = "fp8"'), r"output #1 dtype: Input should be"),
        (lambda t: t.replace('A = "a.safetensors"', 'A = { path = "a.safetensors", sha256 = "abc" }'), r"input 'A' sha256: Value error, must be 64 hex digits"),
        (lambda t: t.replace('A = "a.safetensors"', 'A = ""'), r"input 'A': path is empty"),
        (lambda t: t.replace("[[outputs]]", "[[outputs]"), r"r.toml: not valid TOML: .*at line 10, column 10"),
        (lambda t: "version = 2\n" + t, r"version 2 is not supported"),
        (lambda t: t + '[[outputs]]\npath = "o.safetensors"\n', r"two outputs write 'o.safetensors'"),
    ],
)
def test_recipe_errors_without_files(edit, message: str, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe(edit(BASE_RECIPE), str(tmp_path / "r.toml"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("alpha = 0.5", "alpha = [0.5, 0.5, 0.5]"), r"step 'ab' \(#1\): alpha: the list has 3 values; SD1 needs 1, 25 \(blocks\), 26"),
        (lambda t: t.replace("alpha = 0.5", "alpha = " + str([0.1] * 24)), r"step 'ab' \(#1\): alpha: the list has 24 values"),
        (lambda t: t.replace("alpha = 0.5", 'alpha = "NOPE"'), r"step 'ab' \(#1\): alpha: unknown preset 'NOPE'"),
        (lambda t: t.replace("alpha = 0.5", 'alpha = "IN13=1"'), r"step 'ab' \(#1\): alpha: unknown block 'IN13'"),
        (lambda t: t.replace('B = "b.safetensors"', 'B = "xl.safetensors"'), r"step 'ab' \(#1\): input 'B' is SDXL but input 'A' is SD1"),
        (lambda t: t.replace('B = "b.safetensors"', 'B = "missing.safetensors"'), r"input 'B': .*missing.safetensors: no such file"),
        (lambda t: "architecture = \"SDXL\"\n" + t, r"architecture = 'SDXL', but the inputs are SD1"),
        (lambda t: t.replace('path = "o.safetensors"', 'path = "a.safetensors"'), r"output #1 .*is an input file"),
        (lambda t: t.replace('path = "o.safetensors"', 'path = "exists.safetensors"'), r"output #1 .*already exists"),
        (lambda t: t.replace('A = "a.safetensors"', 'A = { path = "a.safetensors", sha256 = "' + "0" * 64 + '" }'),
         r"input 'A' \(.*a.safetensors\): sha256 is [0-9a-f]{12}…, the recipe expects 000000000000…"),
    ],
)
def test_recipe_errors_with_files_before_any_output(edit, message: str, sd1, tiny_sdxl_paths, tmp_path: Path) -> None:
    (tmp_path / "xl.safetensors").symlink_to(tiny_sdxl_paths[0])
    (tmp_path / "exists.safetensors").write_bytes(b"keep me")
    r = write(tmp_path, "r.toml", edit(BASE_RECIPE))
    with pytest.raises(BlockmergeError, match=message):
        run_recipe(r)
    assert not (tmp_path / "o.safetensors").exists()
    assert (tmp_path / "exists.safetensors").read_bytes() == b"keep me"
    assert not list(tmp_path.glob(".*.partial"))


def test_changed_input_is_refused(sd1, tmp_path: Path, capsys) -> None:
    a = tmp_path / "own_a.safetensors"
    shutil.copyfile(sd1[0], a)
    text = BASE_RECIPE.replace('A = "a.safetensors"', f'A = {{ path = "own_a.safetensors", sha256 = "{sha256_file(a)}" }}')
    r = write(tmp_path, "r.toml", text)
    assert main(["run", str(r), "--dry-run", "-q"]) == 0
    data = bytearray(a.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor
    a.write_bytes(bytes(data))
    assert main(["run", str(r), "-q"]) == 2
    err = capsys.readouterr().err
    assert "input 'A'" in err and "the recipe expects" in err and err.count("\n") == 1
    assert not (tmp_path / "o.safetensors").exists()
    assert main(["run", str(r), "-q", "--no-verify"]) == 0  # the user may insist


def test_cli_output_override_and_errors(sd1, tmp_path: Path, capsys) -> None:
    r = write(tmp_path, "r.toml", BASE_RECIPE)
    assert main(["run", str(r), "-o", str(tmp_path / "x.safetensors")]) == 0
    assert "wrote" in capsys.readouterr().out
    two = write(tmp_path, "two.toml", BASE_RECIPE + '[[outputs]]\npath = "p.safetensors"\n')
    assert main(["run", str(two), "-o", str(tmp_path / "y.safetensors")]) == 2
    assert "has 2 outputs" in capsys.readouterr().err
    none = write(tmp_path, "none.toml", BASE_RECIPE.split("[[outputs]]")[0])
    assert main(["run", str(none)]) == 2
    assert "no [[outputs]]" in capsys.readouterr().err
    assert main(["info", "--recipe", str(sd1[0])]) == 2
    assert "has no embedded recipe" in capsys.readouterr().err
    assert embedded_recipe(tmp_path / "x.safetensors") is not None
    assert load_recipe(r).spec.steps[0].alpha == 0.5


def test_import_rewrites_relative_paths_for_the_recipe_folder(sd1, tmp_path: Path, monkeypatch) -> None:
    """--model paths start at the current folder; the recipe's start at its own: rewritten."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    board = write(tmp_path, "board.txt", "out = __A__ + __B__, 0.5, fp16, safetensors\n")
    assert main(["import-mergeboard", str(board), "-o", "recipes/board.toml", "-q",
                 "--model", "A=a.safetensors", "--model", "B=b.safetensors"]) == 0
    spec = tomllib.loads((tmp_path / "recipes" / "board.toml").read_text())
    assert spec["inputs"] == {"A": {"path": "../a.safetensors"}, "B": {"path": "../b.safetensors"}}
    assert main(["run", "recipes/board.toml", "-q"]) == 0
    ref = tmp_path / "ref.safetensors"
    merge([sd1[0], sd1[1]], ref, alpha=0.5)
    got, want = load_file(tmp_path / "recipes" / "out.safetensors"), load_file(ref)
    assert all(torch.equal(got[k], want[k]) for k in want)
