"""A1111's noise sources: ``RNG: CPU``, ``RNG: GPU`` and ``RNG: NV``, drawn the way A1111 draws them.

An image's noise in A1111 (``modules/rng.py``, ``ImageRNG``) is one generator per seed: its first draw
is the starting latent, and every later draw (the per-step noise of ancestral samplers, DDIM's eta
noise, Restart's re-noising) continues the same stream. With ``Eta noise seed delta`` (ENSD) the
later draws come from a fresh generator seeded ``seed + ENSD`` instead. Brownian-tree samplers
(DPM++ SDE, 2M SDE, 3M SDE) build one ``torchsde`` tree per image, seeded with the image's seed,
whose normal draws A1111 routes through the same source (``randn_local``).

The three sources:

* ``CPU``: ``torch.Generator("cpu")`` -- the same numbers on every machine.
* ``GPU``: the CUDA generator of the device the model runs on (A1111's default).
* ``NV``: A1111's CPU re-implementation of the Philox 4x32-10 stream that torch's CUDA ``randn``
  draws (``modules/rng_philox.py``), so a GPU-seeded image can be made on any device. Written here
  with numpy because no maintained package exposes that exact stream. Its Box-Muller step runs in
  float64 and rounds to float32, as A1111's does, so ``NV`` equals A1111's ``NV`` bit for bit and
  torch's CUDA stream to float32 rounding.

``GPU`` on a machine without CUDA falls back to ``NV`` (:func:`effective_source`), which gives what
an NVIDIA card gives; the infotext then says ``RNG: NV``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from blockmerge.errors import BlockmergeError

__all__ = [
    "RNG_SOURCES",
    "SEED_MAX",
    "ImageNoise",
    "brownian_randn",
    "effective_source",
    "philox_randn",
    "randn_local",
]

#: A1111's ``Random number generator source`` values.
RNG_SOURCES = ("GPU", "CPU", "NV")
#: Largest seed: ``torch.Generator.manual_seed`` and A1111's Philox key both take 64 bits.
SEED_MAX = 2**64 - 1

_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_W = (np.uint32(0x9E3779B9), np.uint32(0xBB67AE85))
# A1111's constants are float32; the products below promote to float64 (uint32 x float32 in numpy).
_TWO_POW32_INV = np.float64(np.float32(2.3283064e-10))
_TWO_POW32_INV_HALF = np.float64(np.float32(2.3283064e-10) / np.float32(2))
_TWO_POW32_INV_2PI = np.float64(np.float32(2.3283064e-10 * 6.2831855))
_TWO_POW32_INV_2PI_HALF = np.float64(np.float32(2.3283064e-10 * 6.2831855) / np.float32(2))
_LOW32 = np.uint64(0xFFFFFFFF)


def philox_randn(seed: int, offset: int, shape: Sequence[int]) -> np.ndarray:
    """``torch.randn(shape, device="cuda")`` for a generator seeded ``seed``, at call number ``offset``.

    Element i uses Philox counter (offset, 0, i, 0) and key (seed low, seed high); the first
    Box-Muller output of the first two words is the normal value (what CUDA's kernel keeps when
    every element gets its own thread).
    """
    n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    if n >= 2**32:
        raise BlockmergeError(f"NV noise: {n} values is more than one Philox stream holds")
    c0 = np.full(n, offset & 0xFFFFFFFF, dtype=np.uint32)
    c1 = np.zeros(n, dtype=np.uint32)
    c2 = np.arange(n, dtype=np.uint32)
    c3 = np.zeros(n, dtype=np.uint32)
    k0, k1 = np.uint32(seed & 0xFFFFFFFF), np.uint32((seed >> 32) & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        for r in range(10):
            if r:
                k0 = np.uint32(k0 + _PHILOX_W[0])
                k1 = np.uint32(k1 + _PHILOX_W[1])
            p0 = c0.astype(np.uint64) * _PHILOX_M[0]
            p2 = c2.astype(np.uint64) * _PHILOX_M[1]
            c0, c1, c2, c3 = (
                (p2 >> np.uint64(32)).astype(np.uint32) ^ c1 ^ k0,
                (p2 & _LOW32).astype(np.uint32),
                (p0 >> np.uint64(32)).astype(np.uint32) ^ c3 ^ k1,
                (p0 & _LOW32).astype(np.uint32),
            )
    u = c0.astype(np.float64) * _TWO_POW32_INV + _TWO_POW32_INV_HALF
    v = c1.astype(np.float64) * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI_HALF
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32).reshape(tuple(shape))


def effective_source(source: str, device: torch.device | str) -> str:
    """The source that really draws: ``GPU`` off CUDA is ``NV`` (the stream an NVIDIA card draws)."""
    if source not in RNG_SOURCES:
        raise BlockmergeError(f"RNG: expected one of {', '.join(RNG_SOURCES)}, got {source!r}")
    if source == "GPU" and torch.device(device).type != "cuda":
        return "NV"
    return source


class _Stream:
    """One seed's generator: successive :meth:`draw` calls continue its stream."""

    def __init__(self, source: str, seed: int, device: torch.device) -> None:
        self.source, self.seed, self.device = source, seed, device
        self.offset = 0
        self.gen: torch.Generator | None = None
        if source == "CPU":
            self.gen = torch.Generator("cpu").manual_seed(seed)
        elif source == "GPU":
            self.gen = torch.Generator(device).manual_seed(seed)

    def draw(self, shape: Sequence[int]) -> torch.Tensor:
        if self.source == "NV":
            out = torch.from_numpy(philox_randn(self.seed, self.offset, shape))
            self.offset += 1
            return out.to(self.device)
        if self.source == "CPU":
            return torch.randn(tuple(shape), generator=self.gen, dtype=torch.float32).to(self.device)
        return torch.randn(tuple(shape), generator=self.gen, device=self.device, dtype=torch.float32)


