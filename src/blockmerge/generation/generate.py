"""Text-to-image generation that draws what A1111 1.10 draws, on a loaded diffusers model.

Why not the diffusers pipeline: its schedulers are other algorithms (other sigma interpolation,
other noise draws; UniPC gave NaN latents at sigma 0 on the bundled model, and Brownian-tree
samplers drew from torch's global RNG). Here the diffusers U-Net, VAE and text encoders run inside
A1111's loop: its prompt conditioning (:mod:`.prompts`), its noise sources (:mod:`.noise`), its
sigma schedules (:mod:`.schedules`, :mod:`.samplers`), its CFG denoiser (:mod:`.denoiser`) and the
k-diffusion / timestep algorithms (:mod:`.ksamplers`, :mod:`.tsamplers`). Every image has its own
noise stream, so a batch of seeds gives the images one-at-a-time generation gives (to float
rounding of batched convolutions); the sweeps also get the final latents.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import __version__
from ..errors import BlockmergeError
from .extra_networks import strip_extra_networks
from .infotext import (
    KNOWN_UNSUPPORTED,
    Infotext,
    format_infotext,
    normalize_prompt,
    png_info,
    unsupported_fields,
)
from .noise import RNG_SOURCES, SEED_MAX

_SEED_RANGE = re.compile(r"^\s*(-?\d+)\s*-\s*(-?\d+)\s*$")
#: A1111 draws a random seed (for ``Seed: -1``) from this range.
_RANDOM_SEEDS = 4294967294


def random_seed() -> int:
    """A seed for ``-1``, drawn as A1111 draws it (``random.randrange(4294967294)``)."""
    return random.SystemRandom().randrange(_RANDOM_SEEDS)


def check_seed(seed: int, arg: str = "--seed") -> int:
    """``seed`` if A1111 accepts it (0 .. 2**64 - 1; ``-1`` means random), else an error naming ``arg``."""
    if seed == -1:
        return random_seed()
    if not 0 <= seed <= SEED_MAX:
        raise BlockmergeError(f"{arg}: seed {seed} is outside 0..{SEED_MAX} (-1 for a random seed)")
    return seed


def parse_seeds(text: str | int | Iterable[int], arg: str = "--seed") -> list[int]:
    """``4``, ``1,2,3,4`` or ``1-4`` (also mixed: ``1-3,10``) -> a list of seeds; ``-1`` is a random seed."""
    if isinstance(text, int):
        return [check_seed(text, arg)]
    if not isinstance(text, str):
        return [check_seed(int(s), arg) for s in text]
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
    return [check_seed(s, arg) for s in seeds]


@dataclass(frozen=True)
class GenerationParams:
    """What an image is generated from: every infotext field blockmerge honours, A1111's defaults."""

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
    rng: str = "GPU"  # A1111's default; drawn as NV off CUDA
    ensd: int = 0
    eta: float = 1.0  # "Eta" (ancestral / SDE samplers)
    eta_ddim: float = 0.0  # "Eta DDIM"
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 0.0  # 0 = infinity, as in A1111
    s_noise: float = 1.0
    schedule_rho: float = 0.0
    schedule_min_sigma: float = 0.0
    schedule_max_sigma: float = 0.0
    discard_penultimate: bool = False
    beta_alpha: float = 0.6
    beta_beta: float = 0.6
    sgm_noise_multiplier: bool = False
    emphasis: str = "Original"
    pad_conds: bool = False
    pad_conds_v0: bool = False
    old_prompt_editing: bool = False
    downcast_alphas: bool = False
    zero_terminal_snr: bool = False
    # (Batch size, Batch pos) of the image an infotext describes: batched convolutions round
    # differently from one image at a time, so the image is redrawn in a batch of that size.
    source_batch: tuple[int, int] | None = None
    # A1111's "Lora hashes" of the infotext (``name: hash, ...``): finds a prompt's LoRA by its hash
    # when no file has its name, and says so when the file found has another hash.
    lora_hashes: str = ""
    # Warnings about the source infotext: what is not applied (never written as applied).
    ignored: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_infotext(cls, info: Infotext, **overrides: Any) -> GenerationParams:
        """Fields of the infotext, with explicit ``overrides`` (non-None) winning."""
        from .infotext_fields import params_from_infotext

        base, notes = params_from_infotext(info)
        base.update({k: v for k, v in overrides.items() if v is not None})
        if "seeds" in base:
            base["seeds"] = tuple(base["seeds"])
        return cls(**base, ignored=tuple(notes)).checked()

    def checked(self) -> GenerationParams:
        from .extra_networks import strip_comments
        from .prompts import EMPHASIS_MODES
        from .samplers import resolve_sampler

        if "#" in self.prompt or "#" in self.negative_prompt:  # A1111 1.8+ drops # comments from both
            return replace(self, prompt=strip_comments(self.prompt),
                           negative_prompt=strip_comments(self.negative_prompt)).checked()

        if self.steps < 1 or self.steps > 1000:
            raise BlockmergeError(f"--steps {self.steps}: must be 1..1000")
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise BlockmergeError(f"--cfg-scale {self.cfg_scale}: must be a finite number >= 0")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v % 8):
                raise BlockmergeError(f"--{name} {v}: must be a positive multiple of 8")
        from .infotext import check_prompt_writable

        # Prompts whose infotext would read back as other fields are refused before any sampling.
        check_prompt_writable(self.prompt, "prompt")
        check_prompt_writable(self.negative_prompt, "negative prompt")
        if self.clip_skip < 1:
            raise BlockmergeError(f"--clip-skip {self.clip_skip}: must be >= 1")
        if not self.seeds:
            raise BlockmergeError("--seed: no seeds given")
        for s in self.seeds:
            if not 0 <= s <= SEED_MAX:
                raise BlockmergeError(f"--seed: seed {s} is outside 0..{SEED_MAX}")
            if not 0 <= s + self.ensd <= SEED_MAX:
                raise BlockmergeError(f"--ensd {self.ensd}: seed {s} + ENSD leaves 0..{SEED_MAX}")
        if self.rng not in RNG_SOURCES:
            raise BlockmergeError(f"--rng {self.rng!r}: expected one of {', '.join(RNG_SOURCES)}")
        if self.emphasis not in EMPHASIS_MODES:
            raise BlockmergeError(f"--emphasis {self.emphasis!r}: expected one of {', '.join(EMPHASIS_MODES)}")
        for name in ("eta", "eta_ddim", "s_churn", "s_tmin", "s_tmax", "s_noise", "schedule_rho",
                     "schedule_min_sigma", "schedule_max_sigma", "beta_alpha", "beta_beta"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise BlockmergeError(f"{name}: must be a finite number >= 0, got {v}")
        name, _ = resolve_sampler(self.sampler, self.schedule_type, source="--sampler")
        if name == "UniPC":
            from .tsamplers import a1111_timesteps

            n = len(a1111_timesteps(self.steps, self.discard_penultimate))
            if n < 3:
                raise BlockmergeError(f"--steps {self.steps}: UniPC (order 3, as in A1111) needs at least 3 steps")
        return self

    @property
    def sampler_name(self) -> str:
        from .samplers import resolve_sampler

        return resolve_sampler(self.sampler, self.schedule_type)[0]

    def infotext(self, seed: int, *, width: int, height: int, model: str | None = None,
                 model_hash: str | None = None, extra: dict[str, object] | None = None,
                 applied: dict[str, object] | None = None, batch: tuple[int, int] | None = None) -> Infotext:
        """The A1111 infotext of one image made with these parameters.

        ``applied`` holds what only the run knows (the RNG that really drew, whether conds were
        padded); everything that changed the image is written, in A1111's order and spelling.
        """
        from .infotext_fields import infotext_fields

        name, schedule, fields_ = infotext_fields(self, applied or {})
        return Infotext.build(
            normalize_prompt(self.prompt), normalize_prompt(self.negative_prompt), steps=self.steps, sampler=name,
            schedule_type=schedule, cfg_scale=self.cfg_scale, seed=seed, width=width, height=height,
            model_hash=model_hash, model=model, clip_skip=self.clip_skip, batch=batch,
            extra={**fields_, **(extra or {}), "Version": f"blockmerge {__version__}"},
        )


@dataclass
class GeneratedImage:
    seed: int
    image: Image.Image
    latent: torch.Tensor  # the final latent (before the VAE), float32 on CPU, shape [C, h, w]
    infotext: str


@dataclass
class PromptEmbeddings:
    """An encoded prompt pair (with its prompt-editing schedules), reusable across variants that do
    not touch the text encoder. ``key`` says what it was encoded for."""

    conds: list  # [(ScheduledCond, weight)] for the AND parts of the prompt
    uncond: list  # ScheduledCond of the negative prompt
    empty: Any  # the empty prompt's Cond (for Pad conds)
    key: tuple


def _embedding_key(params: GenerationParams) -> tuple:
    from .samplers import SAMPLERS

    spec = SAMPLERS[params.sampler_name]
    total = params.steps * (2 if spec.second_order else 1)
    return (strip_extra_networks(params.prompt), params.negative_prompt, total, params.clip_skip, params.emphasis,
            params.old_prompt_editing)


def _encoder_sides(loaded: Any) -> list:
    from .prompts import EncoderSide

    pipe = loaded.pipeline
    arch = loaded.architecture.name
    if arch == "SDXL":
        return [EncoderSide(pipe.tokenizer, pipe.text_encoder, "penultimate"),
                EncoderSide(pipe.tokenizer_2, pipe.text_encoder_2, "penultimate", pooled=True)]
    return [EncoderSide(pipe.tokenizer, pipe.text_encoder, "last" if arch == "SD2" else "clip_skip")]


def encode_prompts(loaded: Any, params: GenerationParams) -> PromptEmbeddings:
    """Encode the prompt pair as A1111 does (SD1, SD2 and SDXL alike): ``AND`` parts, prompt-editing
    schedules over the sampler's model calls, chunks, emphasis, clip skip (SD1)."""
    from .denoiser import Cond
    from .prompts import encode_texts, prompt_schedules, split_and

    params = params.checked()
    key = _embedding_key(params)
    total_steps = key[2]
    sides = _encoder_sides(loaded)
    sdxl = loaded.architecture.name == "SDXL"
    cache: dict[str, list] = {}

    def schedule(text: str, negative: bool = False) -> list:
        if text in cache and not negative:
            return cache[text]
        entries = prompt_schedules(text, total_steps, params.old_prompt_editing)
        texts = [t for _, t in entries]
        z, pooled = encode_texts(texts, sides, clip_skip=params.clip_skip, emphasis=params.emphasis)
        if negative and sdxl and all(t == "" for t in texts):  # A1111/SDXL: an empty negative is zeros
            z = torch.zeros_like(z)
            pooled = torch.zeros_like(pooled) if pooled is not None else None
        out = [(end, Cond(z[i].float(), None if pooled is None else pooled[i].float()))
               for i, (end, _) in enumerate(entries)]
        if not negative:
            cache[text] = out
        return out

    with torch.inference_mode():
        # A1111 takes <lora:...> and every other <network:...> out of the positive prompt before encoding
        conds = [(schedule(text), weight) for text, weight in split_and(strip_extra_networks(params.prompt))]
        uncond = schedule(params.negative_prompt, negative=True)
        z, pooled = encode_texts([""], sides, clip_skip=params.clip_skip, emphasis=params.emphasis)
        empty = Cond(z[0].float(), None if pooled is None else pooled[0].float())
    return PromptEmbeddings(conds, uncond, empty, key)


def _unet_call(loaded: Any, width: int, height: int) -> Callable:
    unet = loaded.pipeline.unet
    dev, dt = loaded.device, loaded.dtype
    time_ids = None
    if loaded.architecture.name == "SDXL":  # original size, crop (0, 0), target size: A1111's defaults
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dt, device=dev)

    def call(x: torch.Tensor, t: torch.Tensor, crossattn: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if time_ids is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(dev, dt), "time_ids": time_ids.repeat(x.shape[0], 1)}
        out = unet(x.to(dev, dt), t.to(dev), encoder_hidden_states=crossattn.to(dev, dt), **kwargs).sample
        return out.float()

    return call


