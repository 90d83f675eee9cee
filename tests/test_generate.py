"""Generation: seeds in a batch vs one at a time, infotext in and out, the generate command, offline."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from PIL import Image

from blockmerge.cli import main
from blockmerge.errors import BlockmergeError
from blockmerge.generation.generate import GenerationParams, generate, parse_seeds, save_png
from blockmerge.generation.infotext import parse_infotext, read_png_infotext
from blockmerge.generation.loader import load_pipeline
from blockmerge.io import file_hashes


@pytest.fixture(scope="module")
def sd1(tiny_sd1_paths):
    return load_pipeline(tiny_sd1_paths[0], device="cpu")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_paths):
    return load_pipeline(tiny_sdxl_paths[0], device="cpu")


def _px(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


@pytest.mark.parametrize("sampler", ["Euler a", "DDIM", "DPM++ 2M Karras"])
def test_batch_of_seeds_equals_one_at_a_time(sd1, sampler):
    p = GenerationParams(prompt="a red circle", negative_prompt="blue", steps=3, sampler=sampler, seeds=(1, 2, 3),
                         width=64, height=64)
    batch = generate(sd1, p)
    single = [generate(sd1, p, seeds=[s])[0] for s in (1, 2, 3)]
    for b, s in zip(batch, single, strict=True):
        assert b.seed == s.seed
        # Batched convolutions sum in another order: equal up to float rounding, never another image.
        assert np.abs(_px(b.image) - _px(s.image)).max() <= 1
        assert (b.latent - s.latent).abs().max().item() < 1e-3
    # ...and different seeds do give different images
    assert np.abs(_px(batch[0].image) - _px(batch[1].image)).mean() > 1


def test_sdxl_batch_equals_single(sdxl):
    p = GenerationParams(prompt="a cat", steps=2, seeds=(5, 6), width=64, height=64)
    batch = generate(sdxl, p)
    single = generate(sdxl, p, batch_size=1)
    for b, s in zip(batch, single, strict=True):
        assert np.abs(_px(b.image) - _px(s.image)).max() <= 1


def test_same_seed_same_image_and_prompt_matters(sd1):
    p = GenerationParams(prompt="a red circle", steps=2, seeds=(7,), width=64, height=64)
    a, b = generate(sd1, p)[0], generate(sd1, p)[0]
    assert np.array_equal(_px(a.image), _px(b.image))
    c = generate(sd1, GenerationParams(prompt="a (red:1.5) circle", steps=2, seeds=(7,), width=64, height=64))[0]
    assert not np.array_equal(_px(a.image), _px(c.image))


def test_png_carries_a1111_infotext(sd1, tmp_path, tiny_sd1_paths):
    p = GenerationParams(prompt="a red circle,\nsecond line", negative_prompt="blurry", steps=2, cfg_scale=5.5,
                         seeds=(42,), width=64, height=64, clip_skip=2)
    img = generate(sd1, p)[0]
    path = save_png(img, tmp_path / "x.png")
    info = parse_infotext(read_png_infotext(path))
    assert info.prompt == "a red circle,\nsecond line" and info.negative_prompt == "blurry"
    assert (info.steps, info.sampler, info.cfg_scale, info.seed, info.size, info.clip_skip) == (
        2, "Euler a", 5.5, 42, (64, 64), 2)
    assert info.model_hash == file_hashes(tiny_sd1_paths[0]).sha256[:10]
    assert info.model == tiny_sd1_paths[0].stem
    assert not list(tmp_path.glob(".*partial"))


def test_params_from_the_articles_style_infotext():
    text = ("masterpiece, 1girl\nNegative prompt: lowres, bad anatomy\nSteps: 40, Sampler: Euler a, CFG scale: 7, "
            "Seed: 1, Face restoration: CodeFormer, Size: 512x512, Model hash: a9263745")
    p = GenerationParams.from_infotext(parse_infotext(text), steps=10, seeds=[1, 2, 3, 4])
    assert (p.steps, p.sampler, p.cfg_scale, p.width, p.height, p.seeds) == (10, "Euler a", 7.0, 512, 512, (1, 2, 3, 4))
    assert p.negative_prompt == "lowres, bad anatomy"
    assert any("'Face restoration'" in note and "CodeFormer" in note for note in p.ignored)


def test_parse_seeds():
    assert parse_seeds("1-4") == [1, 2, 3, 4]
    assert parse_seeds("1,2,9") == [1, 2, 9]
    assert parse_seeds("3") == [3]
    assert parse_seeds("1-2,7") == [1, 2, 7]
    for bad in ("x", "4-1", "", "-5"):
        with pytest.raises(BlockmergeError, match="--seed"):
            parse_seeds(bad)


def test_generate_command(tiny_sd1_paths, tmp_path, capsys):
    info = tmp_path / "info.txt"
    info.write_text("a green square\nNegative prompt: red\nSteps: 30, Sampler: DDIM, CFG scale: 6, Seed: 9, "
                    "Size: 64x64, Face restoration: CodeFormer")
    out = tmp_path / "imgs"
    code = main(["generate", str(tiny_sd1_paths[0]), "-o", str(out), "--infotext-file", str(info), "--steps", "2",
                 "--seed", "3-5", "--batch-size", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Face restoration" in captured.err  # warned about, not applied
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3
    infos = [parse_infotext(read_png_infotext(p)) for p in pngs]
    assert [i.seed for i in infos] == [3, 4, 5]
    assert all(i.steps == 2 and i.sampler == "DDIM" and i.cfg_scale == 6 and i.size == (64, 64) for i in infos)
    assert all("Face restoration" not in i.params for i in infos)
    assert Image.open(pngs[0]).size == (64, 64)
    # --from-png reproduces an image: exactly as the same seed drawn alone; within 1/255 of the image
    # drawn in a batch of 2 (float rounding of batched convolutions, as the README says)
    again = tmp_path / "again"
    assert main(["generate", str(tiny_sd1_paths[0]), "-o", str(again), "--from-png", str(pngs[1]), "-q"]) == 0
    alone = tmp_path / "alone"
    assert main(["generate", str(tiny_sd1_paths[0]), "-o", str(alone), "--infotext-file", str(info), "--steps", "2",
                 "--seed", "4", "-q"]) == 0
    reproduced = _px(Image.open(next(again.glob("*.png"))))
    assert np.array_equal(reproduced, _px(Image.open(next(alone.glob("*.png")))))
    assert np.abs(reproduced.astype(int) - _px(Image.open(pngs[1])).astype(int)).max() <= 1


@pytest.mark.parametrize(
    "args,msg",
    [(["--infotext", "x\nSteps: 20, Sampler: Euler, Size: 500x512"], "Size"),
     (["--infotext", "x\nSteps: abc, Sampler: Euler, CFG scale: 7"], "Steps"),
     (["--infotext", "x\nSteps: 2, Sampler: Euler, Seed: 18446744073709551616"], "Seed"),
     (["--seed", "18446744073709551616"], "--seed"), (["--seed", "-2"], "--seed"),
     (["--infotext", "x\nSteps: 2, Sampler: Euler, RNG: TPU"], "RNG"),
     (["--sampler", "UniPC", "--steps", "2"], "UniPC"),
     (["--sampler", "Euler z"], "Euler z"), (["--width", "100"], "--width"), (["--seed", "a-b"], "--seed")],
)
def test_generate_bad_input(tiny_sd1_paths, tmp_path, capsys, args, msg):
    code = main(["generate", str(tiny_sd1_paths[0]), "-o", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_generation_runs_with_sockets_blocked(tiny_sd1_paths, tmp_path, monkeypatch, capsys):
    """Loading and generating from a single file never touches the network."""
    attempts = []

    def refuse(*a, **k):
        attempts.append(a)
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)  # prove it does not rely on these
    code = main(["generate", str(tiny_sd1_paths[1]), "-o", str(tmp_path / "o"), "--prompt", "a red circle",
                 "--steps", "2", "--width", "64", "--height", "64", "--seed", "1", "-q"])
    assert code == 0, capsys.readouterr().err
    assert len(list((tmp_path / "o").glob("*.png"))) == 1
    assert attempts == []


def test_infotext_says_what_changed_the_image(sd1, tmp_path):
    """Schedule type, RNG (the one that drew), ENSD, Eta, Pad conds and Emphasis are written, and reading
    the PNG back gives the same parameters and pixels."""
    p = GenerationParams(prompt="a " + "red circle, " * 30, negative_prompt="blue", steps=3, sampler="DPM++ 2M",
                         seeds=(5,), width=64, height=64, ensd=31337, pad_conds=True, emphasis="No norm")
    img = generate(sd1, p)[0]
    info = parse_infotext(img.infotext)
    assert info.params["Schedule type"] == "Karras"  # DPM++ 2M's Automatic, written as A1111 1.10 does
    assert info.params["RNG"] == "NV"  # A1111's default GPU stream, drawn on the CPU
    assert info.params["ENSD"] == "31337" and info.params["Pad conds"] == "True"
    assert info.params["Emphasis"] == "No norm"
    back = GenerationParams.from_infotext(info)
    assert (back.rng, back.ensd, back.pad_conds, back.emphasis, back.sampler) == ("NV", 31337,
                                                                                   True, "No norm", "DPM++ 2M")
    again = generate(sd1, back)[0]
    assert np.array_equal(_px(again.image), _px(img.image))
    # without Pad conds the negative prompt (1 chunk) runs apart from the prompt (2 chunks): another image
    unpadded = generate(sd1, GenerationParams(**{**back.__dict__, "pad_conds": False, "ignored": ()}))[0]
    assert "Pad conds" not in parse_infotext(unpadded.infotext).params
    assert not np.array_equal(_px(unpadded.image), _px(img.image))


def test_random_seed_is_written(sd1):
    p = GenerationParams(prompt="a red circle", steps=2, seeds=tuple(parse_seeds("-1")), width=64, height=64)
    img = generate(sd1, p)[0]
    assert 0 <= img.seed < 4294967294 and parse_infotext(img.infotext).seed == img.seed


def test_from_png_with_an_oversized_text_chunk(tiny_sd1_paths, tmp_path, capsys):
    import zlib

    from PIL.PngImagePlugin import PngInfo

    bomb = tmp_path / "bomb.png"
    meta = PngInfo()
    meta.add_text("parameters", "x" * (3 * 2**20), zip=True)  # inflates past Pillow's 1 MB text limit
    Image.new("RGB", (8, 8)).save(bomb, pnginfo=meta)
    assert bomb.stat().st_size < 100_000
    code = main(["generate", str(tiny_sd1_paths[0]), "-o", str(tmp_path / "o"), "--from-png", str(bomb)])
    err = capsys.readouterr().err
    assert code == 2 and "bomb.png" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    del zlib


def test_generate_without_model_uses_the_bundled_default(tmp_path, capsys):
    from blockmerge.models import resolve_model

    code = main(["generate", "-o", str(tmp_path / "o"), "--prompt", "a large red circle on the left, white background",
                 "--steps", "2", "--seed", "1", "-q"])
    assert code == 0, capsys.readouterr().err
    info = parse_infotext(read_png_infotext(next((tmp_path / "o").glob("*.png"))))
    assert info.model == "tiny-a"
    assert info.model_hash == file_hashes(resolve_model("tiny-a")).sha256[:10]
    assert info.size == (64, 64)  # the bundled model's own resolution


def test_sdxl_prompts_take_the_a1111_path(sdxl):
    """SDXL prompts go through A1111's chunking and emphasis on both encoders; for a plain short prompt
    that is exactly diffusers' SDXL encoding (penultimate layers, pooled from the second encoder), and
    an empty negative prompt is zeros in both."""
    import torch

    from blockmerge.generation.generate import encode_prompts

    p = GenerationParams(prompt="a cat on a mat", steps=2, width=64, height=64)
    emb = encode_prompts(sdxl, p)
    with torch.no_grad():
        pe, ne, pp, npp = sdxl.pipeline.encode_prompt(prompt=p.prompt, negative_prompt=None, device="cpu",
                                                      num_images_per_prompt=1, do_classifier_free_guidance=True)
    cond = emb.conds[0][0][0][1]
    torch.testing.assert_close(cond.crossattn, pe[0].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond.pooled, pp[0].float(), rtol=1e-5, atol=1e-5)
    uncond = emb.uncond[0][1]
    assert not uncond.crossattn.any() and not uncond.pooled.any() and not ne.any() and not npp.any()
    weighted = encode_prompts(sdxl, GenerationParams(prompt="a (cat:1.5) on a mat", steps=2))
    assert not torch.allclose(weighted.conds[0][0][0][1].crossattn, cond.crossattn)  # emphasis applies
    long = encode_prompts(sdxl, GenerationParams(prompt="cat, " * 50 + "BREAK mat", steps=2))
    assert long.conds[0][0][0][1].crossattn.shape[0] == 77 * 3  # chunks and BREAK as in A1111
