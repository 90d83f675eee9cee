"""Model families as data: a toy family defined here works end to end with no other change, and the
Flux.1 / SD3 families merge, list, compare and draw like the U-Nets do.

Merges are checked against an independent float64 computation from files loaded with the official
safetensors library, block by block with ComfyUI's rule (``_comfy``), never against blockmerge's
own block mapping.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from _comfy import comfy_args, comfy_ratio_name, our_id_for_comfy_arg
from blockmerge.architectures import (
    BASE,
    FLUX,
    SD3,
    UNET_PREFIX,
    Architecture,
    Component,
    KeyRule,
    ListForm,
    Sentinels,
    by_name,
    detect,
    register,
    unregister,
)
from blockmerge.architectures.layout import stack_layout
from blockmerge.architectures.synthetic import layout, write_synthetic
from blockmerge.cli import main
from blockmerge.compare import compare, heatmap_svg
from blockmerge.errors import WeightSpecError
from blockmerge.inspect import block_table
from blockmerge.merge import load_presets, merge, parse_weights

# ---------------------------------------------------------------------------------------------
# a toy family, defined only here
# ---------------------------------------------------------------------------------------------

TOY_PREFIX = "toy.net."
TOY_BLOCKS = ("STEM", "L00", "L01", "L02", "L03", "HEAD")


def _toy_state_dict(size: str, variant: str | None = None) -> dict[str, torch.Tensor]:
    """A small residual MLP and an embedding 'text encoder', built on the meta device."""
    w = 8 if size == "tiny" else 64
    with torch.device("meta"):
        net = torch.nn.ModuleDict({
            "stem": torch.nn.Linear(4, w),
            "layers": torch.nn.ModuleList([torch.nn.Sequential(torch.nn.LayerNorm(w), torch.nn.Linear(w, w))
                                           for _ in range(4)]),
            "head": torch.nn.Linear(w, 4),
        })
        text = torch.nn.Embedding(16, w)
    out = {TOY_PREFIX + k: v for k, v in net.state_dict().items()}
    out.update({"toy.text." + k: v for k, v in text.state_dict().items()})
    return out


TOY = Architecture(
    name="TOY",
    title="Toy residual MLP",
    block_ids=TOY_BLOCKS,
    components=(Component("TEXT", "toy.text."),),
    diffusion_prefixes=(TOY_PREFIX,),
    diffusion_name="NET",
    rules=(KeyRule(r"stem\.", "STEM"), KeyRule(r"layers\.(\d+)\.", "L{0:02d}"), KeyRule(r"head\.", "HEAD")),
    sentinels=Sentinels(keys=(TOY_PREFIX + "stem.weight",), counts=((TOY_PREFIX + "layers.", 4),)),
    list_forms=(ListForm(TOY_BLOCKS, "blocks"), ListForm((BASE, *TOY_BLOCKS), "BASE first")),
    groups={"L": ("L00", "L01", "L02", "L03")},
    layout=stack_layout([("STEM", "L00", "L01"), ("L02", "L03", "HEAD")]),
    synthetic=_toy_state_dict,
)


@pytest.fixture()
def toy():
    register(TOY)
    try:
        yield TOY
    finally:
        unregister(TOY)


def test_toy_family_merges_lists_compares_and_draws_with_no_other_change(toy, tmp_path: Path, capsys) -> None:
    a = write_synthetic(tmp_path / "a.safetensors", "TOY", seed=1, dtype=torch.float32)
    b = write_synthetic(tmp_path / "b.safetensors", "TOY", seed=2, dtype=torch.float32)
    assert detect(load_file(a).keys()) is toy
    # merge: only L01 and the text encoder (BASE) move, each by its own weight
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(a), str(b), "-o", str(out), "--alpha", "L01=0.25", "--base-alpha", "0.5",
                 "--dtype", "fp32", "-q"]) == 0
    ta, tb, tm = load_file(a), load_file(b), load_file(out)
    for k in ta:
        block = "L01" if k.startswith(TOY_PREFIX + "layers.1.") else (BASE if k.startswith("toy.text.") else None)
        w = {"L01": 0.25, BASE: 0.5}.get(block, 0.0)
        want = (1 - w) * ta[k].double() + w * tb[k].double()
        assert torch.allclose(tm[k].double(), want, atol=1e-7), k
        assert torch.equal(tm[k], ta[k]) == (w == 0), k
    # blocks: one row per id, counted from the real keys
    name, rows, comps = block_table(a)
    assert name == "TOY" and [r.block for r in rows] == ["BASE", *TOY_BLOCKS]
    assert {r.block: r.tensors for r in rows} == {"BASE": 1, "STEM": 2, "L00": 4, "L01": 4, "L02": 4, "L03": 4, "HEAD": 2}
    assert [c.block for c in comps] == ["TEXT"]
    assert main(["blocks", str(a), "--json"]) == 0
    assert [r["block"] for r in json.loads(capsys.readouterr().out)["blocks"]] == ["BASE", *TOY_BLOCKS]
    # compare and the heat map in the toy's own (stack) layout
    r = compare(a, out, threads=1)
    assert r.architecture == "TOY" and r.group("L00").rel_distance == 0 and r.group("L01").rel_distance > 0
    svg = heatmap_svg(r)
    assert set(re.findall(r'data-block="([^"]+)"', svg)) == set(TOY_BLOCKS)
    x_of = {b: float(re.search(rf'data-block="{b}" x="([\d.]+)"', svg).group(1)) for b in TOY_BLOCKS}
    assert x_of["STEM"] == x_of["L01"] < x_of["L02"] == x_of["HEAD"]  # two columns, in execution order
    assert "execution order" in svg
    # weight specs read the toy's groups and list forms
    w = parse_weights("0.1,L=0.7", toy)
    assert [w[b] for b in TOY_BLOCKS] == [0.1, 0.7, 0.7, 0.7, 0.7, 0.1]
    assert parse_weights("0.9,1,2,3,4,5,6", toy)[BASE] == 0.9
    with pytest.raises(WeightSpecError, match="TOY needs 1, 6 \\(blocks\\) or 7 \\(BASE first\\)"):
        parse_weights("1,2,3", toy)
    # and synthetic files through the CLI
    assert main(["synthetic", str(tmp_path / "s.safetensors"), "--arch", "toy", "-q"]) == 0
    assert detect(load_file(tmp_path / "s.safetensors").keys()) is toy


def test_unregistered_toy_is_unknown_again(tmp_path: Path) -> None:
    register(TOY)
    try:
        p = write_synthetic(tmp_path / "a.safetensors", "TOY", seed=1)
    finally:
        unregister(TOY)
    assert main(["blocks", str(p)]) == 2


# ---------------------------------------------------------------------------------------------
# Flux.1
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("flux")
    return tuple(write_synthetic(d / f"flux_{s}.safetensors", "FLUX", seed=s, dtype=torch.float16) for s in (1, 2, 3))


FLUX_61 = [round(0.01 * i, 2) for i in range(61)]  # CLIP, T5, IN, D00..D18, S00..S37, OUT


def _flux_expected_weight(key: str, weights61: list[float], base: float) -> float:
    """The α of a key, by supermerger's 61-value order and ComfyUI's prefix rule (independent of blockmerge)."""
    if key.startswith("text_encoders.clip_l."):
        return weights61[0]
    if key.startswith("text_encoders.t5xxl."):
        return weights61[1]
    if not key.startswith(UNET_PREFIX):
        return base
    order = ["IN", *[f"D{i:02d}" for i in range(19)], *[f"S{i:02d}" for i in range(38)], "OUT"]
    block = our_id_for_comfy_arg(comfy_ratio_name(key[len(UNET_PREFIX):], comfy_args("FLUX")))
    return weights61[2 + order.index(block)]


def _fp16_close(got: torch.Tensor, want64: torch.Tensor) -> bool:
    want = want64.to(torch.float16).double()
    return bool(((got.double() - want).abs() <= want.abs() * 2**-10 + 2**-24).all())


def test_flux_61_value_list_against_float64_reference(flux_pair, tmp_path: Path) -> None:
    a, b, _ = flux_pair
    out = tmp_path / "m.safetensors"
    res = merge([a, b], out, alpha=",".join(map(str, FLUX_61)), base_alpha=0.9, threads=2)
    assert res.architecture == "FLUX"
    ta, tb, tm = load_file(a), load_file(b), load_file(out)
    assert set(tm) == set(ta)
    for k in ta:
        w = _flux_expected_weight(k, FLUX_61, 0.9)
        want = (1 - w) * ta[k].double() + w * tb[k].double()
        assert _fp16_close(tm[k], want), k


@pytest.mark.parametrize("block", ["IN", "D00", "D07", "D18", "S00", "S21", "S37", "OUT"])
def test_one_flux_block_lands_where_comfyui_puts_it(flux_pair, tmp_path: Path, block: str) -> None:
    a, b, _ = flux_pair
    out = tmp_path / "m.safetensors"
    merge([a, b], out, alpha=f"{block}=0.3", threads=1)
    ta, tb, tm = load_file(a), load_file(b), load_file(out)
    changed = {k for k in ta if not torch.equal(tm[k], ta[k])}
    comfy = {k for k in ta if k.startswith(UNET_PREFIX)
             and our_id_for_comfy_arg(comfy_ratio_name(k[len(UNET_PREFIX):], comfy_args("FLUX"))) == block}
    assert changed == comfy
    for k in comfy:
        assert _fp16_close(tm[k], 0.7 * ta[k].double() + 0.3 * tb[k].double()), k


@pytest.mark.parametrize("block", ["IN", "J00", "J13", "J23", "OUT"])
def test_one_sd3_block_lands_where_comfyui_puts_it(tmp_path: Path, block: str) -> None:
    a, b = (write_synthetic(tmp_path / f"sd3_{s}.safetensors", "SD3", seed=s, variant="sd3.5-medium") for s in (1, 2))
    out = tmp_path / "m.safetensors"
    merge([a, b], out, alpha=f"{block}=0.6", threads=1)
    ta, tm = load_file(a), load_file(out)
    changed = {k for k in ta if not torch.equal(tm[k], ta[k])}
    comfy = {k for k in ta if k.startswith(UNET_PREFIX)
             and our_id_for_comfy_arg(comfy_ratio_name(k[len(UNET_PREFIX):], comfy_args("SD3"))) == block}
    assert changed == comfy and comfy


def test_bare_flux_release_merges_key_by_key_with_a_comfyui_checkpoint(tmp_path: Path) -> None:
    """BFL's file (bare names, transformer only) and a full ComfyUI-style checkpoint name the same
    tensors differently; blockmerge matches them and writes the prefixed (checkpoint) names."""
    full = write_synthetic(tmp_path / "full.safetensors", "FLUX", seed=1)
    bare = write_synthetic(tmp_path / "bare.safetensors", "FLUX", seed=2, parts="model", bare=True)
    tb = load_file(bare)
    assert not any(k.startswith(UNET_PREFIX) for k in tb)
    out = tmp_path / "m.safetensors"
    res = merge([full, bare], out, alpha=0.5, threads=1)
    assert res.report.only_in_others == []
    tf, tm = load_file(full), load_file(out)
    assert set(tm) == set(tf)
    for k in tf:
        if k.startswith(UNET_PREFIX):
            assert _fp16_close(tm[k], 0.5 * tf[k].double() + 0.5 * tb[k[len(UNET_PREFIX):]].double()), k
        else:  # text encoders and VAE only A has
            assert torch.equal(tm[k], tf[k]), k


def test_dev_and_schnell_merge_with_a_warning(tmp_path: Path) -> None:
    dev = write_synthetic(tmp_path / "dev.safetensors", "FLUX", seed=1, variant="dev")
    schnell = write_synthetic(tmp_path / "schnell.safetensors", "FLUX", seed=2, variant="schnell")
    res = merge([dev, schnell], tmp_path / "m.safetensors", alpha=0.5, threads=1)
    assert any("Flux.1 dev" in w and "Flux.1 schnell" in w for w in res.report.warnings)
    tm, td = load_file(tmp_path / "m.safetensors"), load_file(dev)
    g = UNET_PREFIX + "guidance_in.in_layer.weight"
    assert torch.equal(tm[g], td[g])  # only dev has guidance_in: kept from A


def test_flux_with_an_sdxl_file_names_both_families(flux_pair, tiny_sdxl_paths, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.safetensors"
    rc = main(["merge", str(flux_pair[0]), str(tiny_sdxl_paths[0]), "-o", str(out), "--alpha", "0.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "Flux.1" in err and "Stable Diffusion XL" in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))
    assert main(["compare", str(tiny_sdxl_paths[0]), str(flux_pair[0])]) == 2


def test_sd3_medium_and_sd35_medium_do_not_merge_silently(tmp_path: Path, capsys) -> None:
    a = write_synthetic(tmp_path / "sd3.safetensors", "SD3", seed=1, variant="sd3-medium")
    b = write_synthetic(tmp_path / "sd35.safetensors", "SD3", seed=2, variant="sd3.5-medium")
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "m.safetensors"), "--alpha", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "shape mismatch" in err and "Stable Diffusion 3 Medium" in err and "Stable Diffusion 3.5 Medium" in err


# ---------------------------------------------------------------------------------------------
# weight specifications per family
# ---------------------------------------------------------------------------------------------


def test_flux_list_forms() -> None:
    ids = FLUX.block_ids
    w59 = parse_weights(list(range(59)), FLUX, base=0.5)
    assert [w59[b] for b in ids] == list(range(59)) and [w59[b] for b in FLUX.base_ids] == [0.5, 0.5, 0.5]
    w60 = parse_weights([9.0, *range(59)], FLUX)
    assert [w60[b] for b in FLUX.base_ids] == [9.0, 9.0, 9.0]  # BASE first covers CLIP and T5 too
    w61 = parse_weights(FLUX_61, FLUX, keep_a=0.0)
    assert w61["CLIP"] == 0.0 and w61["T5"] == 0.01 and w61["IN"] == 0.02 and w61["D00"] == 0.03
    assert w61["S00"] == FLUX_61[2 + 1 + 19] and w61["OUT"] == FLUX_61[60] and w61[BASE] == 0.0
    with pytest.raises(WeightSpecError, match="FLUX needs 1, 59 \\(blocks\\), 60 \\(BASE first\\) or 61"):
        parse_weights([0.5] * 25, FLUX)
    with pytest.raises(WeightSpecError, match="BASE first"):
        parse_weights([0.5] * 60, FLUX, base=0.1)


def test_flux_readable_form_groups_and_components() -> None:
    w = parse_weights("0.2,D=1,S05-S07=0.5,T5=0,BASE=0.3", FLUX)
    assert all(w[f"D{i:02d}"] == 1 for i in range(19))
    assert [w[f"S{i:02d}"] for i in range(4, 9)] == [0.2, 0.5, 0.5, 0.5, 0.2]
    assert w["IN"] == w["OUT"] == 0.2
    assert w[BASE] == 0.3 and w["CLIP"] == 0.3 and w["T5"] == 0.3  # BASE (later) covers the components
    w = parse_weights("BASE=0.3,T5=0,d4=0.9", FLUX)
    assert w["T5"] == 0 and w["CLIP"] == 0.3 and w["D04"] == 0.9
    with pytest.raises(WeightSpecError, match="unknown block 'D19'"):
        parse_weights("D19=1", FLUX)
    with pytest.raises(WeightSpecError, match="must go forward"):
        parse_weights("S03-D02=1", FLUX)
    with pytest.raises(WeightSpecError, match="must go forward"):
        parse_weights("CLIP-D02=1", FLUX)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-2, 2, allow_nan=False).map(lambda x: round(x, 4)), min_size=61, max_size=61),
       st.sampled_from(["FLUX", "SD3", "SD35L", "SD1", "SDXL"]))
def test_any_list_round_trips_through_the_readable_form(values: list[float], name: str) -> None:
    arch = by_name(name)
    vals = values[: arch.n_blocks]
    w = parse_weights(vals, arch, base=values[-1])
    text = ",".join(f"{b}={w[b]}" for b in arch.all_ids)
    assert parse_weights(text, arch).as_dict() == w.as_dict()
    assert [w[b] for b in arch.block_ids] == vals


def test_presets_apply_by_family(tmp_path: Path) -> None:
    f = tmp_path / "p.tsv"
    f.write_text("FLUXALL\t" + ",".join(["1"] * 61) + "\nSD3MID\t" + ",".join(["0"] * 12 + ["1"] * 2 + ["0"] * 12) + "\n")
    book = load_presets([f])
    w = parse_weights("FLUXALL", FLUX, presets=book)
    assert all(v == 1 for k, v in w.as_dict().items() if k != BASE) and w[BASE] == 0
    w = parse_weights("SD3MID", SD3, presets=book)
    assert w["J11"] == 1 and w["J12"] == 1 and w["J13"] == 0 and w[BASE] == 0
    with pytest.raises(WeightSpecError, match="GRAD_V has 25 values and is not for FLUX .* it is for SD1/SD2"):
        parse_weights("GRAD_V", FLUX, presets=book)
    bad = tmp_path / "bad.tsv"
    bad.write_text("X\t1,2,3\n")
    with pytest.raises(WeightSpecError, match="59/60/61 for FLUX"):
        load_presets([bad])


# ---------------------------------------------------------------------------------------------
# blocks, info, compare and heat maps for the new families
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "variant", "title"), [
    ("FLUX", "dev", "Flux.1 dev"), ("FLUX", "schnell", "Flux.1 schnell"), ("SD3", "sd3-medium", "Stable Diffusion 3 Medium"),
    ("SD3", "sd3.5-medium", "Stable Diffusion 3.5 Medium"), ("SD35L", None, "Stable Diffusion 3.5 Large"),
])
def test_blocks_and_info_commands(tmp_path: Path, capsys, arch: str, variant: str | None, title: str) -> None:
    p = write_synthetic(tmp_path / "m.safetensors", arch, seed=1, variant=variant, dtype=torch.bfloat16)
    assert main(["blocks", str(p), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    fam = by_name(arch)
    assert data["architecture"] == arch and [r["block"] for r in data["blocks"]] == list(fam.all_ids)
    keys = [k for k, _, _ in layout(arch, "tiny", variant=variant)]
    assert sum(r["tensors"] for r in data["blocks"]) == len(keys)
    assert all(r["tensors"] > 0 for r in data["blocks"] if r["block"] in fam.block_ids)
    assert main(["info", str(p), "--json", "--no-hash"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["title"] == title and info["prediction"].startswith("flow matching")
    assert info["dtypes"] == {"bfloat16": info["parameters"]}


def test_compare_and_heat_map_in_execution_order(flux_pair, tmp_path: Path) -> None:
    a, b, _ = flux_pair
    m = tmp_path / "m.safetensors"
    merge([a, b], m, alpha="S=1", threads=1)
    r = compare(a, m, threads=1)
    assert r.group("D05").rel_distance == 0 and r.group("S05").rel_distance > 0 and r.group("CLIP").rel_distance == 0
    svg = tmp_path / "map.svg"
    assert main(["compare", str(a), str(m), "--svg", str(svg)]) == 0
    text = svg.read_text()
    assert set(re.findall(r'data-block="([^"]+)"', text)) == set(FLUX.block_ids)
    assert set(re.findall(r'data-extra="([^"]+)"', text)) == {"CLIP", "T5", "VAE"}
    pos = {bid: (float(x), float(y)) for bid, x, y in re.findall(r'data-block="([^"]+)" x="([\d.]+)" y="([\d.]+)"', text)}
    order = list(FLUX.block_ids)
    # reading down each column and then the next column gives the execution order
    assert sorted(order, key=lambda bid: (pos[bid][0], pos[bid][1])) == order


def test_sd3_model_sampling_buffer_is_copied_not_merged(tmp_path: Path) -> None:
    a, b = (write_synthetic(tmp_path / f"{s}.safetensors", "SD3", seed=s, variant="sd3-medium") for s in (1, 2))
    out = tmp_path / "m.safetensors"
    merge([a, b], out, alpha=0.5, dtype="fp16", threads=1)
    key = "model.model_sampling.sigmas"
    ta, tm = load_file(a), load_file(out)
    assert torch.equal(tm[key], ta[key]) and tm[key].dtype == ta[key].dtype


# ---------------------------------------------------------------------------------------------
# dtypes: bf16 and fp8 in and out, math in fp32, fp8 clamped and counted
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16])
def test_narrow_dtypes_round_trip_and_merge_in_fp32(tmp_path: Path, dtype: torch.dtype) -> None:
    name = {torch.float8_e4m3fn: "fp8_e4m3fn", torch.float8_e5m2: "fp8_e5m2", torch.bfloat16: "bf16"}[dtype]
    a = write_synthetic(tmp_path / "a.safetensors", "FLUX", seed=1, dtype=dtype, parts="model")
    b = write_synthetic(tmp_path / "b.safetensors", "FLUX", seed=2, dtype=dtype, parts="model")
    ta, tb = load_file(a), load_file(b)
    assert {t.dtype for t in ta.values()} == {dtype}
    # the official library writes the same bytes for the same tensors (our reader and writer agree)
    save_file(ta, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert load_file(tmp_path / "ref.safetensors").keys() == ta.keys()
    # alpha 0 copies A byte for byte
    same = tmp_path / "same.safetensors"
    merge([a, b], same, alpha=0, dtype=name, threads=1)
    ts = load_file(same)
    assert all(torch.equal(ts[k].view(torch.uint8), ta[k].view(torch.uint8)) for k in ta)
    # a real merge: fp32 arithmetic, one rounding to the storage dtype at the end
    out = tmp_path / "m.safetensors"
    merge([a, b], out, alpha=0.3, dtype=name, threads=2)
    tm = load_file(out)
    mant, tiny = {torch.float8_e4m3fn: (3, 2.0**-9), torch.float8_e5m2: (2, 2.0**-16), torch.bfloat16: (7, 2.0**-133)}[dtype]
    exact = total = 0
    for k in ta:
        want64 = 0.7 * ta[k].double() + 0.3 * tb[k].double()
        got = tm[k].double()
        assert tm[k].dtype == dtype
        # within one step of the storage format at the value's magnitude plus float32's rounding of
        # the inputs' products (fp32 vs fp64 arithmetic may round a tie, or a cancellation, the other
        # way), and mostly the correctly rounded value itself
        fp32_err = (0.7 * ta[k].double().abs() + 0.3 * tb[k].double().abs()) * 2.0**-22
        assert bool(((got - want64).abs() <= want64.abs() * 2.0**-mant + fp32_err + tiny).all()), k
        exact += int((tm[k] == want64.to(dtype)).sum())
        total += tm[k].numel()
    assert exact / total > 0.95  # the rest are ties of the 3-bit mantissa, rounded the other way


@pytest.mark.parametrize(("name", "limit"), [("fp8_e4m3fn", 448.0), ("fp8_e5m2", 57344.0)])
def test_fp8_output_clamps_to_the_range_and_says_how_often(tmp_path: Path, capsys, name: str, limit: float) -> None:
    a = write_synthetic(tmp_path / "a.safetensors", "FLUX", seed=1, dtype=torch.float32, parts="model")
    t = load_file(a)
    key = UNET_PREFIX + "double_blocks.3.img_mlp.0.weight"
    big = t[key].clone()
    big.view(-1)[:7] = torch.tensor([1e5, -1e5, 3 * limit, -2 * limit, math.inf, limit, -limit])
    t[key] = big
    save_file(t, tmp_path / "big.safetensors")
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(tmp_path / "big.safetensors"), "-o", str(out), "--method", "scaled_sum",
                 "--alpha", "D03=1", "--dtype", name, "-q"]) == 0
    err = capsys.readouterr().err
    assert re.search(rf"warning: 5 values were beyond the {name} range and were clamped to ±{limit:g}", err), err
    got = load_file(out)[key].float().view(-1)[:7]
    assert got.tolist() == [limit, -limit, limit, -limit, limit, limit, -limit]
    assert not torch.isinf(load_file(out)[key].float()).any()
    # a recipe writes fp8 the same way, with the same warning
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[inputs]\nA = "big.safetensors"\n\n[[steps]]\nmethod = "scaled_sum"\nmodels = ["A"]\n'
                      f'alpha = "D03=1"\n\n[[outputs]]\npath = "r.safetensors"\ndtype = "{name}"\n')
    assert main(["run", str(recipe), "-q"]) == 0
    err = capsys.readouterr().err
    assert re.search(rf"warning: 5 values were beyond the {name} range", err), err
    assert torch.equal(load_file(tmp_path / "r.safetensors")[key], load_file(out)[key])


def test_report_of_a_flux_sweep_reads_in_execution_order(tmp_path: Path) -> None:
    """The sweep report takes its grid from the family's layout: Flux's 59 blocks in three columns
    in execution order (no Flux sweep can run yet; the report of one is laid out from the data)."""
    from blockmerge.experiments.report import write_report
    from test_report import make_sweep

    res = make_sweep(tmp_path / "sweep", "FLUX", list(FLUX.block_ids), prompts=1, seeds=[1])
    html = write_report(tmp_path / "report", res).read_text()
    assert "grid-template-columns:repeat(3," in html
    found = re.findall(r'data-block="([^"]+)"[^>]*style="grid-row:(\d+);grid-column:(\d+)', html)
    cells = {b: (int(r), int(c)) for b, r, c in found}
    assert {b: cells[b] for b in FLUX.block_ids} == dict(FLUX.layout.positions)
    assert cells["IN"] == (2, 1) and cells["D18"] == (21, 1) and cells["S00"] == (2, 2) and cells["OUT"] == (21, 3)
    svgs = list((tmp_path / "report").rglob("*.svg"))
    assert svgs and all("execution order" in p.read_text() for p in svgs)


def test_flux_recipe_streams_the_same_tensors_as_step_by_step_merges(flux_pair, tmp_path: Path) -> None:
    """A two-step Flux recipe (61-value list, then add difference) equals the same merges made one
    file at a time, tensor for tensor."""
    a, b, c = flux_pair
    w61 = ",".join(map(str, FLUX_61))
    (tmp_path / "r.toml").write_text(f"""
