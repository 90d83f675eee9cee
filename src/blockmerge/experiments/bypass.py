"""Bypass: make one U-Net block do (as nearly as possible) nothing, on the loaded diffusers model.

Why not ``torch.ones_like`` (the article's first attempt): a Linear or Conv layer whose weights
are all ones does not pass its input through, it outputs the *sum* of its inputs (over every
input channel and kernel tap) on every output channel, plus a bias of one; a GroupNorm / LayerNorm
with weight and bias one shifts everything by one. The block then injects a large, input-dependent
signal instead of disappearing (``tests/test_inplace.py`` shows it on a real ResBlock).

What a transparent block really is: Stable Diffusion's blocks are residual. A ResBlock computes
``skip(x) + branch(x)`` and a spatial transformer ``x + proj_out(attn(...))``. Zeroing the *last*
layer of each residual branch (the ResBlock's second conv, the transformer's ``proj_out``, weight
and bias) makes the branch add exactly zero, so the sub-layer returns its input unchanged:
exact, whatever the input.

Where exact bypass is impossible, the closest honest thing, always reported as not exact:

- **channel-changing ResBlocks** (e.g. SD1 IN04 320->640, every OUT block, whose input is the
  concatenation with the skip connection): the skip path is a learned 1x1 projection, not the
  identity; no identity exists between different widths. The residual branch is zeroed and the
  block's own projection kept, so the block reduces to its linear skip path.
- **down-sampling convs** (SD1 IN03/IN06/IN09): a stride-2 conv must halve the size; it becomes the
  identity on the pixels it keeps (centre tap 1 on its own channel, bias 0): nearest-neighbour
  down-sampling, no learned filtering.
- **up-sampling convs** (after the nearest-neighbour 2x resize): the conv becomes the identity, so
  the sub-layer is the plain resize.
- **IN00's ``conv_in``** (4 latent channels -> C features): the latent is copied unchanged into the
  first 4 feature channels, the rest are zero (identity on the shared channels).
- **kept unchanged**: the time embedding and SDXL's ``label_emb`` (filed under IN00) and the output
  head ``out.*`` (GroupNorm + conv to 4 channels, filed under the last OUT block). The Merge Block
  Weighted key rule puts them there for convenience, but they are not part of that block's
  computation and have no residual form; removing them would be a different experiment
  (no timestep information, or no noise prediction at all).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["BypassPlan", "BypassStep", "apply_bypass", "bypass_plan"]

Action = Literal["zero", "centre_tap", "pad_identity"]


@dataclass(frozen=True)
class BypassStep:
    """One parameter rewrite: ``param`` is a qualified name (``unet.mid_block.resnets.0.conv2.weight``)."""

    param: str
    action: Action


@dataclass(frozen=True)
class BypassPlan:
    """What bypassing one block does: the rewrites, whether the result is an exact identity, and why not."""

    block: str
    steps: tuple[BypassStep, ...]
    exact: bool
    notes: tuple[str, ...]

    def describe(self) -> str:
        head = "exact (every residual branch adds zero)" if self.exact else "approximate"
        return head + ("; " + "; ".join(self.notes) if self.notes else "")


def _module_params(module: torch.nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]


def bypass_plan(unet: torch.nn.Module, block: str, block_params: Sequence[str], prefix: str = "unet.") -> BypassPlan:
    """The rewrites that bypass ``block`` of a ``UNet2DConditionModel``.

    ``block_params`` are the block's qualified parameter names (from the one block mapping, see
    :mod:`.inplace`); sub-layers are recognised by their diffusers module types, so the plan
    follows the model's real structure rather than name patterns.
    """
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    owned = set(block_params)
    steps: list[BypassStep] = []
    notes: list[str] = []
    exact = True
    covered: set[str] = set()

    def inside(name: str, module: torch.nn.Module) -> bool:
        ps = _module_params(module, prefix + name)
        return bool(ps) and all(p in owned for p in ps)

    proj: list[str] = []
    n_down = n_up = 0
    for name, module in unet.named_modules():
        if not name or not inside(name, module):
            continue
        q = prefix + name
        if isinstance(module, ResnetBlock2D):
            steps += [BypassStep(f"{q}.conv2.weight", "zero"), BypassStep(f"{q}.conv2.bias", "zero")]
            if module.conv_shortcut is not None:
                proj.append(f"{module.in_channels}->{module.out_channels}")
                exact = False
            covered.update(_module_params(module, q))
        elif isinstance(module, Transformer2DModel):
            steps += [BypassStep(f"{q}.proj_out.weight", "zero"), BypassStep(f"{q}.proj_out.bias", "zero")]
            covered.update(_module_params(module, q))
        elif isinstance(module, Downsample2D | Upsample2D):
            conv = getattr(module, "conv", None)
            if conv is None:  # average-pool / plain-resize variants have no parameters
                continue
            steps += [BypassStep(f"{q}.conv.weight", "centre_tap")]
            if conv.bias is not None:
                steps.append(BypassStep(f"{q}.conv.bias", "zero"))
            if isinstance(module, Downsample2D):
                n_down += 1
            else:
                n_up += 1
            exact = False
            covered.update(_module_params(module, q))
        elif name == "conv_in":
            steps += [BypassStep(f"{q}.weight", "pad_identity")]
            if module.bias is not None:
                steps.append(BypassStep(f"{q}.bias", "zero"))
            exact = False
            notes.append("conv_in has no transparent form (latent channels -> features): the latent is copied "
                         "into the first channels, the rest zero")
            covered.update(_module_params(module, q))
    if proj:
        notes.append(f"ResBlock {', '.join(proj)} channels: residual branch zeroed, its learned 1x1 skip "
                     "projection kept (no identity between different widths)")
    if n_down:
        notes.append("the down-sampling conv keeps every second pixel unchanged (nearest-neighbour)")
    if n_up:
        notes.append("the up-sampling conv is the identity after the nearest-neighbour resize")
    kept = sorted({p.removeprefix(prefix).split(".")[0] for p in owned - covered})
    if kept:
        notes.append(f"kept unchanged (no residual form, not this block's computation): {', '.join(kept)}")
        exact = False
    if not steps:
        exact = False
    return BypassPlan(block, tuple(steps), exact, tuple(notes))


@torch.no_grad()
def apply_bypass(plan: BypassPlan, params: Mapping[str, torch.nn.Parameter]) -> None:
    """Rewrite the parameters of ``plan`` in place (the caller keeps a copy to restore them)."""
    for step in plan.steps:
        p = params[step.param]
        if step.action == "zero":
            p.zero_()
        elif step.action == "centre_tap":
            # Conv weight [C, C, kh, kw] -> 1 at the centre tap of each channel's own input.
            c_out, c_in, kh, kw = p.shape
            if c_out != c_in or kh % 2 == 0 or kw % 2 == 0:
                raise ValueError(f"{step.param}: cannot make a {list(p.shape)} conv an identity")
            p.zero_()
            idx = torch.arange(c_out)
            p[idx, idx, kh // 2, kw // 2] = 1
        elif step.action == "pad_identity":
            c_out, c_in = p.shape[0], p.shape[1]
            n = min(c_out, c_in)
            p.zero_()
            idx = torch.arange(n)
            if p.dim() == 4:
                p[idx, idx, p.shape[2] // 2, p.shape[3] // 2] = 1
            else:
                p[idx, idx] = 1
        else:  # pragma: no cover - Action is a closed set
            raise ValueError(step.action)
