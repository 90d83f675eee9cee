"""Task-vector methods over a base and N models: TIES, DARE, DARE-TIES, Model Stock, and the
geometric median.

The models (or saved deltas) become task vectors ``δᵢ = Mᵢ - base`` before the formula sees them
(:class:`~blockmerge.merge.declare.TaskVector` operands). TIES and DARE follow mergekit's
generalized task arithmetic (sparsify each δᵢ, optionally elect a sign per element, mix with
weights wᵢ), with the sign election by mass ("sum", the TIES paper's) or by count; Model Stock
follows mergekit's (cosine of the task vectors, averaged over pairs); the geometric median is
Weiszfeld's iteration as sd-mecha runs it.
"""

from __future__ import annotations

import torch

from ..declare import Context, Model, Param, TaskVector, merge_method

STRENGTH = "factor of the merged task vector added to the base (mergekit's λ)"
WEIGHT = "weight of model i's task vector (w1, w2, ...)"
# Parameters several methods declare alike (each declaration copies them under its own name).
DROP = Param(0.9, "drop probability of each task-vector element", lo=0.0, hi=1.0, hi_open=True)
SEED = Param(0, "random seed (with the tensor's name it fixes each tensor's drops)", kind="int", lo=0, hi=2**63 - 1)
COUNT_SIGNS = Param(0, "1: elect each element's sign by count instead of by mass", kind="bool")


def top_k(d: torch.Tensor, k: float) -> torch.Tensor:
    """Zero all but the ``int(k·n)`` largest-magnitude elements of ``d`` (in place).

    The threshold is the magnitude of the ``int(k·n)``-th largest element and every element at
    least that large is kept, so ties at the threshold (frequent in fp16 differences) are all
    kept, deterministically, rather than broken by sort order.
    """
    n = d.numel()
    m = int(k * n)
    if m >= n:
        return d
    if m <= 0:
        return d.zero_()
    mag = d.abs().reshape(-1)
    thr = torch.kthvalue(mag, n - m + 1).values
    return d.mul_(mag.reshape(d.shape) >= thr)


