"""The synthetic layouts are the real single-file layouts, and the block mapping agrees with diffusers.

Proof by diffusers' own LDM -> diffusers converters (``diffusers.loaders.single_file_utils``):
they must turn our LDM state dicts into exactly the state dicts of the diffusers / transformers
models built from the same config, key for key, shape for shape and (for the value round trip)
value for value. Full-size layouts are checked the same way on the meta device.
"""

from __future__ import annotations

import math
import os

import pytest
import safetensors
import torch

from blockmerge.architectures import BASE, SD1, SD2, SDXL, UNET_PREFIX, by_name, detect
from blockmerge.architectures.ldm_names import (
    SD2_TE_PREFIX,
    clip_to_ldm,
    open_clip_to_ldm,
    unet_diffusers_to_ldm_name,
    unet_ldm_to_diffusers_names,
    unet_to_ldm,
    vae_to_ldm,
)
from blockmerge.architectures.synthetic import (
    arch_configs,
    layout,
    make_state_dict,
    make_tensor,
    param_count,
    write_synthetic,
)
from blockmerge.errors import BlockmergeError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

su = pytest.importorskip("diffusers.loaders.single_file_utils")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

ARCHS = ("SD1", "SD2", "SDXL")
POSITION_IDS = "embeddings.position_ids"


# ---------------------------------------------------------------------------------------------
# helpers: diffusers-side models and diffusers' converters
# ---------------------------------------------------------------------------------------------


def _te_model(te, device: str | None = None) -> torch.nn.Module:
    """The transformers model diffusers loads from a single file's text encoder."""
    cfg = dict(te.config)
    if te.kind == "clip":
        cls = CLIPTextModel
    elif te.prefix == SD2_TE_PREFIX:
        # diffusers' SD2 text encoder: no projection, and the last of 24 layers dropped
        # (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE names resblocks.23 and text_projection).
        cls = CLIPTextModel
        if cfg["num_hidden_layers"] == 24:
            cfg["num_hidden_layers"] = 23
    else:
        cls = CLIPTextModelWithProjection
    if device == "meta":
        with torch.device("meta"):
            return cls(CLIPTextConfig(**cfg))
    return cls(CLIPTextConfig(**cfg))


def _strip_text_model(model: torch.nn.Module, sd: dict) -> dict:
    # transformers >= 5.6 flattened CLIPTextModel; diffusers strips "text_model." the same way.
    if hasattr(model, "text_model"):
        return sd
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def _diffusers_convert(arch: str, size: str, ldm_sd: dict, device: str | None = None):
    """[(component, converted state dict, reference model)] for every component of the file."""
    cfg = arch_configs(arch, size)
    ctx = torch.device("meta") if device == "meta" else torch.device("cpu")
    with ctx:
        unet = UNet2DConditionModel(**cfg.unet)
        vae = AutoencoderKL(**cfg.vae)
    out = [
        ("unet", su.convert_ldm_unet_checkpoint(ldm_sd, unet.config), unet),
        ("vae", su.convert_ldm_vae_checkpoint(ldm_sd, vae.config), vae),
    ]
    for te in cfg.text_encoders:
        model = _te_model(te, device)
        if te.kind == "clip":
            part = {k: v for k, v in ldm_sd.items() if k.startswith(te.prefix)}
            conv = su.convert_ldm_clip_checkpoint(part)
        else:
            conv = su.convert_open_clip_checkpoint(model, ldm_sd, prefix=te.prefix)
        out.append((te.prefix, _strip_text_model(model, conv), model))
    return out


def _meta_state_dict(arch: str, size: str) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, dtype=dt, device="meta") for k, shape, dt in layout(arch, size)}


def _check_keys_and_shapes(converted, strict_load: bool) -> None:
    for name, conv, model in converted:
        ref = model.state_dict()
        extra = set(conv) - set(ref)
        # position_ids is a real-file tensor that transformers keeps as a non-persistent buffer.
        assert extra <= {POSITION_IDS}, (name, sorted(extra)[:5])
        if extra:
            assert POSITION_IDS in dict(model.named_buffers())
        missing = set(ref) - set(conv)
        assert not missing, (name, sorted(missing)[:5])
        bad = {k: (tuple(conv[k].shape), tuple(ref[k].shape)) for k in ref if conv[k].shape != ref[k].shape}
        assert not bad, (name, bad)
        if strict_load:
            model.load_state_dict({k: v for k, v in conv.items() if k != POSITION_IDS}, strict=True)


