"""Merge methods: small pure functions on tensors, registered by name.

A method never reads files; the executor streams tensors through it. Each method is an in-place
kernel over operands already converted into scratch buffers of the compute dtype: float32, or
float64 when an input is float64, whatever the storage dtype. Why in place: on a CPU, fresh
allocations for every intermediate cost more (page faults) than the arithmetic itself; the
executor reuses its buffers slice after slice. ``MergeMethod.fn`` is the same arithmetic on whole
tensors that leaves its inputs untouched, for callers that hold their own tensors (sweeps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# A kernel computes in place: its operands are scratch copies of one float dtype that it may
# overwrite, and it returns the one holding the result.
Kernel = Callable[[list[torch.Tensor], float, float], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    formula: str
    min_models: int
    max_models: int
    uses_beta: bool
    # The weights that reproduce model A exactly; blocks not named in a readable spec get these.
    keep_a_alpha: float
    keep_a_beta: float
    kernel: Kernel
    a1111_name: str

    def fn(self, tensors: Sequence[torch.Tensor], alpha: float, beta: float) -> torch.Tensor:
        """The method on whole tensors of any float dtype; inputs untouched, result in float32 (or float64)."""
        ct = compute_dtype(*(t.dtype for t in tensors))
        return self.kernel([t.to(dtype=ct, copy=True) for t in tensors], alpha, beta)

    def is_identity(self, alpha: float, beta: float, n_models: int) -> bool:
        """True when the result is exactly A, so the executor can copy A without arithmetic."""
        if self.name == "scaled_sum":
            return alpha == 1.0 and (beta == 0.0 or n_models == 1)
        return alpha == 0.0


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when an operand is float64: never narrower than float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def weighted_sum(t: list[torch.Tensor], alpha: float, beta: float) -> torch.Tensor:
    return t[0].mul_(1.0 - alpha).add_(t[1], alpha=alpha)


def add_difference(t: list[torch.Tensor], alpha: float, beta: float) -> torch.Tensor:
    return t[1].sub_(t[2]).mul_(alpha).add_(t[0])


def scaled_sum(t: list[torch.Tensor], alpha: float, beta: float) -> torch.Tensor:
    out = t[0].mul_(alpha)
    if len(t) > 1:
        out.add_(t[1], alpha=beta)
    return out


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("weighted_sum", "(1-α)·A + α·B", 2, 2, False, 0.0, 0.0, weighted_sum, "Weighted sum"),
        MergeMethod("add_difference", "A + α·(B - C)", 3, 3, False, 0.0, 0.0, add_difference, "Add difference"),
        MergeMethod("scaled_sum", "α·A + β·B (α·A with one model)", 1, 2, True, 1.0, 0.0, scaled_sum, "Scaled sum"),
    )
}


def get_method(name: str) -> MergeMethod:
    from ..errors import BlockmergeError

    try:
        return METHODS[name]
    except KeyError:
        raise BlockmergeError(f"--method {name}: unknown method (choose from {', '.join(METHODS)})") from None
