"""The sweep runner: weights restored after a sweep, k = 1 equals the baseline, resumable runs,
infotext on every PNG, the block-subset grammar, and the ``sweep`` / ``report`` commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blockmerge.architectures import SD1
from blockmerge.cli import main
from blockmerge.errors import BlockmergeError, WeightSpecError
from blockmerge.experiments.inplace import InPlaceModel
from blockmerge.experiments.results import SweepResult
from blockmerge.experiments.sweep import (
    bypass_variants,
    custom_variant,
    parse_blocks,
    run_sweep,
    scale_variants,
    swap_variants,
)
from blockmerge.generation.infotext import parse_infotext, read_png_infotext
from blockmerge.generation.loader import load_pipeline

PROMPT = "a red circle\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, CFG scale: 7, Size: 32x32"
PROMPT2 = "a blue square\nSteps: 3, Sampler: Euler, CFG scale: 5, Size: 32x32"


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def models(tiny_sd1_paths):
    return load_pipeline(tiny_sd1_paths[0], device="cpu"), load_pipeline(tiny_sd1_paths[1], device="cpu")


def _params(loaded) -> dict[str, torch.Tensor]:
    return {q: p.detach().clone() for q, p in InPlaceModel(loaded).params.items()}


def _variants():
    blocks = ["IN00", "M00", "OUT11"]
    return (
        scale_variants(SD1, blocks, (0.75,)) + bypass_variants(blocks) + swap_variants(SD1, blocks, "B")
        + [custom_variant("half", SD1, "0.5", donors=["B"]), custom_variant("gradv", SD1, "GRAD_V")]
        + scale_variants(SD1, ["M00", "OUT11"], (1.0,))  # last: after every other edit was undone
    )


@pytest.fixture(scope="module")
def sweep(models, tmp_path_factory):
    a, b = models
    ref_a, ref_b = _params(a), _params(b)
    out = tmp_path_factory.mktemp("sweep")
    res = run_sweep(a, _variants(), [PROMPT, PROMPT2], out, seeds=[1, 2], donors={"B": b}, progress=False)
    return res, out, ref_a, ref_b


def test_every_parameter_equals_the_original_after_a_sweep(models, sweep) -> None:
    a, b = models
    _, _, ref_a, ref_b = sweep
    for loaded, ref in ((a, ref_a), (b, ref_b)):
        now = InPlaceModel(loaded).params
        assert now.keys() == ref.keys()
        assert all(torch.equal(p, ref[q]) for q, p in now.items())


def test_sweep_description_and_k1_is_pixel_identical_to_the_baseline(sweep) -> None:
    res, out, _, _ = sweep
    assert (out / "sweep.json").is_file()
    loaded = SweepResult.load(out)
    n_variants = 1 + 3 * 3 + 2 + 2
    assert len(loaded.variants) == n_variants and len(loaded.images) == n_variants * 2 * 2
    assert loaded.groups() == ["scale:k=0.75", "bypass", "swap:donor=B", "custom", "scale:k=1"]
    for p in range(2):
        for s in (1, 2):
            base = (out / res.image("baseline", p, s).path).read_bytes()
            for block in ("M00", "OUT11"):
                k1 = res.image(f"scale:{block}:1", p, s)
                # Same pixels (the PNG bytes differ only in the infotext's variant line).
                a = np.asarray(Image.open(out / res.image("baseline", p, s).path))
                b = np.asarray(Image.open(out / k1.path))
                assert np.array_equal(a, b)
            changed = (out / res.image("scale:M00:0.75", p, s).path).read_bytes()
            assert changed != base
    # Latents are saved for the latent distance; exact variants and approximations are both noted.
    assert all(r.latent and (out / r.latent).is_file() for r in res.images)
    assert "exact" in res.meta["notes"]["bypass:M00"]
    assert res.variant("bypass:IN00").label.endswith("(approx.)")
    assert res.prompts[0].startswith("a red circle\nNegative prompt: blurry\nSteps: 3")
    assert "Seed" not in res.prompts[0]


def test_every_png_carries_infotext_and_the_variant(sweep) -> None:
    res, out, _, _ = sweep
    rec = res.image("swap:M00:B", 1, 2)
    info = parse_infotext(read_png_infotext(out / rec.path))
    assert info.prompt == "a blue square" and info.seed == 2 and info.steps == 3 and info.cfg_scale == 5
    assert info.sampler == "Euler" and info.size == (32, 32)
    assert info.params["Blockmerge variant"] == "M00 from B"
    rec = res.image("custom:gradv", 0, 1)
    assert parse_infotext(read_png_infotext(out / rec.path)).params["Blockmerge variant"] == "gradv"


def test_rerun_reuses_images_and_changed_parameters_make_new_ones(models, sweep, capsys) -> None:
    a, b = models
    res, out, _, _ = sweep
    before = {r.path: (out / r.path).stat().st_mtime_ns for r in res.images}
    again = run_sweep(a, _variants(), [PROMPT, PROMPT2], out, seeds=[1, 2], donors={"B": b}, progress=True)
    assert again.meta["images_made"] == 0 and again.meta["images_reused"] == len(res.images)
    assert {r.path: (out / r.path).stat().st_mtime_ns for r in again.images} == before
    assert f"{len(res.images)}/{len(res.images)}" in capsys.readouterr().err  # the progress bar
    more = run_sweep(a, scale_variants(SD1, ["M00"]), [PROMPT], out, seeds=[1, 2], progress=False,
                     overrides={"steps": 2})
    assert more.meta["images_made"] == 4  # baseline and M00 at 2 steps: new files, not the 3-step ones
    assert not {r.path for r in more.images} & set(before)


def test_interrupted_sweep_continues_where_it_stopped(models, tmp_path: Path) -> None:
    a, _ = models
    variants = scale_variants(SD1, ["IN01", "IN02", "IN03"])
    seen = []

    def stop_after_two(p, dt) -> None:
        seen.append(p.variant.id)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(a, variants, [PROMPT], tmp_path / "s", seeds=[1, 2], progress=False, on_variant=stop_after_two)
    res = run_sweep(a, variants, [PROMPT], tmp_path / "s", seeds=[1, 2], progress=False)
    assert res.meta["images_reused"] == 4 and res.meta["images_made"] == 4
    full = run_sweep(a, variants, [PROMPT], tmp_path / "full", seeds=[1, 2], progress=False)
    for r, f in zip(res.images, full.images, strict=True):
        assert (tmp_path / "s" / r.path).read_bytes() == (tmp_path / "full" / f.path).read_bytes()


def test_block_subsets_use_the_weight_spec_grammar() -> None:
    assert parse_blocks("IN04-IN06,M00", SD1) == ["IN04", "IN05", "IN06", "M00"]
    assert parse_blocks("OUT", SD1) == [f"OUT{i:02d}" for i in range(12)]
    assert parse_blocks(None, SD1) == list(SD1.block_ids)
    with pytest.raises(BlockmergeError, match="BASE"):
        parse_blocks("BASE,M00", SD1)
    with pytest.raises(WeightSpecError, match="IN99"):
        parse_blocks("IN99", SD1)


def test_bad_inputs_are_one_line_errors(models, tmp_path: Path) -> None:
    a, _ = models
    with pytest.raises(BlockmergeError, match="donor"):
        run_sweep(a, swap_variants(SD1, ["M00"], "B"), [PROMPT], tmp_path, seeds=[1], progress=False)
    with pytest.raises(BlockmergeError, match="twice"):
        run_sweep(a, [], [PROMPT], tmp_path, seeds=[1, 1], progress=False)
    with pytest.raises(BlockmergeError, match="Steps"):
        run_sweep(a, [], ["x\nSteps: many, Sampler: Euler, CFG scale: 7"], tmp_path, seeds=[1], progress=False)
    with pytest.raises(BlockmergeError, match="names"):
        custom_variant("bad name", SD1, "0.5")


@pytest.mark.parametrize(("customs", "want"), [
    (["x=0.5", " x =0.3"], "--custom x: given twice"),
    (["x"], "--custom 'x': expected NAME=SPEC"),
    (["=0.5"], "--custom '=0.5': expected NAME=SPEC"),
    (["x= "], "--custom 'x= ': expected NAME=SPEC"),
])
def test_bad_custom_variants_are_refused_before_any_model_loads(tmp_path: Path, capsys, monkeypatch, customs,
                                                                 want) -> None:
    """``--custom`` goes through the one NAME=SPEC parser (also ``--param``'s and the UI's): a name
    given twice used to be found only after the models had loaded, as duplicate variant ids."""
    import blockmerge.models

    def no_load(*a, **k):
        raise AssertionError("a model was resolved before the arguments were checked")

    monkeypatch.setattr(blockmerge.models, "resolve_model", no_load)
    argv = ["sweep", "tiny-a", "--donor", "tiny-b", "-o", str(tmp_path / "s"), "--prompt", PROMPT, "--seeds", "1", "-q"]
    for c in customs:
        argv += ["--custom", c]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and want in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_sweep_and_report_commands(tiny_sd1_paths, tmp_path: Path, capsys) -> None:
    a, b = (str(p) for p in tiny_sd1_paths[:2])
    out = tmp_path / "cli"
    rc = main(["sweep", a, "--donor", b, "-o", str(out), "--prompt", PROMPT, "--seeds", "1", "--blocks", "M00,OUT11",
               "--scale", "0.5", "--bypass", "--swap", "--custom", "g=GRAD_V", "-q"])
    assert rc == 0
    assert (out / "index.html").is_file() and (out / "results.csv").is_file()
    res = SweepResult.load(out)
    assert len(res.images) == 1 + 2 * 3 + 1
    html = (out / "index.html").read_text()
    assert html.count('class="cell"') == 26
    assert html.count('class="cell custom" data-variant="custom:g"') == 1  # its own row, outside the U
    (out / "index.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "index.html").is_file()
    assert main(["sweep", a, "-o", str(tmp_path / "x"), "--prompt", PROMPT, "--swap"]) == 2
    assert "--donor" in capsys.readouterr().err
