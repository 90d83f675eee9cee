"""Flux.1 and SD3 / SD3.5 layouts are the real single-file layouts, and their block rule is ComfyUI's.

Proof by diffusers' own single-file converters: our single-file names and shapes, built from
diffusers' ``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` on the meta device and renamed by
``blockmerge.architectures.transformer_names``, must be what
``convert_flux_transformer_checkpoint_to_diffusers`` / ``convert_sd3_transformer_checkpoint_to_diffusers``
turn back into exactly the model's state dict, row by row (a "tracer" checkpoint whose every row
holds its own global index shows where each row lands, at full size for a few MB). The text
encoders and VAE go through diffusers' and transformers' loaders the same way. The block of every
key is checked against ComfyUI's ModelMergeFlux1 / ModelMergeSD3_2B / ModelMergeSD35_Large rule,
re-implemented here from the node's definition (longest matching argument prefix wins; a key no
argument matches takes the first argument's ratio).
"""

from __future__ import annotations

import os

import pytest
import torch

from _comfy import comfy_args, comfy_ratio_name, our_id_for_comfy_arg
from blockmerge.architectures import BASE, FLUX, SD1, SD3, SD35L, SDXL, UNET_PREFIX, by_name, detect
from blockmerge.architectures.synthetic import (
    layout,
    make_state_dict,
    param_count,
    transformer_configs,
)
from blockmerge.architectures.transformer_names import (
    diffusers_config,
    diffusers_to_single_file,
    lora_rows,
    meta_transformer,
    single_file_shapes,
    transformer_to_single_file,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
su = pytest.importorskip("diffusers.loaders.single_file_utils")

# (family, variant): every variant blockmerge describes
VARIANTS = [("FLUX", "dev"), ("FLUX", "schnell"), ("SD3", "sd3-medium"), ("SD3", "sd3.5-medium"), ("SD35L", "large")]
CONVERT = {"flux": "convert_flux_transformer_checkpoint_to_diffusers", "sd3": "convert_sd3_transformer_checkpoint_to_diffusers"}


def _model_shapes(arch: str, size: str, variant: str) -> tuple[str, dict[str, tuple[int, ...]]]:
    cfg = transformer_configs(arch, size, variant)
    model = meta_transformer(cfg.kind, cfg.transformer)
    return cfg.kind, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _tracer(shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """A checkpoint of shape [rows, 1, ...] per key whose rows hold their global index (float64)."""
    ck, start, n = {}, {}, 0
    for k, shp in shapes.items():
        rows = shp[0] if shp else 1
        ck[k] = torch.arange(n, n + rows, dtype=torch.float64).reshape(rows, *([1] * (len(shp) - 1)))
        start[k] = n
        n += rows
    return ck, start


@pytest.mark.parametrize(("arch", "variant"), VARIANTS)
def test_full_layout_is_what_diffusers_converter_reads_row_by_row(arch: str, variant: str) -> None:
    kind, shapes = _model_shapes(arch, "full", variant)
    mapping = diffusers_to_single_file(kind, shapes)
    sf = single_file_shapes(mapping, shapes)
    # the layout blockmerge writes is this one, transformer for transformer
    ours = {k: s for k, s, _ in layout(arch, "full", variant=variant) if k.startswith(UNET_PREFIX)}
    ours = {k: s for k, s in ours.items() if not by_name(arch).is_copied(k)}
    assert ours == sf
    tracer, start = _tracer(sf)
    converted = getattr(su, CONVERT[kind])(dict(tracer))
    assert set(converted) == set(shapes)
    covered: dict[str, int] = {}
    for name, pieces in mapping.items():
        want = torch.cat([torch.arange(start[p.key] + p.lo, start[p.key] + p.hi, dtype=torch.float64) for p in pieces])
        got = converted[name].reshape(converted[name].shape[0], -1)[:, 0] if converted[name].dim() else converted[name].reshape(1)
        assert torch.equal(got, want), name
        assert tuple(converted[name].shape[0:1]) == shapes[name][0:1] or not shapes[name]
        for p in pieces:
            covered[p.key] = covered.get(p.key, 0) + p.hi - p.lo
    # every row of every single-file tensor belongs to exactly one diffusers parameter
    assert covered == {k: (s[0] if s else 1) for k, s in sf.items()}


@pytest.mark.parametrize(("arch", "variant"), [v for v in VARIANTS if v[0] != "FLUX"])
def test_tiny_sd3_values_round_trip_through_diffusers(arch: str, variant: str) -> None:
    """SD3's converter works at any width: real random values go single file -> diffusers intact."""
    cfg = transformer_configs(arch, "tiny", variant)
    torch.manual_seed(0)
    model = type(meta_transformer(cfg.kind, cfg.transformer))(**cfg.transformer)
    ref = model.state_dict()
    single = transformer_to_single_file("sd3", ref)
    back = su.convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in single.items()})
    assert set(back) == set(ref)
    for k in ref:
        assert torch.equal(back[k], ref[k]), k
    model.load_state_dict(back, strict=True)


