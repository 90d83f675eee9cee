"""blockmerge: block-weighted merging of Stable Diffusion checkpoints and block-influence experiments."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
