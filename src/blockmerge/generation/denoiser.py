"""The model as A1111's samplers see it: a diffusers U-Net behind k-diffusion's CompVis wrappers and
A1111's classifier-free-guidance denoiser.

* :class:`KModel` is k-diffusion's ``CompVisDenoiser`` / ``CompVisVDenoiser``: the sampler speaks
  sigmas; the U-Net gets ``x * c_in`` and the (fractional) timestep ``sigma_to_t(sigma)``; eps or v
  output becomes the denoised latent.
* :class:`LCMModel` is A1111's ``LCMCompVisDenoiser`` (50 original timesteps, consistency scalings).
* :class:`TimestepModel` is A1111's ``CompVisTimestepsDenoiser`` for DDIM/PLMS/UniPC (returns eps).
* :class:`CFGDenoiser` is ``sd_samplers_cfg_denoiser.CFGDenoiser``: it picks each prompt's
  conditioning for the current model call (prompt editing counts calls), batches the ``AND``
  sub-prompts and the negative prompt through the U-Net (one call when their token counts match,
  else separately, unless ``Pad conds``), and combines ``uncond + sum(w * scale * (cond - uncond))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .schedules import DiscreteSchedule

__all__ = ["CFGDenoiser", "Cond", "KModel", "LCMModel", "ScheduledCond", "TimestepModel", "UNetCall"]


@dataclass
class Cond:
    """One encoded text: cross-attention tokens ``[T, D]`` and, for SDXL, the pooled embedding."""

    crossattn: torch.Tensor
    pooled: torch.Tensor | None = None


#: A prompt's schedule: (last model call it applies to, its conditioning), in order.
ScheduledCond = list[tuple[int, Cond]]

#: ``unet(x, t, crossattn [N, T, D], pooled [N, P] or None) -> raw U-Net output``
UNetCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v[(...,) + (None,) * (ndim - v.ndim)]


class KModel:
    """k-diffusion's CompVis wrapper over the U-Net: ``(x, sigma, cond) -> denoised``."""

    def __init__(self, unet: UNetCall, schedule: DiscreteSchedule, prediction_type: str) -> None:
        self.unet, self.schedule, self.v = unet, schedule, prediction_type == "v_prediction"

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, crossattn: torch.Tensor,
                 pooled: torch.Tensor | None) -> torch.Tensor:
        c_in = _dims(1 / (sigma**2 + 1.0) ** 0.5, x.ndim)
        out = self.unet(x * c_in, self.schedule.sigma_to_t(sigma), crossattn, pooled)
        if self.v:
            c_skip = _dims(1.0 / (sigma**2 + 1.0), x.ndim)
            c_out = _dims(-sigma * 1.0 / (sigma**2 + 1.0) ** 0.5, x.ndim)
            return out * c_out + x * c_skip
        return x + out * _dims(-sigma, x.ndim)


class LCMSchedule(DiscreteSchedule):
    """A1111's LCM view of the schedule: the 50 timesteps ``19, 39, ..., 999`` LCM was distilled on."""

    skip = 20

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        valid = torch.stack([alphas_cumprod[999 - x * self.skip] for x in range(50)]).flip(0).to(torch.float32)
        super().__init__(valid)

    def get_sigmas(self, n: int) -> torch.Tensor:
        start, end = self.sigma_to_t(self.sigma_max), self.sigma_to_t(self.sigma_min)
        t = torch.linspace(float(start), float(end), n)
        return torch.cat([self.t_to_sigma(t), torch.zeros(1)])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        dists = sigma.log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape) * self.skip + (self.skip - 1)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        idx = torch.clamp(((t - (self.skip - 1)) / self.skip).float(), min=0, max=len(self.sigmas) - 1)
        return super().t_to_sigma(idx)


class LCMModel:
    """A1111's ``LCMCompVisDenoiser``: eps wrapper at the LCM timestep, then the consistency scalings."""

    def __init__(self, unet: UNetCall, schedule: LCMSchedule) -> None:
        self.unet, self.schedule = unet, schedule

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, crossattn: torch.Tensor,
                 pooled: torch.Tensor | None) -> torch.Tensor:
        c_in = _dims(1 / (sigma**2 + 1.0) ** 0.5, x.ndim)
        t = self.schedule.sigma_to_t(sigma)
        x0 = x + self.unet(x * c_in, t, crossattn, pooled) * _dims(-sigma, x.ndim)
        st = _dims(t, x.ndim) * 10.0
        c_skip = 0.5**2 / (st**2 + 0.5**2)
        c_out = st / (st**2 + 0.5**2) ** 0.5
        return c_out * x0 + c_skip * x


class TimestepModel:
    """A1111's timestep wrapper: ``(x, t, cond) -> eps`` (v models converted with ``alphas_cumprod[int(t)]``)."""

    def __init__(self, unet: UNetCall, alphas_cumprod: torch.Tensor, prediction_type: str) -> None:
        self.unet, self.ac, self.v = unet, alphas_cumprod, prediction_type == "v_prediction"

    def __call__(self, x: torch.Tensor, t: torch.Tensor, crossattn: torch.Tensor,
                 pooled: torch.Tensor | None) -> torch.Tensor:
        out = self.unet(x, t, crossattn, pooled)
        if not self.v:
            return out
        idx = t.to(torch.int)
        return torch.sqrt(self.ac)[idx, None, None, None] * out + torch.sqrt(1 - self.ac)[idx, None, None, None] * x


