"""One batch of seeds through A1111's sampling: noise, sigmas or timesteps, CFG denoiser, algorithm.

This is ``KDiffusionSampler.sample`` / ``CompVisSampler.sample`` / ``LCMSampler`` of A1111 1.10 over
a diffusers U-Net: the starting latent is the image RNG's first draw (times the first sigma for
k-samplers), per-step noise continues each seed's stream, Brownian-tree samplers get one tree per
image seed, and the conditioning comes from :func:`~.generate.encode_prompts`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .denoiser import CFGDenoiser, KModel, LCMModel, LCMSchedule, TimestepModel
from .ksamplers import SAMPLE_FUNCTIONS, BrownianTreeNoise
from .noise import ImageNoise, brownian_randn
from .samplers import SamplerSpec, SigmaOptions, k_sigmas, resolve_sampler
from .schedules import DiscreteSchedule, ldm_alphas_cumprod, rescale_zero_terminal_snr
from .tsamplers import TIMESTEP_FUNCTIONS, a1111_timesteps

__all__ = ["model_alphas_cumprod", "sample_batch"]


def model_alphas_cumprod(params: Any) -> torch.Tensor:
    """The model's ``alphas_cumprod`` with A1111's overrides (fp16 downcast, zero terminal SNR)."""
    ac = ldm_alphas_cumprod(downcast=params.downcast_alphas)
    return rescale_zero_terminal_snr(ac) if params.zero_terminal_snr else ac


def _on(schedule: DiscreteSchedule, device: torch.device) -> DiscreteSchedule:
    if torch.device(device).type == "cpu":
        return schedule
    moved = type(schedule).__new__(type(schedule))
    moved.__dict__.update({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in schedule.__dict__.items()})
    return moved


def sample_batch(loaded: Any, params: Any, spec: SamplerSpec, unet: Any, emb: Any, seeds: list[int],
                 shape: tuple[int, int, int]) -> tuple[torch.Tensor, dict[str, object]]:
    """Final latents ``[len(seeds), C, h, w]`` and what the run applied (for the infotext)."""
    dev = loaded.device
    noise = ImageNoise(shape, seeds, params.rng, dev, params.ensd)
    x = noise.first()
    ac = model_alphas_cumprod(params)
    cfg_kwargs = dict(empty=emb.empty, pad_conds=params.pad_conds, pad_conds_v0=params.pad_conds_v0)
    if spec.kind == "timesteps":
        ac_dev = ac.to(dev)
        cfg = CFGDenoiser(TimestepModel(unet, ac_dev, loaded.prediction_type), emb.conds, emb.uncond,
                          params.cfg_scale, len(seeds), scale_multiplier=1 / 12.5 if spec.cfgpp else 1.0,
                          **cfg_kwargs)
        timesteps = a1111_timesteps(params.steps, params.discard_penultimate).to(dev)
        kwargs: dict[str, Any] = {}
        if spec.function == "ddim":
            kwargs["eta"] = params.eta_ddim
            if spec.cfgpp:
                kwargs["cfgpp"] = lambda: cfg.last_uncond
        out = TIMESTEP_FUNCTIONS[spec.function](cfg, x, timesteps, ac_dev, noise.next, **kwargs)
    else:
        schedule = LCMSchedule(ac) if spec.kind == "lcm" else DiscreteSchedule(ac)
        label = resolve_sampler(params.sampler, params.schedule_type)[1]
        options = SigmaOptions(params.discard_penultimate, params.schedule_min_sigma, params.schedule_max_sigma,
                               params.schedule_rho, params.beta_alpha, params.beta_beta)
        sigmas = k_sigmas(spec, label, params.steps, schedule, options, loaded.architecture.name)
        dev_schedule = _on(schedule, dev)
        model = (LCMModel(unet, dev_schedule) if spec.kind == "lcm"
                 else KModel(unet, dev_schedule, loaded.prediction_type))
        cfg = CFGDenoiser(model, emb.conds, emb.uncond, params.cfg_scale, len(seeds), **cfg_kwargs)
        x = x * (torch.sqrt(1.0 + sigmas[0] ** 2.0) if params.sgm_noise_multiplier else sigmas[0])
        kwargs = {}
        if spec.eta:
            kwargs["eta"] = params.eta
        if spec.s_noise:
            kwargs["s_noise"] = params.s_noise
        if spec.churn:
            kwargs.update(s_churn=params.s_churn, s_tmin=params.s_tmin, s_tmax=params.s_tmax or float("inf"))
        if spec.solver_type:
            kwargs["solver_type"] = spec.solver_type
        ctx: contextlib.AbstractContextManager = (brownian_randn(params.rng, dev) if spec.brownian
                                                  else contextlib.nullcontext())
        fn = SAMPLE_FUNCTIONS[spec.function]
        with ctx:  # the trees draw while they are built and while sampling
            if spec.brownian:
                noise_fn: Any = BrownianTreeNoise(x, sigmas[sigmas > 0].min(), sigmas.max(), seeds)
            else:
                def noise_fn(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
                    return noise.next()
            if spec.function in ("sample_dpm_fast", "sample_dpm_adaptive"):
                s_min, s_max = schedule.sigmas[0].item(), schedule.sigmas[-1].item()
                if spec.function == "sample_dpm_fast":
                    kwargs["n"] = params.steps
                out = fn(cfg, x, s_min, s_max, noise=noise_fn, **kwargs)
            else:
                out = fn(cfg, x, sigmas, noise_fn, **kwargs)
    return out, {"RNG": noise.source, "Pad conds": cfg.padded, "Pad conds v0": cfg.padded_v0}