def _drop(d: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """DARE: drop each element with probability p, rescale the survivors by 1/(1-p) (in place)."""
    if p <= 0.0:
        return d
    keep = torch.rand(d.shape, generator=g, dtype=torch.float32) >= p
    return d.mul_(keep).div_(1.0 - p)


def _elect_and_mix(deltas: list[torch.Tensor], w: list[float], count_signs: int) -> torch.Tensor:
    """TIES: per element the sign with the larger total mass (or count) wins; the disjoint mean of
    the weighted task vectors that agree with it (mergekit's get_mask + normalised mix)."""
    weighted = [d.mul_(wi) for d, wi in zip(deltas, w, strict=True)]
    if count_signs:
        votes = sum(torch.sign(d) for d in weighted)
    else:
        votes = sum(weighted[1:], weighted[0].clone()) if len(weighted) > 1 else weighted[0].clone()
    majority = torch.where(votes >= 0, 1.0, -1.0).to(weighted[0].dtype)
    mixed = torch.zeros_like(weighted[0])
    divisor = torch.zeros_like(weighted[0])
    for d, wi in zip(weighted, w, strict=True):
        agree = torch.sign(d) == majority
        mixed.add_(d * agree)
        divisor.add_(agree.to(d.dtype), alpha=wi)
    divisor[divisor == 0] = 1.0
    return mixed.div_(divisor)


@merge_method(formula="base + α·Σᵢ wᵢ·top_k(δᵢ)·[sign agrees] / Σᵢ wᵢ·[sign agrees]", elementwise=False,
              identity={"alpha": 0.0}, source="TIES-merging (Yadav et al. 2023) as mergekit's ties")
def ties(base: Model, *models: TaskVector,
         alpha: float = Param(1.0, STRENGTH),
         k: float = Param(0.2, "density: the fraction of each task vector's largest elements kept", lo=0.0, hi=1.0),
         w: float = Param(1.0, WEIGHT, per_operand=True),
         count_signs: int = COUNT_SIGNS) -> Model:
    """Trim each task vector to its top-k elements, elect a sign per element, average what agrees."""
    deltas = [top_k(d, k) for d in models]
    return base.add_(_elect_and_mix(deltas, w, count_signs), alpha=alpha)


@merge_method(formula="base + α·Σᵢ wᵢ·mᵢ·δᵢ/(1-p), mᵢ ~ Bernoulli(1-p)", elementwise=False,
              identity={"alpha": 0.0}, source="DARE (Yu et al. 2023) as mergekit's dare_linear")
def dare(base: Model, *models: TaskVector,
         alpha: float = Param(1.0, STRENGTH),
         p: float = DROP,
         w: float = Param(1.0, WEIGHT, per_operand=True),
         seed: int = SEED,
         ctx: Context) -> Model:
    """Drop random elements of each task vector and rescale the rest, then add their weighted sum."""
    out = base
    for i, (d, wi) in enumerate(zip(models, w, strict=True)):
        out.add_(_drop(d, p, ctx.generator(i)), alpha=alpha * wi)
    return out


@merge_method(formula="TIES' sign election and disjoint mean over DARE-dropped δᵢ", elementwise=False,
              identity={"alpha": 0.0}, source="DARE + TIES as mergekit's dare_ties")
def dare_ties(base: Model, *models: TaskVector,
              alpha: float = Param(1.0, STRENGTH),
              p: float = DROP,
              w: float = Param(1.0, WEIGHT, per_operand=True),
              count_signs: int = COUNT_SIGNS,
              seed: int = SEED,
              ctx: Context) -> Model:
    """Drop and rescale each task vector as DARE does, then merge them as TIES does."""
    deltas = [_drop(d, p, ctx.generator(i)) for i, d in enumerate(models)]
    return base.add_(_elect_and_mix(deltas, w, count_signs), alpha=alpha)


@merge_method(formula="t·mean(Mᵢ) + (1-t)·base, t = N·cosθ / (1 + (N-1)·cosθ)", elementwise=False,
              min_variadic=2, source="Model Stock (Jang et al. 2024) as mergekit's model_stock")
def model_stock(base: Model, *models: TaskVector) -> Model:
    """Average the models and pull the average toward the base by the angle between their task vectors.

    cos θ is the mean over all pairs of task vectors (each flattened); where it is undefined (a
    zero task vector) mergekit's clamp applies, and where t is not finite the base is kept.
    """
    n = len(models)
    flat = [d.reshape(-1) for d in models]
    norms = [torch.linalg.vector_norm(f) for f in flat]
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            c = torch.dot(flat[i], flat[j]) / (norms[i] * norms[j]).clamp(min=1e-6)
            cos.append(c.clamp(-1.0, 1.0))
    ct = torch.stack(cos).mean()
    t = float(n * ct / (1 + (n - 1) * ct))
    if t != t or t in (float("inf"), float("-inf")):
        return base
    mean_delta = sum(models[1:], models[0].clone()) / n if n > 1 else models[0]
    return base.add_(mean_delta, alpha=t)


@merge_method(formula="argmin_m Σᵢ |Mᵢ - m| (Weiszfeld's iteration)", elementwise=False,
              source="sd-mecha geometric_median (Weiszfeld, as in geom_median)")
def geometric_median(*models: Model,
                     eps: float = Param(1e-6, "smallest distance used as a divisor", lo=0.0, lo_open=True),
                     maxiter: int = Param(100, "most iterations", kind="int", lo=0, hi=10_000),
                     ftol: float = Param(1e-20, "stop when the objective improves by less than this, relative",
                                         lo=0.0)) -> Model:
    """The point with the least total distance to all models, per tensor: robust to one outlier model."""
    # sd-mecha's loop (geom_median's Weiszfeld) computes each model's distance to the median twice:
    # for the objective at the new median and, the next iteration, as the weights' denominators.
    # Here once per median, into reused buffers (torch.dist allocates a full-size difference:
    # 100 ms against 23 ms for SD1.5's token embedding). Same values, same stopping rule: the
    # objective is the mean distance to the new median; the last iteration's objective decides
    # nothing, so it is not computed.
    n = len(models)
    ones = torch.ones(n, dtype=models[0].dtype)
    median = torch.empty_like(models[0])
    diff = torch.empty_like(models[0])

    def average(weights: torch.Tensor) -> torch.Tensor:
        torch.mul(models[0], weights[0], out=median)
        for m, wi in zip(models[1:], weights[1:], strict=True):
            median.add_(m, alpha=float(wi))
        return median.div_(weights.sum())

    def distances() -> torch.Tensor:
        return torch.stack([torch.linalg.vector_norm(torch.sub(m, median, out=diff)) for m in models])

    average(ones)
    if maxiter <= 0:
        return median
    dist = distances()
    obj = float(dist.mean())
    for i in range(int(maxiter)):
        weights = ones / torch.clamp(dist, min=eps)
        average(weights)
        if i == maxiter - 1:
            break
        prev = obj
        dist = distances()
        obj = float(dist.mean())
        if abs(prev - obj) <= ftol * obj:
            break
    return median
