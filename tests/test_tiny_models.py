"""The two bundled tiny models draw what they are asked for, and tiny-b's style is its own.

Measured with plain pixel statistics on images generated through the ordinary loader and a
diffusers pipeline (Euler a, 20 steps, CFG 6): the background is the median of the image border,
the shape is the largest connected region of pixels far from it, its colour the median of the
shape's non-dark pixels, its kind read from how it fills its bounding box (square ~1, circle
~pi/4) and whether it narrows towards the top (triangle). tiny-b's trait, a thick black outline, is the fraction of the shape's
pixels that are near-black (on white and gray backgrounds, where black is not the background).
"""

from __future__ import annotations

import functools
import json
import random
import socket
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy import ndimage

from blockmerge.errors import CheckpointError
from blockmerge.generation.loader import load_pipeline
from blockmerge.io import sha256_file
from blockmerge.models import list_models, models_dir, resolve_model

pytestmark = pytest.mark.slow  # real model runs / a browser: seconds each


PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (12, 12, 12)}
N_PROMPTS = 48
STEPS = 20
CFG = 6.0  # every shape x colour pair four times: 90% allows at most 4 misses per model


@dataclass(frozen=True)
class Case:
    shape: str
    colour: str
    size: str
    position: str
    background: str

    @property
    def prompt(self) -> str:
        where = {"center": "in the center", "top": "at the top", "bottom": "at the bottom"}.get(
            self.position, f"on the {self.position}"
        )
        return f"a {self.size} {self.colour} {self.shape} {where}, {self.background} background"


def _cases() -> list[Case]:
    vocab = list_models()[0].vocabulary
    rng = random.Random(7)
    # Every shape x colour pair four times, with sizes, positions and backgrounds drawn at random.
    pairs = [(s, c) for s in vocab["shape"] for c in vocab["colour"]] * 4
    return [
        Case(s, c, rng.choice(vocab["size"]), rng.choice(vocab["position"]), rng.choice(vocab["background"]))
        for s, c in pairs[:N_PROMPTS]
    ]


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None
    shape: str | None
    dark_fraction: float


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    return min(table, key=lambda k: float(np.sum((rgb - np.array(table[k], dtype=np.float64)) ** 2)))


