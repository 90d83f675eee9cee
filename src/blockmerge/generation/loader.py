"""Single-file SD1.x / SD2.x / SDXL checkpoints -> diffusers pipelines, offline.

Why not ``from_single_file``: it fetches configs from the Hugging Face hub (or wants a local
copy of a model repository). Here every config is inferred from the tensor shapes
(:mod:`.configs`), the models are built from those configs, and the weights are renamed by
diffusers' own converters in ``diffusers.loaders.single_file_utils`` (which only rename; they are
never given a chance to fetch). The tokenizers come from the BPE vocabulary shipped with
blockmerge; sampling is A1111's loop in :mod:`.generate`. Real SD1.5 files and the bundled tiny models
take exactly the same path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..architectures import EMA_PREFIX, SD2, UNET_PREFIX, V_PRED_MARKER, ZTSNR_MARKER, Architecture, detect
from ..errors import BlockmergeError, CheckpointError
from ..io import file_hashes, open_checkpoint
from .configs import ModelConfigs, TextEncoderSpec, infer_configs

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = [
    "PREDICTION_TYPES",
    "LoadedModel",
    "default_device_dtype",
    "detect_v_prediction",
    "load_pipeline",
]

PREDICTION_TYPES = ("epsilon", "v_prediction")
# Keys a pipeline needs; EMA copies and training leftovers are never read.
_NEEDED_PREFIXES = (UNET_PREFIX, "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")
_PREDICTION_ALIASES = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}


@dataclass
class LoadedModel:
    """A ready diffusers pipeline plus what we learnt about the file it came from."""

    pipeline: DiffusionPipeline
    architecture: Architecture
    prediction_type: str
    path: Path
    resolution: int  # the pixel size the model was trained at (width = height)
    device: torch.device
    dtype: torch.dtype
    sha256: str | None = None  # full hex digest (A1111's short hash is the first 10 digits)
    configs: ModelConfigs | None = field(default=None, repr=False)
    zero_snr: bool = False  # zero-terminal-SNR noise schedule (the file's ``ztsnr`` marker)
    # What in-place edits derive once per loaded model (the block map, LoRA name tables).
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def short_hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None


def default_device_dtype(
    device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """CUDA in fp16 when available (what SD models are run in), otherwise CPU in float32."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if dev.type == "cpu" and dtype == torch.float16:
        raise BlockmergeError("dtype: float16 is not supported on CPU; use float32 or bfloat16")
    return dev, dtype


def _normalise_prediction(value: str, source: str) -> str:
    pt = _PREDICTION_ALIASES.get(value.strip().lower())
    if pt is None:
        raise BlockmergeError(f"{source}: unknown prediction type {value!r} (expected epsilon or v_prediction)")
    return pt


def _resolution(metadata: dict[str, str], arch: Architecture, prediction: str | None) -> int:
    # modelspec (Stability's metadata standard) records the training resolution as "WxH".
    spec = metadata.get("modelspec.resolution", "")
    w, _, h = spec.lower().partition("x")
    if w.strip().isdigit() and h.strip().isdigit() and w.strip() == h.strip():
        return int(w)
    gen = arch.generation
    if gen is None:
        raise CheckpointError(f"blockmerge does not generate with {arch.title} models")
    if gen.v_resolution and prediction == "v_prediction":
        return gen.v_resolution
    return gen.default_resolution


@torch.no_grad()
def detect_v_prediction(unet: torch.nn.Module) -> bool:
    """A1111's test for SD2 768-v models: at t=999 an epsilon model returns about its input
    (the noisy latent is almost all noise), a v model returns about minus the clean image.

    Used only for SD2 files whose metadata does not say; random or broken weights give no
    meaningful answer, so callers can always override.
    """
    p = next(unet.parameters())
    x = torch.ones((1, unet.config.in_channels, 8, 8), device=p.device, dtype=p.dtype) * 0.5
    cond = torch.ones((1, 77, unet.config.cross_attention_dim), device=p.device, dtype=p.dtype) * 0.5
    out = unet(x, torch.tensor([999], device=p.device), encoder_hidden_states=cond).sample
    return bool((out - x).mean().float().item() < -1)


def _build_text_encoder(spec: TextEncoderSpec, state: dict[str, torch.Tensor], source: str) -> Any:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(**spec.config)
    cls = CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel
    model = cls(config)
    if spec.kind == "clip":
        converted = convert_ldm_clip_checkpoint(state, remove_prefix=spec.prefix)
        converted = {k: v for k, v in converted.items() if k.startswith("text_model.") or k.startswith("text_projection")}
    else:
        converted = convert_open_clip_checkpoint(model, state, prefix=spec.prefix)
    converted.pop("text_model.embeddings.position_ids", None)
    if spec.drop_last_layer:
        last = f"text_model.encoder.layers.{config.num_hidden_layers}."
        converted = {k: v for k, v in converted.items() if not k.startswith(last)}
    if not spec.with_projection:
        converted.pop("text_projection.weight", None)
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        # transformers 5's CLIPTextModel holds the text model's modules directly (no prefix).
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    _load_exact(model, converted, f"{source}: text encoder ({spec.prefix})")
    return model


