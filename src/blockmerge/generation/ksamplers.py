"""k-diffusion's sampler algorithms, step for step, plus A1111's Restart and LCM loops.

Why written here: to draw A1111's pixels the loop must be k-diffusion's (the version A1111 1.10
pins, ``crowsonkb/k-diffusion`` at ab527a9, whose ``sampling.py`` is the one in the ``k-diffusion``
0.1.1.post1 wheel), but that package cannot be imported beside the CPU torch (its ``__init__``
imports torchvision and CLIP), and diffusers' schedulers are other algorithms (other sigma
interpolation, other noise draws, NaNs at sigma 0). The tests run k-diffusion's own ``sampling.py``
from the wheel as the reference and compare latents.

Every function takes ``model(x, sigma_vector) -> denoised`` and ``noise(sigma, sigma_next) -> tensor``.
``noise`` is where A1111's ``ImageRNG`` (or a Brownian tree seeded from each image's seed) comes in;
k-diffusion's bare ``torch.randn_like`` calls are the same stream in A1111 (it swaps the module's
``torch`` for one whose ``randn_like`` is the image RNG), so they go through ``noise`` too, in the
same order. Arithmetic follows the original's order so float32 results agree to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .schedules import karras

__all__ = ["SAMPLE_FUNCTIONS", "BrownianTreeNoise", "ancestral_step"]

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Noise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    return (x - denoised) / sigma  # A1111 replaces k-diffusion's to_d with exactly this


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """(sigma_down, sigma_up) of an ancestral step (k-diffusion ``get_ancestral_step``)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


class BrownianTreeNoise:
    """k-diffusion's ``BrownianTreeNoiseSampler`` with one ``torchsde`` tree per image seed (A1111's
    ``create_noise_sampler``), so the noise is the seed's, not torch's global RNG's."""

    def __init__(self, x: torch.Tensor, sigma_min: torch.Tensor, sigma_max: torch.Tensor,
                 seeds: Sequence[int]) -> None:
        import torchsde

        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self.sign = 1 if t0 < t1 else -1
        if self.sign < 0:
            t0, t1 = t1, t0
        w0 = torch.zeros_like(x)[0]
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=int(s)) for s in seeds]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        sign = 1 if t0 < t1 else -1
        a, b = (t0, t1) if sign > 0 else (t1, t0)
        w = torch.stack([tree(a, b) for tree in self.trees]) * (self.sign * sign)
        return w / (t1 - t0).abs().sqrt()


def _ones(x: torch.Tensor) -> torch.Tensor:
    return x.new_ones([x.shape[0]])


@torch.no_grad()
def sample_euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        eps = noise(sigmas[i], sigmas[i + 1]) * s_noise
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in)
        d = _to_d(x, sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, eta: float = 1.0,
                           s_noise: float = 1.0) -> torch.Tensor:
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = _to_d(x, sigmas[i], denoised)
        x = x + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        eps = noise(sigmas[i], sigmas[i + 1]) * s_noise
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in)
        d = _to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in)
            d_2 = _to_d(x_2, sigmas[i + 1], denoised_2)
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        eps = noise(sigmas[i], sigmas[i + 1]) * s_noise
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in)
        d = _to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            denoised_2 = model(x_2, sigma_mid * s_in)
            d_2 = _to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, eta: float = 1.0,
                           s_noise: float = 1.0) -> torch.Tensor:
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = _to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            denoised_2 = model(x_2, sigma_mid * s_in)
            d_2 = _to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def _lms_coeff(order: int, t, i: int, j: int) -> float:
    from scipy import integrate

    def fn(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if j != k:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    return integrate.quad(fn, t[i], t[i + 1], epsrel=1e-4)[0]


@torch.no_grad()
def sample_lms(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, order: int = 4) -> torch.Tensor:
    s_in = _ones(x)
    sigmas_cpu = sigmas.detach().cpu().numpy()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        ds.append(_to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        cur_order = min(i + 1, order)
        coeffs = [_lms_coeff(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=True))
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, eta: float = 1.0,
                              s_noise: float = 1.0) -> torch.Tensor:
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = -sigmas[i].log(), -torch.as_tensor(sigma_down).log()
            h = t_next - t
            s = t + 0.5 * h
            x_2 = ((-s).exp() / (-t).exp()) * x - (-h * 0.5).expm1() * denoised
            denoised_2 = model(x_2, (-s).exp() * s_in)
            x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, eta: float = 1.0,
                     s_noise: float = 1.0, r: float = 0.5) -> torch.Tensor:
    s_in = _ones(x)

    def sigma_fn(t: torch.Tensor) -> torch.Tensor:
        return t.neg().exp()

    def t_fn(sigma: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(sigma).log().neg()

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)
            sd, su = ancestral_step(sigma_fn(t), sigma_fn(s), eta)
            s_ = t_fn(sd)
            x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - (t - s_).expm1() * denoised
            x_2 = x_2 + noise(sigma_fn(t), sigma_fn(s)) * s_noise * su
            denoised_2 = model(x_2, sigma_fn(s) * s_in)
            sd, su = ancestral_step(sigma_fn(t), sigma_fn(t_next), eta)
            t_next_ = t_fn(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (sigma_fn(t_next_) / sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
            x = x + noise(sigma_fn(t), sigma_fn(t_next)) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise) -> torch.Tensor:
    s_in = _ones(x)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * denoised
        else:
            h_last = t - (-sigmas[i - 1].log())
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, eta: float = 1.0,
                        s_noise: float = 1.0, solver_type: str = "midpoint") -> torch.Tensor:
    s_in = _ones(x)
    old_denoised, h_last = None, None
    h = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised = denoised
        h_last = h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, eta: float = 1.0,
                        s_noise: float = 1.0) -> torch.Tensor:
    s_in = _ones(x)
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# --- DPM-Solver (fast / adaptive): k-diffusion's DPMSolver class, as functions over t = -log(sigma) ---