def read_image(img: np.ndarray) -> Reading:
    """What a 64x64 RGB uint8 image shows, by pixel statistics."""
    x = img.astype(np.float64)
    border = np.concatenate([x[:2].reshape(-1, 3), x[-2:].reshape(-1, 3), x[:, :2].reshape(-1, 3), x[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    background = _nearest(bg, BACKGROUNDS)
    mask = np.sqrt(((x - bg) ** 2).sum(-1)) > 70
    # The shape is the largest 8-connected region off the background: a stray speck or a tinted
    # corner elsewhere would otherwise stretch the bounding box and read as a sparse "circle".
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n > 1:
        mask = labels == 1 + int(np.argmax(ndimage.sum_labels(mask, labels, range(1, n + 1))))
    if mask.sum() < 20:
        return Reading(background, None, None, 0.0)
    dark = x.max(-1) < 70
    body = mask & ~dark
    colour = _nearest(np.median(x[body], axis=0), PALETTE) if body.sum() >= 10 else None
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1]
    fill = box.mean()
    h = box.shape[0]
    top = box[: max(1, h // 4)].sum(1).mean()
    bottom = box[h - max(1, h // 4):].sum(1).mean()
    if top < 0.6 * bottom:
        shape = "triangle"
    elif fill > 0.88:
        shape = "square"
    else:
        shape = "circle"
    dark_fraction = float((mask & dark).sum() / mask.sum()) if background != "black" else float("nan")
    return Reading(background, colour, shape, dark_fraction)


def test_bundled_models_load_and_generate_at_their_resolution() -> None:
    """Same loader as a real SD1.5 file: SD1 detected, 64 px from modelspec, finite images."""
    for m in list_models():
        loaded = load_pipeline(resolve_model(m.name), hash_file=True)
        assert loaded.architecture.name == "SD1"
        assert loaded.resolution == m.image_size == 64
        assert loaded.sha256 == m.sha256
        unet = loaded.pipeline.unet.config
        assert len(unet.down_block_types) == 4 and unet.layers_per_block == 2
    cases, images = _generate("tiny-a")
    assert images.shape == (len(cases), 64, 64, 3)
    assert images.std() > 10  # not a blank or constant image


@functools.cache  # the same renders serve every test of a model
def _generate(name: str) -> tuple[tuple[Case, ...], np.ndarray]:
    m = load_pipeline(resolve_model(name), hash_file=False)
    cases = tuple(_cases())
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(cases))]
    out = m.pipeline(
        [c.prompt for c in cases], num_inference_steps=STEPS, guidance_scale=CFG,
        generator=gens, output_type="np",
    )
    return cases, (out.images * 255).round().astype(np.uint8)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted during an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_registry_lists_both_models_with_matching_hashes() -> None:
    models = {m.name: m for m in list_models()}
    assert set(models) == {"tiny-a", "tiny-b"}
    assert models["tiny-b"].parent == "tiny-a"
    total = 0
    for m in models.values():
        assert m.path.parent == models_dir() and m.path.is_file()
        assert sha256_file(m.path) == m.sha256
        total += m.path.stat().st_size
    assert total <= 25 * 1024 * 1024
    index = json.loads((models_dir() / "models.json").read_text())
    assert index["models"][0]["vocabulary"]["shape"] == ["circle", "square", "triangle"]


def test_resolve_model_names_and_paths(tmp_path) -> None:
    assert resolve_model("tiny-a").name == "tiny-a.safetensors"
    f = tmp_path / "tiny-a"
    f.write_bytes(b"x")
    assert resolve_model(f) == f  # an existing path is never shadowed by a bundled name
    with pytest.raises(CheckpointError, match="not a bundled model"):
        resolve_model("tiny-z")


def test_reader_reads_the_training_renders() -> None:
    """The measuring stick itself: exact renders of both styles are read correctly."""
    from PIL import Image, ImageDraw

    for shape in ("circle", "square", "triangle"):
        for outline in (None, (10, 10, 10)):
            im = Image.new("RGB", (256, 256), BACKGROUNDS["gray"])
            d = ImageDraw.Draw(im)
            box = [64, 64, 192, 192]
            if shape == "circle":
                d.ellipse(box, fill=PALETTE["green"], outline=outline, width=12 if outline else 0)
            elif shape == "square":
                d.rectangle(box, fill=PALETTE["green"], outline=outline, width=12 if outline else 0)
            else:
                d.polygon([(128, 64), (192, 192), (64, 192)], fill=PALETTE["green"], outline=outline,
                          width=12 if outline else 0)
            r = read_image(np.asarray(im.resize((64, 64), Image.Resampling.LANCZOS)))
            assert (r.background, r.colour, r.shape) == ("gray", "green", shape)
            assert (r.dark_fraction > 0.15) == (outline is not None)


def test_reader_reads_every_training_scene_and_ignores_specks() -> None:
    """Every scene of the training set (all sizes, positions, backgrounds, both styles) is read as
    drawn, also with a stray speck far from the shape; a wrong shape is not read as the asked one."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    import dataset as ds

    rng = random.Random(3)
    for scene in ds.all_scenes()[::7]:
        for style in ds.STYLES:
            img = ds.render(scene, style, (rng.randint(-2, 2), rng.randint(-2, 2), rng.randint(-2, 2))).copy()
            r = read_image(img)
            assert (r.background, r.colour, r.shape) == (scene.background, scene.colour, scene.shape), (scene, style)
            # a 3x3 speck of the shape's colour in a corner the shape does not reach
            corner = (slice(2, 5), slice(59, 62)) if scene.position in ("left", "bottom") else (slice(59, 62), slice(2, 5))
            img[corner] = ds.COLOURS[scene.colour]
            assert read_image(img).shape == scene.shape, (scene, style, "speck")


@pytest.mark.parametrize("name", ["tiny-a", "tiny-b"])
def test_bundled_model_draws_the_asked_colour_and_shape(name: str) -> None:
    cases, images = _generate(name)
    readings = [read_image(img) for img in images]
    n = len(cases)
    colour = sum(r.colour == c.colour for r, c in zip(readings, cases, strict=True)) / n
    shape = sum(r.shape == c.shape for r, c in zip(readings, cases, strict=True)) / n
    background = sum(r.background == c.background for r, c in zip(readings, cases, strict=True)) / n
    both = sum(r.colour == c.colour and r.shape == c.shape for r, c in zip(readings, cases, strict=True)) / n
    report = f"{name}: colour {colour:.0%}, shape {shape:.0%}, both {both:.0%}, background {background:.0%}"
    print(report)
    assert colour >= 0.9, report
    assert shape >= 0.9, report
    assert background >= 0.9, report


def _outline_fractions() -> tuple[np.ndarray, np.ndarray]:
    """Per image, the near-black share of the shape's rim (NaN where no shape was found, dropped)."""
    out = []
    for name in ("tiny-a", "tiny-b"):
        _, images = _generate(name)
        fr = np.array([read_image(img).dark_fraction for img in images])
        out.append(fr[~np.isnan(fr)])
    return out[0], out[1]


def test_tiny_b_style_is_present_in_b_and_absent_from_a() -> None:
    a, b = _outline_fractions()
    print(f"dark outline fraction: tiny-a mean {a.mean():.3f}, tiny-b mean {b.mean():.3f}")
    assert len(a) >= 10 and len(b) >= 10
    assert np.mean(a < 0.05) >= 0.9  # A: essentially no black rim
    assert np.mean(b > 0.15) >= 0.9  # B: a rim of black in nearly every image
    assert b.mean() > 4 * a.mean() + 0.1


def test_bundled_lora_is_registered_with_its_hash() -> None:
    from blockmerge.lora import lora_blocks
    from blockmerge.models import find_bundled_lora, list_bundled_loras

    (lo,) = list_bundled_loras()
    assert lo.name == "tiny-b-outline" and lo.base == "tiny-a" and find_bundled_lora(lo.name) == lo.path
    assert sha256_file(lo.path) == lo.sha256
    rep = lora_blocks(lo.path, resolve_model("tiny-a"))
    assert rep.architecture == "SD1" and rep.matched == rep.modules > 250


def test_bundled_lora_draws_the_outline_on_tiny_a(tmp_path) -> None:
    """tiny-b's outline as a rank-16 LoRA: baked into tiny-a it draws a black rim that tiny-a never
    draws. A LoRA carries only weight matrices: tiny-b's biases and norms, where the rest of its
    outline lives, stay tiny-a's, so the rim is thinner than tiny-b's own (read by the same reader)."""
    from blockmerge.lora import LoraSpec, apply_loras
    from blockmerge.models import find_bundled_lora

    baked = tmp_path / "a-outline.safetensors"
    apply_loras(resolve_model("tiny-a"), [LoraSpec(find_bundled_lora("tiny-b-outline"))], baked)

    m = load_pipeline(baked, hash_file=False)
    assert m.resolution == 64
    cases = tuple(_cases())
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(cases))]
    out = m.pipeline([c.prompt for c in cases], num_inference_steps=STEPS, guidance_scale=CFG, generator=gens,
                     output_type="np")
    images = (out.images * 255).round().astype(np.uint8)
    fr = np.array([read_image(img).dark_fraction for img in images])
    fr = fr[~np.isnan(fr)]
    a, b = _outline_fractions()
    print(f"dark outline fraction: tiny-a {a.mean():.3f}, tiny-a + LoRA {fr.mean():.3f}, tiny-b {b.mean():.3f}")
    assert fr.mean() > 4 * a.mean() + 0.08  # the outline is there...
    assert np.mean(fr > 0.15) >= 0.35 > np.mean(a > 0.15)  # ...in a good share of images, never in tiny-a's
    assert fr.mean() < b.mean()  # ...and thinner than tiny-b's own (what a LoRA cannot carry)
