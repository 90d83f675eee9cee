"""A1111's samplers by name, with the options A1111 1.10 gives each, and their sigma sequences.

The table is A1111's (``sd_samplers_kdiffusion.py``, ``sd_samplers_timesteps.py``,
``sd_samplers_lcm.py``): which algorithm a name runs, its ``Automatic`` schedule (``DPM++ 2M`` is
Karras, ``DPM++ 2M SDE`` exponential, ``Euler a`` the model's uniform discrete schedule), whether
it drops the next-to-last sigma (DPM2, DPM2 a, DPM++ 3M SDE), whether it is second order (prompt
editing counts model calls: two per step), whether its per-step noise follows ENSD, and whether
it draws from a Brownian tree. :func:`resolve_sampler` reads names as A1111's
``get_sampler_and_scheduler`` does, so old infotexts that fold the schedule into the name
(``DPM++ 2M Karras``, ``Euler a Exponential``) keep working. :func:`k_sigmas` is
``KDiffusionSampler.get_sigmas``.

Nothing here imports diffusers: the name tables are cheap to use from infotext validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from blockmerge.errors import BlockmergeError

from .schedules import SCHEDULERS, DiscreteSchedule, Scheduler, find_scheduler, schedule_sigmas

__all__ = [
    "SAMPLERS",
    "SCHEDULE_TYPES",
    "SD_SCHEDULER_CONFIG",
    "SamplerSpec",
    "SigmaOptions",
    "k_sigmas",
    "resolve_sampler",
]

#: The DDPM noise schedule every SD1/SD2/SDXL checkpoint was trained with (diffusers' form, for the
#: pipeline object the loader builds; sampling itself uses :func:`~.schedules.ldm_alphas_cumprod`).
SD_SCHEDULER_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
    }
)


@dataclass(frozen=True)
class SamplerSpec:
    """One A1111 sampler: the algorithm it runs and the options A1111 attaches to its name."""

    function: str  # key of ksamplers.SAMPLE_FUNCTIONS or tsamplers.TIMESTEP_FUNCTIONS
    kind: str = "k"  # "k" (sigmas), "timesteps" (DDIM/PLMS/UniPC) or "lcm"
    scheduler: str | None = None  # the Automatic schedule (Scheduler.name), None = the model's uniform
    second_order: bool = False
    discard_penultimate: bool = False
    uses_ensd: bool = False
    brownian: bool = False
    solver_type: str | None = None
    eta: bool = False  # the algorithm takes eta (k: default 1; timesteps: default 0)
    churn: bool = False  # takes s_churn / s_tmin / s_tmax (Euler, Heun, DPM2)
    s_noise: bool = False
    cfgpp: bool = False


_SPECS: dict[str, SamplerSpec] = {
    "DPM++ 2M": SamplerSpec("sample_dpmpp_2m", scheduler="karras"),
    "DPM++ SDE": SamplerSpec("sample_dpmpp_sde", scheduler="karras", second_order=True, brownian=True, eta=True,
                             s_noise=True),
    "DPM++ 2M SDE": SamplerSpec("sample_dpmpp_2m_sde", scheduler="exponential", brownian=True, eta=True,
                                s_noise=True),
    "DPM++ 2M SDE Heun": SamplerSpec("sample_dpmpp_2m_sde", scheduler="exponential", brownian=True,
                                     solver_type="heun", eta=True, s_noise=True),
    "DPM++ 2S a": SamplerSpec("sample_dpmpp_2s_ancestral", scheduler="karras", uses_ensd=True, second_order=True,
                              eta=True, s_noise=True),
    "DPM++ 3M SDE": SamplerSpec("sample_dpmpp_3m_sde", scheduler="exponential", discard_penultimate=True,
                                brownian=True, eta=True, s_noise=True),
    "Euler a": SamplerSpec("sample_euler_ancestral", uses_ensd=True, eta=True),
    "Euler": SamplerSpec("sample_euler", churn=True, s_noise=True),
    "LMS": SamplerSpec("sample_lms"),
    "Heun": SamplerSpec("sample_heun", second_order=True, churn=True, s_noise=True),
    "DPM2": SamplerSpec("sample_dpm_2", scheduler="karras", discard_penultimate=True, second_order=True,
                        churn=True, s_noise=True),
    "DPM2 a": SamplerSpec("sample_dpm_2_ancestral", scheduler="karras", discard_penultimate=True, uses_ensd=True,
                          second_order=True, eta=True, s_noise=True),
    "DPM fast": SamplerSpec("sample_dpm_fast", uses_ensd=True, eta=True, s_noise=True),
    "DPM adaptive": SamplerSpec("sample_dpm_adaptive", uses_ensd=True, eta=True),
    "Restart": SamplerSpec("restart", scheduler="karras", second_order=True),
    "DDIM": SamplerSpec("ddim", kind="timesteps", eta=True),
    "DDIM CFG++": SamplerSpec("ddim", kind="timesteps", eta=True, cfgpp=True),
    "PLMS": SamplerSpec("plms", kind="timesteps"),
    "UniPC": SamplerSpec("unipc", kind="timesteps"),
    "LCM": SamplerSpec("lcm", kind="lcm"),
}

#: A1111 sampler name -> what it runs (read-only), in A1111 1.10's order.
SAMPLERS: Mapping[str, SamplerSpec] = MappingProxyType(_SPECS)
#: The ``Schedule type`` labels blockmerge honours (all of A1111 1.10's).
SCHEDULE_TYPES: tuple[str, ...] = tuple(s.label for s in SCHEDULERS)


def resolve_sampler(name: str, schedule_type: str | None = None, source: str = "sampler") -> tuple[str, str]:
    """(sampler name, Schedule type label) as A1111 reads them.

    A schedule folded into the name (``DPM++ 2M Karras``) is split off; a schedule equal to the
    sampler's own default becomes ``Automatic``. Unknown names are an error naming ``source``
    (A1111 silently falls back to its default sampler; that would not be the image asked for).
    """
    found = find_scheduler(schedule_type, f"{source}: Schedule type") if schedule_type else SCHEDULERS[0]
    base = name.strip()
    for sched in SCHEDULERS:
        for option in (sched.label, sched.name, *sched.aliases):
            if base.endswith(" " + option):
                found = sched
                base = base[: -(len(option) + 1)]
                break
    spec = SAMPLERS.get(base)
    if spec is None:
        raise BlockmergeError(f"{source}: unknown sampler {name!r}; supported: {', '.join(SAMPLERS)}")
    if spec.scheduler == found.name:
        found = SCHEDULERS[0]
    return base, found.label


@dataclass(frozen=True)
class SigmaOptions:
    """A1111 options that change a k-sampler's sigmas (their infotext fields in comments)."""

    discard_penultimate: bool = False  # "Discard penultimate sigma" (always_discard_next_to_last_sigma)
    sigma_min: float = 0.0  # "Schedule min sigma" (0 = the model's)
    sigma_max: float = 0.0  # "Schedule max sigma"
    rho: float = 0.0  # "Schedule rho" (0 = the schedule's default)
    beta_alpha: float = 0.6  # "Beta schedule alpha"
    beta_beta: float = 0.6  # "Beta schedule beta"


