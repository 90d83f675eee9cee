"""``blockmerge import-mecha``: sd-mecha recipes (as sd-mecha itself writes them) become blockmerge
recipes with the same formulas; what has no equivalent is a clear error naming it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import sd_mecha  # the test extra installs it: the format's own writer and reader
import torch
from safetensors.torch import load_file

from blockmerge.architectures import SD1
from blockmerge.cli import main
from blockmerge.merge import merge
from blockmerge.merge.weights import parse_weights
from blockmerge.recipes import RecipeError
from blockmerge.recipes.mecha import mecha_to_toml


def _models(*paths):
    return [sd_mecha.model(str(p), "sd1-ldm") for p in paths]


def _ser(recipe) -> str:
    text = sd_mecha.serialize(recipe, finalize=False)
    sd_mecha.deserialize(text)  # sd-mecha reads it back: it is a real .mecha text
    return text


def _import(text: str) -> dict:
    toml, _ = mecha_to_toml(text, "r.mecha")
    return tomllib.loads(toml)


def test_weighted_sum_with_block_weights_keeps_sd_mechas_defaults_and_block_rule(tiny_sd1_paths) -> None:
    a, b = _models(*tiny_sd1_paths[:2])
    blocks = sd_mecha.literal({"BASE": 0.2, "IN04": 0.7, "OUT00": 1.0}, "sd1-supermerger_blocks")
    text = _ser(sd_mecha.weighted_sum(a, b, alpha=sd_mecha.convert(blocks, "sd1-ldm")))
    data = _import(text)
    (step,) = data["steps"]
    assert step["method"] == "weighted_sum" and data["architecture"] == "SD1"
    w = parse_weights(step["alpha"], SD1)
    assert w["BASE"] == 0.2 and w["IN04"] == 0.7 and w["OUT00"] == 1.0
    assert w["IN05"] == 0.5 and w["M00"] == 0.5  # sd-mecha's default alpha for blocks the literal leaves out
    # sd-mecha files time_embed under BASE; blockmerge (Merge Block Weighted) under IN00: a rule fixes it
    assert w.value("model.diffusion_model.time_embed.0.weight", "IN00") == 0.2
    assert w.value("model.diffusion_model.input_blocks.0.0.weight", "IN00") == 0.5


def test_add_difference_and_clamp_and_fallback(tiny_sd1_paths, tmp_path: Path) -> None:
    a, b, c = _models(*tiny_sd1_paths)
    text = _ser(sd_mecha.add_difference(a, b, c, alpha=0.4, clamp_to_ab=True))
    data = _import(text)
    (step,) = data["steps"]
    assert step["method"] == "add_difference" and step["alpha"] == 0.4 and step["clamp"] is True
    assert [data["inputs"][m]["path"] for m in step["models"]] == [str(p) for p in tiny_sd1_paths]
    # and it runs: the same as blockmerge's own clamped add difference
    rec = tmp_path / "r.toml"
    rec.write_text(mecha_to_toml(text, "r.mecha")[0])
    assert main(["run", str(rec), "-o", str(tmp_path / "o.safetensors"), "-q"]) == 0
    own = merge(list(tiny_sd1_paths), tmp_path / "own.safetensors", method="add_difference", alpha=0.4, clamp=True)
    x, y = load_file(str(tmp_path / "o.safetensors")), load_file(str(own.output))
    assert all(torch.equal(x[k], y[k]) for k in y)


def test_methods_with_the_same_formula_import(tiny_sd1_paths) -> None:
    a, b, c = _models(*tiny_sd1_paths)
    cases = {
        "slerp": sd_mecha.slerp(a, b, alpha=0.3),
        "geometric_sum": sd_mecha.geometric_sum(a, b, alpha=0.6),
        "n_average": sd_mecha.n_average(a, b, c),
        "geometric_median": sd_mecha.geometric_median(a, b, c, maxiter=50),
        "difference": sd_mecha.subtract(b, c),
    }
    for method, recipe in cases.items():
        (step,) = _import(_ser(recipe))["steps"]
        assert step["method"] == method, method
    gm = _import(_ser(cases["geometric_median"]))["steps"][0]
    assert gm["params"]["maxiter"] == 50 and gm["params"]["eps"] == 1e-6


PERPENDICULAR = """version 0.1.0
model "{a}" model_config="sd1-ldm" merge_space="weight"
model "{b}" model_config="sd1-ldm" merge_space="weight"
model "{c}" model_config="sd1-ldm" merge_space="weight"
merge "subtract" &0 &2
merge "subtract" &1 &2
merge "perpendicular_component" &3 &4
dict key=0.7
literal &6 model_config="singleton-mecha" merge_space=null
merge "convert_singleton" &7
merge "add_difference" &0 &5 &8"""

TIES = """version 0.1.0
model "{a}" model_config="sd1-ldm" merge_space="weight"
model "{b}" model_config="sd1-ldm" merge_space="weight"
model "{c}" model_config="sd1-ldm" merge_space="weight"
merge "subtract" &1 &0
merge "subtract" &2 &0
dict key=0.3
literal &5 model_config="singleton-mecha" merge_space=null
merge "convert_singleton" &6
merge "ties_sum" &3 &4 k=&7
merge "add_difference" &0 &8 0.8
merge "fallback" &9 &0"""


def test_compositions_become_single_methods(tiny_sd1_paths) -> None:
    a, b, c = (str(p) for p in tiny_sd1_paths)
    text = PERPENDICULAR.format(a=a, b=b, c=c)
    sd_mecha.deserialize(text)
    (step,) = _import(text)["steps"]
    assert step["method"] == "add_perpendicular" and step["alpha"] == 0.7 and len(step["models"]) == 3
    text = TIES.format(a=a, b=b, c=c)
    sd_mecha.deserialize(text)
    toml, warnings = mecha_to_toml(text, "t.mecha")
    (step,) = tomllib.loads(toml)["steps"]
    assert step["method"] == "ties" and step["alpha"] == 0.8
    assert step["params"] == {"k": 0.3, "count_signs": 1}  # sd-mecha's vote_sgn=false elects by count
    assert any("one more element" in w for w in warnings)


@pytest.mark.parametrize("method", ["add_cosine_a", "model_stock", "crossover"])
def test_methods_without_an_equivalent_are_errors_naming_them(method, tiny_sd1_paths) -> None:
    a, b = (str(p) for p in tiny_sd1_paths[:2])
    text = (f'version 0.1.0\nmodel "{a}" model_config="sd1-ldm" merge_space="weight"\n'
            f'model "{b}" model_config="sd1-ldm" merge_space="weight"\nmerge "{method}" &0 &1')
    with pytest.raises(RecipeError, match=method):
        mecha_to_toml(text, "x.mecha")


@pytest.mark.parametrize("text,message", [
    ("version 9\n", "line 1"),
    ('version 0.1.0\nmodel "a.safetensors\n', "quotes"),
    ("version 0.1.0\nmerge \"weighted_sum\" &3 &4\n", "&3"),
    ("version 0.1.0\nfrobnicate 1\n", "frobnicate"),
    ('version 0.1.0\nmodel "a.safetensors" model_config="flux-flux" merge_space="weight"\n'
     'merge "weighted_sum" &0 &0\n', "flux-flux"),
])
def test_bad_mecha_text(text, message) -> None:
    with pytest.raises(RecipeError, match=message):
        mecha_to_toml(text, "x.mecha")


def test_import_mecha_command(tiny_sd1_paths, tmp_path: Path, capsys) -> None:
    a, b = _models(*tiny_sd1_paths[:2])
    src = tmp_path / "r.mecha"
    src.write_text(_ser(sd_mecha.weighted_sum(a, b, alpha=0.25)))
    out = tmp_path / "r.toml"
    assert main(["import-mecha", str(src), "-o", str(out), "--model-output", "merged.safetensors"]) == 0
    spec = tomllib.loads(out.read_text())
    assert spec["outputs"][0]["path"] == "merged.safetensors"
    assert main(["run", str(out), "-q"]) == 0
    assert (tmp_path / "merged.safetensors").is_file()
    assert main(["import-mecha", str(src)]) == 0  # to stdout
    assert "weighted_sum" in capsys.readouterr().out
    bad = tmp_path / "bad.mecha"
    bad.write_text('version 0.1.0\nmodel "x" model_config="sd1-ldm" merge_space="weight"\nmerge "rotate" &0 &0\n')
    assert main(["import-mecha", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "rotate" in err and len(err.strip().splitlines()) == 1
