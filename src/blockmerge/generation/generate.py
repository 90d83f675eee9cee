"""Text-to-image generation as A1111 users describe it, on a loaded diffusers pipeline.

Why not simply call the pipeline with strings: A1111 semantics (emphasis weights, 75-token chunks,
clip skip) live in :mod:`.prompts`; seeds must give the same image whether generated alone or in a
batch, so every image gets its own CPU generator for its initial noise and for the sampler's
per-step noise; and the sweeps need the final latents as well as the pixels.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import __version__
from ..errors import BlockmergeError
from .infotext import Infotext, format_infotext, png_info, unsupported_fields

_SEED_RANGE = re.compile(r"^\s*(-?\d+)\s*-\s*(-?\d+)\s*$")


def parse_seeds(text: str | int | Iterable[int], arg: str = "--seed") -> list[int]:
    """``4``, ``1,2,3,4`` or ``1-4`` (also mixed: ``1-3,10``) -> a list of seeds."""
    if isinstance(text, int):
        return [text]
    if not isinstance(text, str):
        return [int(s) for s in text]
    seeds: list[int] = []
    for part in [p for p in text.split(",") if p.strip()]:
        m = _SEED_RANGE.match(part)
        try:
            if m and not part.strip().startswith("-"):
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise BlockmergeError(f"{arg}: range {part.strip()!r} goes backwards")
                if hi - lo > 100_000:
                    raise BlockmergeError(f"{arg}: range {part.strip()!r} is too long")
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise BlockmergeError(f"{arg}: {part.strip()!r} is not a seed (use 4, 1,2,3 or 1-4)") from None
    if not seeds:
        raise BlockmergeError(f"{arg}: no seeds given")
    for s in seeds:
        if not 0 <= s < 2**32:
            raise BlockmergeError(f"{arg}: seed {s} is outside 0..4294967295")
    return seeds


@dataclass(frozen=True)
class GenerationParams:
    """What an image is generated from (everything an infotext's fields can say that we honour)."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "Euler a"
    schedule_type: str | None = None
    cfg_scale: float = 7.0
    width: int | None = None
    height: int | None = None
    clip_skip: int = 1
    seeds: tuple[int, ...] = (1,)
    # Fields of the source infotext we cannot honour, for a warning (never written as applied).
    ignored: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_infotext(cls, info: Infotext, **overrides: Any) -> GenerationParams:
        """Fields of the infotext, with explicit ``overrides`` (non-None) winning."""
        info.validate()
        size = info.size
        base: dict[str, Any] = {
            "prompt": info.prompt,
            "negative_prompt": info.negative_prompt,
            "clip_skip": info.clip_skip,
            "ignored": tuple(unsupported_fields(info)),
        }
        for name, value in (("steps", info.steps), ("sampler", info.sampler), ("cfg_scale", info.cfg_scale),
                            ("schedule_type", info.schedule_type)):
            if value is not None:
                base[name] = value
        if size is not None:
            base["width"], base["height"] = size
        if info.seed is not None:
            base["seeds"] = (info.seed,)
        base.update({k: v for k, v in overrides.items() if v is not None})
        if "seeds" in base:
            base["seeds"] = tuple(base["seeds"])
        return cls(**base).checked()

    def checked(self) -> GenerationParams:
        if self.steps < 1 or self.steps > 1000:
            raise BlockmergeError(f"--steps {self.steps}: must be 1..1000")
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise BlockmergeError(f"--cfg-scale {self.cfg_scale}: must be a finite number >= 0")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v % 8):
                raise BlockmergeError(f"--{name} {v}: must be a positive multiple of 8")
        if self.clip_skip < 1:
            raise BlockmergeError(f"--clip-skip {self.clip_skip}: must be >= 1")
        if not self.seeds:
            raise BlockmergeError("--seed: no seeds given")
        return self

    def infotext(self, seed: int, *, width: int, height: int, model: str | None = None,
                 model_hash: str | None = None, extra: dict[str, object] | None = None) -> Infotext:
        """The A1111 infotext of one image made with these parameters."""
        return Infotext.build(
            self.prompt, self.negative_prompt, steps=self.steps, sampler=self.sampler,
            schedule_type=self.schedule_type, cfg_scale=self.cfg_scale, seed=seed, width=width, height=height,
            model_hash=model_hash, model=model, clip_skip=self.clip_skip,
            extra={**(extra or {}), "Version": f"blockmerge {__version__}"},
        )


@dataclass
class GeneratedImage:
    seed: int
    image: Image.Image
    latent: torch.Tensor  # the final latent (before the VAE), float32 on CPU, shape [C, h, w]
    infotext: str


@dataclass
class PromptEmbeddings:
    """Encoded prompt pair, reusable across variants that do not touch the text encoder."""

    kwargs: dict[str, torch.Tensor]


