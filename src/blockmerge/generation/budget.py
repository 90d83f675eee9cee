"""The memory a batch of images needs, estimated before the model is loaded or anything allocated.

Why: ``generate --width 8192 --height 8192 --seed 1-1000`` used to start, load the model, encode
the prompts and sample, and only then (26 s later under a memory limit) fail with torch's
"can't allocate memory" - or, with Linux's overcommit, be killed by the kernel with no message.
The sizes and the batch are known before anything runs, and so are the model's widths (from the
checkpoint's header), so an impossible request is refused at once, naming the arguments and the
way out (``--batch-size``, smaller ``--width``/``--height``).

The estimate is a *lower bound*: it counts only what certainly coexists at the peak, so a request
it refuses cannot have worked, and one it accepts may still fail later (then the CLI reports the
out-of-memory error as before). Per image of W x H pixels, in the compute dtype's bytes ``e``:

- the VAE decoder at full resolution: at least 4 activations of its first width ``C0``
  (input, normalised, conv output, residual): ``4 * C0 * e`` bytes per pixel. Measured on the
  bundled tiny model (C0 = 32, float32: 512 by this bound): 650-900 bytes per pixel per image; SD's
  VAE (C0 = 128) needs 4x that. The whole batch is decoded at once.
- the U-Net at latent resolution, for the conditional and unconditional halves of CFG: at least the
  skip connections of its first level (4 of ``C_u`` channels) per latent pixel;
- the latents and the sampler's state (a few latent-sized tensors in float32) and the decoded
  float32 image.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import BlockmergeError
from ..io.memory import device_free_memory, gib

_VAE_OUT = "first_stage_model.decoder.conv_out.weight"
_VAE_UP = re.compile(r"^first_stage_model\.decoder\.up\.(\d+)\.")
_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


@dataclass(frozen=True)
class ModelDims:
    """The widths that decide the memory of sampling and decoding."""

    vae_channels: int  # decoder channels at full resolution (conv_out's input)
    vae_factor: int  # pixels per latent pixel along a side (8 for SD)
    unet_channels: int  # U-Net channels at latent resolution
    latent_channels: int

    def bytes_per_image(self, width: int, height: int, dtype_bytes: int) -> int:
        """The lower bound of the module docstring for one image of ``width`` x ``height``."""
        pixels = width * height
        latent = pixels // (self.vae_factor ** 2)
        vae = 4 * self.vae_channels * dtype_bytes * pixels
        unet = 2 * 4 * self.unet_channels * dtype_bytes * latent
        state = 6 * self.latent_channels * 4 * latent + 3 * 4 * pixels
        return vae + unet + state


def dims_from_shapes(keys: Any, shape: Callable[[str], tuple[int, ...]]) -> ModelDims | None:
    """The widths read from a checkpoint's tensor shapes (SD1/SD2/SDXL single-file names)."""
    if _VAE_OUT not in keys or _UNET_IN not in keys:
        return None
    levels = {int(m.group(1)) for k in keys if (m := _VAE_UP.match(k))}
    vae_out, unet_in = shape(_VAE_OUT), shape(_UNET_IN)
    if len(vae_out) != 4 or len(unet_in) != 4 or not levels:
        return None
    return ModelDims(int(vae_out[1]), 2 ** (max(levels)), int(unet_in[0]), int(unet_in[1]))


def dims_from_file(path: str | os.PathLike[str]) -> tuple[ModelDims, int] | None:
    """(widths, the smallest size the model generates at by default) from a safetensors header,
    without reading a tensor; None for other files (a pickle is only read whole, by the loader)."""
    from ..architectures import detect
    from ..io import open_checkpoint, sniff

    if sniff(path) != "safetensors":
        return None
    with open_checkpoint(path) as r:
        keys = set(r.keys())
        dims = dims_from_shapes(keys, lambda k: tuple(r.info(k).shape))
        if dims is None:
            return None
        try:
            arch = detect(keys, str(path))
        except BlockmergeError:
            return None
        gen = arch.generation
        if gen is None:
            return None
        size = gen.default_resolution
        spec = r.metadata.get("modelspec.resolution", "").lower().partition("x")
        if spec[0].strip().isdigit() and spec[2].strip().isdigit():
            size = min(size, int(spec[0]), int(spec[2]))  # a lower bound, whatever the loader picks
        return dims, size


def dims_from_configs(configs: Any) -> ModelDims:
    """The widths of a loaded model (its diffusers configs)."""
    vae, unet = configs.vae, configs.unet
    return ModelDims(int(vae["block_out_channels"][0]), 2 ** (len(vae["block_out_channels"]) - 1),
                     int(unet["block_out_channels"][0]), int(unet["in_channels"]))


def check_batch_memory(
    dims: ModelDims, *, width: int, height: int, batch: int, device: Any, dtype_bytes: int,
    batch_arg: str, size_arg: str = "--width/--height",
) -> None:
    """Refuse, with one line naming the arguments, a batch whose lower bound exceeds the memory free.

    ``batch_arg`` says where the batch size came from (``--batch-size 64``, ``--seed 1-1000``, all
    in one batch); the message suggests the largest ``--batch-size`` that fits, or smaller sizes
    when not even one image does.
    """
    free = device_free_memory(device)
    if free is None:
        return
    one = dims.bytes_per_image(width, height, dtype_bytes)
    need = one * batch
    if need <= free:
        return
    where = f"{gib(free)} free on {device}"
    if one > free:
        raise BlockmergeError(
            f"{size_arg} {width}x{height}: one image needs at least {gib(one)} (VAE decoder and U-Net "
            f"activations), more than the {where}; use a smaller {size_arg}")
    fits = max(1, free // one)
    raise BlockmergeError(
        f"{batch_arg}: {batch} images of {width}x{height} in one batch need at least {gib(need)}, more than "
        f"the {where}; use --batch-size {fits} or less (each image needs at least {gib(one)})")
