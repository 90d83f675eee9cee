"""Noise levels as A1111 computes them: the model's discrete schedule and every ``Schedule type``.

The model side is LDM's: betas ``linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2`` in float64, their
cumulative product rounded to float32 (``alphas_cumprod``; diffusers' ``scaled_linear`` computes in
float32 and differs in the last bits). :class:`DiscreteSchedule` is k-diffusion's
``DiscreteSchedule`` (``external.py``): sigmas, log-sigma interpolation between the 1000 training
timesteps, ``sigma_to_t`` / ``t_to_sigma``. The schedule functions are A1111's ``sd_schedulers.py``
(Karras, exponential and polyexponential from k-diffusion; SGM Uniform, KL Optimal, Align Your
Steps, Simple, Normal, DDIM, Beta from A1111), all in float32 as there, so an A1111 sampler's sigma
sequence is reproduced exactly. k-diffusion cannot be imported here (its package imports torchvision
and CLIP at import time), so these few formulas are written out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from blockmerge.errors import BlockmergeError

__all__ = [
    "SCHEDULERS",
    "DiscreteSchedule",
    "Scheduler",
    "ldm_alphas_cumprod",
    "rescale_zero_terminal_snr",
]


def ldm_alphas_cumprod(steps: int = 1000, start: float = 0.00085, end: float = 0.012,
                       downcast: bool = False) -> torch.Tensor:
    """LDM's ``alphas_cumprod`` for SD1/SD2/SDXL (float32; float16 with A1111's ``Downcast
    alphas_cumprod``, which A1111 applies to infotexts older than v1.7.0-225)."""
    betas = (torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2).numpy()
    ac = torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)
    return ac.half() if downcast else ac


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """A1111's ``Noise Schedule: Zero Terminal SNR`` (Lin et al. 2023): shift and scale sqrt(alpha_bar)
    so the last timestep is pure noise; the last value is then set to A1111's small positive constant."""
    a = alphas_cumprod.sqrt()
    a0, at = a[0].clone(), a[-1].clone()
    a = (a - at) * (a0 / (a0 - at))
    out = a**2
    out[-1] = 4.8973451890853435e-08
    return out


