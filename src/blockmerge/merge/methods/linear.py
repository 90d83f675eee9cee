"""Elementwise methods: sums of the operands with per-block factors, and the delta arithmetic.

All of them are computed slice by slice of the flat tensors through reused buffers (see
:mod:`..declare`); the arithmetic of ``weighted_sum``, ``add_difference`` and ``scaled_sum`` is
exactly what blockmerge has always done, so their outputs stay byte-identical.
"""

from __future__ import annotations

import math

import torch

from ..declare import Delta, Model, Param, merge_method

ALPHA_SHARE = "B's share per block (0 = A, 1 = B; outside [0, 1] extrapolates)"


@merge_method(formula="(1-α)·A + α·B", elementwise=True, identity={"alpha": 0.0}, a1111="Weighted sum",
              source="A1111 checkpoint merger 'Weighted sum'; Merge Block Weighted")
def weighted_sum(a: Model, b: Model, *, alpha: float = Param(None, ALPHA_SHARE)) -> Model:
    """Linear interpolation between two models, one ratio per block."""
    return a.mul_(1.0 - alpha).add_(b, alpha=alpha)


@merge_method(formula="A + α·(B - C)", elementwise=True, identity={"alpha": 0.0}, a1111="Add difference",
              source="A1111 checkpoint merger 'Add difference'", clamp_to=("a", "b"))
def add_difference(a: Model, b: Model, c: Model, *,
                   alpha: float = Param(None, "factor of the difference B - C added to A")) -> Model:
    """Add what B learned relative to C (e.g. a fine-tune minus its base) to A."""
    return b.sub_(c).mul_(alpha).add_(a)


@merge_method(formula="α·A + β·B (α·A with one model)", elementwise=True, identity={"alpha": 1.0, "beta": 0.0},
              a1111="Scaled sum", source="the article's independent M_A·A + M_B·B")
def scaled_sum(a: Model, b: Model = None, *,
               alpha: float = Param(None, "A's factor per block (need not sum to 1 with β)"),
               beta: float = Param(0.0, "B's factor per block", requires="b")) -> Model:
    """Independent factors for A and B, as the article's weakening experiment uses them."""
    out = a.mul_(alpha)
    if b is not None:
        out.add_(b, alpha=beta)
    return out


@merge_method(formula="(1-α-β)·A + α·B + β·C", elementwise=True, identity={"alpha": 0.0, "beta": 0.0},
              source="supermerger 'Triple sum'; sd-meh triple_sum")
def triple_sum(a: Model, b: Model, c: Model, *,
               alpha: float = Param(None, "B's share per block"),
               beta: float = Param(None, "C's share per block")) -> Model:
    """Three models with two ratios; A gets the rest."""
    return a.mul_(1.0 - alpha - beta).add_(b, alpha=alpha).add_(c, alpha=beta)


@merge_method(formula="(1-β)·((1-α)·A + α·B) + β·C", elementwise=True, identity={"alpha": 0.0, "beta": 0.0},
              source="supermerger 'sum Twice'; sd-meh sum_twice")
def sum_twice(a: Model, b: Model, c: Model, *,
              alpha: float = Param(None, "B's share in the first sum"),
              beta: float = Param(None, "C's share in the second sum")) -> Model:
    """Two weighted sums in a row: A with B, then the result with C."""
    return a.mul_(1.0 - alpha).add_(b, alpha=alpha).mul_(1.0 - beta).add_(c, alpha=beta)


def _weights_nonzero(values: dict) -> str | None:
    s = sum(values["w"])
    return None if s != 0 else f"the weights w1..w{len(values['w'])} sum to 0"


@merge_method(formula="Σ wᵢ·Mᵢ / Σ wᵢ", elementwise=True, source="sd-mecha n_average (with per-model weights)",
              constraint=_weights_nonzero)
def n_average(*models: Model, w: float = Param(1.0, "weight of model i (w1, w2, ...; normalised by their sum)",
                                               per_operand=True)) -> Model:
    """The (weighted) mean of any number of models."""
    # The weights normalised once (wᵢ/Σw): one pass per model and no division pass at the end.
    total = sum(w)
    out = models[0].mul_(w[0] / total)
    for m, wi in zip(models[1:], w[1:], strict=True):
        out.add_(m, alpha=wi / total)
    return out