def test_diffusers_flux_converter_is_hard_wired_to_the_full_width() -> None:
    """Why tiny Flux layouts are proven by the same table at full size only: diffusers splits the
    single-stream linear1 with a fixed 3072 width, so a narrow file cannot go through it."""
    sd = make_state_dict("FLUX", "tiny", dtype=torch.float32, parts="model")
    with pytest.raises(RuntimeError):
        su.convert_flux_transformer_checkpoint_to_diffusers(dict(sd))


@pytest.mark.parametrize(("arch", "variant"), VARIANTS)
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_config_read_off_the_single_file_rebuilds_the_same_model(arch: str, variant: str, size: str) -> None:
    kind, shapes = _model_shapes(arch, size, variant)
    sf = {k: s for k, s, _ in layout(arch, size, variant=variant)}
    rebuilt = meta_transformer(kind, diffusers_config(kind, sf))
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == shapes
    # and the LoRA mapping a diffusers `transformer.` LoRA needs covers every parameter
    rows = lora_rows(kind, sf)
    assert set(rows) == set(shapes)
    q = "transformer_blocks.0.attn.to_q.weight"
    inner = shapes[q][0]
    assert [(p.lo, p.hi) for p in rows[q]] == [(0, inner)]
    assert [(p.lo, p.hi) for p in rows["transformer_blocks.0.attn.to_v.weight"]] == [(2 * inner, 3 * inner)]


def test_full_parameter_counts_are_the_published_models() -> None:
    # Flux.1 dev 11.9 B, schnell without guidance_in, SD3 Medium 2 B, SD3.5 Medium 2.5 B, Large 8.1 B
    assert param_count("FLUX", "full", UNET_PREFIX, variant="dev") == 11_901_408_320
    assert param_count("FLUX", "full", UNET_PREFIX, variant="dev") - param_count(
        "FLUX", "full", UNET_PREFIX, variant="schnell") == (3072 * 256 + 3072) + (3072 * 3072 + 3072)  # guidance_in
    assert param_count("SD3", "full", UNET_PREFIX + "joint_blocks.", variant="sd3-medium") > 2.0e9
    assert 2.4e9 < param_count("SD3", "full", UNET_PREFIX, variant="sd3.5-medium") < 2.5e9
    assert 8.0e9 < param_count("SD35L", "full", UNET_PREFIX) < 8.2e9
    # the T5-XXL encoder (4.76 B) and CLIP-L (123 M) the real files carry
    assert param_count("FLUX", "full", "text_encoders.t5xxl.") == 4_762_310_656
    assert param_count("FLUX", "full", "text_encoders.clip_l.") == 123_060_480


# ---------------------------------------------------------------------------------------------
# text encoders and VAE as the real files carry them
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "variant"), [("FLUX", "dev"), ("SD3", "sd3-medium"), ("SD3", "sd3.5-medium"), ("SD35L", None)])
def test_text_encoders_and_vae_load_through_diffusers_and_transformers(arch: str, variant: str | None) -> None:
    from diffusers import AutoencoderKL
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    cfg = transformer_configs(arch, "tiny", variant)
    sd = make_state_dict(arch, "tiny", seed=3, dtype=torch.float32, variant=variant)
    vae = AutoencoderKL(**cfg.vae)
    vae.load_state_dict(su.convert_ldm_vae_checkpoint(sd, vae.config), strict=True)
    for te in cfg.text_encoders:
        if te.kind == "t5":
            model = T5EncoderModel(T5Config(**te.config))
            conv = su.convert_sd3_t5_checkpoint_to_diffusers(sd)  # reads text_encoders.t5xxl.transformer.*
            missing, unexpected = model.load_state_dict(conv, strict=False)
            assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}  # tied to shared.weight
        else:
            model = (CLIPTextModel if te.kind == "clip" else CLIPTextModelWithProjection)(CLIPTextConfig(**te.config))
            conv = su.convert_ldm_clip_checkpoint(sd, te.prefix + "transformer.")
            if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
                conv = {k.removeprefix("text_model."): v for k, v in conv.items()}
            model.load_state_dict(conv, strict=True)
        assert (te.prefix + "logit_scale" in sd) == te.logit_scale