def _load_exact(model: torch.nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """Load and insist every parameter came from the file: a silent random init is a wrong model."""
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatch: our inferred config and the file disagree
        raise CheckpointError(f"{what}: weights do not fit the inferred config: {str(e).splitlines()[0]}") from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: {len(missing)} missing and {len(unexpected)} unexpected tensors "
            f"(e.g. {(missing or unexpected)[0]!r})"
        )


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], frozenset[str]]:
    """The tensors a pipeline needs, the metadata, and every key name (markers included).

    The family is checked from the key names first, so a model blockmerge cannot generate with
    (Flux, SD3) is refused before gigabytes of tensors are read."""
    with open_checkpoint(path) as reader:
        all_keys = frozenset(reader.keys())
        arch = detect([k for k in all_keys if not k.startswith(EMA_PREFIX)], str(path))
        if arch.generation is None:
            raise CheckpointError(f"{path}: is {arch.title}; blockmerge generates with SD1.x, SD2.x and SDXL "
                                  "models only (merge, blocks, info and compare work with this one)")
        keys = [k for k in all_keys if k.startswith(_NEEDED_PREFIXES)]
        state = {k: reader.get(k) for k in keys}
        metadata = dict(getattr(reader, "metadata", None) or {})
    return state, metadata, all_keys


def load_pipeline(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    prediction_type: str | None = None,
    hash_file: bool = True,
) -> LoadedModel:
    """Load a single-file SD1.x / SD2.x / SDXL checkpoint (.safetensors, or .ckpt read without
    running code) as a diffusers pipeline, entirely offline.

    ``prediction_type`` (``epsilon`` / ``v_prediction``, or ``eps`` / ``v``) overrides detection:
    otherwise the ``v_pred`` marker key (NoobAI-style SDXL, as A1111, Forge and ComfyUI read it),
    then ``modelspec.prediction_type`` metadata, then for SD2 A1111's test run of the U-Net, else
    epsilon. A v-prediction model whose file has the ``ztsnr`` marker samples on the
    zero-terminal-SNR schedule (``LoadedModel.zero_snr``). ``device`` / ``dtype`` default to CUDA
    fp16 when available, else CPU float32. ``hash_file`` computes the sha256 (cached by
    :mod:`blockmerge.io.hashes`).
    """
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from .samplers import SD_SCHEDULER_CONFIG
    from .tokenizer import load_clip_tokenizer

    p = Path(path)
    source = str(p)
    dev, dt = default_device_dtype(device, dtype)
    forced = _normalise_prediction(prediction_type, "--prediction") if prediction_type else None
    state, metadata, all_keys = _read_state(p)
    arch = detect(state.keys(), source)
    meta_pred = metadata.get("modelspec.prediction_type")
    marked = arch.is_copied(V_PRED_MARKER) and V_PRED_MARKER in all_keys
    prediction = forced or ("v_prediction" if marked else None) or (
        _normalise_prediction(meta_pred, f"{source}: modelspec.prediction_type") if meta_pred else None)
    keys = frozenset(state)

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"{source}: missing tensor {key!r}; the checkpoint is incomplete")
        return tuple(state[key].shape)

    resolution = _resolution(metadata, arch, prediction)
    configs = infer_configs(arch, keys, shape, source, resolution)

    unet = UNet2DConditionModel(**configs.unet)
    _load_exact(unet, convert_ldm_unet_checkpoint(state, dict(unet.config)), f"{source}: U-Net")
    vae = AutoencoderKL(**configs.vae)
    _load_exact(vae, convert_ldm_vae_checkpoint(state, dict(vae.config)), f"{source}: VAE")
    text_encoders = [_build_text_encoder(spec, state, source) for spec in configs.text_encoders]
    state.clear()  # the modules hold copies; free the file's tensors before building the pipeline

    if prediction is None:
        prediction = "v_prediction" if arch is SD2 and detect_v_prediction(unet) else "epsilon"
        if arch is SD2 and prediction == "v_prediction" and "modelspec.resolution" not in metadata:
            resolution = _resolution({}, arch, prediction)
            unet.register_to_config(sample_size=resolution // 2 ** (len(configs.vae["block_out_channels"]) - 1))
    # Zero terminal SNR only makes sense for v-prediction (an epsilon model cannot predict at SNR 0).
    zero_snr = prediction == "v_prediction" and arch.is_copied(ZTSNR_MARKER) and ZTSNR_MARKER in all_keys

    max_len = int(configs.text_encoders[0].config["max_position_embeddings"])
    # As A1111 tokenizes: transformers' CLIPTokenizer for CLIP ViT-L (no HTML unescaping), open_clip's
    # SimpleTokenizer for the OpenCLIP encoders (with it)
    tokenizers = [load_clip_tokenizer(max_length=max_len, pad_token=s.pad_token, unescape_html=s.kind == "open_clip")
                  for s in configs.text_encoders]
    # The pipeline object wants a scheduler; blockmerge samples with A1111's loop (generate.py) and
    # never calls it. This one (diffusers' Euler ancestral on k-diffusion's linspace timesteps) makes
    # the pipeline usable on its own, as the tiny-model quality measurements use it.
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = EulerAncestralDiscreteScheduler.from_config(
        {**SD_SCHEDULER_CONFIG, "timestep_spacing": "linspace", "prediction_type": prediction,
         "rescale_betas_zero_snr": zero_snr})

    for m in (unet, vae, *text_encoders):
        m.eval()
        m.requires_grad_(False)
    loaded = LoadedModel(None, arch, prediction, p, resolution, dev, dt, None, configs, zero_snr)  # type: ignore[arg-type]
    if arch.generation is not None and arch.generation.pipeline == StableDiffusionXLPipeline.__name__:
        pipe: DiffusionPipeline = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
            tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0], unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    if dt != torch.float32:  # models are built in float32; .to(dtype) only when it changes
        pipe.to(dtype=dt)
    pipe.to(device=dev)
    pipe.set_progress_bar_config(disable=True)
    loaded.pipeline = pipe
    loaded.sha256 = file_hashes(p).sha256 if hash_file else None
    return loaded