class ImageNoise:
    """A1111's ``ImageRNG`` for a batch of seeds: :meth:`first` is the starting latents, :meth:`next`
    each later draw, one stream per seed so a batch gives what one-at-a-time generation gives."""

    def __init__(self, shape: Sequence[int], seeds: Sequence[int], source: str, device: torch.device | str,
                 ensd: int = 0) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.source = effective_source(source, self.device)
        self.ensd = int(ensd)
        self._streams = [_Stream(self.source, s, self.device) for s in self.seeds]
        self._started = False

    def first(self) -> torch.Tensor:
        xs = [s.draw(self.shape) for s in self._streams]
        if self.ensd:
            self._streams = [_Stream(self.source, s + self.ensd, self.device) for s in self.seeds]
        self._started = True
        return torch.stack(xs)

    def next(self) -> torch.Tensor:
        if not self._started:
            return self.first()
        return torch.stack([s.draw(self.shape) for s in self._streams])


def randn_local(source: str, seed: int, shape: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """The first draw of a fresh generator seeded ``seed`` (A1111's ``randn_local``)."""
    return _Stream(effective_source(source, device), int(seed), torch.device(device)).draw(shape)


@contextlib.contextmanager
def brownian_randn(source: str, device: torch.device | str) -> Iterator[None]:
    """Make torchsde's Brownian trees draw their normals from ``source``, as A1111 does.

    torchsde draws every node of a tree with ``_randn(size, dtype, device, seed)`` from a fresh CPU
    or CUDA generator; A1111 replaces that function with ``randn_local`` so the tree follows the
    chosen noise source. Replaced only while sampling, and restored afterwards.
    """
    from torchsde._brownian import brownian_interval

    original = brownian_interval._randn
    src = effective_source(source, device)
    dev = torch.device(device)

    def randn(size: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
        return randn_local(src, int(seed), size, dev).to(device=device, dtype=dtype)

    brownian_interval._randn = randn
    try:
        with warnings.catch_warnings():
            # torchsde warns when a query sits a float32 rounding outside the tree's interval (the
            # ends are sigma_min / sigma_max themselves); A1111 shows the same harmless warnings.
            warnings.filterwarnings("ignore", message=r"Should have (ta>=t0|tb<=t1)")
            yield
    finally:
        brownian_interval._randn = original