def cond_at(schedule: ScheduledCond, step: int) -> Cond:
    """The schedule entry for model call ``step`` (A1111: the first whose end is >= step, else the first)."""
    for end, cond in schedule:
        if step <= end:
            return cond
    return schedule[0][1]


def _stack(conds: Sequence[Cond]) -> Cond:
    # A1111's stack_conds: shorter token sequences are padded by repeating their last vector.
    n = max(c.crossattn.shape[0] for c in conds)
    rows = [c.crossattn if c.crossattn.shape[0] == n
            else torch.vstack([c.crossattn, c.crossattn[-1:].repeat(n - c.crossattn.shape[0], 1)]) for c in conds]
    pooled = torch.stack([c.pooled for c in conds]) if conds[0].pooled is not None else None
    return Cond(torch.stack(rows), pooled)


class CFGDenoiser:
    """Classifier-free guidance over ``model`` (a :class:`KModel`, :class:`LCMModel` or
    :class:`TimestepModel`) for a batch of ``batch`` images that share one prompt.

    ``conds`` are the prompt's ``AND`` parts as (schedule, weight); ``uncond`` the negative
    prompt's schedule; ``empty`` the empty prompt's encoding (for ``Pad conds``).
    """

    def __init__(self, model: Callable[..., torch.Tensor], conds: Sequence[tuple[ScheduledCond, float]],
                 uncond: ScheduledCond, cfg_scale: float, batch: int, *, empty: Cond | None = None,
                 pad_conds: bool = False, pad_conds_v0: bool = False, scale_multiplier: float = 1.0) -> None:
        self.model, self.conds, self.uncond = model, list(conds), uncond
        self.cfg_scale, self.batch = cfg_scale, batch
        self.empty, self.pad_conds, self.pad_conds_v0 = empty, pad_conds, pad_conds_v0
        self.scale_multiplier = scale_multiplier
        self.step = 0
        self.padded = False  # "Pad conds" was needed (and done)
        self.padded_v0 = False
        self.last_uncond: torch.Tensor | None = None

    def _pad(self, cond: Cond, uncond: Cond) -> tuple[Cond, Cond]:
        tc, tu = cond.crossattn.shape[1], uncond.crossattn.shape[1]
        if tc == tu:
            return cond, uncond
        if self.pad_conds_v0:  # A1111 < 1.6 DDIM/PLMS: repeat (or cut) the negative's last vector
            self.padded_v0 = True
            u = uncond.crossattn
            u = torch.hstack([u, u[:, -1:].repeat(1, tc - tu, 1)]) if tu < tc else u[:, :tc]
            return cond, Cond(u, uncond.pooled)
        if self.pad_conds and self.empty is not None:
            self.padded = True
            e = self.empty.crossattn
            reps = (tc - tu) // e.shape[0]
            if reps < 0:
                c = torch.cat([cond.crossattn, e.repeat(cond.crossattn.shape[0], -reps, 1)], dim=1)
                return Cond(c, cond.pooled), uncond
            if reps > 0:
                u = torch.cat([uncond.crossattn, e.repeat(uncond.crossattn.shape[0], reps, 1)], dim=1)
                return cond, Cond(u, uncond.pooled)
        return cond, uncond

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = self.batch
        parts = [cond_at(s, self.step) for s, _ in self.conds]
        n = len(parts)
        stacked = _stack(parts)  # [n, T, D]
        cond = Cond(stacked.crossattn.repeat(b, 1, 1),
                    stacked.pooled.repeat(b, 1) if stacked.pooled is not None else None)
        u1 = cond_at(self.uncond, self.step)
        uncond = Cond(u1.crossattn.unsqueeze(0).repeat(b, 1, 1),
                      u1.pooled.unsqueeze(0).repeat(b, 1) if u1.pooled is not None else None)
        x_in = torch.cat([x.repeat_interleave(n, dim=0), x])
        s_in = torch.cat([sigma.repeat_interleave(n, dim=0), sigma])
        cond, uncond = self._pad(cond, uncond)
        if cond.crossattn.shape[1] == uncond.crossattn.shape[1]:
            pooled = None if cond.pooled is None else torch.cat([cond.pooled, uncond.pooled])
            x_out = self.model(x_in, s_in, torch.cat([cond.crossattn, uncond.crossattn]), pooled)
        else:
            x_out = torch.zeros_like(x_in)
            step = 2 * b
            for a in range(0, b * n, step):
                e = min(a + step, b * n)
                x_out[a:e] = self.model(x_in[a:e], s_in[a:e], cond.crossattn[a:e],
                                        None if cond.pooled is None else cond.pooled[a:e])
            x_out[-b:] = self.model(x_in[-b:], s_in[-b:], uncond.crossattn, uncond.pooled)
        self.last_uncond = x_out[-b:].clone()
        denoised_uncond = x_out[-b:]
        denoised = torch.clone(denoised_uncond)
        scale = self.cfg_scale * self.scale_multiplier
        for i in range(b):
            for j, (_, weight) in enumerate(self.conds):
                denoised[i] += (x_out[i * n + j] - denoised_uncond[i]) * (weight * scale)
        self.step += 1
        return denoised
