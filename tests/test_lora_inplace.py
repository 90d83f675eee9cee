"""LoRAs in place: ``<lora:NAME:...>`` in prompts (A1111's syntax and LoRA Block Weight's ``lbw=``) and
the LoRA sweep, against baking the same LoRA into a file and generating from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from blockmerge.cli import main
from blockmerge.errors import BlockmergeError
from blockmerge.experiments.sweep import lora_variants, run_sweep
from blockmerge.generation.extra_networks import lora_calls, parse_extra_networks, strip_comments
from blockmerge.generation.generate import GenerationParams, generate
from blockmerge.generation.infotext import parse_infotext, read_png_infotext
from blockmerge.generation.loader import load_pipeline
from blockmerge.generation.weights_map import pipeline_parameters
from blockmerge.lora import LoraSpec, apply_loras, extract_lora
from blockmerge.lora.library import lora_hash
from blockmerge.models import resolve_model

pytestmark = [pytest.mark.usefixtures("single_torch_thread"), pytest.mark.slow]

PROMPT = "a large red circle on the left, white background"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("loras")
    extract_lora(resolve_model("tiny-b"), resolve_model("tiny-a"), d / "outline.safetensors", rank=4, conv_rank=4)
    return d


@pytest.fixture(scope="module")
def tiny_a():
    return load_pipeline(resolve_model("tiny-a"), device="cpu", dtype=torch.float32)


def _px(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def _params(prompt: str, **kw) -> GenerationParams:
    return GenerationParams(prompt=prompt, negative_prompt="blue", steps=4, sampler="Euler a", cfg_scale=6,
                            seeds=(1, 2), width=64, height=64, **kw)


def _one(seed: int) -> GenerationParams:
    return GenerationParams(prompt=PROMPT, negative_prompt="blue", steps=4, sampler="Euler a", cfg_scale=6,
                            seeds=(seed,), width=64, height=64)


def _snapshot(loaded) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pipeline_parameters(loaded.pipeline).items()}


@pytest.mark.parametrize("tag,spec", [
    ("<lora:outline:0.8>", LoraSpec(Path("outline"), 0.8, 0.8)),
    ("<lora:outline:0.5:1.2>", LoraSpec(Path("outline"), 0.5, 1.2)),  # A1111: TE, then U-Net multiplier
    ("<lora:outline:1:lbw=OUTD>", LoraSpec(Path("outline"), 1.0, 1.0, "OUTD")),  # LoRA Block Weight
    ("<lora:outline:te=0:unet=1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1>",
     LoraSpec(Path("outline"), 0.0, 1.0, "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1")),
])
def test_prompt_lora_draws_what_the_baked_file_draws(tiny_a, lora_dir, tmp_path, tag, spec) -> None:
    lp = lora_dir / "outline.safetensors"
    baked = tmp_path / "baked.safetensors"
    apply_loras(resolve_model("tiny-a"), [LoraSpec(lp, spec.te, spec.unet, spec.blocks)], baked, dtype="fp32")
    before = _snapshot(tiny_a)
    notes: list[str] = []
    got = generate(tiny_a, _params(f"{PROMPT} {tag}"), lora_dir=lora_dir, notes=notes)
    after = _snapshot(tiny_a)
    assert all(torch.equal(before[k], after[k]) for k in before)  # taken off bit-exactly
    ref = generate(load_pipeline(baked, device="cpu", dtype=torch.float32), _params(PROMPT))
    for g, r in zip(got, ref, strict=True):
        assert np.abs(_px(g.image) - _px(r.image)).max() <= 1
    plain = generate(tiny_a, _params(PROMPT))
    assert max(np.abs(_px(g.image) - _px(p.image)).max() for g, p in zip(got, plain, strict=True)) > 1
    info = parse_infotext(got[0].infotext)
    assert tag in info.prompt  # the prompt is written as given, as A1111 writes it
    assert info.params["Lora hashes"] == f"outline: {lora_hash(lp)}"
    assert notes == []


def test_from_png_reproduces_a_lora_image_and_finds_a_renamed_lora_by_hash(lora_dir, tmp_path, capsys) -> None:
    out = tmp_path / "imgs"
    assert main(["generate", "tiny-a", "-o", str(out), "--prompt", f"{PROMPT} <lora:outline:0.9>", "--seed", "3",
                 "--steps", "4", "--lora-dir", str(lora_dir), "-q"]) == 0
    (png,) = out.glob("*.png")
    moved = tmp_path / "renamed"
    moved.mkdir()
    shutil.copy(lora_dir / "outline.safetensors", moved / "something-else.safetensors")
    again = tmp_path / "again"
    assert main(["generate", "tiny-a", "-o", str(again), "--from-png", str(png), "--lora-dir", str(moved), "-q"]) == 0
    (png2,) = again.glob("*.png")
    from PIL import Image

    assert np.array_equal(_px(Image.open(png2)), _px(Image.open(png)))
    assert read_png_infotext(png2) == read_png_infotext(png)
    capsys.readouterr()
    # no LoRA of that name and no hash to find it by: a one-line error before any image
    code = main(["generate", "tiny-a", "-o", str(tmp_path / "x"), "--prompt", "a <lora:nope:1>", "--steps", "2", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "no LoRA named 'nope'" in err and err.count("\n") == 1


def test_other_networks_and_comments_are_removed_as_a1111_removes_them(tiny_a) -> None:
    notes: list[str] = []
    a = generate(tiny_a, _params(f"{PROMPT} <hypernet:foo:1> # a comment"), notes=notes)
    b = generate(tiny_a, _params(PROMPT))
    assert all(np.array_equal(_px(x.image), _px(y.image)) for x, y in zip(a, b, strict=True))
    assert any("hypernet" in n and "not applied" in n for n in notes)
    assert "comment" not in parse_infotext(a[0].infotext).prompt


@pytest.mark.parametrize("text,calls", [
    ("x <lora:a:0.5>", [("a", 0.5, 0.5, None, None)]),
    ("<lora:a:0.5:1.5:8>", [("a", 0.5, 1.5, 8, None)]),
    ("<lora:a:te=0.2:unet=0.7:dyn=4>", [("a", 0.2, 0.7, 4, None)]),
    ("<lyco:b:1:lbw=OUTS> and <lora:c>", [("b", 1.0, 1.0, None, "OUTS"), ("c", 1.0, 1.0, None, None)]),
    ("<lora:d:1:w=1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0>", [("d", 1.0, 1.0, None, "1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0")]),
])
def test_lora_call_syntax_as_a1111_reads_it(text, calls) -> None:
    got, _ = lora_calls(text)
    assert [(c.name, c.te, c.unet, c.dyn, c.lbw) for c in got] == calls
    assert "<" not in parse_extra_networks(text)[0]


@pytest.mark.parametrize("bad", ["<lora:a:x>", "<lora:a:1:nan>", "<lora:a:1:1:zero>", "<lora::1>", "<lora:a:1:1:0>"])
def test_malformed_lora_calls_are_errors(bad) -> None:
    with pytest.raises(BlockmergeError, match="prompt"):
        lora_calls(bad)


def test_strip_comments_as_a1111() -> None:
    assert strip_comments("a\n# whole line\nb # tail\nc") == "a\nb \nc"
    assert strip_comments("no comment") == "no comment"


def test_lora_sweep_in_place_equals_bake_and_generate(tiny_a, lora_dir, tmp_path) -> None:
    lp = lora_dir / "outline.safetensors"
    arch = tiny_a.architecture
    variants = lora_variants(arch, lp, resolve_model("tiny-a"), 1.0, ["IN04", "OUT08", "OUT11"])
    ids = [p.variant.id for p in variants]
    assert ids[:2] == ["baseline", "lora:none"]
    assert {"lora:without:OUT08", "lora:only:OUT08", "lora:without:BASE", "lora:only:BASE"} <= set(ids)
    assert not any(":IN00" in i or ":OUT05" in i for i in ids)  # only the chosen blocks the LoRA touches
    before = _snapshot(tiny_a)
    prompt = f"{PROMPT}\nNegative prompt: blue\nSteps: 4, Sampler: Euler a, CFG scale: 6, Size: 64x64"
    res = run_sweep(tiny_a, variants, [prompt], tmp_path / "sweep", seeds=[5], progress=False)
    after = _snapshot(tiny_a)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert res.baseline.label == "model + outline ×1"
    from PIL import Image

    for vid, blocks in (("lora:only:OUT08", "OUT08=1"), ("baseline", None), ("lora:without:OUT08", "1,OUT08=0")):
        baked = tmp_path / f"{vid.replace(':', '_')}.safetensors"
        apply_loras(resolve_model("tiny-a"), [LoraSpec(lp, 1.0, 1.0, blocks)], baked, dtype="fp32")
        ref = generate(load_pipeline(baked, device="cpu", dtype=torch.float32), _one(5))[0]
        rec = res.image(vid, 0, 5)
        assert rec is not None
        assert np.abs(_px(Image.open(res.path_of(rec.path))) - _px(ref.image)).max() <= 1, vid
    alone = res.image("lora:none", 0, 5)
    plain = generate(tiny_a, _one(5))[0]
    assert np.abs(_px(Image.open(res.path_of(alone.path))) - _px(plain.image)).max() <= 1
    data = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert any(v["kind"] == "lora" for v in data["variants"])


def test_sweep_lora_cli(tmp_path, lora_dir, capsys) -> None:
    out = tmp_path / "s"
    prompt = f"{PROMPT}\nSteps: 3, Sampler: Euler a, CFG scale: 6, Size: 64x64"
    assert main(["sweep", "tiny-a", "-o", str(out), "--prompt", prompt, "--seeds", "1", "--lora", "outline:0.8",
                 "--lora-dir", str(lora_dir), "--blocks", "OUT08,OUT11", "-q"]) == 0
    assert (out / "index.html").is_file()
    html = (out / "index.html").read_text()
    assert "without OUT08" in html and "only OUT11" in html and "model alone" in html
    capsys.readouterr()
    code = main(["sweep", "tiny-a", "-o", str(tmp_path / "t"), "--prompt", prompt, "--lora", "outline",
                 "--lora-dir", str(lora_dir), "--scale", "0.5"])
    assert code == 2 and "--lora is an experiment of its own" in capsys.readouterr().err
