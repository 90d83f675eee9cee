"""compare on tiny SD1 / SDXL checkpoints with real key layouts, against a direct float64
computation over whole tensors loaded with the official safetensors library."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blockmerge.architectures import SD1, SDXL, Architecture
from blockmerge.cli import main
from blockmerge.compare import compare, format_table, heatmap_svg
from blockmerge.errors import BlockmergeError
from blockmerge.merge import merge

UNET = "model.diffusion_model."


def group_of(arch: Architecture, key: str) -> str:
    """Written independently of blockmerge's mapping: the MBW rule by regex, components by prefix."""
    if key.startswith(UNET):
        rest = key[len(UNET):]
        if rest.startswith(("time_embed.", "label_emb.")):
            return "IN00"
        if rest.startswith("out."):
            return f"OUT{arch.n_out - 1:02d}"
        if rest.startswith("middle_block."):
            return "M00"
        m = re.match(r"(input|output)_blocks\.(\d+)\.", rest)
        assert m, key
        return f"{'IN' if m.group(1) == 'input' else 'OUT'}{int(m.group(2)):02d}"
    if key.startswith("first_stage_model."):
        return "VAE"
    if key.startswith("cond_stage_model."):
        return "TE"
    if key.startswith("conditioner.embedders.0."):
        return "TE1"
    if key.startswith("conditioner.embedders.1."):
        return "TE2"
    return "OTHER"


def direct(arch: Architecture, a: Path, b: Path, c: Path | None = None) -> dict[str, dict[str, float]]:
    """Per group: the metrics from whole groups concatenated into float64 vectors."""
    ta, tb = load_file(a), load_file(b)
    tc = load_file(c) if c else None
    vecs: dict[str, list[list[torch.Tensor]]] = {}
    for k in sorted(ta):
        if not ta[k].is_floating_point() or k.endswith("position_ids"):
            continue
        parts = [ta[k], tb[k]] + ([tc[k]] if tc else [])
        vecs.setdefault(group_of(arch, k), []).append([t.double().flatten() for t in parts])
    out = {}
    for g, rows in vecs.items():
        va = torch.cat([r[0] for r in rows])
        vb = torch.cat([r[1] for r in rows])
        res = {
            "rel_distance": float((va - vb).norm() / va.norm()),
            "cosine": float(va @ vb / (va.norm() * vb.norm())),
            "tensors": len(rows),
            "parameters": va.numel(),
        }
        if tc:
            vc = torch.cat([r[2] for r in rows])
            da, db = va - vc, vb - vc
            res.update(change_a=float(da.norm() / vc.norm()), change_b=float(db.norm() / vc.norm()),
                       change_cosine=float(da @ db / (da.norm() * db.norm())))
        out[g] = res
    return out


@pytest.mark.parametrize("arch", [SD1, SDXL], ids=["SD1", "SDXL"])
def test_values_match_direct_computation(arch, tiny_sd1_paths, tiny_sdxl_paths) -> None:
    a, b, c = tiny_sd1_paths if arch is SD1 else tiny_sdxl_paths
    r = compare(a, b, base=c, top=5)
    want = direct(arch, a, b, c)
    comps = [x.name for x in arch.components]
    assert [g.group for g in r.groups] == comps + list(arch.block_ids)
    assert set(want) == {g.group for g in r.groups}
    for g in r.groups:
        w = want[g.group]
        assert (g.tensors, g.parameters) == (w["tensors"], w["parameters"]), g.group
        for field in ("rel_distance", "cosine", "change_a", "change_b", "change_cosine"):
            assert getattr(g, field) == pytest.approx(w[field], rel=1e-5, abs=1e-6), (g.group, field)
    # top tensors: sorted, and each value is that tensor's own distance
    ta, tb = load_file(a), load_file(b)
    vals = [t.rel_distance for t in r.top]
    assert vals == sorted(vals, reverse=True) and len(vals) == 5
    for t in r.top:
        x, y = ta[t.key].double(), tb[t.key].double()
        assert t.rel_distance == pytest.approx(float((x - y).norm() / x.norm()), rel=1e-5)
        assert t.group == group_of(arch, t.key)
    everything = compare(a, b, top=10_000)
    assert max(x.rel_distance for x in everything.top) == vals[0]