def effective_scheduler(spec: SamplerSpec, schedule_type: str) -> Scheduler | None:
    """The schedule a k-sampler really uses (``Automatic`` resolved to the sampler's default)."""
    sched = find_scheduler(schedule_type)
    if sched.function is None:
        return find_scheduler(spec.scheduler) if spec.scheduler else None
    return sched


def k_sigmas(spec: SamplerSpec, schedule_type: str, steps: int, inner: DiscreteSchedule,
             options: SigmaOptions = SigmaOptions(), family: str = "SD1") -> torch.Tensor:
    """The sigma sequence A1111's ``KDiffusionSampler.get_sigmas`` gives (float32, on the CPU)."""
    discard = spec.discard_penultimate or options.discard_penultimate
    steps += 1 if discard else 0
    sched = effective_scheduler(spec, schedule_type)
    if sched is None:
        sigmas = inner.get_sigmas(steps)
    else:
        m_min, m_max = inner.sigma_min.item(), inner.sigma_max.item()
        smin = options.sigma_min if options.sigma_min and options.sigma_min != m_min else m_min
        smax = options.sigma_max if options.sigma_max and options.sigma_max != m_max else m_max
        rho = options.rho if sched.default_rho != -1 and options.rho and options.rho != sched.default_rho else None
        sigmas = schedule_sigmas(sched, steps, inner, sigma_min=smin, sigma_max=smax, rho=rho, family=family,
                                 beta_alpha=options.beta_alpha, beta_beta=options.beta_beta)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas.cpu()