def test_sentinel_keys_are_diffusers_own() -> None:
    """The keys diffusers' single-file loader tells these families by are in our layouts."""
    names = su.CHECKPOINT_KEY_NAMES
    flux = {k for k, _, _ in layout("FLUX", "tiny")}
    assert names["flux"][1] in flux and names["clip_sd3"] in flux
    sd3 = {k for k, _, _ in layout("SD3", "tiny")}
    assert names["sd3"][1] in sd3 and names["open_clip_sd3"] in sd3
    large = {k for k, _, _ in layout("SD35L", "tiny")}
    assert names["sd35_large"][1] in large


# ---------------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "variant"), VARIANTS)
@pytest.mark.parametrize("parts", ["all", "model"])
@pytest.mark.parametrize("bare", [False, True])
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_each_variant_is_detected_in_every_file_form(arch: str, variant: str, parts: str, bare: bool, size: str) -> None:
    keys = [k for k, _, _ in layout(arch, size, variant=variant, parts=parts, bare=bare)]
    fam = detect(keys, "x.safetensors")
    assert fam is by_name(arch)
    assert fam.variant_of(keys).name == variant
    if bare:
        assert not any(k.startswith(UNET_PREFIX) for k in keys)


def test_families_do_not_detect_each_other() -> None:
    for arch in ("SD1", "SD2", "SDXL", "FLUX", "SD3", "SD35L"):
        keys = [k for k, _, _ in layout(arch, "tiny")]
        assert [a.name for a in (SD1, SDXL, FLUX, SD3, SD35L, by_name("SD2")) if a.matches(keys)] == [arch]


def test_a_flux_with_another_block_count_is_refused_not_guessed() -> None:
    from blockmerge.errors import CheckpointError

    keys = [k for k, _, _ in layout("FLUX", "tiny") if ".double_blocks.18." not in k]
    with pytest.raises(CheckpointError, match="unknown architecture"):
        detect(keys, "lite.safetensors")


# ---------------------------------------------------------------------------------------------
# the block of every key: ComfyUI's nodes, re-implemented from their definitions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "variant"), VARIANTS)
def test_every_key_is_in_the_block_comfyui_gives_it(arch: str, variant: str) -> None:
    fam = by_name(arch)
    args = comfy_args(arch)
    counts: dict[str, int] = {}
    for key, _, _ in layout(arch, "full", variant=variant):
        block = fam.block_of(key)
        if key.startswith(UNET_PREFIX) and not fam.is_copied(key):
            want = our_id_for_comfy_arg(comfy_ratio_name(key[len(UNET_PREFIX):], args))
            assert block == want, key
            # the bare form of the same key (BFL's release names) is in the same block
            assert fam.block_of(key[len(UNET_PREFIX):]) == want
        else:
            assert block in fam.base_ids, key
            assert block == (fam.component_of(key) if fam.component_of(key) in fam.weighted_components else BASE)
        counts[block] = counts.get(block, 0) + 1
    assert set(fam.block_ids) <= set(counts)  # no block is empty


def test_flux_components_and_weighted_ids() -> None:
    assert FLUX.all_ids[:3] == ("BASE", "CLIP", "T5")
    assert len(FLUX.block_ids) == 59 and FLUX.block_ids[0] == "IN" and FLUX.block_ids[-1] == "OUT"
    assert FLUX.block_of("text_encoders.clip_l.transformer.text_model.final_layer_norm.weight") == "CLIP"
    assert FLUX.block_of("text_encoders.t5xxl.transformer.shared.weight") == "T5"
    assert FLUX.block_of("vae.decoder.conv_in.weight") == BASE
    assert FLUX.component_of("double_blocks.3.img_mod.lin.weight") == "TRANSFORMER"
    assert SD3.block_of(UNET_PREFIX + "pos_embed") == "IN"
    assert SD35L.block_of(UNET_PREFIX + "joint_blocks.37.x_block.mlp.fc1.weight") == "J37"
    assert SD3.block_of("model.model_sampling.sigmas") == BASE and SD3.is_copied("model.model_sampling.sigmas")