version = 1
[inputs]
A = "{a}"
B = "{b}"
C = "{c}"
[[steps]]
name = "ab"
models = ["A", "B"]
alpha = "{w61}"
[[steps]]
name = "plus"
method = "add_difference"
models = ["ab", "A", "C"]
alpha = "0.2,D=0.5,CLIP=0"
[[outputs]]
path = "{tmp_path / 'recipe.safetensors'}"
dtype = "fp32"
""")
    assert main(["run", str(tmp_path / "r.toml"), "-q"]) == 0
    merge([a, b], tmp_path / "ab.safetensors", alpha=w61, dtype="fp32", threads=1)
    merge([tmp_path / "ab.safetensors", a, c], tmp_path / "plus.safetensors", method="add_difference",
          alpha="0.2,D=0.5,CLIP=0", dtype="fp32", threads=1)
    got, want = load_file(tmp_path / "recipe.safetensors"), load_file(tmp_path / "plus.safetensors")
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_generation_refuses_flux_and_sd3_clearly(flux_pair, tmp_path: Path, capsys) -> None:
    bare = write_synthetic(tmp_path / "bare.safetensors", "FLUX", seed=1, parts="model", bare=True)
    for model in (flux_pair[0], bare):
        assert main(["generate", str(model), "-o", str(tmp_path / "out"), "--prompt", "x", "-q"]) == 2
        err = capsys.readouterr().err
        assert "is Flux.1; blockmerge generates with SD1.x, SD2.x and SDXL models only" in err and "Traceback" not in err