def encode_prompts(loaded: Any, params: GenerationParams) -> PromptEmbeddings:
    """Encode the prompt pair the A1111 way (SD1/SD2) or with diffusers' SDXL encoder."""
    pipe = loaded.pipeline
    arch = loaded.architecture.name
    with torch.inference_mode():
        if arch == "SDXL":
            if re.search(r"(?<!\\)[\(\[]|BREAK", params.prompt + params.negative_prompt):
                warnings.warn("SDXL prompts are encoded without A1111 emphasis/BREAK handling", stacklevel=2)
            pe, ne, pp, npp = pipe.encode_prompt(
                prompt=params.prompt, negative_prompt=params.negative_prompt, device=loaded.device,
                num_images_per_prompt=1, do_classifier_free_guidance=True,
                clip_skip=None if params.clip_skip <= 1 else params.clip_skip - 1,
            )
            return PromptEmbeddings({"prompt_embeds": pe, "negative_prompt_embeds": ne,
                                     "pooled_prompt_embeds": pp, "negative_pooled_prompt_embeds": npp})
        from .prompts import encode_prompt_pair_a1111

        cond, uncond = encode_prompt_pair_a1111(
            params.prompt, params.negative_prompt, pipe.tokenizer, pipe.text_encoder, params.clip_skip
        )
        dt = loaded.dtype
        return PromptEmbeddings({"prompt_embeds": cond.to(loaded.device, dt),
                                 "negative_prompt_embeds": uncond.to(loaded.device, dt)})


def seeded_noise(seed: int, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Generator]:
    """The starting latent of one seed, and the generator that goes on to give the sampler's per-step
    noise. CPU RNG, so a seed means the same on every device; one stream per image, continued after
    the starting latent as A1111 does (a fresh generator with the same seed would hand the sampler
    the starting noise again as its first step's noise, and the samples degrade)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32), g


def _decode(loaded: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode; retried in float32 when fp16 overflows to NaN (A1111's no-half-vae fallback)."""
    vae = loaded.pipeline.vae
    scale = vae.config.scaling_factor
    with torch.inference_mode():
        out = vae.decode(latents.to(vae.dtype) / scale).sample
        if vae.dtype != torch.float32 and torch.isnan(out).any():
            vae.to(torch.float32)
            try:
                out = vae.decode(latents.float() / scale).sample
            finally:
                vae.to(loaded.dtype)
    return out


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def generate(
    loaded: Any,
    params: GenerationParams,
    *,
    seeds: Sequence[int] | None = None,
    batch_size: int | None = None,
    embeddings: PromptEmbeddings | None = None,
    extra_infotext: dict[str, object] | None = None,
    on_image: Callable[[GeneratedImage], None] | None = None,
) -> list[GeneratedImage]:
    """Generate one image per seed. A batch of seeds gives the images one-at-a-time generation gives.

    ``embeddings`` lets a caller reuse an encoded prompt (the sweeps do, when the text encoder is
    untouched). ``on_image`` is called as each image is ready.
    """
    params = params.checked()
    seeds = list(seeds if seeds is not None else params.seeds)
    pipe = loaded.pipeline
    width = params.width or loaded.resolution
    height = params.height or loaded.resolution
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if width % factor or height % factor:
        raise BlockmergeError(f"--width/--height {width}x{height}: must be multiples of {factor} for this model")
    pipe.scheduler = loaded.make_scheduler(params.sampler, params.schedule_type)
    emb = embeddings or encode_prompts(loaded, params)
    bs = max(1, batch_size or len(seeds))
    c = pipe.unet.config.in_channels
    model_name = Path(loaded.path).stem
    results: list[GeneratedImage] = []
    for start in range(0, len(seeds), bs):
        chunk = seeds[start:start + bs]
        n = len(chunk)
        noise = [seeded_noise(s, (1, c, height // factor, width // factor)) for s in chunk]
        latents = torch.cat([x for x, _ in noise])
        gens = [g for _, g in noise]
        kwargs = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in emb.kwargs.items()}
        with torch.inference_mode():
            out = pipe(
                num_inference_steps=params.steps, guidance_scale=params.cfg_scale, width=width, height=height,
                latents=latents.to(loaded.device, loaded.dtype), generator=gens if n > 1 else gens[0],
                output_type="latent", return_dict=True, **kwargs,
            ).images
        pixels = _decode(loaded, out)
        for i, (seed, img) in enumerate(zip(chunk, to_pil(pixels), strict=True)):
            text = format_infotext(params.infotext(seed, width=width, height=height, model=model_name,
                                                   model_hash=loaded.short_hash, extra=extra_infotext))
            g = GeneratedImage(seed, img, out[i].float().cpu(), text)
            results.append(g)
            if on_image:
                on_image(g)
    return results


def save_png(image: GeneratedImage, path: str | os.PathLike[str]) -> Path:
    """Write a PNG carrying A1111's ``parameters`` text chunk, atomically."""
    from ..io import atomic_write

    p = Path(path)
    with atomic_write(p) as f:
        image.image.save(f, format="PNG", pnginfo=png_info(image.infotext))
    return p


def with_seeds(params: GenerationParams, seeds: Iterable[int]) -> GenerationParams:
    return replace(params, seeds=tuple(seeds))
