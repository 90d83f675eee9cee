"""A1111's timestep samplers (``sd_samplers_timesteps_impl.py``): DDIM, DDIM CFG++, PLMS, UniPC.

They work on the model's 1000 discrete timesteps instead of sigmas. A1111 (1.6+) picks
``range(0, 1000, 1000 // steps) + 1`` and runs ``len(timesteps) - 1`` DDIM/PLMS updates (so the
last update lands on t = 1, and e.g. 30 steps give 31 timesteps), and UniPC over
``len(timesteps)`` steps of continuous time from 1 to 1/1000 with no final denoise. The model
callable returns the noise prediction (eps) with classifier-free guidance already applied.
UniPC is the B(h) multistep predictor-corrector of Zhao et al. (2023) in A1111's copy of the
authors' code; diffusers' ``UniPCMultistepScheduler`` uses rounded timesteps and ends at sigma 0,
where it produced NaN latents on the bundled model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from blockmerge.errors import BlockmergeError

__all__ = ["TIMESTEP_FUNCTIONS", "a1111_timesteps"]

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Noise = Callable[[], torch.Tensor]


def a1111_timesteps(steps: int, discard_penultimate: bool = False) -> torch.Tensor:
    """A1111's DDIM/PLMS/UniPC timesteps for ``steps`` (``+1`` when the penultimate is discarded)."""
    steps += 1 if discard_penultimate else 0
    return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)


def _ddim_tables(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, eta: float):
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus = torch.sqrt(1 - alphas)
    # A1111 mixes numpy float64 and torch float32 here: (1 - alphas) is rounded to float32 first.
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas).to(torch.float64)
                              * (1 - alphas.to(torch.float64) / alphas_prev))
    return alphas, alphas_prev, sqrt_one_minus, sigmas


