"""An architecture is data: its block ids, how its keys map to blocks and components, how it is
recognised. The merge engine, the in-place sweeps and the reports all ask this one place.

The key -> block rule follows the Merge Block Weighted extension (the one the article used):
``input_blocks.N.*`` -> IN<N>, ``middle_block.*`` -> M00, ``output_blocks.N.*`` -> OUT<N>,
``time_embed.*`` and ``label_emb.*`` -> IN00, ``out.*`` -> the last OUT block, and every tensor
outside the U-Net (text encoders, VAE) -> BASE.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

BASE = "BASE"
UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."

_INPUT = re.compile(r"input_blocks\.(\d+)\.")
_OUTPUT = re.compile(r"output_blocks\.(\d+)\.")


def block_ids_for(n_in: int, n_out: int) -> tuple[str, ...]:
    """IN00..IN(n_in-1), M00, OUT00..OUT(n_out-1) in the order weight lists use."""
    return (
        tuple(f"IN{i:02d}" for i in range(n_in))
        + ("M00",)
        + tuple(f"OUT{i:02d}" for i in range(n_out))
    )


@dataclass(frozen=True)
class Component:
    """A part of the checkpoint outside the U-Net blocks (text encoder, VAE), by key prefix."""

    name: str
    prefix: str


@dataclass(frozen=True)
class Architecture:
    """One Stable Diffusion family as data."""

    name: str
    title: str
    n_in: int
    n_out: int
    components: tuple[Component, ...]
    # A predicate over the key set that says "this file is of this family".
    detector: Callable[[frozenset[str]], bool] = field(compare=False, repr=False)

    @property
    def block_ids(self) -> tuple[str, ...]:
        return block_ids_for(self.n_in, self.n_out)

    @property
    def all_ids(self) -> tuple[str, ...]:
        """BASE first, then the blocks: the supermerger order of a 26 (20) value list."""
        return (BASE, *self.block_ids)

    @property
    def n_blocks(self) -> int:
        return self.n_in + 1 + self.n_out

    def block_of(self, key: str) -> str:
        """The block id (or ``BASE``) a checkpoint key belongs to."""
        if not key.startswith(UNET_PREFIX):
            return BASE
        rest = key[len(UNET_PREFIX):]
        m = _INPUT.match(rest)
        if m:
            idx = int(m.group(1))
            return f"IN{idx:02d}" if idx < self.n_in else BASE
        if rest.startswith("middle_block."):
            return "M00"
        m = _OUTPUT.match(rest)
        if m:
            idx = int(m.group(1))
            return f"OUT{idx:02d}" if idx < self.n_out else BASE
        if rest.startswith(("time_embed.", "label_emb.")):
            return "IN00"
        if rest.startswith("out."):
            return f"OUT{self.n_out - 1:02d}"
        return BASE

    def component_of(self, key: str) -> str:
        """``UNET`` for U-Net keys, else the component name (e.g. ``TE``, ``VAE``), else ``OTHER``."""
        if key.startswith(UNET_PREFIX):
            return "UNET"
        for comp in self.components:
            if key.startswith(comp.prefix):
                return comp.name
        return "OTHER"

    def blocks_of(self, keys: Iterable[str]) -> dict[str, list[str]]:
        """Group keys by block id, in ``all_ids`` order (empty blocks included)."""
        out: dict[str, list[str]] = {b: [] for b in self.all_ids}
        for k in keys:
            out[self.block_of(k)].append(k)
        return out
