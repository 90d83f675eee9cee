"""A1111 sampler names build the matching diffusers schedulers, offline."""

from __future__ import annotations

import os

import pytest
import torch

from blockmerge.errors import BlockmergeError
from blockmerge.generation.samplers import (
    SAMPLERS,
    SCHEDULE_TYPES,
    SD_SCHEDULER_CONFIG,
    make_scheduler,
    resolve_sampler,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:
    import torchsde  # noqa: F401

    HAVE_TORCHSDE = True
except ImportError:
    HAVE_TORCHSDE = False

# Model evaluations per step: Heun and DPM2 take two (diffusers lists 2n-1 timesteps), PLMS repeats
# its first timestep (n+1), every other sampler takes one.
_TWO_EVALS = {"Heun", "Heun Karras", "DPM2", "DPM2 Karras", "DPM2 a", "DPM2 a Karras", "DPM++ SDE", "DPM++ SDE Karras"}


def _expected_timesteps(name: str, steps: int) -> int:
    if name in _TWO_EVALS:
        return 2 * steps - 1
    if name == "PLMS":
        return steps + 1
    return steps


def test_required_names_exist() -> None:
    for name in ["Euler a", "Euler", "Heun", "LMS", "DDIM", "DPM++ 2M", "DPM++ 2M Karras",
                 "DPM++ SDE Karras", "UniPC", "DPM++ 2M SDE"]:
        assert name in SAMPLERS


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_each_sampler_builds_with_20_steps(name: str) -> None:
    spec = SAMPLERS[name]
    if spec.needs and not HAVE_TORCHSDE:
        with pytest.raises(BlockmergeError, match="torchsde"):
            make_scheduler(name, SD_SCHEDULER_CONFIG)
        return
    scheduler = make_scheduler(name, SD_SCHEDULER_CONFIG)
    assert type(scheduler).__name__ == spec.scheduler
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.prediction_type == "epsilon"
    scheduler.set_timesteps(20)
    assert len(scheduler.timesteps) == _expected_timesteps(name, 20)
    timesteps = scheduler.timesteps.float()
    assert torch.all(timesteps[1:] <= timesteps[:-1] + 1)  # descending (DPM2 a Karras interleaves rounded t)
    if spec.config.get("timestep_spacing") == "leading":
        assert timesteps[0].item() == 951 and timesteps[-1].item() == 1  # A1111: range(0, 1000, 50) + 1
    else:
        assert timesteps[0].item() == 999  # k-diffusion starts at the last training timestep


def test_karras_sigmas_match_k_diffusion() -> None:
    # k-diffusion get_sigmas_karras(n, sigma_min, sigma_max, rho=7) on SD's schedule
    base = make_scheduler("DPM++ 2M Karras")
    base.set_timesteps(20)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    smin, smax, rho = sigmas[0], sigmas[-1], 7.0
    ramp = torch.linspace(0, 1, 20, dtype=torch.float64)
    expected = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    torch.testing.assert_close(base.sigmas[:-1].double(), expected, rtol=1e-4, atol=1e-4)
    assert base.sigmas[-1].item() == 0.0


def test_euler_a_sigmas_are_k_diffusion_discrete_linspace() -> None:
    # k-diffusion DiscreteSchedule.get_sigmas(n): interpolate log-sigmas at linspace(999, 0, n)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    t = torch.linspace(999, 0, 20, dtype=torch.float64)
    low, high = t.floor().long(), t.ceil().long()
    w = t - low
    expected = ((1 - w) * sigmas[low].log() + w * sigmas[high].log()).exp()
    sched = make_scheduler("Euler a")
    sched.set_timesteps(20)
    # diffusers interpolates sigma linearly rather than log-sigma: equal at the ends, close inside
    torch.testing.assert_close(sched.sigmas[:-1].double(), expected, rtol=2e-3, atol=1e-3)


def test_v_prediction_is_passed_through() -> None:
    assert make_scheduler("Euler a", SD_SCHEDULER_CONFIG, "v_prediction").config.prediction_type == "v_prediction"
    with pytest.raises(BlockmergeError, match="prediction_type"):
        make_scheduler("Euler a", SD_SCHEDULER_CONFIG, "x0")


def test_unknown_name_lists_supported() -> None:
    with pytest.raises(BlockmergeError, match=r"unknown sampler 'Euler b'.*Euler a.*DPM\+\+ 2M Karras"):
        make_scheduler("Euler b", SD_SCHEDULER_CONFIG)


def test_schedule_type() -> None:
    assert resolve_sampler("DPM++ 2M", "Karras") == resolve_sampler("DPM++ 2M Karras")
    cls, cfg = resolve_sampler("Euler", "Exponential")
    assert cls == "EulerDiscreteScheduler" and cfg["use_exponential_sigmas"] and "use_karras_sigmas" not in cfg
    cls, cfg = resolve_sampler("DPM++ 2M Karras", "Beta")  # the explicit schedule wins over the name
    assert cfg["use_beta_sigmas"] and "use_karras_sigmas" not in cfg
    assert "Automatic" in SCHEDULE_TYPES and "Karras" in SCHEDULE_TYPES
    sched = make_scheduler("Euler", schedule_type="SGM Uniform")
    sched.set_timesteps(20)
    assert sched.config.timestep_spacing == "trailing" and len(sched.timesteps) == 20
    with pytest.raises(BlockmergeError, match="Align Your Steps"):
        resolve_sampler("Euler", "Align Your Steps")
    with pytest.raises(BlockmergeError, match="does not apply"):
        resolve_sampler("DDIM", "Karras")