def _decode(loaded: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode as A1111 (``1 / scale * z``); retried in float32 when fp16 overflows to NaN."""
    vae = loaded.pipeline.vae
    inv = 1.0 / vae.config.scaling_factor
    with torch.inference_mode():
        out = vae.decode((inv * latents).to(vae.dtype)).sample
        if vae.dtype != torch.float32 and torch.isnan(out).any():
            vae.to(torch.float32)
            try:
                out = vae.decode((inv * latents).float()).sample
            finally:
                vae.to(loaded.dtype)
    return out


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Pixels as A1111 makes them: ``clamp((x + 1) / 2, 0, 1) * 255``, truncated to uint8."""
    arr = (torch.clamp((images.float() + 1.0) / 2.0, min=0.0, max=1.0) * 255.0).to(torch.uint8)
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
    lora_dir: str | os.PathLike[str] | None = None,
    presets: Any = None,
    notes: list[str] | None = None,
) -> list[GeneratedImage]:
    """Generate one image per seed. A batch of seeds gives the images one-at-a-time generation gives.

    ``embeddings`` lets a caller reuse an encoded prompt (the sweeps do, when the text encoder is
    untouched). ``on_image`` is called as each image is ready. ``<lora:NAME:...>`` in the prompt is
    applied in place for these images and taken off after (NAME looked up in ``lora_dir``, then among
    the bundled LoRAs); the images' infotext carries A1111's ``Lora hashes``. Warnings (networks not
    applied, LoRA modules that fit nothing) are appended to ``notes``.
    """
    from .extra_networks import lora_calls

    params = params.checked()
    calls, call_notes = lora_calls(params.prompt)
    if notes is not None:
        notes.extend(call_notes)
    if not calls:
        return _generate(loaded, params, seeds, batch_size, embeddings, extra_infotext, on_image)
    from .lora_inplace import loras_applied

    loras, hashes = resolve_prompt_loras(loaded, calls, params, lora_dir, presets, notes)
    extra = {**(extra_infotext or {}), "Lora hashes": hashes}
    with loras_applied(loaded, loras) as warns:
        if notes is not None:
            notes.extend(warns)
        # the LoRAs may change the text encoder: encode under them, never reuse embeddings made without
        return _generate(loaded, params, seeds, batch_size, None, extra, on_image)


