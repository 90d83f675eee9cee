"""Merge methods: small pure functions on tensors, registered by name.

A method never reads files; the executor streams tensors through it. Inputs arrive already upcast
to float32 (or float64 when an input is float64), so every method computes in float32 or wider
whatever the storage dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

MethodFn = Callable[[Sequence[torch.Tensor], float, float], torch.Tensor]


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
    fn: MethodFn
    a1111_name: str

    def is_identity(self, alpha: float, beta: float, n_models: int) -> bool:
        """True when the result is exactly A, so the executor can copy A without arithmetic."""
        if self.name == "scaled_sum":
            return alpha == 1.0 and (beta == 0.0 or n_models == 1)
        return alpha == 0.0


def weighted_sum(t: Sequence[torch.Tensor], alpha: float, beta: float) -> torch.Tensor:
    a, b = t[0], t[1]
    out = a.mul(1.0 - alpha)
    out.add_(b, alpha=alpha)
    return out


def add_difference(t: Sequence[torch.Tensor], alpha: float, beta: float) -> torch.Tensor:
    a, b, c = t[0], t[1], t[2]
    diff = b.sub(c)
    return diff.mul_(alpha).add_(a)


def scaled_sum(t: Sequence[torch.Tensor], alpha: float, beta: float) -> torch.Tensor:
    out = t[0].mul(alpha)
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
