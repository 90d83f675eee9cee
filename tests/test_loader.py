"""Single-file checkpoints -> diffusers pipelines, offline, with configs inferred from shapes.

Every test here runs with outgoing sockets blocked: a loader that tried to fetch a config would
fail, not silently succeed on a machine that happens to be online.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from blockmerge.architectures import SD1, SD2, SDXL, detect
from blockmerge.architectures import ldm_names as names
from blockmerge.architectures.synthetic import arch_configs, layout, write_synthetic
from blockmerge.errors import BlockmergeError, CheckpointError
from blockmerge.generation.configs import infer_configs, norm_groups
from blockmerge.generation.loader import LoadedModel, load_pipeline
from blockmerge.io import open_checkpoint


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted during an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _file_tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as r:
        return {k: r.get(k) for k in r.keys()}


def _expected_ldm(m: LoadedModel) -> dict[str, torch.Tensor]:
    """The loaded modules renamed back to single-file names by the layouts' reverse rules."""
    pipe = m.pipeline
    out = dict(names.unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)))
    out.update(names.vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    if m.architecture is SD1:
        out.update(names.clip_to_ldm(pipe.text_encoder.state_dict(), names.SD1_TE_PREFIX, position_ids=False))
    elif m.architecture is SD2:
        out.update(names.open_clip_to_ldm(pipe.text_encoder.state_dict(), names.SD2_TE_PREFIX))
    else:
        out.update(names.clip_to_ldm(pipe.text_encoder.state_dict(), names.SDXL_TE1_PREFIX, position_ids=False))
        out.update(names.open_clip_to_ldm(pipe.text_encoder_2.state_dict(), names.SDXL_TE2_PREFIX))
    return out


def _check_weights_equal_file(m: LoadedModel, path: Path, min_count: int) -> None:
    file = _file_tensors(path)
    got = _expected_ldm(m)
    assert len(got) >= min_count
    for key, t in got.items():
        assert key in file, key
        assert torch.equal(t.to(file[key].dtype), file[key]), key
    # Every U-Net / VAE tensor of the file went somewhere.
    for key in file:
        if key.startswith((names.UNET_PREFIX, names.VAE_PREFIX)):
            assert key in got, key


def _generate(m: LoadedModel, prompt: str = "a red circle", seed: int = 0) -> np.ndarray:
    out = m.pipeline(
        prompt, num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
        generator=torch.Generator().manual_seed(seed), output_type="np",
    )
    return out.images


def test_sd1_tiny_loads_offline_with_the_files_weights(tiny_sd1_paths: tuple[Path, ...]) -> None:
    m = load_pipeline(tiny_sd1_paths[0])
    assert m.architecture is SD1
    assert m.prediction_type == "epsilon"
    assert type(m.pipeline).__name__ == "StableDiffusionPipeline"
    assert m.device.type == "cpu" and m.dtype == torch.float32
    assert m.pipeline.vae.config.scaling_factor == pytest.approx(0.18215)
    assert m.pipeline.unet.config.attention_head_dim == 8  # SD1's 8 heads per layer
    assert m.sha256 is not None and len(m.sha256) == 64 and m.short_hash == m.sha256[:10]
    _check_weights_equal_file(m, tiny_sd1_paths[0], min_count=300)
    img = _generate(m)
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    # A different seed gives a different image: the pipeline really samples.
    assert not np.array_equal(img, _generate(m, seed=1))


def test_sd2_tiny_loads_offline_with_the_files_weights(tiny_sd2_paths: tuple[Path, ...]) -> None:
    m = load_pipeline(tiny_sd2_paths[0], prediction_type="v")
    assert m.architecture is SD2
    assert m.prediction_type == "v_prediction"
    assert m.pipeline.scheduler.config.prediction_type == "v_prediction"
    assert m.pipeline.unet.config.use_linear_projection is True
    assert m.pipeline.tokenizer.pad_token == "!"  # OpenCLIP pads with "!" (id 0)
    # SD2 runs the penultimate text layer: the file's last resblock is not part of the model.
    n_file = arch_configs("SD2").text_encoders[0].config["num_hidden_layers"]
    assert m.pipeline.text_encoder.config.num_hidden_layers == n_file - 1
    file = _file_tensors(tiny_sd2_paths[0])
    got = _expected_ldm(m)
    for key, t in got.items():
        assert torch.equal(t.to(file[key].dtype), file[key]), key
    assert img_ok(_generate(m))


def img_ok(img: np.ndarray) -> bool:
    return img.shape == (1, 64, 64, 3) and bool(np.isfinite(img).all())


def test_sdxl_tiny_loads_offline_with_the_files_weights(tiny_sdxl_paths: tuple[Path, ...]) -> None:
    m = load_pipeline(tiny_sdxl_paths[0])
    assert m.architecture is SDXL
    assert type(m.pipeline).__name__ == "StableDiffusionXLPipeline"
    assert m.pipeline.vae.config.scaling_factor == pytest.approx(0.13025)
    expected = arch_configs("SDXL").unet
    assert m.pipeline.unet.config.addition_time_embed_dim == expected["addition_time_embed_dim"]
    assert list(m.pipeline.unet.config.transformer_layers_per_block) == expected["transformer_layers_per_block"]
    _check_weights_equal_file(m, tiny_sdxl_paths[0], min_count=300)
    assert img_ok(_generate(m))


def test_ckpt_is_read_without_pickle_code_and_matches_safetensors(
    tiny_sd1_ckpt_path: Path, tiny_sd1_paths: tuple[Path, ...]
) -> None:
    a = load_pipeline(tiny_sd1_ckpt_path, hash_file=False)
    b = load_pipeline(tiny_sd1_paths[0], hash_file=False)
    assert a.sha256 is None
    for (ka, va), (kb, vb) in zip(a.pipeline.unet.state_dict().items(), b.pipeline.unet.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_prediction_type_from_metadata_and_override(tmp_path: Path) -> None:
    p = write_synthetic(tmp_path / "sd2v.safetensors", "SD2", seed=4,
                        metadata={"modelspec.prediction_type": "v", "modelspec.resolution": "64x64"})
    m = load_pipeline(p, hash_file=False)
    assert m.prediction_type == "v_prediction"
    assert m.resolution == 64
    assert m.pipeline.unet.config.sample_size == 64 // 8
    forced = load_pipeline(p, prediction_type="epsilon", hash_file=False)
    assert forced.prediction_type == "epsilon"
    assert forced.pipeline.scheduler.config.prediction_type == "epsilon"
    with pytest.raises(BlockmergeError, match="prediction"):
        load_pipeline(p, prediction_type="x0", hash_file=False)


@pytest.mark.parametrize("arch", ["SD1", "SD2", "SDXL"])
def test_real_size_configs_are_inferred_from_shapes(arch: str) -> None:
    """The full SD1.5 / SD2.1 / SDXL-base layouts (shapes only) give the published configs."""
    entries = layout(arch, "full")
    shapes = {k: s for k, s, _ in entries}
    a = detect(shapes.keys(), arch)
    resolution = {"SD1": 512, "SD2": 768, "SDXL": 1024}[arch]
    cfg = infer_configs(a, frozenset(shapes), lambda k: shapes[k], arch, resolution)
    want = arch_configs(arch, "full")
    for k, v in want.unet.items():
        got = cfg.unet.get(k, None)
        if k == "transformer_layers_per_block":
            assert list(got) == list(v), k
        elif k != "sample_size":
            assert (list(got) if isinstance(got, (list, tuple)) else got) == v, k
    assert cfg.unet["sample_size"] == resolution // 8
    for k in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
        assert cfg.vae[k] == want.vae[k], k
    for spec, te in zip(cfg.text_encoders, want.text_encoders, strict=True):
        for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size", "hidden_act"):
            assert spec.config[k] == te.config[k], k
        layers = te.config["num_hidden_layers"] - (1 if arch == "SD2" else 0)
        assert spec.config["num_hidden_layers"] == layers


def test_norm_groups_rule() -> None:
    assert norm_groups([320, 640, 1280]) == 32
    assert norm_groups([8, 16, 32]) == 8
    assert norm_groups([24, 48]) == 24


def test_not_a_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "notes.safetensors"
    bad.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="notes.safetensors"):
        load_pipeline(bad)
    with pytest.raises(CheckpointError, match="no such file"):
        load_pipeline(tmp_path / "missing.safetensors")


def test_truncated_u_net_is_reported(tmp_path: Path, tiny_sd1_paths: tuple[Path, ...]) -> None:
    from safetensors.torch import save_file

    sd = _file_tensors(tiny_sd1_paths[0])
    del sd["model.diffusion_model.out.2.weight"]
    p = tmp_path / "cut.safetensors"
    save_file(sd, str(p))
    with pytest.raises(CheckpointError, match="out.2.weight"):
        load_pipeline(p)