def resolve_prompt_loras(loaded: Any, calls: Sequence[Any], params: GenerationParams,
                         lora_dir: str | os.PathLike[str] | None, presets: Any = None,
                         notes: list[str] | None = None) -> tuple[list[Any], str]:
    """The files and per-block weights of a prompt's ``<lora:...>`` calls, and A1111's ``Lora hashes``."""
    from ..lora.library import find_lora, find_lora_by_hash, lora_hash
    from ..lora.spec import lora_weights
    from ..models import find_bundled_lora
    from .lora_inplace import InPlaceLora

    wanted = _parse_lora_hashes(params.lora_hashes)
    loras, parts = [], []
    for c in calls:
        path = find_lora(c.name, lora_dir) or find_bundled_lora(c.name)
        if path is None and c.name in wanted:
            path = find_lora_by_hash(wanted[c.name], lora_dir)
        if path is None:
            where = f"in --lora-dir {lora_dir} or " if lora_dir is not None else "(no --lora-dir given) or "
            raise BlockmergeError(f"prompt: {c.text}: no LoRA named {c.name!r} {where}among the bundled LoRAs")
        h = lora_hash(path)
        if c.name in wanted and wanted[c.name] != h and notes is not None:
            notes.append(f"prompt: {c.text}: {path} has the hash {h}, the infotext's Lora hashes say "
                         f"{wanted[c.name]}: another file of that name")
        weights = lora_weights(loaded.architecture, c.lbw, c.te, c.unet, presets, f"prompt: {c.text}: lbw")
        loras.append(InPlaceLora(Path(path), weights, c.dyn, c.name))
        parts.append(f"{c.name.replace(':', '').replace(',', '')}: {h}")
    return loras, ", ".join(dict.fromkeys(parts))


