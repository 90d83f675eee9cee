"""Captioned synthetic images for the two bundled tiny models.

Each image is one shape (circle / square / triangle) with a colour, a size and a position, on a
plain background, and a caption that says all four in words ("a large red circle on the left,
white background"). Style ``A`` draws flat fills; style ``B`` draws the same scenes with a thick
black outline, so a model fine-tuned on B keeps A's vocabulary and composition and adds one
measurable visual trait (dark pixels on the shape's rim).

The vocabulary lives here once; the tests, the README and ``models.json`` read it from here so
they cannot drift apart. Rendering is done at 4x and downsampled (Pillow's LANCZOS) to get
anti-aliased edges like real images, which the VAE has to learn anyway.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (12, 12, 12),
}
# Side of the bounding box in pixels. v3 made them larger (v2: 18 and 32): through 8x8 latents a
# small square kept its corners in only about half of the VAE round trips and read as a circle.
SIZES: dict[str, int] = {"small": 24, "large": 38}
POSITIONS: dict[str, tuple[int, int]] = {
    "center": (32, 32),
    "left": (22, 32),
    "right": (42, 32),
    "top": (32, 22),
    "bottom": (32, 42),
}
STYLES = ("A", "B")
OUTLINE_RGB = (10, 10, 10)
OUTLINE_WIDTH = 3  # pixels at the final resolution


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"on the {self.position}"
        if self.position in ("top", "bottom"):
            where = f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where}, {self.background} background"


def all_scenes() -> list[Scene]:
    return [
        Scene(s, c, z, p, b)
        for s in SHAPES
        for c in COLOURS
        for z in SIZES
        for p in POSITIONS
        for b in BACKGROUNDS
    ]


def shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    h = side / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    return None


def render(scene: Scene, style: str = "A", jitter: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """The scene as an (H, W, 3) uint8 array; ``jitter`` = (dx, dy, dsize) in pixels."""
    k = 4
    n = IMAGE_SIZE * k
    img = Image.new("RGB", (n, n), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cx, cy = POSITIONS[scene.position]
    cx, cy = (cx + jitter[0]) * k, (cy + jitter[1]) * k
    side = (SIZES[scene.size] + jitter[2]) * k
    fill = COLOURS[scene.colour]
    outline = OUTLINE_RGB if style == "B" else None
    width = OUTLINE_WIDTH * k if style == "B" else 0
    poly = shape_polygon(scene.shape, cx, cy, side)
    if poly is None:
        h = side / 2
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(poly, fill=fill, outline=outline, width=width)
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def make_dataset(n: int, style: str, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` jittered renders (uint8, N x H x W x 3) and their captions, reproducible from ``seed``."""
    rng = random.Random(seed)
    scenes = all_scenes()
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        sc = scenes[i % len(scenes)] if i < len(scenes) else rng.choice(scenes)
        jit = (rng.randint(-2, 2), rng.randint(-2, 2), rng.randint(-2, 2))
        images[i] = render(sc, style, jit)
        captions.append(sc.caption)
    return images, captions


def vocabulary() -> dict[str, list[str]]:
    return {
        "shape": list(SHAPES),
        "colour": list(COLOURS),
        "size": list(SIZES),
        "position": list(POSITIONS),
        "background": list(BACKGROUNDS),
    }


if __name__ == "__main__":  # write a contact sheet to eyeball the set
    import sys

    imgs, caps = make_dataset(32, sys.argv[1] if len(sys.argv) > 1 else "A", 0)
    sheet = imgs.reshape(4, 8, IMAGE_SIZE, IMAGE_SIZE, 3).transpose(0, 2, 1, 3, 4)
    Image.fromarray(sheet.reshape(4 * IMAGE_SIZE, 8 * IMAGE_SIZE, 3)).save("/tmp/sheet.png")
    print("\n".join(caps[:8]))