# ---------------------------------------------------------------------------------------------
# the layouts are real
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_layout_is_what_diffusers_converters_read(arch: str) -> None:
    sd = make_state_dict(arch, "tiny", seed=1, dtype=torch.float32)
    converted = _diffusers_convert(arch, "tiny", sd)
    _check_keys_and_shapes(converted, strict_load=True)
    # Every tensor of the file is consumed by some component (nothing stray, nothing lost).
    n_used = sum(len(conv) for _, conv, _ in converted)
    n_fused = sum(1 for k in sd if k.endswith(("in_proj_weight", "in_proj_bias")))
    n_extra = sum(1 for k in sd if k.endswith("logit_scale"))
    if arch == "SD2":
        n_extra += 1  # diffusers ignores SD2's text_projection
    assert n_used == len(sd) + 2 * n_fused - n_extra


@pytest.mark.parametrize("arch", ARCHS)
def test_full_layout_is_what_diffusers_converters_read(arch: str) -> None:
    converted = _diffusers_convert(arch, "full", _meta_state_dict(arch, "full"), device="meta")
    _check_keys_and_shapes(converted, strict_load=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_our_converters_round_trip_through_diffusers_value_for_value(arch: str) -> None:
    """diffusers model -> our LDM names -> diffusers' converter gives back the very same tensors.

    Keys and shapes alone would not catch a swapped pair of equal-shaped tensors (q/k/v order in
    OpenCLIP's in_proj, the reversed VAE decoder levels 2/3, a square text_projection): values do.
    """
    torch.manual_seed(0)
    cfg = arch_configs(arch, "tiny")
    unet = UNet2DConditionModel(**cfg.unet)
    vae = AutoencoderKL(**cfg.vae)
    ldm: dict[str, torch.Tensor] = {}
    ldm.update(unet_to_ldm(unet.state_dict(), cfg.unet))
    ldm.update(vae_to_ldm(vae.state_dict(), cfg.vae))
    originals = {"unet": unet.state_dict(), "vae": vae.state_dict()}
    for te in cfg.text_encoders:
        model = CLIPTextModel(CLIPTextConfig(**te.config)) if te.kind == "clip" else (
            CLIPTextModelWithProjection(CLIPTextConfig(**te.config))
        )
        with torch.no_grad():  # fresh CLIP has zero biases: make every tensor distinct
            for p in model.parameters():
                p.normal_()
        sd = model.state_dict()
        if te.kind == "clip":
            ldm.update(clip_to_ldm(sd, te.prefix))
        else:
            ldm.update(open_clip_to_ldm(sd, te.prefix, logit_scale=torch.tensor(4.6)))
        originals[te.prefix] = sd
    assert detect(ldm.keys()) is by_name(arch)
    for name, conv, _model in _diffusers_convert(arch, "tiny", ldm):
        orig = originals[name]
        if name == SD2_TE_PREFIX:  # diffusers' SD2 encoder: flattened CLIPTextModel, no projection
            orig = {k.removeprefix("text_model."): v for k, v in orig.items() if k != "text_projection.weight"}
        conv = {k: v for k, v in conv.items() if k != POSITION_IDS}
        assert set(conv) == set(orig), (name, sorted(set(conv) ^ set(orig))[:5])
        for k, v in orig.items():
            assert torch.equal(conv[k], v), (name, k)


def test_full_parameter_counts_are_the_real_models() -> None:
    assert param_count("SD1", "full", UNET_PREFIX) == 859_520_964
    assert param_count("SDXL", "full", UNET_PREFIX) == 2_567_463_684
    assert param_count("SD2", "full", UNET_PREFIX) == 865_910_724
    for arch in ARCHS:
        assert param_count(arch, "full", "first_stage_model.") == 83_653_863
    # CLIP ViT-L/14 text model: 123,060,480 floats; position_ids (77 int64) are not parameters.
    assert param_count("SD1", "full", "cond_stage_model.") == 123_060_480
    assert param_count("SDXL", "full", "conditioner.embedders.0.") == 123_060_480
    pos = dict((k, (s, d)) for k, s, d in layout("SD1", "full"))[
        "cond_stage_model.transformer.text_model.embeddings.position_ids"
    ]
    assert pos == ((1, 77), torch.int64)
    # OpenCLIP text towers (+1 for logit_scale): ViT-H (24 layers) and ViT-bigG (32 layers).
    assert param_count("SD2", "full", "cond_stage_model.") == 354_032_641
    assert param_count("SDXL", "full", "conditioner.embedders.1.") == 694_659_841
    # Key counts of the real files' components.
    keys = {a: [k for k, _, _ in layout(a, "full")] for a in ARCHS}
    assert sum(k.startswith(UNET_PREFIX) for k in keys["SD1"]) == 686
    assert sum(k.startswith(UNET_PREFIX) for k in keys["SDXL"]) == 1680
    assert len(keys["SD1"]) == 1131
    assert len(keys["SDXL"]) == 2515
    # fp16 file sizes (data only): ~2.1 GB and ~6.9 GB.
    fp16 = {a: sum(math.prod(s) * (2 if d.is_floating_point else 8) for _, s, d in layout(a, "full")) for a in ARCHS}
    assert 2.10e9 < fp16["SD1"] < 2.15e9
    assert 6.90e9 < fp16["SDXL"] < 6.95e9


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_detect_recognises_layout(arch: str, size: str) -> None:
    keys = [k for k, _, _ in layout(arch, size)]
    assert detect(keys, "synthetic") is by_name(arch)


@pytest.mark.parametrize(("arch_obj", "n_blocks"), [(SD1, 25), (SD2, 25), (SDXL, 19)])
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_every_block_is_populated_and_unet_never_falls_to_base(arch_obj, n_blocks: int, size: str) -> None:
    keys = [k for k, _, _ in layout(arch_obj.name, size)]
    groups = arch_obj.blocks_of(keys)
    assert len(arch_obj.block_ids) == n_blocks
    assert all(groups[b] for b in arch_obj.block_ids), [b for b in arch_obj.block_ids if not groups[b]]
    assert not [k for k in groups[BASE] if k.startswith(UNET_PREFIX)]
    assert all(not k.startswith(UNET_PREFIX) for k in groups[BASE])
    assert len(groups[BASE]) == sum(not k.startswith(UNET_PREFIX) for k in keys)


P = UNET_PREFIX
SD1_TABLE = {
    P + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": "IN04",
    P + "input_blocks.0.0.weight": "IN00",
    P + "time_embed.0.weight": "IN00",
    P + "time_embed.2.bias": "IN00",
    P + "input_blocks.1.0.in_layers.0.weight": "IN01",
    P + "input_blocks.3.0.op.weight": "IN03",
    P + "input_blocks.11.0.out_layers.3.weight": "IN11",
    P + "middle_block.0.emb_layers.1.weight": "M00",
    P + "middle_block.1.proj_in.weight": "M00",
    P + "middle_block.2.out_layers.3.bias": "M00",
    P + "output_blocks.0.0.skip_connection.weight": "OUT00",
    P + "output_blocks.2.1.conv.weight": "OUT02",
    P + "output_blocks.5.2.conv.weight": "OUT05",
    P + "output_blocks.8.2.conv.bias": "OUT08",
    P + "output_blocks.11.1.transformer_blocks.0.attn1.to_q.weight": "OUT11",
    P + "out.0.weight": "OUT11",
    P + "out.2.bias": "OUT11",
    "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": BASE,
    "cond_stage_model.transformer.text_model.embeddings.position_ids": BASE,
    "first_stage_model.decoder.up.3.block.0.conv1.weight": BASE,
    "first_stage_model.encoder.mid.attn_1.q.weight": BASE,
}
SDXL_TABLE = {
    P + "time_embed.0.weight": "IN00",
    P + "label_emb.0.0.weight": "IN00",
    P + "label_emb.0.2.bias": "IN00",
    P + "input_blocks.0.0.bias": "IN00",
    P + "input_blocks.1.0.in_layers.2.weight": "IN01",
    P + "input_blocks.3.0.op.weight": "IN03",
    P + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": "IN04",
    P + "input_blocks.6.0.op.weight": "IN06",
    P + "input_blocks.7.1.transformer_blocks.1.attn2.to_v.weight": "IN07",
    P + "input_blocks.8.1.proj_out.weight": "IN08",
    P + "middle_block.1.transformer_blocks.1.ff.net.2.weight": "M00",
    P + "output_blocks.0.1.transformer_blocks.0.norm3.weight": "OUT00",
    P + "output_blocks.2.2.conv.weight": "OUT02",
    P + "output_blocks.5.2.conv.weight": "OUT05",
    P + "output_blocks.6.0.skip_connection.weight": "OUT06",
    P + "output_blocks.8.0.in_layers.0.weight": "OUT08",
    P + "out.0.weight": "OUT08",
    P + "out.2.bias": "OUT08",
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": BASE,
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": BASE,
    "conditioner.embedders.1.model.text_projection": BASE,
    "first_stage_model.post_quant_conv.weight": BASE,
}
# Keys that must NOT exist: SDXL's first level has no attention, SD1's last level neither.
ABSENT = {
    "SD1": [P + "input_blocks.10.1.norm.weight", P + "output_blocks.2.2.conv.weight", P + "label_emb.0.0.weight"],
    "SDXL": [P + "input_blocks.1.1.norm.weight", P + "output_blocks.8.1.norm.weight", P + "input_blocks.9.0.op.weight"],
}


@pytest.mark.parametrize("size", ["tiny", "full"])
@pytest.mark.parametrize(("arch_obj", "table"), [(SD1, SD1_TABLE), (SDXL, SDXL_TABLE)])
def test_representative_real_keys_map_to_their_blocks(arch_obj, table: dict[str, str], size: str) -> None:
    keys = {k for k, _, _ in layout(arch_obj.name, size)}
    for key, block in table.items():
        assert key in keys, key
        assert arch_obj.block_of(key) == block, key
    for key in ABSENT[arch_obj.name]:
        assert key not in keys, key


def test_full_sdxl_transformer_depths_are_0_2_10() -> None:
    keys = [k for k, _, _ in layout("SDXL", "full")]

    def depth(block: str) -> int:
        idx = {int(k.split("transformer_blocks.")[1].split(".")[0]) for k in keys if k.startswith(P + block + ".1.transformer_blocks.")}
        return max(idx) + 1 if idx else 0

    assert [depth(f"input_blocks.{i}") for i in range(1, 9)] == [0, 0, 0, 2, 2, 0, 10, 10]
    assert depth("middle_block") == 10
    assert [depth(f"output_blocks.{i}") for i in range(9)] == [10, 10, 10, 2, 2, 2, 0, 0, 0]


# ---------------------------------------------------------------------------------------------
# LDM <-> diffusers names for the in-place sweeps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_unet_ldm_to_diffusers_names_is_a_bijection_onto_the_model(arch: str, size: str) -> None:
    cfg = arch_configs(arch, size)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg.unet)
    params = set(unet.state_dict())
    keys = [k for k, _, _ in layout(arch, size)]
    mapping = unet_ldm_to_diffusers_names(keys, unet.config)
    unet_keys = [k for k in keys if k.startswith(UNET_PREFIX)]
    assert sorted(mapping) == sorted(unet_keys)  # every U-Net key, nothing else
    assert set(mapping.values()) == params
    assert len(set(mapping.values())) == len(mapping)
    # diffusers' own direction and our hand-written one are inverses of each other.
    for ldm_key, dname in mapping.items():
        assert unet_diffusers_to_ldm_name(dname, cfg.unet) == ldm_key
    # ... so block ids carry over to diffusers names: IN04 of SD1 is down_blocks.1.*.0.
    arch_obj = by_name(arch)
    by_block: dict[str, set[str]] = {}
    for ldm_key, dname in mapping.items():
        by_block.setdefault(arch_obj.block_of(ldm_key), set()).add(dname)
    if arch != "SDXL":
        assert all(n.startswith(("down_blocks.1.resnets.0.", "down_blocks.1.attentions.0.")) for n in by_block["IN04"])
        assert all(n.startswith(("up_blocks.3.", "conv_norm_out.", "conv_out.")) for n in by_block["OUT11"])
    else:
        assert all(n.startswith(("up_blocks.2.", "conv_norm_out.", "conv_out.")) for n in by_block["OUT08"])
        assert {"add_embedding.linear_1.weight", "time_embedding.linear_1.weight", "conv_in.weight"} <= by_block["IN00"]


