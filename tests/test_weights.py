"""Weight specifications: every accepted form and every refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockmerge.architectures import SD1, SDXL
from blockmerge.errors import WeightSpecError
from blockmerge.merge import load_presets, parse_weights

# The project's reference copy of the extension's presets sits beside the checkout (../shared).
REFERENCE_TSV = Path(__file__).resolve().parents[2] / "shared" / "reference" / "mbw-presets.tsv"
PACKAGE_TSV = Path(__file__).resolve().parents[1] / "src" / "blockmerge" / "data" / "mbw-presets.tsv"


def test_one_number_sets_every_block_and_base():
    w = parse_weights("0.3", SD1)
    assert w.values == (0.3,) * 26
    w = parse_weights(0.3, SD1, base=0.9)
    assert w["BASE"] == 0.9 and w["OUT11"] == 0.3


def test_25_values_in_block_order_and_base_from_option():
    vals = [i / 100 for i in range(25)]
    w = parse_weights(",".join(map(str, vals)), SD1, base=0.5)
    assert w.blocks_list() == vals and w["BASE"] == 0.5
    assert w["IN00"] == 0.0 and w["M00"] == 0.12 and w["OUT11"] == 0.24
    # without a base value BASE keeps model A for the method (0 for weighted_sum, 1 for scaled_sum α)
    assert parse_weights(",".join(map(str, vals)), SD1)["BASE"] == 0.0
    assert parse_weights(",".join(map(str, vals)), SD1, keep_a=1.0)["BASE"] == 1.0


def test_26_values_take_base_first_like_supermerger():
    vals = [0.7] + [0.1] * 25
    w = parse_weights(" ".join(map(str, vals)), SD1)
    assert w["BASE"] == 0.7 and w["IN05"] == 0.1
    with pytest.raises(WeightSpecError, match="BASE first"):
        parse_weights(",".join(map(str, vals)), SD1, base=0.2)


def test_sdxl_counts():
    assert len(parse_weights(",".join(["0.5"] * 19), SDXL).values) == 20
    assert parse_weights(",".join(["0.5"] + ["0.25"] * 19), SDXL)["BASE"] == 0.5
    with pytest.raises(WeightSpecError, match="25 values; SDXL needs 1, 19"):
        parse_weights(",".join(["0.5"] * 25), SDXL)


@pytest.mark.parametrize("bad", ["0.1,0.2", ",".join(["0.5"] * 24), ",".join(["0.5"] * 27)])
def test_wrong_number_of_values(bad):
    with pytest.raises(WeightSpecError, match=r"--alpha: the list has \d+ values; SD1 needs 1, 25"):
        parse_weights(bad, SD1)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "abc", "0.5,x," + ",".join(["1"] * 23), "IN04=nan", "IN04=zz"])
def test_non_numeric_nan_inf_refused(bad):
    with pytest.raises(WeightSpecError, match="--alpha"):
        parse_weights(bad, SD1)


def test_presets_match_the_reference_file():
    book = load_presets()
    ref = REFERENCE_TSV if REFERENCE_TSV.exists() else PACKAGE_TSV
    rows = [line.split("\t") for line in ref.read_text().splitlines()[1:] if line.strip()]
    mbw = [p for p in book.presets.values() if p.source == "built-in presets"]
    assert len(rows) == len(mbw) > 30
    for name, vals in rows:
        w = parse_weights(name, SD1, base=0.0)
        assert w.blocks_list() == [float(v) for v in vals.split(",")], name
    assert parse_weights("grad_v", SD1)["IN00"] == 1.0  # names are case-insensitive
    # a few values as the Merge Block Weighted extension defines them
    assert parse_weights("GRAD_A", SD1).blocks_list()[12] == 1.0
    assert parse_weights("WRAP08", SD1).blocks_list() == [1] * 4 + [0] * 17 + [1] * 4
    assert parse_weights("SMOOTHSTEP/4", SD1)["IN06"] == 1.0


def test_lora_block_weight_presets_and_lists():
    """LoRA Block Weight's presets (its DEF_WEIGHT_PRESET) and 17-value lists: BASE, IN01, IN02, IN04,
    IN05, IN07, IN08, M00, OUT03..OUT11; blocks they leave out keep model A (LBW's 0: no LoRA)."""
    lbw17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)]
    expected = {"ALL": [1] * 17, "NONE": [0] * 17, "INS": [1, 1, 1, 1] + [0] * 13,
                "IND": [1, 0, 0, 0, 1, 1, 1] + [0] * 10, "INALL": [1] * 7 + [0] * 10,
                "MIDD": [1, 0, 0, 0] + [1] * 8 + [0] * 5, "OUTD": [1] + [0] * 7 + [1] * 4 + [0] * 5,
                "OUTS": [1] + [0] * 11 + [1] * 5, "OUTALL": [1] + [0] * 7 + [1] * 9, "ALL0.5": [0.5] * 17}
    for name, vals in expected.items():
        w = parse_weights(name, SD1, keep_a=0.0)
        assert [w[b] for b in lbw17] == [float(v) for v in vals], name
        assert all(w[b] == 0.0 for b in SD1.block_ids if b not in lbw17), name
        # with a method whose "keep A" is 1 (scaled_sum's alpha), the left-out blocks keep A too
        assert all(parse_weights(name, SD1, keep_a=1.0)[b] == 1.0 for b in SD1.block_ids if b not in lbw17)
    xl = parse_weights("1,2,3,4,5,6,7,8,9,10,11,12", SDXL, keep_a=0.0)
    assert [xl[b] for b in ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT05")] == [1, 2, 3, 4, 5, 6, 7, 12]
    assert xl["IN00"] == xl["OUT06"] == 0.0


def test_lora_block_weight_preset_file_format(tmp_path):
    f = tmp_path / "lbwpresets.txt"
    f.write_text("# comment\nMINE:1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0.5\nTAB\t" + ",".join(["0.25"] * 25) + "\n")
    book = load_presets([f])
    assert parse_weights("MINE", SD1, presets=book)["OUT11"] == 0.5
    assert parse_weights("TAB", SD1, presets=book)["IN00"] == 0.25
    bad = tmp_path / "bad.txt"
    bad.write_text("RAND:R,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1\n")
    with pytest.raises(WeightSpecError, match="R, U and X"):
        load_presets([bad])


def test_sd1_preset_on_sdxl_is_an_error_not_a_truncation():
    with pytest.raises(WeightSpecError, match="preset GRAD_V has 25 values and is not for SDXL"):
        parse_weights("GRAD_V", SDXL)


def test_unknown_preset():
    with pytest.raises(WeightSpecError, match="unknown preset 'NOPE'"):
        parse_weights("NOPE", SD1)


def test_user_preset_file(tmp_path, monkeypatch):
    f = tmp_path / "mine.tsv"
    f.write_text("preset_name\tpreset_weights\n# mine\nXL_HALF\t" + ",".join(["0.5"] * 19) + "\n"
                 "MY_SD\t" + ",".join(["0.2"] * 26) + "\n")
    book = load_presets([f])
    assert parse_weights("XL_HALF", SDXL, presets=book).blocks_list() == [0.5] * 19
    w = parse_weights("MY_SD", SD1, presets=book)
    assert w["BASE"] == 0.2
    monkeypatch.setenv("BLOCKMERGE_PRESETS", str(f))
    assert load_presets().get("xl_half") is not None
    bad = tmp_path / "bad.tsv"
    bad.write_text("X\t1,2,3\n")
    with pytest.raises(WeightSpecError, match=r"bad.tsv:1: preset X has 3 values"):
        load_presets([bad])
    with pytest.raises(WeightSpecError, match="missing.tsv"):
        load_presets([tmp_path / "missing.tsv"])


def test_readable_form():
    w = parse_weights("IN04-IN08=0.5,M00=1", SD1)
    d = w.as_dict()
    assert [d[f"IN{i:02d}"] for i in range(12)] == [0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5, 0.5, 0, 0, 0]
    assert d["M00"] == 1 and d["OUT05"] == 0 and d["BASE"] == 0
    w = parse_weights("0.2, OUT=0.9, BASE=0.1", SD1)
    assert w["IN03"] == 0.2 and w["OUT00"] == 0.9 and w["OUT11"] == 0.9 and w["BASE"] == 0.1 and w["M00"] == 0.2
    w = parse_weights("GRAD_V,in=0", SD1)
    assert w["IN00"] == 0 and w["OUT11"] == 1.0
    w = parse_weights("IN4=0.75", SD1, keep_a=1.0)  # the article's experiment spec for scaled_sum
    assert w["IN04"] == 0.75 and w["IN03"] == 1.0 and w["BASE"] == 1.0
    w = parse_weights("IN03-M00=1", SDXL)
    assert w.as_dict()["IN08"] == 1 and w["M00"] == 1 and w["IN02"] == 0 and w["OUT00"] == 0


@pytest.mark.parametrize(
    "bad,msg",
    [("IN12=0.5", "unknown block 'IN12'"), ("IN08-IN04=1", "must go forward"), ("OUT09=1", "unknown block"),
     ("IN04=0.5,0.3", "expected ID=VALUE"), ("", "empty")],
)
def test_readable_form_errors(bad, msg):
    arch = SDXL if bad == "OUT09=1" else SD1
    with pytest.raises(WeightSpecError, match=msg):
        parse_weights(bad, arch)


def test_base_given_twice():
    with pytest.raises(WeightSpecError, match="BASE is given both"):
        parse_weights("IN04=0.5,BASE=0.2", SD1, base=0.3)


# ---- specs that hold nothing, and BASE values named as given (issue 10 audit) -----------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from blockmerge.cli import main  # noqa: E402
from blockmerge.merge import resolve_params  # noqa: E402
from blockmerge.merge.methods import METHODS  # noqa: E402
from blockmerge.recipes import RecipeError, recipe_from_text, run_recipe  # noqa: E402

separators_only = st.text(st.sampled_from(";,\n\r\t "), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(spec=separators_only)
def test_a_spec_of_separators_only_is_an_error_not_keep_a(spec: str) -> None:
    """``--alpha ';'`` used to mean "rules only, no rules": every block kept model A, exit 0."""
    with pytest.raises(WeightSpecError, match=r"^--alpha: "):
        parse_weights(spec, SD1, arg="--alpha")


def _every_parameter() -> list[tuple[str, int, str]]:
    out = []
    for m in METHODS.values():
        n = m.min_operands
        out += [(m.name, n, name) for name in m.param_names(n)]
    return out


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(_every_parameter()), spec=separators_only)
def test_every_parameter_of_every_method_refuses_an_empty_spec(case, spec: str) -> None:
    method, n, name = case
    m = METHODS[method]
    given = {other: _valid(m.lookup(other, n)) for other in m.param_names(n) if other != name}
    given[name] = spec
    with pytest.raises(WeightSpecError, match=f"--param {name}: |--{name}: "):
        resolve_params(m, SD1, n, given, given_as={"alpha": "--alpha", "beta": "--beta"})


def _valid(p) -> float:
    """A value inside the parameter's range (the other parameters must not fail first)."""
    import math

    if p.kind == "bool":
        return 1.0
    lo, hi = p.lo, p.hi
    v = (lo + hi) / 2 if math.isfinite(lo) and math.isfinite(hi) else lo + 1 if math.isfinite(lo) else \
        hi - 1 if math.isfinite(hi) else 0.5
    return float(round(v)) if p.kind == "int" else v


RECIPE = ('version = 1\n[inputs.A]\npath = "a.safetensors"\n[inputs.B]\npath = "b.safetensors"\n'
          '[inputs.C]\npath = "c.safetensors"\n[[steps]]\nname = "s"\nmethod = "{method}"\nmodels = {models}\n{lines}\n')


@pytest.mark.parametrize("field,spec", [("alpha", ";"), ("alpha", ",;"), ("alpha", "\n"), ("beta", " ; "),
                                        ("params", "{ alpha = ';' }")])
def test_a_recipe_with_an_empty_spec_names_the_step_and_parameter(recipe_dir: Path, field, spec) -> None:
    method, models = ("add_difference", '["A", "B", "C"]') if field != "beta" else ("sum_twice", '["A", "B", "C"]')
    line = f"params = {spec}" if field == "params" else f"{field} = {tomllib_quote(spec)}"
    if field == "beta":
        line = f"alpha = 0.5\n{line}"
    text = RECIPE.format(method=method, models=models, lines=line)
    rec = recipe_from_text(text, recipe_dir, "r.toml")
    with pytest.raises(RecipeError, match=r"r\.toml: step 's' \(#1\): (alpha|beta): (.* holds no weights|empty weight specification)"):
        run_recipe(rec, output=recipe_dir / "o.safetensors", dry_run=True, verify_hashes=False)


def tomllib_quote(s: str) -> str:
    import json

    return json.dumps(s)


@pytest.fixture
def recipe_dir(tmp_path: Path, tiny_sd1_paths) -> Path:
    for name, src in zip("abc", tiny_sd1_paths, strict=True):
        (tmp_path / f"{name}.safetensors").symlink_to(src)
    return tmp_path


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "1e39", "-1e39"])
@pytest.mark.parametrize("base", ["base_alpha", "base_beta"])
def test_a_bad_base_value_in_a_recipe_is_named_as_written(recipe_dir: Path, base: str, bad: str) -> None:
    """``base_alpha = nan`` was reported as ``alpha: 'nan' is not a finite number``."""
    lines = f"alpha = 0.5\nbeta = 0.5\n{base} = {bad}" if base == "base_beta" else f"alpha = 0.5\n{base} = {bad}"
    method = "sum_twice" if base == "base_beta" else "weighted_sum"
    models = '["A", "B", "C"]' if base == "base_beta" else '["A", "B"]'
    text = RECIPE.format(method=method, models=models, lines=lines)
    rec = recipe_from_text(text, recipe_dir, "r.toml")
    with pytest.raises(RecipeError, match=rf"r\.toml: step 's' \(#1\): {base}: "):
        run_recipe(rec, output=recipe_dir / "o.safetensors", dry_run=True, verify_hashes=False)


