"""Storage dtypes: the names users give (``--dtype``), and casts into narrow formats that saturate.

The safetensors names (``F16``, ``BF16``, ``F8_E4M3``, ``F8_E5M2`` ...) are in
:data:`blockmerge.io.safetensors_io.DTYPES`; this is the user-facing side. Arithmetic never
happens in these dtypes: merges compute in float32 and only the stored result is narrow.

Why a casting helper: float8 has a tiny range (e4m3fn: ±448, e5m2: ±57344). torch's CPU cast
saturates e4m3fn but turns e5m2 overflow into ±inf, and neither says how often it happened; a
merge that silently flattened weights is a merge the user cannot trust. :func:`cast_into` clamps
to the format's finite range first, so both formats saturate the same way, and returns how many
values were clamped.
"""

from __future__ import annotations

import torch

from ..errors import BlockmergeError

#: ``--dtype`` names -> torch dtypes of the stored output.
OUTPUT_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
FP8_DTYPES: frozenset[torch.dtype] = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})


def output_dtype(name: str) -> torch.dtype:
    try:
        return OUTPUT_DTYPES[name]
    except KeyError:
        raise BlockmergeError(f"--dtype {name}: choose from {', '.join(OUTPUT_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The ``--dtype`` name of a torch dtype (``str(dtype)`` without ``torch.`` for others)."""
    for k, v in OUTPUT_DTYPES.items():
        if v == dtype:
            return k
    return str(dtype).replace("torch.", "")


def saturates(dtype: torch.dtype) -> bool:
    """Formats whose range is narrow enough that merged values can leave it (float8)."""
    return dtype in FP8_DTYPES


def cast_into(dest: torch.Tensor, src: torch.Tensor) -> int:
    """``dest.copy_(src)``, clamping ``src`` to ``dest``'s finite range first when ``dest`` is float8.

    Returns the number of values beyond the range (infinities included; NaN stays NaN and is
    not counted). ``dest`` and ``src`` have the same number of elements.
    """
    if not saturates(dest.dtype) or src.dtype == dest.dtype:
        dest.copy_(src)
        return 0
    limit = torch.finfo(dest.dtype).max
    x = src if src.dtype in (torch.float32, torch.float64) else src.float()
    over = int(torch.count_nonzero(x.abs() > limit))
    if over:
        x = x.clamp(-limit, limit)
    dest.copy_(x)
    return over


def cast_to(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """``t`` in ``dtype`` (saturating for float8) and the number of values clamped."""
    if t.dtype == dtype:
        return t, 0
    out = torch.empty(t.shape, dtype=dtype)
    return out, cast_into(out, t)