# ---------------------------------------------------------------------------------------------
# synthetic values and files
# ---------------------------------------------------------------------------------------------


def test_values_are_seeded_realistic_and_order_free() -> None:
    a = make_state_dict("SD1", "tiny", seed=5)
    b = make_state_dict("SD1", "tiny", seed=5)
    c = make_state_dict("SD1", "tiny", seed=6)
    assert list(a) == sorted(a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    floats = [k for k in a if a[k].is_floating_point()]
    assert all(a[k].dtype == torch.float16 for k in floats)
    assert not any(torch.equal(a[k], c[k]) for k in floats if a[k].numel() > 1 and not k.endswith("logit_scale"))
    w = a[P + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].float()
    assert abs(w.std().item() - 0.02) < 0.004 and abs(w.mean().item()) < 0.005
    norm = a[P + "input_blocks.1.0.in_layers.0.weight"].float()  # GroupNorm scale
    assert abs(norm.mean().item() - 1.0) < 0.02
    pos = a["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert pos.dtype == torch.int64 and torch.equal(pos, torch.arange(77).unsqueeze(0))
    # A tensor's value does not depend on the rest of the file.
    key = P + "out.2.weight"
    assert torch.equal(make_tensor(key, tuple(a[key].shape), torch.float16, seed=5), a[key])


def test_sdxl_and_sd2_extras() -> None:
    xl = make_state_dict("SDXL", "tiny", seed=0, dtype=torch.bfloat16)
    assert xl["conditioner.embedders.1.model.logit_scale"].shape == ()
    assert xl["conditioner.embedders.1.model.logit_scale"].float().item() == pytest.approx(math.log(100), rel=1e-2)
    assert xl["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert xl[P + "label_emb.0.0.weight"].dtype == torch.bfloat16
    sd2 = {k: s for k, s, _ in layout("SD2", "full")}
    assert sd2["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
    assert sd2["cond_stage_model.model.text_projection"] == (1024, 1024)
    assert sd2["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert P + "input_blocks.1.1.proj_in.weight" in sd2 and sd2[P + "input_blocks.1.1.proj_in.weight"] == (320, 320)
    sd1 = {k: s for k, s, _ in layout("SD1", "full")}
    assert sd1[P + "input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)  # SD1: conv proj_in


def test_fixture_files_hold_the_synthetic_tensors(tiny_sd1_paths, tiny_sd1_ckpt_path, tiny_sd2_paths,
                                                 tiny_sdxl_paths) -> None:
    assert len(tiny_sd1_paths) == 3 and len(tiny_sd2_paths) == 2 and len(tiny_sdxl_paths) == 3
    expected = make_state_dict("SD1", "tiny", seed=1)
    with safetensors.safe_open(str(tiny_sd1_paths[0]), framework="pt") as f:
        assert sorted(f.keys()) == sorted(expected)
        assert f.metadata() == {"format": "pt"}
        for k in expected:
            assert torch.equal(f.get_tensor(k), expected[k]), k
    ckpt = torch.load(tiny_sd1_ckpt_path, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"state_dict"}
    assert all(torch.equal(ckpt["state_dict"][k], expected[k]) for k in expected)
    for paths, arch in ((tiny_sd1_paths, SD1), (tiny_sd2_paths, SD2), (tiny_sdxl_paths, SDXL)):
        heads = []
        for p in paths:
            with safetensors.safe_open(str(p), framework="pt") as f:
                assert detect(f.keys(), str(p)) is arch
                heads.append(f.get_tensor(P + "out.2.weight"))
        assert not torch.equal(heads[0], heads[1])


def test_streaming_writer_matches_safetensors_library(tmp_path) -> None:
    from safetensors.torch import load_file

    path = write_synthetic(tmp_path / "x.safetensors", "SD2", "tiny", seed=3, dtype=torch.float32,
                           metadata={"note": "hello"})
    loaded = load_file(str(path))
    expected = make_state_dict("SD2", "tiny", seed=3, dtype=torch.float32)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "hello"}
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert (8 + header_len) % 8 == 0
    assert len(raw) == 8 + header_len + sum(t.numel() * t.element_size() for t in expected.values())


def test_bad_arguments_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(BlockmergeError, match="unknown architecture"):
        layout("SD4")
    with pytest.raises(BlockmergeError, match="unknown size"):
        layout("SD1", "huge")
    with pytest.raises(BlockmergeError, match="unknown format"):
        write_synthetic(tmp_path / "x", "SD1", fmt="gguf")  # type: ignore[arg-type]
    with pytest.raises(BlockmergeError, match="floating point"):
        make_state_dict("SD1", dtype=torch.int8)
    assert layout("sdxl") == layout(SDXL.name)


@pytest.mark.parametrize("arch", ["SD1", "SD2", "SDXL"])
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_rule_based_ldm_to_diffusers_names_equal_diffusers_converter(arch: str, size: str) -> None:
    """The diffusers-free inverse (what LoRA name tables use, to spare a LoRA bake the seconds of
    importing diffusers' single-file code) gives exactly the names diffusers' converter gives."""
    from blockmerge.architectures import by_name
    from blockmerge.architectures.ldm_names import unet_ldm_to_diffusers_name
    from blockmerge.architectures.unet_config import unet_config

    a = by_name(arch)
    lay = {k: tuple(t.shape) for k, t in a.synthetic(size, None).items()}
    cfg = unet_config(a, frozenset(lay), lambda k: lay[k], "t", 64)
    keys = [k for k in lay if k.startswith("model.diffusion_model.")]
    ref = unet_ldm_to_diffusers_names(keys, cfg)
    assert len(ref) == len(keys)
    assert {k: unet_ldm_to_diffusers_name(k, cfg) for k in keys} == ref
    with pytest.raises(ValueError):
        unet_ldm_to_diffusers_name("model.diffusion_model.input_blocks.99.7.nothing.weight", cfg)
