"""Rank-r factorisations of a weight difference: exact where the rank is a large share, randomised
(with a fixed seed per tensor) where it is small.

Why not ``torch.linalg.svd`` for everything: kohya's extraction takes the full SVD of every
difference and keeps r columns; for rank 64 of a 1280 x 11520 convolution that is ~40x more work
than needed. A randomised range finder (Halko, Martinsson & Tropp 2011, with power iterations)
finds the top r singular triplets in a few matrix products. Why not ``torch.svd_lowrank``: it draws
from torch's global generator, so two runs would write different files; here the Gaussian test
matrix comes from a generator seeded by the tensor's name. The total energy ||ΔW||² is always
exact (a sum of squares), and the kept energy is the sum of the r squared singular values found.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from ..errors import CheckpointError

__all__ = ["Factors", "low_rank"]

#: Extra columns of the random test matrix beyond the rank, and power iterations: with these the
#: kept energy of rank-64 factors of SD1.5-sized differences was within 0.1% of the exact SVD's
#: (bench/bench_lora.py), and the ranks kept are never worse than one pass of the exact method.
OVERSAMPLE = 16
POWER_ITERATIONS = 4


@dataclass(frozen=True)
class Factors:
    up: torch.Tensor  # (out, r): U·S
    down: torch.Tensor  # (r, in): Vᵀ
    kept: float  # Σ of the r largest squared singular values
    total: float  # ||A||²
    singular: torch.Tensor  # the r singular values found, descending


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"blockmerge/lowrank/{name}".encode()).digest()[:8], "little") >> 1


def _exact(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def low_rank(a: torch.Tensor, rank: int, *, name: str = "", exact: bool | None = None) -> Factors:
    """The best rank-``rank`` factors ``up @ down ≈ a`` of a 2-D float tensor.

    ``exact`` forces (True) or forbids (False) the full SVD; by default it is used when the rank
    is at least a quarter of the smaller side, where the randomised method saves little.
    """
    a = a.to(torch.float64 if a.dtype == torch.float64 else torch.float32)
    m, n = a.shape
    k = max(0, min(rank, m, n))
    total = float(a.double().pow(2).sum())
    if not math.isfinite(total):  # any inf/NaN makes the sum of squares so; an SVD would fail on it
        raise CheckpointError(f"{name or 'a tensor'}: holds non-finite values (inf/NaN); it has no low-rank factors")
    if k == 0:
        return Factors(a.new_zeros(m, 0), a.new_zeros(0, n), 0.0, total, a.new_zeros(0))
    use_exact = exact if exact is not None else 4 * k >= min(m, n)
    if use_exact:
        u, s, vh = _exact(a, k)
    else:
        g = torch.Generator(device="cpu").manual_seed(_seed(name))
        q_cols = min(k + OVERSAMPLE, min(m, n))
        omega = torch.randn(n, q_cols, generator=g, dtype=a.dtype).to(a.device)
        y = a @ omega
        q, _ = torch.linalg.qr(y)
        for _ in range(POWER_ITERATIONS):
            z, _ = torch.linalg.qr(a.T @ q)
            q, _ = torch.linalg.qr(a @ z)
        b = q.T @ a  # (q_cols, n)
        ub, s, vh = torch.linalg.svd(b, full_matrices=False)
        u = q @ ub[:, :k]
        s, vh = s[:k], vh[:k]
    kept = float(s.double().pow(2).sum())
    return Factors(u * s, vh, min(kept, total), total, s)