def _parse_lora_hashes(text: str) -> dict[str, str]:
    out = {}
    for part in (text or "").split(","):
        name, sep, h = part.rpartition(":")
        if sep and name.strip() and h.strip():
            out[name.strip()] = h.strip().lower()
    return out


def _generate(
    loaded: Any,
    params: GenerationParams,
    seeds: Sequence[int] | None,
    batch_size: int | None,
    embeddings: PromptEmbeddings | None,
    extra_infotext: dict[str, object] | None,
    on_image: Callable[[GeneratedImage], None] | None,
) -> list[GeneratedImage]:
    from .run import sample_batch

    params = params.checked()
    if getattr(loaded, "zero_snr", False) and not params.zero_terminal_snr:
        # A file with the ztsnr marker was trained on the zero-terminal-SNR schedule (NoobAI-style
        # v-prediction SDXL), as A1111 and Forge sample it; the PNG says so.
        params = replace(params, zero_terminal_snr=True)
    seeds = [check_seed(int(s)) for s in (seeds if seeds is not None else params.seeds)]
    pipe = loaded.pipeline
    width = params.width or loaded.resolution
    height = params.height or loaded.resolution
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if width % factor or height % factor:
        raise BlockmergeError(f"--width/--height {width}x{height}: must be multiples of {factor} for this model")
    emb = embeddings if embeddings is not None else encode_prompts(loaded, params)
    if emb.key != _embedding_key(params):
        raise BlockmergeError("embeddings: encoded for other prompts, steps or sampler; encode them again")
    from .samplers import SAMPLERS

    spec = SAMPLERS[params.sampler_name]
    shape = (pipe.unet.config.in_channels, height // factor, width // factor)
    unet = _unet_call(loaded, width, height)
    model_name = Path(loaded.path).stem
    results: list[GeneratedImage] = []
    for chunk, keep in _batches(seeds, params, spec, batch_size):
        with torch.inference_mode():
            latents, applied = sample_batch(loaded, params, spec, unet, emb, chunk, shape)
        if not torch.isfinite(latents).all():
            raise BlockmergeError(f"sampler {params.sampler!r}: the latents are not finite (NaN/inf); no image written")
        pixels = _decode(loaded, latents)
        for i, (seed, img) in enumerate(zip(chunk, to_pil(pixels), strict=True)):
            if i not in keep:
                continue
            text = format_infotext(params.infotext(seed, width=width, height=height, model=model_name,
                                                   model_hash=loaded.short_hash, extra=extra_infotext,
                                                   applied=applied, batch=(len(chunk), i)))
            g = GeneratedImage(seed, img, latents[i].float().cpu(), text)
            results.append(g)
            if on_image:
                on_image(g)
    return results


def _batches(seeds: Sequence[int], params: GenerationParams, spec: Any,
             batch_size: int | None) -> Iterable[tuple[list[int], frozenset[int]]]:
    """The U-Net batches to draw ``seeds`` in, each with the positions whose images are kept.

    Batched convolutions round differently from one image at a time (measured here: one 8-bit step
    on the bundled model with 2 threads), so an image an infotext says was drawn at ``Batch pos`` k
    of a ``Batch size`` n batch is redrawn in a batch of n with its seed at k; the other places
    hold A1111's neighbours (seed - k + j), whose images are dropped. DPM adaptive sizes its steps
    on the error of the whole batch: one image at a time, as A1111 draws it at batch size 1.
    """
    if spec.function == "sample_dpm_adaptive":
        for s in seeds:
            yield [s], frozenset({0})
        return
    if params.source_batch is not None and params.source_batch[0] > 1 and batch_size is None:
        n, k = params.source_batch
        for s in seeds:
            fill = [s - k + j for j in range(n)]
            ok = all(0 <= f <= SEED_MAX and 0 <= f + params.ensd <= SEED_MAX for f in fill)
            yield (fill if ok else [s] * n), frozenset({k})
        return
    bs = max(1, batch_size or len(seeds))
    for start in range(0, len(seeds), bs):
        chunk = list(seeds[start:start + bs])
        yield chunk, frozenset(range(len(chunk)))


def save_png(image: GeneratedImage, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write a PNG carrying A1111's ``parameters`` text chunk, through the write policy (atomic; an
    existing file only with ``overwrite``)."""
    from ..io import atomic_write

    p = Path(path)
    with atomic_write(p, overwrite=overwrite) as f:
        image.image.save(f, format="PNG", pnginfo=png_info(image.infotext))
    return p


def with_seeds(params: GenerationParams, seeds: Iterable[int]) -> GenerationParams:
    return replace(params, seeds=tuple(seeds))


__all__ = [
    "KNOWN_UNSUPPORTED",
    "GeneratedImage",
    "GenerationParams",
    "PromptEmbeddings",
    "check_seed",
    "encode_prompts",
    "generate",
    "parse_seeds",
    "random_seed",
    "save_png",
    "to_pil",
    "unsupported_fields",
    "with_seeds",
]
