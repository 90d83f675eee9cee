"""The web UI's session logic without a browser (``blockmerge.workbench``): the name policy of the
models and output folders, sliders <-> MBW text, merges byte-identical to ``blockmerge merge``,
previews equal to merge + generate, cancel, history and recipes. Real bundled models, CPU."""

from __future__ import annotations

import os
import shlex
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from blockmerge.architectures import SD1, SDXL
from blockmerge.errors import BlockmergeError, Cancelled, WeightSpecError
from blockmerge.models import resolve_model
from blockmerge.workbench import (
    JobControl,
    MergeSettings,
    PathPolicyError,
    Workbench,
    Workspace,
    format_blocks,
    initial_settings,
    read_blocks_text,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")
PROMPT = "a large red circle on the left, white background\nSteps: 6, Sampler: Euler a, CFG scale: 6, Size: 64x64"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Nothing the workbench does may open a connection (loopback included: it serves nothing here)."""

    def refuse(self, address):  # noqa: ARG001
        raise OSError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path, Path]:
    models, out, outside = tmp_path / "models", tmp_path / "out", tmp_path / "outside"
    for d in (models, out, outside):
        d.mkdir()
    (models / "sub").mkdir()
    (outside / "secret.safetensors").write_bytes(resolve_model("tiny-b").read_bytes())
    os.symlink(resolve_model("tiny-b"), models / "sub" / "b-link.safetensors")  # a link *to* a bundled file
    os.symlink(outside / "secret.safetensors", models / "escape.safetensors")
    os.symlink(outside, out / "linkdir")
    (models / "a.safetensors").write_bytes(resolve_model("tiny-a").read_bytes())
    return models, out, outside


# ------------------------------------------------------------------------------------------------
# names: models only from the models folder and the bundled models, outputs only into the output folder


@pytest.mark.parametrize("name", ["../outside/secret.safetensors", "sub/../../outside/secret.safetensors",
                                  "/etc/passwd", "~/x.safetensors", "", "sub/./a.safetensors", "a\x00b",
                                  "C:/x.safetensors", "..", "escape.safetensors", "missing.safetensors"])
def test_model_names_that_leave_the_models_folder_are_refused(roots, name) -> None:
    models, out, _ = roots
    ws = Workspace(out, models)
    with pytest.raises(PathPolicyError) as e:
        ws.model_path(name)
    assert "\n" not in str(e.value) and "model" in str(e.value)


def test_model_names_inside_and_bundled_resolve(roots) -> None:
    models, out, _ = roots
    ws = Workspace(out, models)
    assert ws.model_path("a.safetensors") == (models / "a.safetensors").resolve()
    assert ws.model_path("tiny-a") == resolve_model("tiny-a").resolve()
    names = [e.name for e in ws.list_models()]
    # the link out of the folder is not offered; the bundled models come first
    assert names[:2] == ["tiny-a", "tiny-b"] and "a.safetensors" in names and "escape.safetensors" not in names
    assert ws.model_name(ws.model_path("a.safetensors")) == "a.safetensors"
    assert Workspace(out).model_path("tiny-b") == resolve_model("tiny-b").resolve()
    with pytest.raises(PathPolicyError, match="no --models-dir"):
        Workspace(out).model_path("a.safetensors")


@pytest.mark.parametrize("name", ["../x.safetensors", "/tmp/x.safetensors", "linkdir/x.safetensors",
                                  "sub/../../x.safetensors", "x.txt", "a\nb.safetensors"])
def test_output_names_that_leave_the_output_folder_are_refused(roots, name) -> None:
    models, out, outside = roots
    ws = Workspace(out, models)
    with pytest.raises(PathPolicyError):
        ws.output_path(name, suffixes=(".safetensors",))
    assert sorted(p.name for p in outside.iterdir()) == ["secret.safetensors"]


def test_output_names_inside_and_served_files(roots) -> None:
    models, out, _ = roots
    ws = Workspace(out, models)
    p = ws.output_path("runs/m.safetensors", suffixes=(".safetensors",))
    assert p == out.resolve() / "runs" / "m.safetensors" and p.parent.is_dir()
    with pytest.raises(PathPolicyError, match="outside"):
        ws.served_file("linkdir/secret.safetensors")
    with pytest.raises(PathPolicyError):
        ws.served_file("../outside/secret.safetensors")
    assert ws.served_file("runs") == out.resolve() / "runs"


# ------------------------------------------------------------------------------------------------
# sliders <-> text


def test_text_box_and_sliders_follow_each_other() -> None:
    s = initial_settings("weighted_sum", ["tiny-a", "tiny-b"], SD1)
    assert s.values["alpha"] == (0.0,) * 26  # every slider starts where model A is kept
    s = s.with_value("alpha", "IN04", 0.5, SD1).with_value("alpha", "BASE", 0.25, SD1)
    text = format_blocks(s.values["alpha"], SD1)
    assert text.split(",")[4] == "0.5" and len(text.split(",")) == 25  # MBW's 25, BASE apart
    vals25 = [round(0.04 * i, 2) for i in range(25)]
    got, rules = read_blocks_text(",".join(map(str, vals25)), SD1, s.values["alpha"])
    assert got == (0.25, *vals25) and rules == ""  # BASE keeps its slider
    got, _ = read_blocks_text(",".join(map(str, [0.7, *vals25])), SD1, s.values["alpha"])
    assert got[0] == 0.7 and got[1:] == tuple(vals25)  # 26 values: BASE first, as supermerger writes
    got, _ = read_blocks_text("IN04-IN05=0.9", SD1, s.values["alpha"])
    assert got[5:7] == (0.9, 0.9) and got[0] == 0.25 and got[1] == 0.0  # the rest unchanged
    got, _ = read_blocks_text("GRAD_V", SD1, s.values["alpha"])
    assert got[1] == 1.0 and got[13] == 0.0 and got[0] == 0.25
    got, rules = read_blocks_text("0.5; OUT:attn2:0", SD1, s.values["alpha"])
    assert got[0] == 0.25 and set(got[1:]) == {0.5} and rules == "OUT:attn2:0"
    with pytest.raises(WeightSpecError, match=r"^alpha: 'abc' is not a number$"):
        read_blocks_text("1,2,abc", SD1, s.values["alpha"])
    with pytest.raises(WeightSpecError, match="SD1 needs"):
        read_blocks_text("1,2,3", SD1, s.values["alpha"])
    sx = initial_settings("slerp", ["a", "b"], SDXL)
    assert len(format_blocks(sx.values["alpha"], SDXL).split(",")) == 19


def test_settings_specs_resolve_like_the_command_line() -> None:
    s = initial_settings("ties", ["a", "b", "c"], SD1)
    assert list(s.values) == ["alpha", "k", "w1", "w2", "count_signs"]
    assert s.values["k"][0] == 0.2  # no identity: the default
    s = s.with_values("k", [0.5] * 26).with_rules("alpha", "IN04:attn2:0.5")
    pv = s.resolve(SD1)
    assert pv["k"]["IN07"] == 0.5 and pv["alpha"].rules[0].text == "IN04:attn2:0.5"
    bad = s.with_values("k", [1.5] * 26)
    with pytest.raises(BlockmergeError, match=r"k \(BASE\): 1.5 is outside k's range \[0, 1\]"):
        bad.resolve(SD1)
    cmd = s.command_line(["a.safetensors", "b c.safetensors", "c.safetensors"], "o.safetensors")
    assert shlex.split(cmd)[:5] == ["blockmerge", "merge", "a.safetensors", "b c.safetensors", "c.safetensors"]
    assert "--param" in cmd and "alpha=0,0" in cmd


# ------------------------------------------------------------------------------------------------
# merge, preview, cancel, history, recipes


@pytest.fixture(scope="module")
def wb(tmp_path_factory) -> Workbench:
    return Workbench(Workspace(tmp_path_factory.mktemp("ui-out")))


def _gradv(wb: Workbench) -> MergeSettings:
    s, arch = wb.new_settings("weighted_sum", ["tiny-a", "tiny-b"])
    vals, _ = read_blocks_text("GRAD_V", arch, s.values["alpha"])
    return s.with_values("alpha", vals).with_value("alpha", "BASE", 0.3, arch)


def test_models_table_has_family_size_and_short_hash(wb) -> None:
    rows = {m.name: m for m in wb.models()}
    from blockmerge.io import file_hashes

    a = rows["tiny-a"]
    assert a.architecture == "SD1" and a.size_bytes == resolve_model("tiny-a").stat().st_size
    assert a.short_hash == file_hashes(resolve_model("tiny-a")).short and a.bundled


@pytest.mark.slow
def test_merge_is_byte_identical_to_the_command_line(wb, tmp_path) -> None:
    from blockmerge.cli import main

    s = _gradv(wb).with_rules("alpha", "OUT:attn2:0.8")
    o = wb.merge(s, "gradv.safetensors")
    assert o.output == wb.workspace.output_dir / "gradv.safetensors"
    args = shlex.split(o.command)[1:]
    args[args.index("-o") + 1] = str(tmp_path / "cli.safetensors")
    assert main(["--debug", *args, "-q"]) == 0
    assert (tmp_path / "cli.safetensors").read_bytes() == o.output.read_bytes()
    assert o.record["params"]["alpha"]["IN01"] == pytest.approx(0.9166666667)
    assert o.record["rules"] == {"alpha": ["OUT:attn2:0.8"]}
    with pytest.raises(BlockmergeError, match="already exists"):
        wb.merge(s, "gradv.safetensors")
    with pytest.raises(PathPolicyError):
        wb.merge(s, "../escape.safetensors")
    assert not (wb.workspace.output_dir.parent / "escape.safetensors").exists()
    e = wb.history.entries[-1]
    assert e.kind == "merge" and e.output == "gradv.safetensors" and e.params["alpha"]["OUT11"] == 1.0
    assert [m["name"] for m in e.models] == ["tiny-a", "tiny-b"] and len(e.models[0]["sha256"]) == 64


@pytest.mark.slow
def test_preview_equals_merge_to_a_file_then_generate(wb) -> None:
    from blockmerge.generation.generate import generate
    from blockmerge.generation.loader import load_pipeline

    s = _gradv(wb)
    pv = wb.preview(s, PROMPT, "1-4")
    assert pv.seeds == [1, 2, 3, 4] and len(pv.images) == 4 and set(pv.refs) == {"A", "B"}
    o = wb.merge(s, "for-preview.safetensors")
    from_file = load_pipeline(o.output, device="cpu", hash_file=False)
    gen = wb.generation(PROMPT, "1-4")
    ref = generate(from_file, gen)
    for x, y in zip(pv.images, ref, strict=True):
        diff = np.abs(np.asarray(x.image, dtype=int) - np.asarray(y.image, dtype=int))
        assert diff.max() <= 1, diff.max()
    # A's own images are A unchanged: the in-place edit was restored
    a_imgs = generate(load_pipeline(resolve_model("tiny-a"), device="cpu", hash_file=False), gen)
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(pv.refs["A"], a_imgs, strict=True))
    assert any(np.abs(np.asarray(x.image, dtype=int) - np.asarray(y.image, dtype=int)).max() > 8
               for x, y in zip(pv.images, a_imgs, strict=True))  # and the merge is not A
    second = wb.preview(s.with_value("alpha", "M00", 1.0, SD1), PROMPT, "1-4")
    assert second.timings["load_s"] < 0.05 and second.timings["references_s"] < 0.05  # kept loaded
    assert wb.history.entries[-1].kind == "preview" and wb.history.entries[-1].params["alpha"]["M00"] == 1.0
    with pytest.raises(BlockmergeError, match="seeds"):
        wb.preview(s, PROMPT, "1,x")


def test_cancel_stops_a_merge_and_leaves_nothing(wb) -> None:
    jobs = JobControl()
    s = _gradv(wb)
    seen = []
    with jobs.run("merge", lambda f, t: (seen.append(f), jobs.cancel())) as job, pytest.raises(Cancelled):
        wb.merge(s, "cancelled.safetensors", job=job)
    assert seen and not list(wb.workspace.output_dir.glob("*cancelled*"))
    assert not list(wb.workspace.output_dir.glob(".*partial"))
    assert jobs.cancel() is None  # nothing running any more


@pytest.mark.slow
def test_sweep_cancel_keeps_finished_images_and_resumes(wb) -> None:
    jobs = JobControl()
    counts = []

    def stop_after_first(f, text):
        counts.append(text)
        if " 2 of " in text or " 5 of " in text:  # after the baseline's images
            jobs.cancel()

    with jobs.run("sweep", stop_after_first) as job, pytest.raises(Cancelled):
        wb.sweep("tiny-a", "sw", PROMPT, "1", scale=[0.5], blocks="IN00,M00,OUT11", job=job)
    folder = wb.workspace.output_dir / "sw"
    made = list(folder.rglob("*.png"))
    assert 1 <= len(made) < 4 and not list(folder.rglob("*partial"))
    r = wb.sweep("tiny-a", "sw", PROMPT, "1", scale=[0.5], blocks="IN00,M00,OUT11")
    assert r.images == 4 and r.reused == len(made) and r.index is not None and r.index.is_file()
    with pytest.raises(PathPolicyError):
        wb.sweep("tiny-a", "../sw", PROMPT, "1", scale=[0.5])


def test_sweep_custom_variants_take_parameters_and_clamp_as_the_cli(wb) -> None:
    """The sweep tab's "other parameters" and "clamp" reach the custom variants, as ``sweep --param``
    and ``--clamp`` do: recorded per variant, and a clamped α = 2 extrapolation draws B (α = 1)."""
    import json

    from PIL import Image

    prompt = "a red circle\nSteps: 3, Sampler: Euler, CFG scale: 5, Size: 32x32"
    r = wb.sweep("tiny-a", "swp", prompt, "1", donor="tiny-b", custom=[("free", "2"), ("one", "1"), ("t", "1")],
                 method="ties", params={"k": "0.5"}, clamp=True, blocks="IN00")
    res = json.loads((r.folder / "sweep.json").read_text())
    got = {v["id"]: v["params"] for v in res["variants"]}
    assert got["custom:free"]["clamp"] == "1" and got["custom:free"]["method"] == "ties"
    assert got["custom:t"]["k"].split(",")[0] == "0.5"

    def image(vid: str) -> np.ndarray:
        (p,) = [p for p in r.folder.rglob("*.png") if vid.replace(":", "_") in str(p) or vid in str(p)]
        return np.asarray(Image.open(p), dtype=np.int16)

    assert np.abs(image("custom:free") - image("custom:one")).max() <= 1
    with pytest.raises(BlockmergeError, match="parameter"):
        wb.sweep("tiny-a", "swq", prompt, "1", donor="tiny-b", custom=[("x", "1")], method="ties",
                 params={"nope": "1"})


def test_history_reloads_and_runs_as_a_recipe(wb) -> None:
    from safetensors.torch import load_file

    s = _gradv(wb)
    o = wb.merge(s, "hist.safetensors")
    back, arch = wb.settings_from_history(o.entry.id)
    assert back.values == s.values and back.models == s.models and arch is SD1
    toml = wb.history.as_recipe(o.entry).replace('path = "hist.safetensors"', 'path = "hist-again.safetensors"')
    assert wb.validate_recipe(toml).startswith("OK: 1 step(s), writes hist-again.safetensors")
    outs = wb.run_recipe(toml)
    a, b = load_file(o.output), load_file(outs[0].output)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.slow
def test_clamp_reaches_merge_preview_history_and_recipe(wb, tmp_path) -> None:
    """The clamp checkbox: the merge equals ``blockmerge merge --clamp`` byte for byte, the preview
    equals that file's images, and the history entry, its reload and its recipe keep it."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from blockmerge.cli import main
    from blockmerge.generation.generate import generate
    from blockmerge.generation.loader import load_pipeline

    s = replace(wb.new_settings("weighted_sum", ["tiny-a", "tiny-b"])[0].with_values("alpha", [1.6] * 26), clamp=True)
    o = wb.merge(s, "clamped.safetensors")
    assert "--clamp" in shlex.split(o.command) and o.record["options"]["clamp"] is True
    args = shlex.split(o.command)[1:]
    args[args.index("-o") + 1] = str(tmp_path / "cli.safetensors")
    assert main(["--debug", *args, "-q"]) == 0
    assert (tmp_path / "cli.safetensors").read_bytes() == o.output.read_bytes()
    free = wb.merge(replace(s, clamp=False), "free.safetensors")
    assert free.output.read_bytes() != o.output.read_bytes()
    e = wb.history.entries[-2]
    assert e.clamp is True and wb.settings_from_history(e.id)[0].clamp is True
    toml = wb.history.as_recipe(e).replace('path = "clamped.safetensors"', 'path = "clamped-again.safetensors"')
    assert "clamp = true" in toml
    again = load_file(wb.run_recipe(toml)[0].output)
    mine = load_file(o.output)
    assert all(torch.equal(mine[k], again[k]) for k in mine)
    pv = wb.preview(s, PROMPT, "1-2")
    ref = generate(load_pipeline(o.output, device="cpu", hash_file=False), wb.generation(PROMPT, "1-2"))
    for x, y in zip(pv.images, ref, strict=True):
        assert np.abs(np.asarray(x.image, dtype=int) - np.asarray(y.image, dtype=int)).max() <= 1
    assert wb.history.entries[-1].kind == "preview" and wb.history.entries[-1].clamp is True


def test_recipes_are_checked_with_lines_and_names(wb) -> None:
    toml = wb.mergeboard("mix = __tiny-a__ + __tiny-b__, 0.3, fp16, safetensors\n")
    assert 'path = "tiny-a"' in toml
    assert wb.validate_recipe(toml).startswith("OK: 1 step(s), writes mix.safetensors")
    with pytest.raises(BlockmergeError, match="line 2"):
        wb.validate_recipe('version = 1\n[inputs\nA = "tiny-a"\n')
    bad_abs = toml.replace('path = "tiny-a"', f'path = "{resolve_model("tiny-a")}"')
    with pytest.raises(BlockmergeError, match="absolute path is not allowed"):
        wb.validate_recipe(bad_abs)
    bad_out = toml.replace('path = "mix.safetensors"', 'path = "../mix.safetensors"')
    with pytest.raises(BlockmergeError, match=r"'\.\.' and '\.' are not allowed"):
        wb.run_recipe(bad_out)
    bad_weights = toml.replace("alpha = 0.3", 'alpha = "1,2,abc"')
    with pytest.raises(BlockmergeError, match="'abc' is not a number"):
        wb.validate_recipe(bad_weights)
    assert not (wb.workspace.output_dir.parent / "mix.safetensors").exists()


def test_compare_gives_table_and_heat_map(wb) -> None:
    table, svg, r = wb.compare("tiny-a", "tiny-b")
    assert "IN00" in table and "OUT11" in table and svg.startswith("<svg")
    assert 0 < r.group("M00").rel_distance < 1
    with pytest.raises(BlockmergeError, match="needs a base"):
        wb.compare("tiny-a", "tiny-b", metric="change_a")