@torch.no_grad()
def ddim(model: EpsModel, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, noise: Noise,
         eta: float = 0.0, cfgpp: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """DDIM; with ``cfgpp`` (the unconditional eps of the last call) it is DDIM CFG++ (Chung et al.
    2024), whose direction term follows the unconditional prediction."""
    alphas, alphas_prev, sqrt_one_minus, sigmas = _ddim_tables(alphas_cumprod, timesteps, eta)
    s_in = x.new_ones(x.shape[0])
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in)
        direction = cfgpp() if cfgpp is not None else e_t
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sigma_t = sigmas[index].item() * s_x
        sqrt_one_minus_at = sqrt_one_minus[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * direction
        x = a_prev.sqrt() * pred_x0 + dir_xt + sigma_t * noise()
    return x


@torch.no_grad()
def plms(model: EpsModel, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
         noise: Noise) -> torch.Tensor:
    alphas, alphas_prev, sqrt_one_minus, _ = _ddim_tables(alphas_cumprod, timesteps, 0.0)
    s_in = x.new_ones([x.shape[0]])
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    old_eps: list[torch.Tensor] = []

    def x_prev_of(x: torch.Tensor, e_t: torch.Tensor, index: int) -> torch.Tensor:
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sqrt_one_minus_at = sqrt_one_minus[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e_t

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        ts = timesteps[index].item() * s_in
        t_next = timesteps[max(index - 1, 0)].item() * s_in
        e_t = model(x, ts)
        if not old_eps:  # pseudo improved Euler (2nd order)
            e_t_next = model(x_prev_of(x, e_t, index), t_next)
            e_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_new = x_prev_of(x, e_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        x = x_new
    return x


# --- UniPC ---

def _interp(x: torch.Tensor, xp: torch.Tensor, yp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f(x) through (xp, yp) (ascending xp), extended linearly past both ends, as
    UniPC's ``interpolate_fn``."""
    k = xp.shape[0]
    pos = torch.searchsorted(xp, x.contiguous(), right=False)
    seg = torch.where(pos == 0, torch.zeros_like(pos), torch.where(pos == k, torch.full_like(pos, k - 2), pos - 1))
    x0, x1, y0, y1 = xp[seg], xp[seg + 1], yp[seg], yp[seg + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class _NoiseScheduleVP:
    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        log_alphas = 0.5 * torch.log(alphas_cumprod)
        self.total_n = len(log_alphas)
        self.t_array = torch.linspace(0.0, 1.0, self.total_n + 1)[1:].to(log_alphas.device)
        self.log_alpha_array = log_alphas

    def log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        return _interp(t.reshape(-1), self.t_array, self.log_alpha_array)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_mean_coeff(t))

    def std(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_mean_coeff(t)))

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        m = self.log_mean_coeff(t)
        return m - 0.5 * torch.log(1.0 - torch.exp(2.0 * m))


def _expand(v: torch.Tensor, dims: int) -> torch.Tensor:
    return v[(...,) + (None,) * (dims - 1)]


@torch.no_grad()
def unipc(model: EpsModel, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, noise: Noise,
          order: int = 3, variant: str = "bh1", skip_type: str = "time_uniform",
          lower_order_final: bool = True) -> torch.Tensor:
    """UniPC multistep with data prediction (A1111's defaults: bh1, time-uniform, order 3)."""
    steps = len(timesteps)
    if steps < order:
        raise BlockmergeError(f"sampler 'UniPC': order {order} needs at least {order} timesteps; "
                              f"{steps} timesteps are too few (use more steps)")
    if variant not in ("bh1", "bh2"):
        raise BlockmergeError(f"UniPC variant: expected bh1 or bh2, got {variant!r}")
    ns = _NoiseScheduleVP(alphas_cumprod)
    t_0, t_T = 1.0 / ns.total_n, 1.0
    if skip_type == "time_uniform":
        ts = torch.linspace(t_T, t_0, steps + 1)
    elif skip_type == "time_quadratic":
        ts = torch.linspace(t_T**0.5, t_0**0.5, steps + 1).pow(2)
    elif skip_type == "logSNR":
        lam_T = ns.lambda_(torch.tensor(t_T)).item()
        lam_0 = ns.lambda_(torch.tensor(t_0)).item()
        lam = torch.linspace(lam_T, lam_0, steps + 1)
        log_alpha = -0.5 * torch.logaddexp(torch.zeros((1,)), -2.0 * lam)
        ts = _interp(log_alpha, torch.flip(ns.log_alpha_array, [0]), torch.flip(ns.t_array, [0]))
    else:
        raise BlockmergeError(f"UniPC skip type: expected time_uniform, time_quadratic or logSNR, got {skip_type!r}")
    ts = ts.to(x.device)

    def data_pred(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = model(x, (t - 1.0 / ns.total_n) * 1000.0)
        dims = x.dim()
        return (x - _expand(ns.std(t), dims) * eps) / _expand(ns.alpha(t), dims)

    def update(x, model_prev, t_prev, t, k, use_corrector):
        dims = x.dim()
        t_prev_0 = t_prev[-1]
        lambda_prev_0, lambda_t = ns.lambda_(t_prev_0), ns.lambda_(t)
        model_prev_0 = model_prev[-1]
        sigma_prev_0, sigma_t = ns.std(t_prev_0), ns.std(t)
        alpha_t = torch.exp(ns.log_mean_coeff(t))
        h = lambda_t - lambda_prev_0
        rks, d1s = [], []
        for i in range(1, k):
            rk = ((ns.lambda_(t_prev[-(i + 1)]) - lambda_prev_0) / h)[0]
            rks.append(rk)
            d1s.append((model_prev[-(i + 1)] - model_prev_0) / rk)
        rks.append(torch.tensor(1.0, device=x.device))
        rks_t = torch.stack([torch.as_tensor(r, dtype=torch.float32, device=x.device) for r in rks])
        hh = -h[0]
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        b_h = hh if variant == "bh1" else torch.expm1(hh)
        r_rows, b = [], []
        for i in range(1, k + 1):
            r_rows.append(torch.pow(rks_t, i - 1))
            b.append(h_phi_k * factorial_i / b_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        r_mat = torch.stack(r_rows)
        b_t = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in b]).to(x.device)
        d1s_t = None
        rhos_p = None
        if d1s:
            d1s_t = torch.stack(d1s, dim=1)
            rhos_p = torch.tensor([0.5], device=x.device) if k == 2 else torch.linalg.solve(r_mat[:-1, :-1], b_t[:-1])
        rhos_c = None
        if use_corrector:
            rhos_c = torch.tensor([0.5], device=x.device) if k == 1 else torch.linalg.solve(r_mat, b_t)
        x_t_ = _expand(sigma_t / sigma_prev_0, dims) * x - _expand(alpha_t * h_phi_1, dims) * model_prev_0
        pred_res = torch.einsum("k,bkchw->bchw", rhos_p, d1s_t) if d1s_t is not None else 0
        x_t = x_t_ - _expand(alpha_t * b_h, dims) * pred_res
        model_t = None
        if use_corrector:
            model_t = data_pred(x_t, t)
            corr_res = torch.einsum("k,bkchw->bchw", rhos_c[:-1], d1s_t) if d1s_t is not None else 0
            d1_t = model_t - model_prev_0
            x_t = x_t_ - _expand(alpha_t * b_h, dims) * (corr_res + rhos_c[-1] * d1_t)
        return x_t, model_t

    vec_t = ts[0].expand(x.shape[0])
    model_prev = [data_pred(x, vec_t)]
    t_prev = [vec_t]
    for init_order in range(1, order):
        vec_t = ts[init_order].expand(x.shape[0])
        x, model_x = update(x, model_prev, t_prev, vec_t, init_order, True)
        if model_x is None:
            model_x = data_pred(x, vec_t)
        model_prev.append(model_x)
        t_prev.append(vec_t)
    for step in range(order, steps + 1):
        vec_t = ts[step].expand(x.shape[0])
        step_order = min(order, steps + 1 - step) if lower_order_final else order
        x, model_x = update(x, model_prev, t_prev, vec_t, step_order, step != steps)
        for i in range(order - 1):
            t_prev[i] = t_prev[i + 1]
            model_prev[i] = model_prev[i + 1]
        t_prev[-1] = vec_t
        if step < steps:
            if model_x is None:
                model_x = data_pred(x, vec_t)
            model_prev[-1] = model_x
    return x


TIMESTEP_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {"ddim": ddim, "plms": plms, "unipc": unipc}
