"""Methods that need each tensor whole: norms, angles, filters and model-wide statistics.

The executor never slices these (a norm over a 4M-element slice of SD1.5's 38M-element token
embedding is not the tensor's norm); it computes them tensor by tensor, so peak memory is bounded
by the largest tensors in flight, not by the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..declare import Context, Model, Param, Statistics, merge_method

ALPHA_SHARE = "B's share per block (0 = A, 1 = B)"


@merge_method(formula="A·sin((1-α)Ω)/sin Ω + B·sin(αΩ)/sin Ω on the unit tensors, times the lerp of the norms",
              elementwise=False, identity={"alpha": 0.0}, source="sd-mecha slerp")
def slerp(a: Model, b: Model, *, alpha: float = Param(None, ALPHA_SHARE)) -> Model:
    """Spherical interpolation per tensor: the direction moves along the great circle, the norm linearly.

    Where the angle degenerates (parallel tensors, a zero tensor) it is plain linear interpolation.
    """
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if na == 0 or nb == 0 or not (torch.isfinite(na) and torch.isfinite(nb)):
        return torch.lerp(a, b, alpha)
    dot = (torch.dot(a.reshape(-1), b.reshape(-1)) / (na * nb)).clamp(-1.0, 1.0)
    omega = torch.arccos(dot)
    so = torch.sin(omega)
    if not torch.isfinite(so) or so.abs() < 1e-8:
        return torch.lerp(a, b, alpha)
    ca = torch.sin((1.0 - alpha) * omega) / (so * na)
    cb = torch.sin(alpha * omega) / (so * nb)
    scale = torch.lerp(na, nb, alpha)
    return a.mul_(ca * scale).add_(b.mul_(cb * scale))


@merge_method(formula="A + α·(Δb - Δa·⟨Δa,Δb⟩/|Δa|²), Δa = A - C, Δb = B - C", elementwise=False,
              identity={"alpha": 0.0}, source="sd-mecha add_perpendicular", clamp_to=("a", "b"))
def add_perpendicular(a: Model, b: Model, c: Model, *,
                      alpha: float = Param(1.0, "factor of the part of B - C orthogonal to A - C")) -> Model:
    """Add only what B - C has that A - C does not already point at (its orthogonal component)."""
    b.sub_(c)  # Δb
    c.neg_().add_(a)  # Δa
    n2 = torch.dot(c.reshape(-1), c.reshape(-1))
    if n2 == 0 or not torch.isfinite(n2):
        return a  # no direction to be orthogonal to: sd-mecha's zero component
    proj = torch.dot(c.reshape(-1), b.reshape(-1)) / n2
    return a.add_(b.sub_(c.mul_(proj)), alpha=alpha)


# --- supermerger's cosineA / cosineB --------------------------------------------------------------
# supermerger first measures the cosine similarity of A and B over the whole model (every U-Net
# and text-encoder tensor, not the VAE), trims the lowest and highest 1% and keeps the extremes;
# each tensor's similarity is then placed between them, and what is left after subtracting α is
# A's share. That model-wide pass is what Statistics is for.

def _not_vae(key: str) -> bool:
    return "first_stage_model" not in key


def _cos_dim0(a: torch.Tensor, b: torch.Tensor, *, overwrite: bool = False) -> torch.Tensor:
    """``torch.nn.functional.cosine_similarity(a, b, dim=0)`` with its arithmetic (each tensor over
    its norms along dim 0 clamped to 1e-8, the products summed), bit for bit, with fewer
    full-size temporaries: two instead of three, none with ``overwrite`` (``a`` and ``b`` are then
    spent)."""
    na = torch.linalg.vector_norm(a, 2, dim=0, keepdim=True).clamp_min_(1e-8)
    nb = torch.linalg.vector_norm(b, 2, dim=0, keepdim=True).clamp_min_(1e-8)
    x = a.div_(na) if overwrite else a / na
    return x.mul_(b.div_(nb) if overwrite else b / nb).sum(0)


def _magnitude_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1)) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))


def _normalized(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(t, p=2, dim=0)


def _collect_a(key: str, ts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    a, b = ts[0], ts[1]
    if a.ndim == 0:
        return None
    return _cos_dim0(_normalized(a), _normalized(b), overwrite=True).reshape(-1)


def _collect_b(key: str, ts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    a, b = ts[0], ts[1]
    if a.ndim == 0:
        return None
    return ((_cos_dim0(a, b) + _magnitude_similarity(a, b)) / 2.0).reshape(-1)


def _trimmed_range(parts: list[torch.Tensor]) -> tuple[float, float]:
    """supermerger's bounds: drop NaNs, then values below the 1st and above the 99th percentile
    (numpy's 'midpoint' method, the second on what the first left), and take min and max."""
    if not parts:
        return 0.0, 0.0
    sims = torch.cat([p.double() for p in parts]).numpy()
    sims = sims[~np.isnan(sims)]
    if sims.size == 0:
        return 0.0, 0.0
    sims = sims[~(sims < np.percentile(sims, 1, method="midpoint"))]
    sims = sims[~(sims > np.percentile(sims, 99, method="midpoint"))]
    return float(sims.min()), float(sims.max())


def _cosine_merge(a: torch.Tensor, b: torch.Tensor, combined: torch.Tensor, alpha: float,
                  bounds: tuple[float, float]) -> torch.Tensor:
    lo, hi = bounds
    k = (combined - lo) / (hi - lo) if hi > lo else torch.zeros_like(combined)
    k = (k - alpha).nan_to_num_(nan=0.0).clamp_(0.0, 1.0)
    # A's share is k: B·(1 - k) + A·k, k broadcast over dim 0.
    return b.mul_(1.0 - k).add_(a.mul_(k))


@merge_method(formula="lerp(B, A, k), k = clip((sim(Â, B̂) - s_min)/(s_max - s_min) - |α|, 0, 1)",
              elementwise=False, source="supermerger cosineA (favours A's structure)",
              statistics=Statistics(_collect_a, _trimmed_range, _not_vae))
def add_cosine_a(a: Model, b: Model, *, alpha: float = Param(None, "how much of B to let in, against the similarity"),
                 ctx: Context) -> Model:
    """supermerger's cosineA: A and B normalised along dim 0, their similarity decides A's share."""
    if a.ndim == 0:
        return torch.lerp(a, b, alpha)
    an, bn = _normalized(a), _normalized(b)
    magnitude = _magnitude_similarity(an, bn)
    combined = (_cos_dim0(an, bn, overwrite=True) + magnitude) / 2.0
    del an, bn  # spent: freed before the merge
    return _cosine_merge(a, b, combined, abs(alpha), ctx.stats)


@merge_method(formula="lerp(B, A, k), k = clip((½(sim(A, B) + ⟨A,B⟩/|A||B|) - s_min)/(s_max - s_min) - α, 0, 1)",
              elementwise=False, source="supermerger cosineB (favours B's structure)",
              statistics=Statistics(_collect_b, _trimmed_range, _not_vae))
def add_cosine_b(a: Model, b: Model, *, alpha: float = Param(None, "how much of B to let in, against the similarity"),
                 ctx: Context) -> Model:
    """supermerger's cosineB: the similarity of A and B themselves decides A's share."""
    if a.ndim == 0:
        return torch.lerp(a, b, alpha)
    combined = (_cos_dim0(a, b) + _magnitude_similarity(a, b)) / 2.0
    return _cosine_merge(a, b, combined, alpha, ctx.stats)


@merge_method(formula="A + α·gauss₁(median₃(B - C))", elementwise=False, identity={"alpha": 0.0},
              source="supermerger smoothAdd", clamp_to=("a", "b"))
def smooth_add_difference(a: Model, b: Model, c: Model, *,
                          alpha: float = Param(None, "factor of the smoothed difference")) -> Model:
    """Add difference with B - C filtered (3-wide median, then Gaussian σ = 1) to avoid 'burning'."""
    import scipy.ndimage

    d = b.sub_(c)
    if d.ndim == 0:
        return a.add_(d, alpha=alpha)
    filtered = scipy.ndimage.median_filter(d.numpy(), size=3)
    filtered = scipy.ndimage.gaussian_filter(filtered, sigma=1)
    return a.add_(torch.from_numpy(filtered), alpha=alpha)