class DiscreteSchedule:
    """k-diffusion's mapping between sigmas and the model's 1000 discrete timesteps (not quantized)."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        self.alphas_cumprod = alphas_cumprod
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def get_sigmas(self, n: int) -> torch.Tensor:
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return _append_zero(self.t_to_sigma(t))

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()


def _append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


# --- the schedule functions, with A1111's signatures: (n, sigma_min, sigma_max[, rho][, inner]) ---

def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    ramp = torch.linspace(1, 0, n) ** rho
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def _uniform(n: int, sigma_min: float, sigma_max: float, inner: DiscreteSchedule) -> torch.Tensor:
    return inner.get_sigmas(n)


def _t_range_sigmas(n: int, sigma_min: float, sigma_max: float, inner: DiscreteSchedule,
                    sgm: bool) -> torch.Tensor:
    start = inner.sigma_to_t(torch.tensor(sigma_max))
    end = inner.sigma_to_t(torch.tensor(sigma_min))
    ts = torch.linspace(start, end, n + 1)[:-1] if sgm else torch.linspace(start, end, n)
    return torch.FloatTensor([float(inner.t_to_sigma(t)) for t in ts] + [0.0])


def _sgm_uniform(n: int, sigma_min: float, sigma_max: float, inner: DiscreteSchedule) -> torch.Tensor:
    return _t_range_sigmas(n, sigma_min, sigma_max, inner, sgm=True)


def _normal(n: int, sigma_min: float, sigma_max: float, inner: DiscreteSchedule) -> torch.Tensor:
    return _t_range_sigmas(n, sigma_min, sigma_max, inner, sgm=False)


def _kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    # A1111 ends this schedule at sigma_min (no appended zero): the last step stops there.
    alpha_min = torch.arctan(torch.tensor(sigma_min))
    alpha_max = torch.arctan(torch.tensor(sigma_max))
    idx = torch.arange(n + 1)
    return torch.tan(idx / n * alpha_min + (1.0 - idx / n) * alpha_max)


# NVIDIA's published Align Your Steps noise levels for 10 steps (SD1.5 and SDXL).
_AYS = {
    "SD1": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "SDXL": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}


def _align_your_steps(n: int, sigma_min: float, sigma_max: float, family: str = "SD1") -> torch.Tensor:
    levels = list(_AYS["SDXL" if family == "SDXL" else "SD1"])
    if n == len(levels):
        return torch.FloatTensor([*levels, 0.0])
    xs = np.linspace(0, 1, len(levels))
    ys = np.log(levels[::-1])
    interp = np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy()
    return torch.FloatTensor(np.append(interp, [0.0]))


def _simple(n: int, sigma_min: float, sigma_max: float, inner: DiscreteSchedule) -> torch.Tensor:
    ss = len(inner.sigmas) / n
    return torch.FloatTensor([float(inner.sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0])


def _ddim(n: int, sigma_min: float, sigma_max: float, inner: DiscreteSchedule) -> torch.Tensor:
    ss = max(len(inner.sigmas) // n, 1)
    sigs = [float(inner.sigmas[x]) for x in range(1, len(inner.sigmas), ss)]
    return torch.FloatTensor([*sigs[::-1], 0.0])


def _beta(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    from scipy import stats

    ts = [stats.beta.ppf(x, alpha, beta) for x in 1 - np.linspace(0, 1, n)]
    return torch.FloatTensor([sigma_min + x * (sigma_max - sigma_min) for x in ts] + [0.0])


@dataclass(frozen=True)
class Scheduler:
    """One A1111 ``Schedule type``: its infotext label, internal name and sigma function."""

    name: str
    label: str
    function: Callable[..., torch.Tensor] | None
    default_rho: float = -1.0
    needs_inner: bool = False
    aliases: tuple[str, ...] = ()


#: A1111 1.10's schedule types, in its order (``Automatic`` = the sampler's own default).
SCHEDULERS: tuple[Scheduler, ...] = (
    Scheduler("automatic", "Automatic", None),
    Scheduler("uniform", "Uniform", _uniform, needs_inner=True),
    Scheduler("karras", "Karras", karras, default_rho=7.0),
    Scheduler("exponential", "Exponential", exponential),
    Scheduler("polyexponential", "Polyexponential", polyexponential, default_rho=1.0),
    Scheduler("sgm_uniform", "SGM Uniform", _sgm_uniform, needs_inner=True, aliases=("SGMUniform",)),
    Scheduler("kl_optimal", "KL Optimal", _kl_optimal),
    Scheduler("align_your_steps", "Align Your Steps", _align_your_steps),
    Scheduler("simple", "Simple", _simple, needs_inner=True),
    Scheduler("normal", "Normal", _normal, needs_inner=True),
    Scheduler("ddim", "DDIM", _ddim, needs_inner=True),
    Scheduler("beta", "Beta", _beta),
)
_BY_NAME = {k: s for s in SCHEDULERS for k in (s.name, s.label, *s.aliases)}


def find_scheduler(name: str, source: str = "Schedule type") -> Scheduler:
    sched = _BY_NAME.get(name.strip())
    if sched is None:
        raise BlockmergeError(
            f"{source}: unknown schedule type {name!r}; supported: {', '.join(s.label for s in SCHEDULERS)}"
        )
    return sched


def schedule_sigmas(sched: Scheduler, n: int, inner: DiscreteSchedule, *, sigma_min: float, sigma_max: float,
                    rho: float | None = None, family: str = "SD1", beta_alpha: float = 0.6,
                    beta_beta: float = 0.6) -> torch.Tensor:
    """``n`` steps of schedule ``sched`` (A1111's call: ``function(n=steps, sigma_min, sigma_max, ...)``)."""
    if sched.function is None:
        return inner.get_sigmas(n)
    kwargs: dict[str, object] = {}
    if rho is not None:
        kwargs["rho"] = rho
    if sched.needs_inner:
        kwargs["inner"] = inner
    if sched.name == "align_your_steps":
        kwargs["family"] = family
    if sched.name == "beta":
        kwargs.update(alpha=beta_alpha, beta=beta_beta)
    return sched.function(n, sigma_min, sigma_max, **kwargs)