@merge_method(formula="A - B", elementwise=True, source="sd-mecha subtract; the task vector of a fine-tune")
def difference(a: Model, b: Model) -> Delta:
    """The task vector A - B (what A learned relative to B), as a delta that can be saved and reused."""
    return a.sub_(b)


@merge_method(formula="A + α·D", elementwise=True, identity={"alpha": 0.0}, source="sd-mecha add_difference on a delta",
              adds=("d", "alpha"))
def add_delta(a: Model, d: Delta, *, alpha: float = Param(1.0, "factor of the delta D added to A")) -> Model:
    """Add a saved task vector (a delta file) to a model."""
    return d.mul_(alpha).add_(a)


@merge_method(formula="A + α·(B - C)·|B - A| / (|B - C| + |B - A|) · 1.8", elementwise=True,
              identity={"alpha": 0.0}, source="supermerger trainDifference", clamp_to=("a", "b"))
def train_difference(a: Model, b: Model, c: Model, *,
                     alpha: float = Param(None, "strength of the 'trained' difference (supermerger's α)")) -> Model:
    """Add B - C to A scaled per element by how far B is from A, as if training the difference into A."""
    # (B - C) into c, |B - A| into b; where both distances are 0 the difference is 0 (0/0 -> 0).
    c.neg_().add_(b)
    b.sub_(a).abs_()
    scale = b.div_(c.abs().add_(b)).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return a.add_(c.mul_(scale), alpha=alpha * 1.8)


@merge_method(formula="C + sign((1-β)·A + β·B - C)·|A - C|^(1-α)·|B - C|^α", elementwise=True,
              identity={"alpha": 0.0, "beta": 0.0}, source="sd-meh multiply_difference", clamp_to=("a", "b"))
def multiply_difference(a: Model, b: Model, c: Model, *,
                        alpha: float = Param(None, "exponent share of B's distance from C"),
                        beta: float = Param(0.0, "B's share in the sign of the result")) -> Model:
    """The geometric mean of the two distances from C, with the sign of their weighted sum."""
    sign = a.mul(1.0 - beta).add_(b, alpha=beta).sub_(c)
    a.sub_(c).abs_().pow_(1.0 - alpha)
    b.sub_(c).abs_().pow_(alpha)
    return a.mul_(b).copysign_(sign).add_(c)


@merge_method(formula="Re(A^(1-α)·B^α)", elementwise=True, identity={"alpha": 0.0}, source="sd-mecha geometric_sum")
def geometric_sum(a: Model, b: Model, *, alpha: float = Param(None, "B's share of the exponent")) -> Model:
    """The weighted geometric mean, taken in complex numbers so negative weights stay defined."""
    # The principal branch in real arithmetic: A^(1-α) = |A|^(1-α)·e^(iπ(1-α)[A<0]), so
    # Re(A^(1-α)·B^α) = |A|^(1-α)·|B|^α·cos(π((1-α)·[A<0] + α·[B<0])), and the cosine takes one of
    # four values by the signs. Two real pows instead of two complex ones (sd-mecha's formula):
    # 63 ms instead of 248-682 ms for 4M elements, and no complex temporaries (8 bytes each).
    factor = torch.where(b < 0, math.cos(math.pi * alpha), 1.0)  # B negative (A not): cos(πα)
    neg_a = a < 0
    factor.masked_fill_(neg_a, math.cos(math.pi * (1.0 - alpha)))  # A negative (B not)
    factor.masked_fill_(neg_a.logical_and_(b < 0), -1.0)  # both: cos(π)
    # 0 to a negative power: the complex formula gives NaN (log 0 = -inf times a phase), not ±inf.
    undefined = (a == 0) if alpha > 1.0 else (b == 0) if alpha < 0.0 else None
    out = a.abs_().pow_(1.0 - alpha).mul_(b.abs_().pow_(alpha)).mul_(factor)
    return out if undefined is None else out.masked_fill_(undefined, math.nan)
