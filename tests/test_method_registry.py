"""The method registry end to end: adding a method is one declaration; every method merges to a
file, in a recipe and in place with the same result; deltas are first-class; elemental rules;
bad method input is a one-line error with nothing written."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from blockmerge.architectures import SD1, SD2
from blockmerge.cli import main
from blockmerge.errors import BlockmergeError
from blockmerge.experiments.inplace import InPlaceModel, MergeEdit
from blockmerge.experiments.sweep import custom_variant
from blockmerge.generation.loader import load_pipeline
from blockmerge.merge import Delta, Model, Param, merge, merge_method, resolve_params
from blockmerge.merge.declare import unregister
from blockmerge.merge.methods import METHODS
from blockmerge.recipes import recipe_from_text, run_recipe

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _load(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


UNET_ATTN2 = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
UNET_ATTN1 = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"
UNET_OUT = "model.diffusion_model.output_blocks.3.0.in_layers.2.weight"


# --- one declaration ------------------------------------------------------------------------------

@pytest.fixture()
def toy_method():
    """A method defined here, in the test, and nowhere else: ``A + 2·g·(B - A)``."""

    @merge_method(formula="A + 2·g·(B - A)", elementwise=True, identity={"gain": 0.0}, source="this test")
    def toy_gain(a: Model, b: Model, *, gain: float = Param(None, "twice B's share", lo=-1, hi=1)) -> Model:
        """A test method."""
        return b.sub_(a).mul_(2.0 * gain).add_(a)

    yield toy_gain
    unregister("toy_gain")


def test_adds_must_name_the_delta_operand_and_a_parameter() -> None:
    """``adds`` lets the executor sum a delta into A without making it, so a declaration that does not
    say exactly "A + param·delta" is refused when the method is declared."""

    def two(a: Model, d: Delta, *, alpha: float = Param(1.0, "x")) -> Model:
        return a

    def model_d(a: Model, d: Model, *, alpha: float = Param(1.0, "x")) -> Model:
        return a

    def three(a: Model, d: Delta, e: Delta, *, alpha: float = Param(1.0, "x")) -> Model:
        return a

    for fn, adds in ((two, ("x", "alpha")),  # not the second operand's name
                     (model_d, ("d", "alpha")),  # the second operand is no delta
                     (two, ("d", "beta")),  # no such parameter
                     (three, ("d", "alpha"))):  # more than A and the delta
        with pytest.raises(TypeError, match="adds="):
            merge_method(formula="A + α·D", elementwise=True, source="this test", adds=adds)(fn)
        assert fn.__name__ not in METHODS
    assert METHODS["add_delta"].adds == ("d", "alpha")


def test_adding_a_method_is_one_declaration(toy_method, tiny_sd1_paths, tmp_path: Path, capsys) -> None:
    a, b, _ = tiny_sd1_paths
    # listed
    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0 and "toy_gain" in out and "A + 2·g·(B - A)" in out and "twice B's share" in out
    code, out, _ = run_cli(["methods", "--json"], capsys)
    listed = {m["name"]: m for m in json.loads(out)}
    assert listed["toy_gain"]["params"][0]["range"] == "[-1, 1]"
    # CLI merge with a per-block parameter
    o = tmp_path / "toy.safetensors"
    code, _, err = run_cli(["merge", a, b, "-o", o, "--method", "toy_gain", "--param", "gain=IN04-IN08=0.25", "-q",
                            "--dtype", "fp32"], capsys)
    assert code == 0, err
    ta, tb, to = _load(a), _load(b), _load(o)
    want = ta[UNET_ATTN2].float() + 0.5 * (tb[UNET_ATTN2].float() - ta[UNET_ATTN2].float())
    assert torch.allclose(to[UNET_ATTN2], want, atol=1e-6)
    assert torch.equal(to[UNET_OUT], ta[UNET_OUT].float())  # gain 0 (identity) outside IN04-IN08
    rec = json.loads(safe_open(str(o), "pt").metadata()["blockmerge"])
    assert rec["method"] == "toy_gain" and rec["params"]["gain"]["IN05"] == 0.25 and rec["params"]["gain"]["OUT03"] == 0
    # out of its declared range
    code, _, err = run_cli(["merge", a, b, "-o", tmp_path / "x.safetensors", "--method", "toy_gain",
                            "--param", "gain=2"], capsys)
    assert code == 2 and "gain" in err and "[-1, 1]" in err and not (tmp_path / "x.safetensors").exists()
    # a recipe step
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[inputs]\nA = "{a}"\nB = "{b}"\n\n[[steps]]\nname = "t"\nmethod = "toy_gain"\n'
                      f'models = ["A", "B"]\nparams = {{ gain = "IN04-IN08=0.25" }}\n\n[[outputs]]\npath = "r.safetensors"\n'
                      'dtype = "fp32"\n')
    code, _, err = run_cli(["run", recipe, "-q"], capsys)
    assert code == 0, err
    assert torch.equal(_load(tmp_path / "r.safetensors")[UNET_ATTN2], to[UNET_ATTN2])
    # a sweep's custom variant (the in-place edit)
    v = custom_variant("t", SD1, None, method="toy_gain", params={"gain": "M00=0.5"}, donors=["B"])
    assert v.edit.changed_blocks() == ["M00"] and v.variant.params["method"] == "toy_gain"


# --- every method: file merge == recipe == in place -----------------------------------------------

def _values(name: str, n: int) -> dict[str, object]:
    """Parameters that exercise per-block values: α differs between blocks, the rest stays valid."""
    m = METHODS[name]
    out: dict[str, object] = {}
    for pname in m.param_names(n):
        p = m.lookup(pname, n)
        if pname == "alpha":
            out[pname] = "0.3,IN04-IN08=0.6,OUT=0.2" if name != "add_cosine_a" else "0.1,OUT=0.05"
        elif pname == "beta":
            out[pname] = "0.2,M00=0.4"
        elif pname == "seed":
            out[pname] = 7
        elif pname == "p" or pname == "k":
            out[pname] = 0.5
        elif p.per_operand:
            out[pname] = 1.0 if pname.endswith("1") else 0.5
    return out


def _n(name: str) -> int:
    m = METHODS[name]
    if m.max_operands is not None:
        return m.max_operands
    return max(3, m.min_operands)


@pytest.fixture(scope="module")
def sd1_three(tiny_sd1_paths):
    return [load_pipeline(p, device="cpu", hash_file=False) for p in tiny_sd1_paths]


def _delta_free(name: str) -> bool:
    return all(o.space != "delta" for o in METHODS[name].operands)


@pytest.mark.parametrize("name", sorted(n for n in METHODS if _delta_free(n) and METHODS[n].result == "model"))
def test_in_place_equals_merge_to_file(name: str, sd1_three, tiny_sd1_paths, tmp_path: Path) -> None:
    n = _n(name)
    paths = [tiny_sd1_paths[i % 3] for i in range(n)]
    loaded = [sd1_three[i % 3] for i in range(n)]
    values = _values(name, n)
    out = merge(paths, tmp_path / "o.safetensors", method=name, params=values, dtype="fp32")
    from_file = InPlaceModel(load_pipeline(out.output, device="cpu", hash_file=False)).params
    donors = {f"d{i}": loaded[i] for i in range(1, n)}
    ipm = InPlaceModel(loaded[0], donors)
    pv = resolve_params(METHODS[name], SD1, n, values)
    edit = MergeEdit(name, pv, tuple(donors), ids=SD1.all_ids)
    before = {q: p.detach().clone() for q, p in ipm.params.items()}
    with ipm.applied(edit):
        bad = [q for q, p in ipm.params.items() if not torch.allclose(p, from_file[q], rtol=1e-5, atol=1e-6)]
        assert not bad, (name, bad[:3])
        changed = sum(not torch.equal(p, before[q]) for q, p in ipm.params.items())
    assert changed > 0
    assert all(torch.equal(p, before[q]) for q, p in ipm.params.items())


def _clamp_capable(name: str) -> bool:
    m = METHODS[name]
    return _delta_free(name) and m.clamp_problem(["model"] * _n(name)) is None


@pytest.mark.parametrize("name", sorted(n for n in METHODS if _clamp_capable(n)))
def test_in_place_clamp_equals_merge_to_file_with_clamp(name: str, sd1_three, tiny_sd1_paths, tmp_path: Path) -> None:
    """``clamp`` in place (sweep --custom, the UI's preview) is ``blockmerge merge --clamp``'s."""
    n = _n(name)
    paths = [tiny_sd1_paths[i % 3] for i in range(n)]
    loaded = [sd1_three[i % 3] for i in range(n)]
    values = _values(name, n)
    out = merge(paths, tmp_path / "o.safetensors", method=name, params=values, dtype="fp32", clamp=True)
    from_file = InPlaceModel(load_pipeline(out.output, device="cpu", hash_file=False)).params
    donors = {f"d{i}": loaded[i] for i in range(1, n)}
    ipm = InPlaceModel(loaded[0], donors)
    edit = MergeEdit(name, resolve_params(METHODS[name], SD1, n, values), tuple(donors), ids=SD1.all_ids, clamp=True)
    assert edit.key()["clamp"] is True
    before = {q: p.detach().clone() for q, p in ipm.params.items()}
    with ipm.applied(edit):
        bad = [q for q, p in ipm.params.items() if not torch.allclose(p, from_file[q], rtol=1e-5, atol=1e-6)]
        assert not bad, (name, bad[:3])
    assert all(torch.equal(p, before[q]) for q, p in ipm.params.items())


def test_in_place_clamp_keeps_an_extrapolation_inside_the_models(sd1_three) -> None:
    a, b = sd1_three[0], sd1_three[1]
    ipm = InPlaceModel(a, {"B": b})
    pa, pb = InPlaceModel(a).params, InPlaceModel(b).params
    pv = resolve_params(METHODS["weighted_sum"], SD1, 2, {"alpha": "1.5"})
    free = MergeEdit("weighted_sum", pv, ("B",), ids=SD1.all_ids)
    with ipm.applied(free):
        unclamped = {q: p.detach().clone() for q, p in ipm.params.items()}
    with ipm.applied(MergeEdit("weighted_sum", pv, ("B",), ids=SD1.all_ids, clamp=True)):
        outside = 0
        for q, p in ipm.params.items():
            lo, hi = torch.minimum(pa[q], pb[q]), torch.maximum(pa[q], pb[q])
            assert torch.equal(p, torch.minimum(torch.maximum(unclamped[q], lo), hi)), q
            outside += int((unclamped[q] != p).sum())
    assert outside > 1000  # α = 1.5 extrapolates: the clamp really cut


@pytest.mark.parametrize("method,n,why", [("difference", 2, "gives a delta"), ("scaled_sum", 1, "fewer than two")])
def test_in_place_clamp_that_cannot_apply_is_an_error(method: str, n: int, why: str) -> None:
    pv = resolve_params(METHODS[method], SD1, n, {"alpha": "1"} if method == "scaled_sum" else {})
    with pytest.raises(BlockmergeError, match=why):
        MergeEdit(method, pv, tuple(f"d{i}" for i in range(1, n)), ids=SD1.all_ids, clamp=True)
    with pytest.raises(BlockmergeError, match=f"--custom x: clamp: .*{why}"):
        custom_variant("x", SD1, "1" if method == "scaled_sum" else None, method=method,
                       donors=tuple(f"d{i}" for i in range(1, n)), clamp=True)


@pytest.fixture(scope="module")
def sd2_pair(tiny_sd2_paths):
    return [load_pipeline(p, device="cpu", hash_file=False) for p in tiny_sd2_paths]


@pytest.mark.parametrize("name", ["slerp", "add_cosine_b", "dare"])
def test_in_place_whole_tensor_methods_on_openclip_text_encoders(name, sd2_pair, tiny_sd2_paths, tmp_path) -> None:
    """SD2's OpenCLIP text encoder stores q, k, v stacked and the projection transposed: in place the
    method must still see the file's tensor (slerp's norm over all of q, k, v together)."""
    values = {"alpha": "0.5", **({"seed": 3, "w1": 1.0, "p": 0.5} if name == "dare" else {})}
    paths = list(tiny_sd2_paths)
    out = merge(paths, tmp_path / "o.safetensors", method=name, params=values, dtype="fp32")
    from_file = InPlaceModel(load_pipeline(out.output, device="cpu", hash_file=False)).params
    ipm = InPlaceModel(sd2_pair[0], {"B": sd2_pair[1]})
    edit = MergeEdit(name, resolve_params(METHODS[name], SD2, 2, values), ("B",))
    with ipm.applied(edit):
        te = [q for q in ipm.params if q.startswith("text_encoder.")]
        assert any("q_proj" in q for q in te)
        for q in te + [q for q in ipm.params if q.startswith("unet.")][:50]:
            assert torch.allclose(ipm.params[q], from_file[q], rtol=1e-5, atol=1e-6), q


# --- deltas ---------------------------------------------------------------------------------------

def test_a_delta_is_written_read_back_and_added(tiny_sd1_paths, tmp_path: Path, capsys) -> None:
    a, b, c = tiny_sd1_paths
    d = tmp_path / "d.safetensors"
    code, _, err = run_cli(["merge", b, c, "-o", d, "--method", "difference", "--dtype", "fp32", "-q"], capsys)
    assert code == 0, err
    rec = json.loads(safe_open(str(d), "pt").metadata()["blockmerge"])
    assert rec["space"] == "delta"
    code, out, _ = run_cli(["info", d, "--no-hash"], capsys)
    assert code == 0 and "difference" in out
    # A + α·D equals add_difference A + α·(B - C), bit for bit in fp32
    x = merge([a, d], tmp_path / "x.safetensors", method="add_delta", alpha="0.4,OUT=0.9", dtype="fp32")
    y = merge([a, b, c], tmp_path / "y.safetensors", method="add_difference", alpha="0.4,OUT=0.9", dtype="fp32")
    tx, ty = _load(x.output), _load(y.output)
    assert all(torch.equal(tx[k], ty[k]) for k in ty)
    # task-vector methods take deltas too: TIES over (B - A, C - A) equals TIES over B, C with base A
    db, dc = tmp_path / "db.safetensors", tmp_path / "dc.safetensors"
    merge([b, a], db, method="difference", dtype="fp32")
    merge([c, a], dc, method="difference", dtype="fp32")
    t1 = _load(merge([a, db, dc], tmp_path / "t1.safetensors", method="ties", params={"k": 0.4}, dtype="fp32").output)
    t2 = _load(merge([a, b, c], tmp_path / "t2.safetensors", method="ties", params={"k": 0.4}, dtype="fp32").output)
    assert all(torch.equal(t1[k], t2[k]) for k in t2)
    # spaces are checked: a delta where a model is needed, a model where a delta is needed
    code, _, err = run_cli(["merge", d, b, "-o", tmp_path / "bad.safetensors", "--alpha", "0.5"], capsys)
    assert code == 2 and "d.safetensors" in err and "is a delta" in err and "must be a model" in err
    code, _, err = run_cli(["merge", a, b, "-o", tmp_path / "bad.safetensors", "--method", "add_delta"], capsys)
    assert code == 2 and "is a model" in err and "must be a delta" in err
    assert not (tmp_path / "bad.safetensors").exists()


def test_recipe_with_a_delta_step_and_method_params_round_trips(tiny_sd1_paths, tmp_path: Path, capsys) -> None:
    a, b, c = tiny_sd1_paths
    text = f'''
[inputs]
A = "{a}"
B = "{b}"
C = "{c}"

[[steps]]
name = "d"
method = "difference"
models = ["B", "C"]

[[steps]]
name = "plus"
method = "add_delta"
models = ["A", "d"]
alpha = "0.5; IN04-IN08:attn2:0"

[[steps]]
name = "t"
method = "ties"
models = ["A", "plus", "B"]
params = {{ k = 0.5, w2 = "IN=0.5" }}
clamp = true

[[outputs]]
path = "out.safetensors"
'''
    rec = recipe_from_text(text, tmp_path, "r.toml")
    (res,) = run_recipe(rec)
    code, out, _ = run_cli(["info", "--recipe", res.output], capsys)
    assert code == 0
    spec = tomllib.loads(out)
    steps = {s["name"]: s for s in spec["steps"]}
    assert steps["plus"]["alpha"].endswith("; IN04-IN08:attn2:0")
    assert steps["t"]["params"]["k"] == 0.5 and steps["t"]["params"]["w2"][1:13] == [0.5] * 12
    assert steps["t"]["clamp"] is True
    again = tmp_path / "again.toml"
    again.write_text(out)
    (res2,) = run_recipe(again, output=tmp_path / "again.safetensors")
    assert res2.output.read_bytes() == res.output.read_bytes()


# --- elemental rules --------------------------------------------------------------------------------

def test_elemental_rules_end_to_end(tiny_sd1_paths, tmp_path: Path, capsys) -> None:
    a, b, _ = tiny_sd1_paths
    o = tmp_path / "e.safetensors"
    code, _, err = run_cli(["merge", a, b, "-o", o, "--dtype", "fp32", "-q",
                            "--alpha", "0.5; IN04-IN08:attn2:0, OUT:NOT attn:1"], capsys)
    assert code == 0, err
    ta, tb, to = _load(a), _load(b), _load(o)
    assert torch.equal(to[UNET_ATTN2], ta[UNET_ATTN2].float())  # the rule: A's
    assert torch.allclose(to[UNET_ATTN1], 0.5 * (ta[UNET_ATTN1].float() + tb[UNET_ATTN1].float()), atol=1e-6)
    assert torch.equal(to[UNET_OUT], tb[UNET_OUT].float())  # OUT, not attention: B's
    # blocks shows the value each tensor gets
    code, out, _ = run_cli(["blocks", a, "--alpha", "0.5; IN04-IN08:attn2:0, OUT:NOT attn:1"], capsys)
    lines = {ln.split()[-1]: ln for ln in out.splitlines()[1:]}
    assert "alpha=0 " in lines[UNET_ATTN2] + " " and "alpha=0.5" in lines[UNET_ATTN1] and "alpha=1" in lines[UNET_OUT]
    code, out, _ = run_cli(["blocks", a, "--json", "--method", "ties", "--param", "k=0.3; M00:proj:0.9"], capsys)
    rows = json.loads(out)["tensors"]
    assert {r["k"] for r in rows if r["block"] == "M00" and "proj" in r["key"]} == {0.9}
    assert {r["k"] for r in rows if r["block"] != "M00"} == {0.3}
    # a rule that matches nothing is an error naming it; nothing is written
    code, _, err = run_cli(["merge", a, b, "-o", tmp_path / "n.safetensors", "--alpha", "0.5; IN04:attn9:0"], capsys)
    assert code == 2 and "IN04:attn9:0" in err and "matches no tensor" in err
    assert not (tmp_path / "n.safetensors").exists()


# --- bad input ----------------------------------------------------------------------------------------

BAD = [
    (["--method", "slurp", "--alpha", "0.5"], "slurp"),
    (["--param", "zeta=1", "--alpha", "0.5"], "zeta"),
    (["--param", "k", "--alpha", "0.5"], "NAME=SPEC"),
    (["--method", "dare", "--param", "p=1"], "p"),
    (["--method", "ties", "--param", "k=1.5"], "k"),
    (["--method", "ties", "--param", "count_signs=0.5"], "count_signs"),
    (["--method", "dare", "--param", "seed=1.5"], "seed"),
    (["--alpha", "nan"], "not a finite number"),
    (["--alpha", "1e39"], "overflows float32"),
    (["--alpha", "0.5", "--param", "alpha=0.2"], "alpha"),
    (["--method", "triple_sum", "--alpha", "0.3", "+C"], "beta"),
    (["--method", "scaled_sum"], "--alpha"),
    (["--method", "add_difference", "--alpha", "0.5"], "needs 3 models"),
    (["--method", "model_stock"], "needs 3 or more"),
    (["--method", "n_average", "--param", "w1=1", "--param", "w2=-1"], "sum to 0"),
    (["--method", "difference", "--clamp"], "--clamp"),
]


@pytest.mark.parametrize("args,must_name", BAD, ids=[b[1] for b in BAD])
def test_bad_method_input_is_a_one_line_error(args, must_name, tiny_sd1_paths, tmp_path: Path, capsys) -> None:
    a, b, c = tiny_sd1_paths
    out = tmp_path / "o.safetensors"
    models = [a, b, c] if "+C" in args else [a, b]
    code, _, err = run_cli(["merge", *models, "-o", out, *(x for x in args if x != "+C")], capsys)
    assert code == 2
    assert must_name in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_non_finite_results_are_refused_or_counted(tiny_sd1_paths, tmp_path: Path, capsys) -> None:
    a, b, _ = tiny_sd1_paths
    out = tmp_path / "o.safetensors"
    code, _, err = run_cli(["merge", a, b, "-o", out, "--alpha", "IN04=1e6"], capsys)
    assert code == 2 and "non-finite" in err and "IN04" in err and "--allow-non-finite" in err
    assert not out.exists()
    code, _, err = run_cli(["merge", a, b, "-o", out, "--alpha", "IN04=1e6", "--allow-non-finite"], capsys)
    assert code == 0 and "non-finite" in err
    t = _load(out)
    bad = sum(int((~torch.isfinite(v)).sum()) for v in t.values() if v.dtype.is_floating_point)
    assert bad > 0 and str(bad) in err
    # a fine merge passes the same check
    assert run_cli(["merge", a, b, "-o", tmp_path / "ok.safetensors", "--alpha", "0.5", "-q"], capsys)[0] == 0


def test_methods_listing_covers_every_method(capsys) -> None:
    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0
    for name, m in METHODS.items():
        assert f"{name}  [" in out and m.formula in out
        for p in m.params:
            assert p.name in out


def test_n_average_and_sum_twice_by_block(tiny_sd1_paths, tmp_path: Path) -> None:
    a, b, c = tiny_sd1_paths
    r = merge([a, b, c], tmp_path / "n.safetensors", method="n_average", params={"w2": "2,OUT=0", "w3": 1},
              dtype="fp32")
    ta, tb, tc, to = _load(a), _load(b), _load(c), _load(r.output)
    k = UNET_ATTN2
    want = (ta[k].float() + 2 * tb[k].float() + tc[k].float()) / 4
    assert torch.allclose(to[k], want, atol=1e-6)
    k = UNET_OUT
    assert torch.allclose(to[k], (ta[k].float() + tc[k].float()) / 2, atol=1e-6)


def test_whole_tensor_merge_of_files_is_independent_of_threads(tiny_sd1_paths, tmp_path: Path) -> None:
    a, b, c = tiny_sd1_paths
    outs = [merge([a, b, c], tmp_path / f"t{t}.safetensors", method="dare_ties", params={"seed": 9}, threads=t).output
            for t in (1, 3)]
    assert outs[0].read_bytes() == outs[1].read_bytes()
    other = merge([a, b, c], tmp_path / "s.safetensors", method="dare_ties", params={"seed": 10}).output
    assert other.read_bytes() != outs[0].read_bytes()


def test_sweep_cli_custom_variant_of_any_method(tiny_sd1_paths, tmp_path: Path, capsys) -> None:
    a, b, _ = tiny_sd1_paths
    out = tmp_path / "sw"
    prompt = "a red circle\nSteps: 2, Sampler: Euler, CFG scale: 5, Size: 32x32"
    code, _, err = run_cli(["sweep", a, "--donor", b, "-o", out, "--prompt", prompt, "--seeds", "1",
                            "--custom", "s=0.5", "--method", "slerp", "--no-report", "-q"], capsys)
    assert code == 0, err
    res = json.loads((out / "sweep.json").read_text())
    (v,) = [v for v in res["variants"] if v["id"] == "custom:s"]
    assert v["params"]["method"] == "slerp"
    code, _, err = run_cli(["sweep", a, "--donor", b, "-o", tmp_path / "x", "--prompt", prompt,
                            "--custom", "s=0.5", "--method", "slerp", "--param", "k=1"], capsys)
    assert code == 2 and "k" in err


def test_sweep_cli_clamped_custom_variant(tiny_sd1_paths, tmp_path: Path, capsys) -> None:
    """``--clamp`` reaches the custom variants: recorded, and the images differ from the unclamped
    extrapolation's (α = 2 takes B's side twice over; clamped, it is B itself)."""
    a, b, _ = tiny_sd1_paths
    out = tmp_path / "sw"
    prompt = "a red circle\nSteps: 3, Sampler: Euler, CFG scale: 5, Size: 32x32"
    code, _, err = run_cli(["sweep", a, "--donor", b, "-o", out, "--prompt", prompt, "--seeds", "1",
                            "--custom", "free=2", "--no-report", "-q"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["sweep", a, "--donor", b, "-o", tmp_path / "cl", "--prompt", prompt, "--seeds", "1",
                            "--custom", "free=2", "--custom", "one=1", "--clamp", "--no-report", "-q"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "cl" / "sweep.json").read_text())
    (v,) = [v for v in res["variants"] if v["id"] == "custom:free"]
    assert v["params"]["clamp"] == "1"

    def image(folder: Path, vid: str) -> np.ndarray:
        (p,) = [p for p in folder.rglob("*.png") if vid.replace(":", "_") in str(p) or vid in str(p)]
        return np.asarray(Image.open(p), dtype=np.int16)

    clamped, unclamped, at_b = image(tmp_path / "cl", "custom:free"), image(out, "custom:free"), image(tmp_path / "cl", "custom:one")
    assert np.abs(clamped - unclamped).max() > 8
    assert np.abs(clamped - at_b).max() <= 1  # clamped to [A, B], α = 2 is B everywhere


def test_values_differ_by_block_in_the_written_file(tiny_sd1_paths, tmp_path: Path) -> None:
    """A per-block parameter other than α (TIES' density) really changes per block."""
    a, b, c = tiny_sd1_paths
    r = merge([a, b, c], tmp_path / "t.safetensors", method="ties", params={"k": "0.1,OUT=0.9"}, dtype="fp32")
    ta, to = _load(a), _load(r.output)
    frac_in = float((to[UNET_ATTN2] != ta[UNET_ATTN2].float()).float().mean())
    frac_out = float((to[UNET_OUT] != ta[UNET_OUT].float()).float().mean())
    assert frac_in < 0.25 < frac_out
    assert np.isclose(frac_in, 0.1, atol=0.1)


def test_unknown_method_in_library_call_is_a_clear_error(tiny_sd1_paths, tmp_path: Path) -> None:
    with pytest.raises(BlockmergeError, match="unknown method"):
        merge(tiny_sd1_paths[:2], tmp_path / "o.safetensors", method="nope", alpha=0.5)
