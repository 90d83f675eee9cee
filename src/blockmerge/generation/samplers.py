"""A1111 sampler names -> diffusers schedulers configured to behave like A1111's samplers.

A1111's k-diffusion samplers take their sigmas from the model's own 1000-step discrete schedule,
sampled at ``linspace(999, 0, steps)`` (k-diffusion ``DiscreteSchedule.get_sigmas``), or from the
Karras et al. schedule between that schedule's smallest and largest sigma when the name ends in
"Karras". In diffusers that is ``timestep_spacing="linspace"`` and ``use_karras_sigmas=True``.
A1111's DDIM and PLMS use ``range(0, 1000, 1000 // steps) + 1``, i.e. ``"leading"`` spacing with
``steps_offset=1`` (the SD training config). The mapping follows the A1111 table in the diffusers
scheduler docs; it gives the same sigmas, not bit-identical images (the noise draws differ).

A1111 1.9+ writes the schedule separately (``Sampler: DPM++ 2M, Schedule type: Karras``); older
infotexts fold it into the name (``Sampler: DPM++ 2M Karras``). :func:`resolve_sampler` accepts both.

Nothing here imports diffusers until a scheduler is actually built, so the name tables are cheap
to use from infotext validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from blockmerge.errors import BlockmergeError

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

__all__ = [
    "SAMPLERS",
    "SCHEDULE_TYPES",
    "SD_SCHEDULER_CONFIG",
    "SamplerSpec",
    "make_scheduler",
    "resolve_sampler",
]

#: The DDPM noise schedule every SD1/SD2/SDXL checkpoint was trained with (the ``scheduler_config.json``
#: the SD repos ship), so pipelines never need to download it.
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
    """One A1111 sampler: the diffusers class that implements it and the config that matches A1111."""

    scheduler: str
    config: Mapping[str, Any] = field(default_factory=dict)
    needs: str | None = None  # optional package the scheduler needs at run time
    note: str = ""


_LINSPACE = {"timestep_spacing": "linspace"}
_KARRAS = {"timestep_spacing": "linspace", "use_karras_sigmas": True}
_LEADING = {"timestep_spacing": "leading", "steps_offset": 1}
_UNIPC = {"solver_type": "bh1", "solver_order": 3, "lower_order_final": True}  # A1111's UniPC defaults

_SPECS: dict[str, SamplerSpec] = {
    "Euler a": SamplerSpec("EulerAncestralDiscreteScheduler", _LINSPACE),
    "Euler": SamplerSpec("EulerDiscreteScheduler", _LINSPACE),
    "LMS": SamplerSpec("LMSDiscreteScheduler", _LINSPACE),
    "LMS Karras": SamplerSpec("LMSDiscreteScheduler", _KARRAS),
    "Heun": SamplerSpec("HeunDiscreteScheduler", _LINSPACE, note="2 model calls per step"),
    "Heun Karras": SamplerSpec("HeunDiscreteScheduler", _KARRAS, note="2 model calls per step"),
    "DPM2": SamplerSpec("KDPM2DiscreteScheduler", _LINSPACE, note="A1111 drops the next-to-last sigma"),
    "DPM2 Karras": SamplerSpec("KDPM2DiscreteScheduler", _KARRAS, note="A1111 drops the next-to-last sigma"),
    "DPM2 a": SamplerSpec("KDPM2AncestralDiscreteScheduler", _LINSPACE),
    "DPM2 a Karras": SamplerSpec("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "DPM++ 2M": SamplerSpec("DPMSolverMultistepScheduler", {**_LINSPACE, "algorithm_type": "dpmsolver++"}),
    "DPM++ 2M Karras": SamplerSpec("DPMSolverMultistepScheduler", {**_KARRAS, "algorithm_type": "dpmsolver++"}),
    "DPM++ 2M SDE": SamplerSpec(
        "DPMSolverMultistepScheduler",
        {**_LINSPACE, "algorithm_type": "sde-dpmsolver++", "solver_type": "midpoint"},
        note="Gaussian noise per step instead of A1111's Brownian tree",
    ),
    "DPM++ 2M SDE Karras": SamplerSpec(
        "DPMSolverMultistepScheduler",
        {**_KARRAS, "algorithm_type": "sde-dpmsolver++", "solver_type": "midpoint"},
        note="Gaussian noise per step instead of A1111's Brownian tree",
    ),
    "DPM++ SDE": SamplerSpec("DPMSolverSDEScheduler", _LINSPACE, needs="torchsde"),
    "DPM++ SDE Karras": SamplerSpec("DPMSolverSDEScheduler", _KARRAS, needs="torchsde"),
    "UniPC": SamplerSpec("UniPCMultistepScheduler", {**_LINSPACE, **_UNIPC}),
    "DDIM": SamplerSpec("DDIMScheduler", _LEADING),
    "PLMS": SamplerSpec("PNDMScheduler", {**_LEADING, "skip_prk_steps": True}),
}

#: A1111 sampler name -> how blockmerge builds it (read-only).
SAMPLERS: Mapping[str, SamplerSpec] = MappingProxyType(_SPECS)

# A1111 "Schedule type" values we can reproduce, as the config they add. "Automatic" and "Uniform"
# are k-diffusion's default discrete schedule; "SGM Uniform" is trailing spacing (diffusers docs).
_SCHEDULE_OVERRIDES: dict[str, dict[str, Any]] = {
    "Automatic": {},
    "Uniform": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "Beta": {"use_beta_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
}
#: The ``Schedule type`` values blockmerge honours.
SCHEDULE_TYPES: tuple[str, ...] = tuple(_SCHEDULE_OVERRIDES)
_SIGMA_KINDS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def _unknown_sampler(name: str, source: str) -> BlockmergeError:
    return BlockmergeError(f"{source}: unknown sampler {name!r}; supported: {', '.join(SAMPLERS)}")


def resolve_sampler(
    name: str, schedule_type: str | None = None, source: str = "sampler"
) -> tuple[str, dict[str, Any]]:
    """Resolve an A1111 ``Sampler`` (+ optional ``Schedule type``) to (diffusers class name, config).

    Raises :class:`BlockmergeError` naming ``source`` for an unknown sampler or schedule type, or one
    that does not apply to that sampler (e.g. Karras for DDIM).
    """
    spec = SAMPLERS.get(name.strip())
    if spec is None:
        raise _unknown_sampler(name, source)
    config = dict(spec.config)
    schedule = (schedule_type or "Automatic").strip()
    if schedule not in _SCHEDULE_OVERRIDES:
        raise BlockmergeError(
            f"{source}: Schedule type {schedule_type!r} is not supported; supported: {', '.join(SCHEDULE_TYPES)}"
        )
    override = _SCHEDULE_OVERRIDES[schedule]
    if override:
        if spec.config.get("timestep_spacing") == "leading":
            raise BlockmergeError(f"{source}: Schedule type {schedule!r} does not apply to sampler {name!r}")
        if any(k in override for k in _SIGMA_KINDS):
            for k in _SIGMA_KINDS:
                config.pop(k, None)
        config.update(override)
    return spec.scheduler, config


def make_scheduler(
    name: str,
    base_config: Mapping[str, Any] = SD_SCHEDULER_CONFIG,
    prediction_type: str = "epsilon",
    schedule_type: str | None = None,
) -> SchedulerMixin:
    """Build the diffusers scheduler for A1111 sampler ``name`` on the model's noise schedule.

    ``base_config`` is the checkpoint's training schedule (:data:`SD_SCHEDULER_CONFIG` for SD1/SD2/SDXL);
    ``prediction_type`` is ``"epsilon"`` or ``"v_prediction"`` (SD2 768-v models). Entries of the
    base config a scheduler class does not know are dropped by diffusers' ``from_config``.
    """
    class_name, overrides = resolve_sampler(name, schedule_type)
    spec = SAMPLERS[name.strip()]
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise BlockmergeError(f"prediction_type: expected 'epsilon' or 'v_prediction', got {prediction_type!r}")

    import diffusers  # deferred: heavy, and only needed once a scheduler is really built
    from diffusers.utils import is_torchsde_available

    if spec.needs == "torchsde" and not is_torchsde_available():
        raise BlockmergeError(
            f"sampler {name!r} needs the optional package torchsde (pip install torchsde); "
            "'DPM++ 2M SDE' and 'DPM++ 2M SDE Karras' work without it"
        )
    cls = getattr(diffusers, class_name)
    config = {**dict(base_config), **overrides, "prediction_type": prediction_type}
    return cls.from_config(config)