class _DPMSolver:
    def __init__(self, model: Model) -> None:
        self.model = model

    @staticmethod
    def t(sigma: torch.Tensor) -> torch.Tensor:
        return -sigma.log()

    @staticmethod
    def sigma(t: torch.Tensor) -> torch.Tensor:
        return t.neg().exp()

    def eps(self, cache: dict, key: str, x: torch.Tensor, t: torch.Tensor):
        if key in cache:
            return cache[key], cache
        sigma = self.sigma(t) * x.new_ones([x.shape[0]])
        eps = (x - self.model(x, sigma)) / self.sigma(t)
        return eps, {key: eps, **cache}

    def step1(self, x, t, t_next, cache):
        h = t_next - t
        eps, cache = self.eps(cache, "eps", x, t)
        return x - self.sigma(t_next) * h.expm1() * eps, cache

    def step2(self, x, t, t_next, r1=1 / 2, cache=None):
        cache = {} if cache is None else cache
        h = t_next - t
        eps, cache = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, cache = self.eps(cache, "eps_r1", u1, s1)
        x_2 = x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)
        return x_2, cache

    def step3(self, x, t, t_next, r1=1 / 3, r2=2 / 3, cache=None):
        cache = {} if cache is None else cache
        h = t_next - t
        eps, cache = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, cache = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - self.sigma(s2) * (r2 * h).expm1() * eps
              - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2, cache = self.eps(cache, "eps_r2", u2, s2)
        x_3 = (x - self.sigma(t_next) * h.expm1() * eps
               - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps))
        return x_3, cache