def test_only_the_merged_block_differs(tiny_sd1_paths, tmp_path: Path) -> None:
    """A vs A-with-IN04-from-B: zero everywhere but IN04, where it equals A vs B's IN04."""
    a, b, _ = tiny_sd1_paths
    m = tmp_path / "m.safetensors"
    merge([a, b], m, alpha="IN04=1")
    r = compare(a, m)
    ab = compare(a, b)
    for g in r.groups:
        if g.group == "IN04":
            assert g.rel_distance == pytest.approx(ab.group("IN04").rel_distance, rel=1e-6)
            assert g.rel_distance > 0.1
        else:
            assert g.rel_distance == 0.0 and g.cosine == pytest.approx(1.0), g.group
    assert {t.group for t in r.top if t.rel_distance > 0} == {"IN04"}
    same = compare(a, a, base=a)
    assert all(g.rel_distance == 0 and math.isnan(g.change_cosine) for g in same.groups)
    assert all(g.change_a == 0 and g.change_b == 0 for g in same.groups)


@pytest.mark.parametrize("torch_threads", [1, 2])
def test_threads_do_not_change_numbers(tiny_sd1_paths, torch_threads) -> None:
    """Bit for bit, whatever the worker count and the caller's intra-op thread count: the workers
    take the caller's count (a new thread's MKL did not, and with 1 intra-op thread in the caller
    the workers' dot products summed in another order than the caller's)."""
    a, b, c = tiny_sd1_paths
    old = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        one = compare(a, b, base=c, threads=1).to_json()
        two = compare(a, b, base=c, threads=3).to_json()
    finally:
        torch.set_num_threads(old)
    assert one == two


def test_outputs_table_json_svg(tiny_sd1_paths, tmp_path: Path, capsys) -> None:
    a, b, c = tiny_sd1_paths
    r = compare(a, b, base=c, top=3)
    table = format_table(r)
    rows = {ln.split()[0]: ln.split() for ln in table.splitlines() if ln and ln.split()[0] in ("TE", "M00")}
    assert float(rows["M00"][3]) == pytest.approx(r.group("M00").rel_distance, rel=1e-3)
    assert float(rows["TE"][7]) == pytest.approx(r.group("TE").change_cosine, rel=1e-3)
    assert "largest changes" in table
    svg = heatmap_svg(r, "change_cosine")
    cells = re.findall(r'<rect data-block="([A-Z0-9]+)"', svg)
    assert cells == list(SD1.block_ids)
    assert 'data-extra="TE"' in svg and 'data-extra="VAE"' in svg
    with pytest.raises(BlockmergeError, match="needs --base"):
        heatmap_svg(compare(a, b), "change_a")
    out_svg = tmp_path / "d.svg"
    assert main(["compare", str(a), str(b), "--base", str(c), "--json", "--svg", str(out_svg), "-q",
                 "--top", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["architecture"] == "SD1" and len(data["top"]) == 2
    g = {x["group"]: x for x in data["groups"]}
    assert g["OUT03"]["rel_distance"] == pytest.approx(r.group("OUT03").rel_distance)
    assert out_svg.read_text().startswith("<svg")
    assert main(["compare", str(a), str(b), "--metric", "change_b"]) == 2
    assert "needs --base C" in capsys.readouterr().err


def test_mismatches_are_reported(tiny_sd1_paths, tiny_sdxl_paths, tmp_path: Path) -> None:
    a, b, _ = tiny_sd1_paths
    with pytest.raises(BlockmergeError, match="models of different architectures cannot be compared"):
        compare(a, tiny_sdxl_paths[0])
    from safetensors.torch import save_file

    tb = load_file(b)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    gone = "model.diffusion_model.out.2.bias"
    tb[key] = torch.zeros(tb[key].shape[0], 9, *tb[key].shape[2:], dtype=tb[key].dtype)  # inpainting conv_in
    del tb[gone]
    odd = tmp_path / "odd.safetensors"
    save_file(tb, odd)
    r = compare(a, odd)
    assert r.shape_mismatch == [key] and r.only_in_a == [gone]
    assert "tensors of different shapes skipped" in format_table(r)