@pytest.mark.parametrize("arg", ["--alpha", "recipe: step 'x' (#1): beta", "--param alpha", "w2"])
def test_the_base_name_follows_how_the_parameter_was_named(arg: str) -> None:
    with pytest.raises(WeightSpecError) as e:
        parse_weights("0.5", SD1, arg=arg, base=float("nan"))
    want = {"--alpha": "--base-alpha", "recipe: step 'x' (#1): beta": "recipe: step 'x' (#1): base_beta",
            "--param alpha": "--param base_alpha", "w2": "base_w2"}[arg]
    assert str(e.value).startswith(want + ": "), e.value


@pytest.mark.parametrize("argv", [["--alpha", ";"], ["--alpha", "0.5", "--beta", ";", "--method", "sum_twice"],
                                  ["--param", "alpha=;"], ["--alpha", " , ; "]])
def test_the_cli_refuses_an_empty_spec_and_writes_nothing(recipe_dir: Path, capsys, argv) -> None:
    models = [recipe_dir / "a.safetensors", recipe_dir / "b.safetensors"]
    if "sum_twice" in argv:
        models.append(recipe_dir / "c.safetensors")
    out = recipe_dir / "o.safetensors"
    code = main(["merge", *map(str, models), "-o", str(out), *argv])
    err = capsys.readouterr().err
    assert code == 2 and "holds no weights" in err and err.count("\n") == 1, err
    assert not out.exists()