@torch.no_grad()
def sample_dpm_fast(model: Model, x: torch.Tensor, sigma_min: float, sigma_max: float, n: int, noise: Noise,
                    eta: float = 0.0, s_noise: float = 1.0) -> torch.Tensor:
    solver = _DPMSolver(model)
    t_start, t_end = solver.t(torch.tensor(sigma_max)), solver.t(torch.tensor(sigma_min))
    m = math.floor(n / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i in range(len(orders)):
        cache: dict = {}
        t, t_next = ts[i], ts[i + 1]
        if eta:
            sd, su = ancestral_step(solver.sigma(t), solver.sigma(t_next), eta)
            t_next_ = torch.minimum(t_end, solver.t(sd))
            su = (solver.sigma(t_next) ** 2 - solver.sigma(t_next_) ** 2) ** 0.5
        else:
            t_next_, su = t_next, 0.0
        _, cache = solver.eps(cache, "eps", x, t)
        if orders[i] == 1:
            x, cache = solver.step1(x, t, t_next_, cache)
        elif orders[i] == 2:
            x, cache = solver.step2(x, t, t_next_, cache=cache)
        else:
            x, cache = solver.step3(x, t, t_next_, cache=cache)
        x = x + su * s_noise * noise(solver.sigma(t), solver.sigma(t_next))
    return x


class _PID:
    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8) -> None:
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety, self.eps = accept_safety, eps
        self.errs: list[float] = []

    def propose_step(self, error) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(model: Model, x: torch.Tensor, sigma_min: float, sigma_max: float, noise: Noise,
                        order: int = 3, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                        pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81,
                        eta: float = 0.0, s_noise: float = 1.0) -> torch.Tensor:
    """Adaptive step size: the error norm spans the whole batch, so callers run one image at a time
    (what A1111 draws at batch size 1)."""
    solver = _DPMSolver(model)
    t_start, t_end = solver.t(torch.tensor(sigma_max)), solver.t(torch.tensor(sigma_min))
    forward = t_end > t_start
    h_init = abs(h_init) * (1 if forward else -1)
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    s = t_start
    x_prev = x
    pid = _PID(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
        cache: dict = {}
        t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
        if eta:
            sd, su = ancestral_step(solver.sigma(s), solver.sigma(t), eta)
            t_ = torch.minimum(t_end, solver.t(sd))
            su = (solver.sigma(t) ** 2 - solver.sigma(t_) ** 2) ** 0.5
        else:
            t_, su = t, 0.0
        _, cache = solver.eps(cache, "eps", x, s)
        if order == 2:
            x_low, cache = solver.step1(x, s, t_, cache)
            x_high, cache = solver.step2(x, s, t_, cache=cache)
        else:
            x_low, cache = solver.step2(x, s, t_, r1=1 / 3, cache=cache)
            x_high, cache = solver.step3(x, s, t_, cache=cache)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high + su * s_noise * noise(solver.sigma(s), solver.sigma(t))
            s = t
    return x


# --- A1111's own loops (sd_samplers_extra.py, sd_samplers_lcm.py) ---

@torch.no_grad()
def sample_restart(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise,
                   s_noise: float = 1.0) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023) as A1111 configures it: with 20+ steps, 9 (or steps/4 twice,
    from 36 steps) restart steps back up to sigma 2 once the schedule reaches sigma 0.1."""
    s_in = _ones(x)

    def heun_step(x: torch.Tensor, old_sigma: torch.Tensor, new_sigma: torch.Tensor) -> torch.Tensor:
        denoised = model(x, old_sigma * s_in)
        d = _to_d(x, old_sigma, denoised)
        dt = new_sigma - old_sigma
        if new_sigma == 0:
            return x + d * dt
        x_2 = x + d * dt
        denoised_2 = model(x_2, new_sigma * s_in)
        d_2 = _to_d(x_2, new_sigma, denoised_2)
        return x + (d + d_2) / 2 * dt

    steps = sigmas.shape[0] - 1
    restart_list: dict[float, list[int]] = {}
    if steps >= 20:
        restart_steps, restart_times = 9, 1
        if steps >= 36:
            restart_steps, restart_times = steps // 4, 2
        sigmas = karras(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item())
        restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    by_index = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restart_list.items()}
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in by_index:
            r_steps, r_times, r_max = by_index[i + 1]
            min_idx = i + 1
            max_idx = int(torch.argmin(abs(sigmas - r_max), dim=0))
            if max_idx < min_idx:
                sigma_restart = karras(r_steps, sigmas[min_idx].item(), sigmas[max_idx].item())[:-1]
                for _ in range(r_times):
                    step_list.extend(zip(sigma_restart[:-1], sigma_restart[1:], strict=True))
    last_sigma = None
    for old_sigma, new_sigma in step_list:
        if last_sigma is None:
            last_sigma = old_sigma
        elif last_sigma < old_sigma:
            x = x + noise(old_sigma, new_sigma) * s_noise * (old_sigma**2 - last_sigma**2) ** 0.5
        x = heun_step(x, old_sigma, new_sigma)
        last_sigma = new_sigma
    return x


@torch.no_grad()
def sample_lcm(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise) -> torch.Tensor:
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise(sigmas[i], sigmas[i + 1])
    return x


#: k-diffusion function name -> implementation (the names A1111's sampler table uses).
SAMPLE_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "sample_euler": sample_euler,
    "sample_euler_ancestral": sample_euler_ancestral,
    "sample_heun": sample_heun,
    "sample_dpm_2": sample_dpm_2,
    "sample_dpm_2_ancestral": sample_dpm_2_ancestral,
    "sample_lms": sample_lms,
    "sample_dpm_fast": sample_dpm_fast,
    "sample_dpm_adaptive": sample_dpm_adaptive,
    "sample_dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "sample_dpmpp_sde": sample_dpmpp_sde,
    "sample_dpmpp_2m": sample_dpmpp_2m,
    "sample_dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "sample_dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "restart": sample_restart,
    "lcm": sample_lcm,
}
