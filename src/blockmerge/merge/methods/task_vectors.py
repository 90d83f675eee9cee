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


def top_k(d: torch.Tensor, k: float, mag: torch.Tensor | None = None) -> torch.Tensor:
    """Zero all but the ``int(k·n)`` largest-magnitude elements of ``d`` (in place).

    The threshold is the magnitude of the ``int(k·n)``-th largest element and every element at
    least that large is kept, so ties at the threshold (frequent in fp16 differences) are all
    kept, deterministically, rather than broken by sort order. ``mag``, a scratch tensor of
    ``d``'s shape and dtype, receives the magnitudes (else one is allocated).
    """
    n = d.numel()
    m = int(k * n)
    if m >= n:
        return d
    if m <= 0:
        return d.zero_()
    mag = d.abs() if mag is None else torch.abs(d, out=mag)
    # The (n-m+1)-th smallest magnitude, by numpy's in-place selection: torch.kthvalue copies the
    # tensor and allocates int64 indices (3x its bytes; 0.78 s for SD1.5's token embedding, numpy
    # 0.06 s and nothing). Same value: the k-th order statistic does not depend on the method.
    arr = mag.reshape(-1).numpy()
    arr.partition(n - m)
    thr = float(arr[n - m])
    torch.abs(d, out=mag)  # the selection reordered it
    # The mask as 1.0/0.0 in the magnitudes' buffer: multiplying by a bool tensor converts it into
    # a float temporary the size of the tensor.
    return d.mul_(torch.ge(mag, thr, out=mag))


def _drop(d: torch.Tensor, p: float, g: torch.Generator, noise: torch.Tensor | None = None) -> torch.Tensor:
    """DARE: drop each element with probability p, rescale the survivors by 1/(1-p) (in place).

    ``noise``: a float32 scratch tensor of ``d``'s shape for the uniform draws (``uniform_`` draws
    what ``torch.rand`` would; ``torch.rand(out=...)`` allocates a copy), else one is allocated."""
    if p <= 0.0:
        return d
    if noise is None:
        noise = torch.empty(d.shape, dtype=torch.float32)
    noise.uniform_(generator=g)
    return d.mul_(torch.ge(noise, p, out=noise)).div_(1.0 - p)  # kept: 1.0, dropped: 0.0


def _noise_buffer(scratch: torch.Tensor) -> torch.Tensor | None:
    """The scratch tensor as DARE's float32 noise buffer where it is float32."""
    return scratch if scratch.dtype == torch.float32 else None


def _elect_and_mix(deltas: list[torch.Tensor], w: list[float], count_signs: int, scratch: torch.Tensor) -> torch.Tensor:
    """TIES: per element the sign with the larger total mass (or count) wins; the disjoint mean of
    the weighted task vectors that agree with it (mergekit's get_mask + normalised mix).

    In place, in float passes only: the deltas are overwritten, ``scratch`` (a tensor of their
    shape) holds the votes and then the elected sign s = ±1, one more tensor the sum, the first
    delta's buffer the divisor. A delta agrees where d·s > 0; its part of the sum is then
    max(d·s, 0)·s, which is d exactly (s is ±1) where it agrees and 0 elsewhere. No bool masks:
    torch's masked_fill_, where and bool->float conversions cost 5-20x a float multiply here
    (SD1.5's token embedding, two task vectors: 1.0 s -> 0.2 s).
    """
    for d, wi in zip(deltas, w, strict=True):
        d.mul_(wi)
    sign = scratch
    spare = torch.empty_like(scratch)
    if count_signs:
        torch.sign(deltas[0], out=sign)
        for d in deltas[1:]:
            sign.add_(torch.sign(d, out=spare))
    else:
        sign.copy_(deltas[0])
        for d in deltas[1:]:
            sign.add_(d)
    torch.ge(sign, 0, out=sign).mul_(2.0).sub_(1.0)  # the votes -> +1 where they are >= 0, else -1
    mixed = spare
    divisor = deltas[0]
    for i, (d, wi) in enumerate(zip(deltas, w, strict=True)):
        part = d.mul_(sign).clamp_(min=0.0).mul_(sign)  # d where its sign agrees, else 0
        if i == 0:
            torch.add(part, 0.0, out=mixed)  # 0 + part, as the sum starting from zeros (-0.0 -> 0.0)
        else:
            mixed.add_(part)
        agree = torch.ne(part, 0.0, out=part)  # 1.0 where it agrees (a 0 delta never does)
        if i == 0:
            agree.mul_(wi)  # deltas[0]'s buffer: the divisor from here on
        else:
            divisor.add_(agree, alpha=wi)
    # Where no delta agrees the divisor is 0 (the sum is too): 1 instead, as mergekit does.
    zero = torch.eq(divisor, 0.0, out=deltas[-1] if len(deltas) > 1 else sign)
    divisor.add_(zero)
    return mixed.div_(divisor)


@merge_method(formula="base + α·Σᵢ wᵢ·top_k(δᵢ)·[sign agrees] / Σᵢ wᵢ·[sign agrees]", elementwise=False,
              identity={"alpha": 0.0}, source="TIES-merging (Yadav et al. 2023) as mergekit's ties")
def ties(base: Model, *models: TaskVector,
         alpha: float = Param(1.0, STRENGTH),
         k: float = Param(0.2, "density: the fraction of each task vector's largest elements kept", lo=0.0, hi=1.0),
         w: float = Param(1.0, WEIGHT, per_operand=True),
         count_signs: int = COUNT_SIGNS) -> Model:
    """Trim each task vector to its top-k elements, elect a sign per element, average what agrees."""
    scratch = torch.empty_like(base)
    deltas = [top_k(d, k, scratch) for d in models]
    return base.add_(_elect_and_mix(deltas, w, count_signs, scratch), alpha=alpha)


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
    noise = torch.empty(base.shape, dtype=torch.float32) if p > 0.0 else None
    for i, (d, wi) in enumerate(zip(models, w, strict=True)):
        out.add_(_drop(d, p, ctx.generator(i), noise), alpha=alpha * wi)
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
    scratch = torch.empty_like(base)
    deltas = [_drop(d, p, ctx.generator(i), _noise_buffer(scratch)) for i, d in enumerate(models)]
    return base.add_(_elect_and_mix(deltas, w, count_signs, scratch), alpha=alpha)


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
    mean_delta = models[0]  # in place: the task vectors are scratch copies
    for d in models[1:]:
        mean_delta.add_(d)
    return base.add_(mean_delta.div_(n) if n > 1 else mean_delta, alpha=t)


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
