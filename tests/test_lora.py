"""LoRAs as low-rank deltas: formats against LyCORIS' own functions and A1111's formulas, the name
mapping against diffusers' converter, baking by block, extract / merge / resize, inspection."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from blockmerge.architectures import FLUX, SD1, SD2, SD3, SDXL
from blockmerge.architectures.synthetic import write_synthetic
from blockmerge.cli import main
from blockmerge.errors import BlockmergeError, CheckpointError
from blockmerge.lora import (
    LoraSpec,
    apply_loras,
    extract_lora,
    family_table,
    lora_blocks,
    lora_weights,
    merge_loras,
    name_table,
    open_lora,
    parse_lora_arg,
    resize_lora,
)
from blockmerge.lora.formats import apply_dora, group_modules, module_delta
from blockmerge.lora.synthetic import synthetic_lora, write_synthetic_lora
from blockmerge.merge.nodes import FileSource
from blockmerge.models import resolve_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _shapes(path: Path) -> tuple:
    src = FileSource(path)
    try:
        return src.arch, {k: tuple(src.info(k).shape) for k in src.keys()}
    finally:
        src.close()


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- formats -------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("form", ["linear", "conv3x3", "conv1x1", "tucker"])
def test_lora_and_locon_equal_lycoris(form: str, seed: int) -> None:
    from lycoris.functional import locon

    g = _g(seed)
    out, inn, r = int(torch.randint(3, 20, (1,), generator=g)), int(torch.randint(3, 20, (1,), generator=g)), 3
    k = {"linear": (), "conv1x1": (1, 1), "conv3x3": (3, 3), "tucker": (3, 3)}[form]
    down = torch.randn(r, inn, *k, generator=g, dtype=torch.float64)
    up = torch.randn(out, r, *((1, 1) if k else ()), generator=g, dtype=torch.float64)
    t = {"up": up, "down": down, "alpha": torch.tensor(1.5)}
    mid = None
    if form == "tucker":
        mid = torch.randn(r, r, *k, generator=g, dtype=torch.float64)
        t = {"up": up, "down": torch.randn(r, inn, 1, 1, generator=g, dtype=torch.float64), "mid": mid,
             "alpha": torch.tensor(1.5)}
    ours = module_delta("lora", t, (out, inn, *k))
    ref = locon.diff_weight(t["down"], t["up"], mid, gamma=1.5 / r, backend="torch")
    assert torch.allclose(ours, ref.reshape(ours.shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("form", ["linear", "conv", "tucker"])
def test_loha_equals_lycoris(form: str, seed: int) -> None:
    from lycoris.functional import loha

    g = _g(seed)
    out, inn, r = 7 + seed, 5 + seed, 3
    f64 = {"dtype": torch.float64, "generator": g}
    t1 = t2 = None
    if form == "tucker":
        w1a, w1b, w2a, w2b = (torch.randn(r, out, **f64), torch.randn(r, inn, **f64),
                              torch.randn(r, out, **f64), torch.randn(r, inn, **f64))
        t1, t2 = torch.randn(r, r, 3, 3, **f64), torch.randn(r, r, 3, 3, **f64)
        shape = (out, inn, 3, 3)
    else:
        k = (3, 3) if form == "conv" else ()
        w1a, w1b = torch.randn(out, r, **f64), torch.randn(r, inn, *k, **f64)
        w2a, w2b = torch.randn(out, r, **f64), torch.randn(r, inn, *k, **f64)
        shape = (out, inn, *k)
    t = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(2.0)}
    if t1 is not None:
        t.update(hada_t1=t1, hada_t2=t2)
    ours = module_delta("loha", t, shape)
    ref = loha.diff_weight(w1b, w1a, w2b, w2a, t1, t2, gamma=2.0 / r, backend="torch")
    assert torch.allclose(ours, ref.reshape(shape), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", ["full", "w1_lowrank", "w2_lowrank", "w2_tucker", "conv_w2_full", "conv_w2_lowrank"])
def test_lokr_equals_lycoris(form: str) -> None:
    from lycoris.functional import lokr

    g = _g(len(form))
    f64 = {"dtype": torch.float64, "generator": g}
    a, b, c, d, r = 2, 5, 3, 4, 2
    w1 = w1a = w1b = w2 = w2a = w2b = t2 = None
    k: tuple[int, ...] = ()
    if form == "w1_lowrank":
        w1a, w1b = torch.randn(a, r, **f64), torch.randn(r, c, **f64)
    else:
        w1 = torch.randn(a, c, **f64)
    if form in ("full", "w1_lowrank"):
        w2 = torch.randn(b, d, **f64)
    elif form == "w2_lowrank":
        w2a, w2b = torch.randn(b, r, **f64), torch.randn(r, d, **f64)
    elif form == "w2_tucker":
        k = (3, 3)
        w2a, w2b, t2 = torch.randn(r, b, **f64), torch.randn(r, d, **f64), torch.randn(r, r, 3, 3, **f64)
    elif form == "conv_w2_full":
        k = (3, 3)
        w2 = torch.randn(b, d, 3, 3, **f64)
    else:
        k = (3, 3)
        w2a, w2b = torch.randn(b, r, **f64), torch.randn(r, d, 3, 3, **f64)
    t = {n: v for n, v in (("lokr_w1", w1), ("lokr_w1_a", w1a), ("lokr_w1_b", w1b), ("lokr_w2", w2),
                           ("lokr_w2_a", w2a), ("lokr_w2_b", w2b), ("lokr_t2", t2)) if v is not None}
    shape = (a * b, c * d, *k)
    ours = module_delta("lokr", t, shape)  # no alpha: scale 1 whatever is decomposed
    # lycoris' functional scale is gamma / rank with its own rank convention; pick gamma for scale 1
    rank_ly = w1a.shape[1] if w1a is not None else (w2a.shape[1] if w2a is not None else 1.0)
    ref = lokr.diff_weight(w1, w1a, w1b, w2, w2a, w2b, t2, gamma=float(rank_ly), backend="torch")
    assert torch.allclose(ours, ref.reshape(shape), rtol=1e-10, atol=1e-12)
    # A1111's scale rule: alpha / the rank of the decomposed factor (w1b's, else w2b's), else 1
    t["alpha"] = torch.tensor(3.0)
    rank = w1b.shape[0] if w1b is not None else (w2b.shape[0] if w2b is not None else None)
    expect = ours * (3.0 / rank if rank else 1.0)
    assert torch.allclose(module_delta("lokr", t, shape), expect, rtol=1e-12)


def test_scale_rules_and_dyn() -> None:
    g = _g(0)
    up, down = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    base = up @ down
    assert torch.allclose(module_delta("lora", {"up": up, "down": down}, (6, 5)), base)  # no alpha: rank, scale 1
    assert torch.allclose(module_delta("lora", {"up": up, "down": down, "alpha": torch.tensor(2.0)}, (6, 5)), base / 2)
    assert torch.allclose(module_delta("lora", {"up": up, "down": down, "alpha": torch.tensor(2.0),
                                                "scale": torch.tensor(0.3)}, (6, 5)), base * 0.3)
    # A1111's dyn keeps the first ranks (alpha / full rank still scales)
    assert torch.allclose(module_delta("lora", {"up": up, "down": down, "alpha": torch.tensor(2.0)}, (6, 5), dyn=2),
                          (up[:, :2] @ down[:2]) / 2)
    with pytest.raises(CheckpointError, match="the model's weight there is"):
        module_delta("lora", {"up": up, "down": down}, (6, 6))


@pytest.mark.parametrize("layout", ["kohya_in", "lycoris_out"])
@pytest.mark.parametrize("conv", [False, True])
def test_dora_as_a1111_decomposes(layout: str, conv: bool) -> None:
    g = _g(1)
    shape = (6, 5, 3, 3) if conv else (6, 5)
    w = torch.randn(*shape, generator=g, dtype=torch.float64)
    delta = torch.randn(*shape, generator=g, dtype=torch.float64) * 0.1
    merged = (w + delta).reshape(6, 5, -1)
    if layout == "kohya_in":  # A1111's apply_weight_decompose: one norm per input column
        m = torch.rand(1, 5, *([1, 1] if conv else []), generator=g, dtype=torch.float64) + 0.5
        norm = merged.pow(2).sum(dim=(0, 2)).sqrt()[None, :, None]
        expect = merged * (m.reshape(1, 5, 1) / norm) - w.reshape(6, 5, -1)
    else:  # LyCORIS wd_on_out / PEFT: one norm per output row
        m = torch.rand(6, *([1, 1, 1] if conv else [1]), generator=g, dtype=torch.float64) + 0.5
        norm = merged.pow(2).sum(dim=(1, 2)).sqrt()[:, None, None]
        expect = merged * (m.reshape(6, 1, 1) / norm) - w.reshape(6, 5, -1)
    got = apply_dora(w, delta, m)
    assert torch.allclose(got.reshape(6, 5, -1), expect, rtol=1e-12, atol=1e-14)


def test_group_modules_reads_every_naming() -> None:
    keys = [
        "lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.alpha",
        "unet.b.lora_A.weight", "unet.b.lora_B.weight",
        "unet.c.to_q.lora.down.weight", "unet.c.to_q.lora.up.weight",
        "unet.d.attn1.processor.to_out_lora.down.weight", "unet.d.attn1.processor.to_out_lora.up.weight",
        "lora_te_e.hada_w1_a", "lora_te_e.hada_w1_b", "lora_te_e.hada_w2_a", "lora_te_e.hada_w2_b",
        "lora_unet_f.lokr_w1", "lora_unet_f.lokr_w2_a", "lora_unet_f.lokr_w2_b",
        "lora_unet_g.diff", "lora_unet_g.diff_b", "lora_unet_h.dora_scale", "lora_unet_h.lora_up.weight",
        "lora_unet_h.lora_down.weight", "bundle_emb.x.string_to_param.*", "lora_unet_i.alpha",
    ]
    mods, unknown = group_modules(keys)
    assert {n: m.kind for n, m in mods.items()} == {
        "lora_unet_a": "lora", "unet.b": "lora", "unet.c.to_q": "lora", "unet.d.attn1.to_out.0": "lora",
        "lora_te_e": "loha", "lora_unet_f": "lokr", "lora_unet_g": "full", "lora_unet_h": "lora",
    }
    assert mods["lora_unet_h"].dora and not mods["lora_unet_a"].dora
    assert sorted(unknown) == ["bundle_emb.x.string_to_param.*", "lora_unet_i.alpha"]


# --- names -----------------------------------------------------------------------------------------

_KOHYA_UNET = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")


def _meta_unet(arch):
    """The full-size single-file layout of ``arch``, its LoRA name table, and diffusers' own U-Net
    built on the meta device from that layout's config (also returned)."""
    from diffusers import UNet2DConditionModel

    from blockmerge.architectures.unet_config import unet_config

    layout = {k: tuple(t.shape) for k, t in arch.synthetic("full", None).items()}
    cfg = unet_config(arch, frozenset(layout), lambda k: layout[k], "t", 64)
    if "projection_class_embeddings_input_dim" in cfg:
        cfg["addition_time_embed_dim"] = 256
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    return layout, family_table(arch), cfg, unet


@pytest.mark.parametrize("arch", [SD1, SD2, SDXL], ids=lambda a: a.name)
def test_every_kohya_module_name_maps_to_the_key_diffusers_gives_it(arch) -> None:
    """kohya names modules by the diffusers path (dots as underscores); each must land on the key
    diffusers' own LDM converter turns into that parameter, and the LDM spelling on the same key."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint


    layout, table, cfg, unet = _meta_unet(arch)
    # where diffusers puts each single-file tensor: follow placeholder identities through its converter
    unet_keys = [k for k in layout if k.startswith("model.diffusion_model.")]
    ph = {k: torch.empty(0, device="meta") for k in unet_keys}
    where = {id(t): k for k, t in ph.items()}
    to_ldm = {name: where[id(t)] for name, t in convert_ldm_unet_checkpoint(ph, dict(cfg)).items()}
    n = 0
    for path, mod in unet.named_modules():
        if type(mod).__name__ not in _KOHYA_UNET:
            continue
        for cname, child in mod.named_modules():
            if not isinstance(child, torch.nn.Linear | torch.nn.Conv2d):
                continue
            full = f"{path}.{cname}" if cname else path
            target = table.lookup("lora_unet_" + full.replace(".", "_"))
            assert target is not None, full
            assert target.key == to_ldm[full + ".weight"]
            ldm_mod = target.key[len("model.diffusion_model."):-len(".weight")]
            assert table.lookup("lora_unet_" + ldm_mod.replace(".", "_")) == target
            assert table.lookup("unet." + full) == target
            assert target.shape == layout[target.key]
            n += 1
    assert n > 100
    # text encoders: every transformers CLIP projection name, with kohya's prefix per encoder
    from transformers import CLIPTextConfig, CLIPTextModel

    for enc in arch.lora.text_encoders:
        width = layout[next(k for k in layout if k.startswith(enc.prefix) and k.endswith(
            ("token_embedding.weight",)))][1]
        layers = sum(1 for k in layout if k.startswith(enc.prefix) and k.endswith(("mlp.fc1.weight", "mlp.c_fc.weight")))
        with torch.device("meta"):
            te = CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                              num_attention_heads=max(1, width // 64)))
        for name, child in te.named_modules():
            if isinstance(child, torch.nn.Linear) and ("self_attn" in name or "mlp" in name):
                # kohya's files say text_model_ (transformers 4); transformers 5 dropped that level
                bare = name[len("text_model."):] if name.startswith("text_model.") else name
                t = table.lookup(enc.kohya + "text_model_" + bare.replace(".", "_"))
                assert t is not None, enc.kohya + name
                assert table.lookup(enc.kohya + bare.replace(".", "_")) == t
                got = t.take(torch.arange(math.prod(layout[t.key]), dtype=torch.float64).reshape(layout[t.key]))
                assert tuple(got.shape) == tuple(child.weight.shape)


def test_openclip_q_k_v_land_on_their_thirds_of_in_proj(tiny_sd2_paths, tmp_path) -> None:
    """SD2's text encoder LoRA (transformers names) changes the right rows of OpenCLIP's in_proj:
    apply it, load the file with the generation loader (transformers' CLIP), and compare."""
    from blockmerge.generation.loader import load_pipeline

    model = tiny_sd2_paths[0]
    arch, shapes = _shapes(model)
    sd = synthetic_lora(arch, shapes, rank=2, seed=3, scale=0.5)
    te_only = {k: v for k, v in sd.items() if k.startswith("lora_te_")}
    lpath = tmp_path / "te.safetensors"
    save_file(te_only, str(lpath))
    out = tmp_path / "out.safetensors"
    apply_loras(model, [LoraSpec(lpath)], out, dtype="fp32")
    before = load_pipeline(model, device="cpu").pipeline.text_encoder
    after = load_pipeline(out, device="cpu").pipeline.text_encoder
    pb, pa = dict(before.named_parameters()), dict(after.named_parameters())
    checked = 0
    for name in pb:
        if not name.endswith(".weight") or ("self_attn" not in name and "mlp" not in name):
            continue
        bare = name[: -len(".weight")]
        bare = bare[len("text_model."):] if bare.startswith("text_model.") else bare
        mod = "lora_te_text_model_" + bare.replace(".", "_")
        if mod + ".lora_up.weight" not in te_only:
            assert torch.equal(pa[name], pb[name]), name
            continue
        up, down = te_only[mod + ".lora_up.weight"], te_only[mod + ".lora_down.weight"]
        expect = pb[name].double() + (up.double() @ down.double())
        assert torch.allclose(pa[name].double(), expect, atol=1e-5), name
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize("arch", [FLUX, SD3], ids=lambda a: a.name)
def test_transformer_lora_names_kohya_and_diffusers(arch, tmp_path) -> None:
    """Flux / SD3: kohya names the single-file module; a diffusers ``transformer.`` LoRA on to_q
    changes the first third of the fused qkv rows only."""
    model = write_synthetic(tmp_path / "m.safetensors", arch.name, "tiny", seed=1, dtype=torch.float32)
    _, shapes = _shapes(model)
    table = name_table(arch, shapes)
    qkv = next(k for k in shapes if k.endswith("attn.qkv.weight") and ("double_blocks.0." in k or "joint_blocks.0.x_block" in k))
    rows = shapes[qkv][0] // 3
    kohya = "lora_unet_" + qkv[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
    assert table.lookup(kohya).key == qkv
    to_q = "transformer.transformer_blocks.0.attn.to_q"
    to_k = "transformer.transformer_blocks.0.attn.to_k"
    assert table.lookup(to_q).rows == ((0, rows),) and table.lookup(to_k).rows == ((rows, 2 * rows),)
    g = _g(2)
    width = shapes[qkv][1]
    lora = {to_k + ".lora_A.weight": torch.randn(2, width, generator=g),
            to_k + ".lora_B.weight": torch.randn(rows, 2, generator=g)}
    lpath = tmp_path / "l.safetensors"
    save_file(lora, str(lpath))
    out = tmp_path / "o.safetensors"
    apply_loras(model, [LoraSpec(lpath, 0.5, 0.5)], out, dtype="fp32")
    a, o = load_file(str(model)), load_file(str(out))
    delta = 0.5 * (lora[to_k + ".lora_B.weight"] @ lora[to_k + ".lora_A.weight"])
    assert torch.allclose(o[qkv][rows:2 * rows], a[qkv][rows:2 * rows] + delta, atol=1e-6)
    assert torch.equal(o[qkv][:rows], a[qkv][:rows]) and torch.equal(o[qkv][2 * rows:], a[qkv][2 * rows:])
    assert sum(not torch.equal(a[k], o[k]) for k in a) == 1


# --- baking by block -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_lora(tiny_sd1_paths, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    model = tiny_sd1_paths[0]
    path = d / "l.safetensors"
    sd = write_synthetic_lora(path, model, rank=3, conv_rank=2, alpha=1.5, seed=7, dtype="fp32", scale=0.3)
    return model, path, sd


def _expected(model: Path, sd: dict, weights_of) -> dict[str, torch.Tensor]:
    """Independent bake: W + Σ w(block)·(alpha/rank)·up@down per kohya module, in float64."""
    arch, shapes = _shapes(model)
    table = name_table(arch, shapes)
    a = load_file(str(model))
    out = {k: v.double() for k, v in a.items()}
    for key in sd:
        if not key.endswith(".lora_up.weight"):
            continue
        mod = key[: -len(".lora_up.weight")]
        t = table.lookup(mod)
        up = sd[mod + ".lora_up.weight"].double()
        down = sd[mod + ".lora_down.weight"].double()
        r = down.shape[0]
        d = (up.reshape(up.shape[0], -1) @ down.reshape(r, -1)) * (float(sd[mod + ".alpha"]) / r)
        w = weights_of(arch.block_of(t.key))
        full = torch.zeros(shapes[t.key], dtype=torch.float64)
        t.add_into(full, d)
        out[t.key] += w * full
    return out


@pytest.mark.parametrize("spec,weights_of", [
    (None, lambda b: 1.0),
    ("0.6", lambda b: 0.6),
    ("IN04-IN08=1", lambda b: 1.0 if b in ("IN04", "IN05", "IN06", "IN07", "IN08") else 0.0),
    ("OUTD", lambda b: 1.0 if b in ("BASE", "OUT03", "OUT04", "OUT05", "OUT06") else 0.0),  # LBW preset
    ("1,0,0,0,0,0,1,1,0,0,0,0,0,0,0,0,1", lambda b: 1.0 if b in ("BASE", "IN08", "M00", "OUT11") else 0.0),  # LBW 17
    (",".join(["0.5"] + ["1"] * 12 + ["2"] * 13), lambda b: 0.5 if b == "BASE" else (1.0 if b < "M" else 2.0)),  # 26
])
def test_bake_by_block_equals_independent_sum(sd1_lora, tmp_path, spec, weights_of) -> None:
    model, lpath, sd = sd1_lora
    out = tmp_path / "o.safetensors"
    apply_loras(model, [LoraSpec(lpath, 0.8, 0.8, spec)], out, dtype="fp32")
    got = load_file(str(out))
    exp = _expected(model, sd, lambda b: 0.8 * weights_of(b))
    worst = max(float((got[k].double() - exp[k]).abs().max()) for k in exp)
    assert worst < 1e-5
    a = load_file(str(model))
    changed = {k for k in a if not torch.equal(a[k].float(), got[k])}
    assert changed == {k for k in exp if not torch.equal(exp[k], a[k].double())}


def test_zero_blocks_and_zero_strength_are_the_model_bit_for_bit(sd1_lora, tmp_path) -> None:
    model, lpath, _ = sd1_lora
    a = load_file(str(model))
    for spec in (LoraSpec(lpath, 0.0, 0.0), LoraSpec(lpath, 1.0, 1.0, "NONE"), LoraSpec(lpath, 1.0, 1.0, ",".join("0" * 26))):
        out = tmp_path / f"{spec.te}-{spec.blocks}.safetensors".replace(",", "")
        apply_loras(model, [spec], out, dtype="fp16")
        o = load_file(str(out))
        assert all(torch.equal(a[k], o[k]) for k in a)


def test_te_and_unet_strengths_and_two_loras_in_order(sd1_lora, tiny_sd1_paths, tmp_path) -> None:
    model, lpath, sd = sd1_lora
    l2 = tmp_path / "l2.safetensors"
    sd2 = write_synthetic_lora(l2, model, rank=2, seed=9, dtype="fp32", scale=0.3)
    out = tmp_path / "o.safetensors"
    apply_loras(model, [LoraSpec(lpath, 0.3, 1.2), LoraSpec(l2, 1.0, 1.0, "0.5")], out, dtype="fp32")
    e1 = _expected(model, sd, lambda b: 0.3 if b == "BASE" else 1.2)
    e2 = _expected(model, sd2, lambda b: 0.5)
    a = load_file(str(model))
    got = load_file(str(out))
    for k in a:
        want = e1[k] + e2[k] - a[k].double()
        assert float((got[k].double() - want).abs().max()) < 1e-5, k


def test_apply_is_byte_identical_across_runs_and_threads(sd1_lora, tmp_path) -> None:
    model, lpath, _ = sd1_lora
    outs = []
    for i, threads in enumerate((1, 2, 2)):
        o = tmp_path / f"o{i}.safetensors"
        apply_loras(model, [LoraSpec(lpath, 0.7, 0.7, "OUTALL")], o, threads=threads)
        outs.append(o.read_bytes())
    assert outs[0] == outs[1] == outs[2]
    meta = json.loads(open_lora_meta(tmp_path / "o0.safetensors")["blockmerge"])
    (rec,) = meta["loras"]
    assert rec["name"] == "l" and rec["te"] == 0.7 and rec["blocks"]["OUT11"] == pytest.approx(0.7)
    from blockmerge.lora.library import lora_hash

    # the addnet hash (computed on a thread while the tensors are written), not its placeholder
    assert rec["blocks"]["IN04"] == 0.0 and rec["lora_hash"] == lora_hash(lpath) != "0" * 12
    assert [i["role"] for i in meta["inputs"]] == ["A", "LoRA1"]


@pytest.mark.parametrize("family", ["SD1", "SD2", "SDXL", "FLUX"])
def test_sliced_delta_equals_the_whole_delta(family, tmp_path) -> None:
    """Every slice of a plain LoRA key's ΔW (the executor streams those) equals the same elements of
    the whole ΔW: random slice bounds, fused q/k/v rows (OpenCLIP's in_proj, Flux's qkv) from several
    modules, two namings on one key, ``dyn``; keys the slices cannot serve (DoRA, LoHa, Tucker
    cores) are whole-tensor only."""
    from blockmerge.lora.delta import LoraDelta
    from blockmerge.merge.nodes import Scratch

    model = write_synthetic(tmp_path / "m.safetensors", family, "tiny", seed=1, dtype=torch.float32)
    arch, shapes = _shapes(model)
    table = name_table(arch, shapes)
    g = _g(5)
    sd = synthetic_lora(arch, shapes, rank=4, seed=2, scale=0.5)
    sd.update(synthetic_lora(arch, shapes, rank=3, seed=4, naming="peft"))  # a second module on many keys
    # Flux/SD3-style split projections onto fused rows, where the family has them
    split = [(n, t) for n, t in table.targets.items() if t.rows and n.startswith("transformer.")]
    for name, t in split[:8]:
        sd[name + ".lora_A.weight"] = torch.randn(2, t.shape[1], generator=g)
        sd[name + ".lora_B.weight"] = torch.randn(t.shape[0], 2, generator=g)
    path = tmp_path / "l.safetensors"
    save_file(sd, str(path))
    lf = open_lora(path)
    try:
        for dyn in (None, 2):
            delta = LoraDelta(lf, table, shapes, dyn=dyn)
            keys = [k for k in delta.keys() if delta.sliceable(k)]
            assert len(keys) == len(delta.keys()) > 0  # plain LoRAs only: every key can be sliced
            fused = [k for k in keys if any(m.target.rows for m in delta.modules_of(k))]
            assert fused or family == "SD1"
            scratch = Scratch()
            for key in keys:
                whole = delta.get(key).reshape(-1)
                n = whole.numel()
                cols = n // shapes[key][0]
                inside = [cols + 1, cols + 3] if n > cols + 3 else []  # a slice within one row
                cuts = sorted({0, n, *inside, *torch.randint(1, max(2, n), (3,), generator=g).tolist()})
                for lo, hi in zip(cuts, cuts[1:], strict=False):
                    if lo < hi:
                        part = delta.get_range(key, lo, hi, scratch)
                        assert part.shape == (hi - lo,)
                        assert torch.allclose(part, whole[lo:hi], rtol=1e-5, atol=1e-6), (key, lo, hi, dyn)
    finally:
        lf.close()
    # DoRA, LoHa and Tucker-core modules make whole-tensor keys
    mod = next(n for n, t in sd.items() if n.startswith("lora_unet_") and n.endswith(".lora_down.weight")
               and t.dim() == 2)[:-len(".lora_down.weight")]
    odd = {k: v for k, v in sd.items() if k.startswith(mod + ".")}
    up = odd[mod + ".lora_up.weight"]
    variants = {
        "dora": {**odd, mod + ".dora_scale": torch.ones(1, odd[mod + ".lora_down.weight"].shape[1])},
        "loha": {mod + ".hada_w1_a": up[:, :2].contiguous(), mod + ".hada_w1_b": odd[mod + ".lora_down.weight"][:2].clone(),
                 mod + ".hada_w2_a": up[:, 1:3].contiguous(), mod + ".hada_w2_b": odd[mod + ".lora_down.weight"][1:3].clone()},
    }
    for kind, tensors in variants.items():
        p = tmp_path / f"{kind}.safetensors"
        save_file(tensors, str(p))
        lf = open_lora(p)
        try:
            d = LoraDelta(lf, table, shapes, base=FileSource(model))
            assert [d.sliceable(k) for k in d.keys()] == [False], kind
        finally:
            lf.close()


def test_apply_streams_lora_keys_in_slices_as_the_whole_tensor_path(sd1_lora, tmp_path, monkeypatch) -> None:
    """With slices smaller than the tensors, ``lora apply`` writes what the whole-tensor path writes
    (to fp32 rounding of one sum), for any thread count."""
    import blockmerge.merge.executor as ex
    from blockmerge.lora.delta import LoraDelta

    model, lpath, _ = sd1_lora
    monkeypatch.setattr(ex, "SLICE", 1000)
    outs = {}
    for threads in (1, 2):
        outs[threads] = tmp_path / f"s{threads}.safetensors"
        apply_loras(model, [LoraSpec(lpath, 0.7, 0.4, "1,0.5,1,0,1,1,0.3,1,1,1,1,1,1,1,1,1,1")], outs[threads],
                    dtype="fp32", threads=threads)
    monkeypatch.setattr(LoraDelta, "sliceable", lambda self, key: False)
    whole = tmp_path / "w.safetensors"
    apply_loras(model, [LoraSpec(lpath, 0.7, 0.4, "1,0.5,1,0,1,1,0.3,1,1,1,1,1,1,1,1,1,1")], whole,
                dtype="fp32", threads=1)
    assert outs[1].read_bytes() == outs[2].read_bytes()
    s, w, a = load_file(str(outs[1])), load_file(str(whole)), load_file(str(model))
    changed = [k for k in a if not torch.equal(w[k], a[k])]
    assert len(changed) > 20
    for k in a:
        assert torch.allclose(s[k], w[k], rtol=1e-5, atol=1e-6), k


def test_apply_adds_the_lora_into_a_without_making_its_delta(sd1_lora, tmp_path, monkeypatch) -> None:
    """``add_delta`` declares ``adds``: a sliceable LoRA key is summed into A's copy by
    ``add_range_into`` and ΔW is never made (neither whole nor per slice). The same file as before."""
    from blockmerge.lora.delta import LoraDelta

    model, lpath, _ = sd1_lora
    ref = tmp_path / "ref.safetensors"
    apply_loras(model, [LoraSpec(lpath, 0.7, 0.4)], ref, dtype="fp32")
    calls = []
    real = LoraDelta.add_range_into

    def spy(self, *a, **k):
        calls.append(a[0])
        return real(self, *a, **k)

    def made(self, *a, **k):
        raise AssertionError("ΔW was made")

    monkeypatch.setattr(LoraDelta, "add_range_into", spy)
    monkeypatch.setattr(LoraDelta, "get_range", made)
    lf = open_lora(lpath)
    try:
        _, shapes = _shapes(model)
        touched = set(LoraDelta(lf, name_table(SD1, shapes), shapes).keys())
    finally:
        lf.close()
    monkeypatch.setattr(LoraDelta, "get", made)  # every module of this LoRA is plain: no key goes whole
    out = tmp_path / "fused.safetensors"
    apply_loras(model, [LoraSpec(lpath, 0.7, 0.4)], out, dtype="fp32")
    assert out.read_bytes() == ref.read_bytes()
    assert set(calls) == touched and len(touched) > 20


def open_lora_meta(path: Path) -> dict[str, str]:
    from blockmerge.io import open_checkpoint

    with open_checkpoint(path) as r:
        return dict(r.metadata)


def test_peft_and_kohya_namings_bake_the_same(tiny_sdxl_paths, tmp_path) -> None:
    model = tiny_sdxl_paths[0]
    arch, shapes = _shapes(model)
    kohya = synthetic_lora(arch, shapes, rank=2, seed=4, scale=0.2)
    peft = synthetic_lora(arch, shapes, rank=2, seed=4, scale=0.2, naming="peft")
    assert any(k.startswith("lora_unet_input_blocks_") for k in kohya)  # SDXL: kohya's LDM names
    assert any(k.startswith("unet.down_blocks.") for k in peft) and any(k.startswith("text_encoder_2.") for k in peft)
    paths = []
    for name, sd in (("k", kohya), ("p", peft)):
        lp = tmp_path / f"{name}.safetensors"
        save_file(sd, str(lp))
        out = tmp_path / f"{name}-out.safetensors"
        apply_loras(model, [LoraSpec(lp)], out, dtype="fp32")
        paths.append(load_file(str(out)))
    assert all(torch.equal(paths[0][k], paths[1][k]) for k in paths[0])
    a = load_file(str(model))
    assert sum(not torch.equal(a[k].float(), paths[0][k]) for k in a) > 50


def test_sdxl_12_value_lbw_list(tiny_sdxl_paths) -> None:
    w = lora_weights(SDXL, "1,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0,1.1", 2.0, 0.5)
    assert w["BASE"] == 2.0 and w["IN04"] == pytest.approx(0.05) and w["OUT05"] == pytest.approx(0.55)
    assert w["IN00"] == 0.0 and w["OUT08"] == 0.0  # not in LBW's 12: no LoRA there
    with pytest.raises(BlockmergeError, match="preset ALL has 17 values"):
        lora_weights(SDXL, "ALL")


def test_dora_bakes_against_the_weight(tiny_sd1_paths, tmp_path) -> None:
    model = tiny_sd1_paths[0]
    arch, shapes = _shapes(model)
    sd = synthetic_lora(arch, shapes, rank=2, seed=5, scale=0.3, text_encoder=False)
    mods = sorted({k.rsplit(".lora_", 1)[0] for k in sd if ".lora_" in k})[:5]
    g = _g(6)
    table = name_table(arch, shapes)
    for m in mods:
        t = table.lookup(m)
        sd[m + ".dora_scale"] = torch.rand(1, t.shape[1], *([1, 1] if len(t.shape) == 4 else []), generator=g) + 0.5
    lp = tmp_path / "dora.safetensors"
    save_file(sd, str(lp))
    out = tmp_path / "o.safetensors"
    apply_loras(model, [LoraSpec(lp, 0.7, 0.7)], out, dtype="fp32")
    a, o = load_file(str(model)), load_file(str(out))
    for m in mods:
        t = table.lookup(m)
        up, down = sd[m + ".lora_up.weight"].double(), sd[m + ".lora_down.weight"].double()
        d = (up.reshape(up.shape[0], -1) @ down.reshape(2, -1)).reshape(t.shape)
        w = a[t.key].double()
        merged = (w + d).reshape(w.shape[0], w.shape[1], -1)
        norm = merged.pow(2).sum(dim=(0, 2)).sqrt()
        dora = merged * (sd[m + ".dora_scale"].double().reshape(1, -1, 1) / norm[None, :, None]) - w.reshape(merged.shape)
        assert torch.allclose(o[t.key].double(), w + 0.7 * dora.reshape(w.shape), atol=1e-5), m


# --- extract / merge / resize ----------------------------------------------------------------------


def test_full_rank_extract_then_apply_reproduces_tiny_b(tmp_path) -> None:
    a, b = resolve_model("tiny-a"), resolve_model("tiny-b")
    lp = tmp_path / "full.safetensors"
    res = extract_lora(b, a, lp, rank=100_000, conv_rank=100_000, clamp_quantile=1.0, dtype="fp32")
    assert res.text_encoder and all(abs(k / t - 1) < 1e-6 for k, t in res.energy.values() if t > 0)
    out = tmp_path / "o.safetensors"
    apply_loras(a, [LoraSpec(lp)], out, dtype="fp32")
    A, B, out_sd = load_file(str(a)), load_file(str(b)), load_file(str(out))
    covered = [k for k in out_sd if not torch.equal(out_sd[k], A[k])]
    assert len(covered) == res.modules
    assert res.modules > 250
    for k in covered:  # every tensor the LoRA covers is tiny-b's, to float rounding
        assert float((out_sd[k] - B[k]).abs().max()) < 1e-5 * max(1.0, float(B[k].abs().max())), k
    # what a LoRA cannot express (biases, norms, embeddings, conv_in/out) stays tiny-a's
    assert all(out_sd[k].dim() < 2 or "embedding" in k or "time_embed" in k or "input_blocks.0." in k or "out.2" in k
               for k in out_sd if k not in covered and not torch.equal(A[k], B[k]))


def test_low_rank_extract_keeps_energy_as_the_svd_says(tmp_path) -> None:
    a, b = resolve_model("tiny-a"), resolve_model("tiny-b")
    res = extract_lora(b, a, tmp_path / "r4.safetensors", rank=4, conv_rank=4, clamp_quantile=1.0)
    A, B = load_file(str(a)), load_file(str(b))
    arch, shapes = _shapes(a)
    table = name_table(arch, shapes)
    with open_lora(tmp_path / "r4.safetensors") as lf:
        kept: dict[str, float] = {}
        total: dict[str, float] = {}
        for name in lf.modules:
            t = table.lookup(name)
            d = (t.take(B[t.key].double()) - t.take(A[t.key].double()))
            s = torch.linalg.svdvals(d.reshape(d.shape[0], -1))
            blk = arch.block_of(t.key)
            kept[blk] = kept.get(blk, 0.0) + float(s[:4].pow(2).sum())
            total[blk] = total.get(blk, 0.0) + float(s.pow(2).sum())
    for blk, (k, tot) in res.energy.items():
        assert tot == pytest.approx(total[blk], rel=1e-6)
        assert k / tot == pytest.approx(kept[blk] / total[blk], abs=0.01)  # within 1% of the exact SVD


def test_extract_blocks_and_text_encoder_rule(tmp_path) -> None:
    a, b = resolve_model("tiny-a"), resolve_model("tiny-b")
    res = extract_lora(b, a, tmp_path / "x.safetensors", rank=2, blocks="OUT06-OUT11=1", min_diff=1e9)
    assert not res.text_encoder and any("text encoders differ" in w for w in res.warnings)
    assert set(res.energy) == {"OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"}
    rep = lora_blocks(tmp_path / "x.safetensors", a)
    assert {b.block for b in rep.blocks if b.modules} == set(res.energy)


def test_merge_concatenates_exactly_and_svd_to_a_rank(sd1_lora, tmp_path) -> None:
    model, l1, sd1 = sd1_lora
    l2 = tmp_path / "l2.safetensors"
    write_synthetic_lora(l2, model, rank=2, conv_rank=2, seed=11, dtype="fp32", scale=0.3)
    cat = tmp_path / "cat.safetensors"
    res = merge_loras([LoraSpec(l1, 0.5, 0.5), LoraSpec(l2, 1.0, 1.0, "OUT=1")], cat, dtype="fp32")
    assert set(res.ranks.values()) <= {2, 3, 4, 5}
    o_sum, o_cat = tmp_path / "sum.safetensors", tmp_path / "cat-applied.safetensors"
    apply_loras(model, [LoraSpec(l1, 0.5, 0.5), LoraSpec(l2, 1.0, 1.0, "OUT=1")], o_sum, dtype="fp32")
    apply_loras(model, [LoraSpec(cat)], o_cat, dtype="fp32")
    s, c = load_file(str(o_sum)), load_file(str(o_cat))
    assert max(float((s[k] - c[k]).abs().max()) for k in s) < 1e-5
    svd = tmp_path / "svd.safetensors"
    merge_loras([LoraSpec(l1, 0.5, 0.5), LoraSpec(l2)], svd, rank=2, dtype="fp32")
    with open_lora(svd) as lf:
        assert {lf.rank(m) for m in lf.modules.values()} <= {1, 2}


def test_resize_to_rank_and_energy(sd1_lora, tmp_path) -> None:
    model, lp, _ = sd1_lora
    same = tmp_path / "same.safetensors"
    resize_lora(lp, same, rank=3, dtype="fp32")  # rank 3 = the LoRA's: the same ΔW
    o1, o2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    apply_loras(model, [LoraSpec(lp)], o1, dtype="fp32")
    apply_loras(model, [LoraSpec(same)], o2, dtype="fp32")
    x, y = load_file(str(o1)), load_file(str(o2))
    assert max(float((x[k] - y[k]).abs().max()) for k in x) < 1e-5
    low = resize_lora(lp, tmp_path / "r1.safetensors", rank=1)
    assert set(low.ranks.values()) == {1}
    assert all(0 < k / t < 1 for k, t in low.energy.values())
    e = resize_lora(lp, tmp_path / "e.safetensors", keep_energy=0.9)
    assert all(k / t >= 0.9 - 1e-9 for k, t in e.energy.values())
    with pytest.raises(BlockmergeError, match="--keep-energy"):
        resize_lora(lp, tmp_path / "bad.safetensors", keep_energy=1.5)


# --- inspection and CLI ----------------------------------------------------------------------------


def test_blocks_and_info_of_a_lora(sd1_lora, capsys) -> None:
    model, lp, sd = sd1_lora
    arch, shapes = _shapes(model)
    table = name_table(arch, shapes)
    counts: dict[str, int] = {}
    for k in sd:
        if k.endswith(".lora_up.weight"):
            b = arch.block_of(table.lookup(k[: -len(".lora_up.weight")]).key)
            counts[b] = counts.get(b, 0) + 1
    rep = lora_blocks(lp)  # without the model: the family from the names, full-size names
    assert rep.architecture == "SD1" and rep.matched == rep.modules
    assert {b.block: b.modules for b in rep.blocks if b.modules} == counts
    assert all(set(b.ranks) <= {2, 3} for b in rep.blocks)
    assert main(["blocks", str(lp), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["architecture"] == "SD1" and sum(b["modules"] for b in data["blocks"]) == sum(counts.values())
    assert main(["info", str(lp)]) == 0
    text = capsys.readouterr().out
    assert "LoRA for:     SD1" in text and "Lora hash:" in text


def test_cli_apply_extract_merge_resize(tmp_path, capsys) -> None:
    lp = tmp_path / "x.safetensors"
    assert main(["lora", "extract", "tiny-b", "tiny-a", "-o", str(lp), "--rank", "4", "--conv-rank", "2", "-q"]) == 0
    out = tmp_path / "baked.safetensors"
    assert main(["lora", "apply", "tiny-a", f"{lp}:0.8:OUTALL", "-o", str(out), "-q"]) == 0
    assert out.stat().st_size > 1_000_000
    # a LoRA name looked up in --lora-dir, and the resize and merge commands
    assert main(["lora", "apply", "tiny-a", "x:1", "--lora-dir", str(tmp_path), "-o", str(tmp_path / "b2.safetensors"),
                 "-q"]) == 0
    assert main(["lora", "resize", str(lp), "-o", str(tmp_path / "r.safetensors"), "--rank", "2", "-q"]) == 0
    assert main(["lora", "merge", f"{lp}:0.5", str(tmp_path / "r.safetensors"), "-o", str(tmp_path / "m.safetensors"),
                 "-q"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("argv,msg", [
    (["lora", "apply", "{model}", "nope.safetensors", "-o", "o.safetensors"], "no such file"),
    (["lora", "apply", "{model}", "{lora}:abc", "-o", "o.safetensors"], "strength: 'abc' is not a number"),
    (["lora", "apply", "{model}", "{lora}:1:IN99=1", "-o", "o.safetensors"], "unknown block"),
    (["lora", "apply", "{model}", "{model}", "-o", "o.safetensors"], "not a LoRA"),
    (["lora", "apply", "{model}", "{xl_lora}", "-o", "o.safetensors"], "it is a LoRA for Stable Diffusion XL"),
    (["lora", "apply", "tiny-a", "{lora}", "-o", "o.safetensors"], "for another model"),
    (["lora", "apply", "{model}", "{lora}", "-o", "{lora}", "--overwrite"], "input"),
    (["lora", "resize", "{lora}", "-o", "o.safetensors"], "--rank, --keep-energy"),
    (["lora", "extract", "tiny-b", "tiny-a", "-o", "o.safetensors", "--rank", "0"], "--rank"),
    (["lora"], "give a command"),
])
def test_bad_lora_input_is_one_line(argv, msg, tmp_path, sd1_lora, tiny_sdxl_paths, capsys, monkeypatch) -> None:
    model, lp, _ = sd1_lora
    xl = tmp_path / "xl.safetensors"
    write_synthetic_lora(xl, tiny_sdxl_paths[0], rank=2)
    before = lp.read_bytes()
    monkeypatch.chdir(tmp_path)
    args = [a.format(lora=lp, model=model, xl_lora=xl) for a in argv]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and msg in err and err.count("\n") == 1 and "Traceback" not in err
    assert lp.read_bytes() == before and not (tmp_path / "o.safetensors").exists()


def test_unmatched_modules_are_warned_with_their_count(sd1_lora, tmp_path) -> None:
    model, lp, sd = sd1_lora
    extra = dict(sd)
    extra["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(1, 4)
    extra["lora_unet_not_a_module.lora_up.weight"] = torch.zeros(4, 1)
    extra["something_else"] = torch.zeros(1)
    p = tmp_path / "x.safetensors"
    save_file(extra, str(p))
    res = apply_loras(model, [LoraSpec(p)], tmp_path / "o.safetensors")
    assert any("1 of" in w and "not_a_module" in w for w in res.warnings)
    assert any("1 keys are no LoRA module" in w for w in res.warnings)


def test_parse_lora_arg_splits_on_the_file(tmp_path) -> None:
    d = tmp_path / "we:ird"
    d.mkdir()
    f = d / "a.safetensors"
    f.write_bytes(b"x")
    spec = parse_lora_arg(f"{f}:0.5:IN04:attn2:0")
    assert spec.path == f and spec.unet == 0.5 and spec.blocks == "IN04:attn2:0"
    assert parse_lora_arg(str(f)).unet == 1.0
    assert parse_lora_arg("a:2", d).path == f


def test_bad_lora_file_kinds(tmp_path) -> None:
    p = tmp_path / "empty.safetensors"
    save_file({"weird": torch.zeros(2)}, str(p))
    with pytest.raises(CheckpointError, match="not a LoRA"):
        open_lora(p)
    q = tmp_path / "badshape.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 3),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(5, 2)}, str(q))
    with pytest.raises(CheckpointError, match="1 have its names but other shapes"):
        apply_loras(resolve_model("tiny-a"), [LoraSpec(q)], tmp_path / "o.safetensors")


def test_sd2_lora_is_told_from_sd1_by_shapes_and_metadata(tmp_path) -> None:
    """Full-size SD1 and SD2 LoRAs share every name; the 1024-wide cross-attention (or kohya's
    ss_v2 when the shapes cannot tell) tells them apart."""
    from blockmerge.lora.inspect import detect_lora_family

    for arch in (SD1, SD2):
        table = family_table(arch)
        names = [n for n in table.targets if n.startswith("lora_unet_down_blocks") and "attn2_to_k" in n][:3]
        sd = {}
        for n in names:
            t = table.lookup(n)
            sd[n + ".lora_down.weight"] = torch.zeros(2, t.shape[1])
            sd[n + ".lora_up.weight"] = torch.zeros(t.shape[0], 2)
        p = tmp_path / f"{arch.name}.safetensors"
        save_file(sd, str(p))
        with open_lora(p) as lf:
            assert detect_lora_family(lf)[0] is arch
        # names shared by both (self-attention) and no metadata: the first family; ss_v2 says SD2
        shared = {k: v for k, v in sd.items()}
        shared = {n.replace("attn2_to_k", "attn1_to_q") + s: torch.zeros(2, 320) if s.endswith("down.weight")
                  else torch.zeros(320, 2) for n in names for s in (".lora_down.weight", ".lora_up.weight")}
        q = tmp_path / f"{arch.name}-shared.safetensors"
        save_file(shared, str(q), metadata={"ss_v2": str(arch is SD2)})
        with open_lora(q) as lf:
            assert detect_lora_family(lf)[0] is arch


def test_baked_and_merged_files_keep_model_as_modelspec(tmp_path) -> None:
    """The bundled 64 px models' modelspec (resolution, prediction type) carries over to a bake and a
    merge, so the result loads at 64 px like its parent; title and description are not copied."""
    from blockmerge.generation.loader import load_pipeline
    from blockmerge.merge import merge

    a, b = resolve_model("tiny-a"), resolve_model("tiny-b")
    lp = tmp_path / "x.safetensors"
    extract_lora(b, a, lp, rank=2)
    baked, merged = tmp_path / "baked.safetensors", tmp_path / "merged.safetensors"
    apply_loras(a, [LoraSpec(lp)], baked)
    merge([a, b], merged, alpha=0.5)
    for out in (baked, merged):
        meta = open_lora_meta(out)
        assert meta["modelspec.resolution"] == "64x64" and meta["modelspec.prediction_type"] == "epsilon"
        assert "modelspec.title" not in meta
        assert load_pipeline(out, device="cpu").resolution == 64


def _mix_recipe(model: Path, b: Path, lora: Path, loras: str | None = None) -> str:
    """A recipe's inputs (A, B, the LoRA as ``style``) and step ``mix`` (A and B at 0.3), then, given
    ``loras`` (one inline table), step ``styled``: the LoRA baked into ``mix``. Outputs are the caller's."""
    text = (f'version = 1\n[inputs]\nA = "{model}"\nB = "{b}"\nstyle = "{lora}"\n'
            '[[steps]]\nname = "mix"\nmodels = ["A", "B"]\nalpha = 0.3\n')
    if loras is not None:
        text += f'[[steps]]\nname = "styled"\nmodels = ["mix"]\nloras = [{loras}]\n'
    return text


def test_recipe_lora_step_bakes_as_lora_apply_and_round_trips(sd1_lora, tiny_sd1_paths, tmp_path) -> None:
    import tomllib

    from blockmerge.recipes import embedded_recipe, recipe_from_text, run_recipe

    model, lp, _ = sd1_lora
    b = tiny_sd1_paths[1]
    text = _mix_recipe(model, b, lp, '{ lora = "style", strength = 0.8, te = 0.5, blocks = "OUTD" }') + (
        '[[outputs]]\nstep = "styled"\npath = "out.safetensors"\ndtype = "fp32"\n')
    (out,) = run_recipe(recipe_from_text(text, tmp_path))
    # the same as merging to a file and baking the LoRA into it
    mixed = tmp_path / "mix.safetensors"
    from blockmerge.merge import merge

    merge([model, b], mixed, alpha=0.3, dtype="fp32")
    ref = tmp_path / "ref.safetensors"
    apply_loras(mixed, [LoraSpec(lp, 0.5, 0.8, "OUTD")], ref, dtype="fp32")
    x, y = load_file(str(out.output)), load_file(str(ref))
    assert all(torch.equal(x[k], y[k]) for k in x)
    meta = json.loads(open_lora_meta(out.output)["blockmerge"])
    assert meta["method"] == "lora" and meta["loras"][0]["te"] == 0.5
    from blockmerge.lora.library import lora_hash  # recorded as lora apply records it, not the placeholder

    assert meta["loras"][0]["lora_hash"] == lora_hash(lp) != "0" * 12
    (baked,) = json.loads(open_lora_meta(ref)["blockmerge"])["loras"]
    assert {**meta["loras"][0], "name": None} == {**baked, "name": None}  # named "style" in the recipe
    assert {i["role"] for i in meta["inputs"]} == {"A", "B", "style"}
    # the embedded recipe says what ran, reads back, and reruns to the same bytes
    emb = embedded_recipe(out.output)
    step = tomllib.loads(emb)["steps"][1]
    assert step["loras"][0]["lora"] == "style" and step["loras"][0]["strength"] == 0.8
    again_dir = tmp_path / "again"
    again_dir.mkdir()
    (again,) = run_recipe(recipe_from_text(emb, tmp_path), output=again_dir / "out.safetensors")
    assert again.output.read_bytes() == out.output.read_bytes()


def test_recipe_lora_steps_get_the_compute_bound_worker_default(sd1_lora, tiny_sd1_paths, tmp_path, monkeypatch) -> None:
    """A recipe output whose chain bakes a LoRA asks for ``lora apply``'s worker default (its matmuls
    are compute-bound); a plain merge recipe for the plain one. The bytes do not depend on it."""
    from blockmerge.merge import executor
    from blockmerge.recipes import recipe_from_text, run_recipe

    asked: list[bool] = []
    real = executor.default_workers

    def spy(compute_bound: bool = False, hashing: bool = True) -> int:
        asked.append(compute_bound)
        return real(compute_bound, hashing)

    monkeypatch.setattr(executor, "default_workers", spy)
    model, lp, _ = sd1_lora
    outs = {}
    for name, text in (("plain", _mix_recipe(model, tiny_sd1_paths[1], lp)),
                       ("lora", _mix_recipe(model, tiny_sd1_paths[1], lp, '{ lora = "style", strength = 0.8 }'))):
        step = "styled" if name == "lora" else "mix"
        d = tmp_path / name
        d.mkdir()
        recipe = recipe_from_text(text + f'[[outputs]]\nstep = "{step}"\npath = "o.safetensors"\n', d)
        (outs[name],) = run_recipe(recipe)
        (again,) = run_recipe(recipe, output=d / "t1.safetensors", threads=1)
        assert again.output.read_bytes() == outs[name].output.read_bytes()
    assert asked == [False, True]


@pytest.mark.parametrize("step,msg", [
    ('models = ["A", "B"]\nloras = [{ lora = "style" }]', "takes one model"),
    ('models = ["A"]\nalpha = 0.5\nloras = [{ lora = "style" }]', "takes no alpha"),
    ('models = ["A"]\nloras = [{ lora = "nope" }]', "is not an input"),
    ('models = ["A"]\nloras = [{ lora = "style", blocks = "IN99=1" }]', "unknown block"),
])
def test_recipe_lora_step_errors(sd1_lora, tiny_sd1_paths, tmp_path, step, msg) -> None:
    from blockmerge.recipes import recipe_from_text, run_recipe

    model, lp, _ = sd1_lora
    text = (f'version = 1\n[inputs]\nA = "{model}"\nB = "{tiny_sd1_paths[1]}"\nstyle = "{lp}"\n'
            f'[[steps]]\n{step}\n[[outputs]]\npath = "o.safetensors"\n')
    with pytest.raises(BlockmergeError, match=msg):
        run_recipe(recipe_from_text(text, tmp_path))
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("arch", [SD1, SDXL], ids=lambda a: a.name)
@pytest.mark.parametrize("conv", [False, True])
def test_extract_targets_are_kohyas_module_classes(arch, conv) -> None:
    """The modules extract writes are the Linear / Conv2d layers inside the classes kohya's LoRA
    network targets (Transformer2DModel; with a conv rank also ResnetBlock2D, Downsample2D,
    Upsample2D), read off diffusers' own model built on the meta device."""

    from blockmerge.architectures.ldm_names import unet_diffusers_to_ldm_name
    from blockmerge.lora.extract import kohya_modules

    layout, table, cfg, unet = _meta_unet(arch)
    classes = {"Transformer2DModel"} | ({"ResnetBlock2D", "Downsample2D", "Upsample2D"} if conv else set())
    expect = set()
    for path, mod in unet.named_modules():
        if type(mod).__name__ in classes:
            for cname, child in mod.named_modules():
                if isinstance(child, torch.nn.Linear | torch.nn.Conv2d):
                    full = f"{path}.{cname}" if cname else path
                    expect.add(unet_diffusers_to_ldm_name(full + ".weight", cfg))
    got = {m.target.key for m in kohya_modules(arch, layout, table, conv=conv) if not m.text_encoder}
    assert got == expect and len(got) > 100


def test_flux_kohya_lora_by_block_with_lbws_61_values(tmp_path) -> None:
    """A kohya Flux LoRA (lora_unet_double_blocks_N_..., lora_te1_ CLIP) with LoRA Block Weight's
    61-value Flux list: only the blocks given a value change, and by exactly that share."""
    model = write_synthetic(tmp_path / "flux.safetensors", "FLUX", "tiny", seed=1, dtype=torch.float32)
    arch, shapes = _shapes(model)
    sd = synthetic_lora(arch, shapes, rank=2, seed=8, scale=0.3)
    assert any(k.startswith("lora_unet_double_blocks_") for k in sd) and any(k.startswith("lora_te1_") for k in sd)
    lp = tmp_path / "flux-lora.safetensors"
    save_file(sd, str(lp))
    ids = ["CLIP", "T5", "IN", *(f"D{i:02d}" for i in range(19)), *(f"S{i:02d}" for i in range(38)), "OUT"]
    values = {"CLIP": 0.0, "D00": 1.0, "S05": 0.5}
    spec = ",".join(str(values.get(i, 0.0)) for i in ids)
    out = tmp_path / "o.safetensors"
    apply_loras(model, [LoraSpec(lp, 1.0, 1.0, spec)], out, dtype="fp32")
    exp = _expected(model, sd, lambda b: values.get(b, 0.0))
    got, a = load_file(str(out)), load_file(str(model))
    changed = {k for k in a if not torch.equal(a[k], got[k])}
    assert changed and {arch.block_of(k) for k in changed} == {"D00", "S05"}
    assert max(float((got[k].double() - exp[k]).abs().max()) for k in a) < 1e-5


# ---- malformed LoRAs and arguments (adversarial probe, session 6) --------------------------------


def _outline_lora() -> dict[str, torch.Tensor]:
    from blockmerge.models import find_bundled_lora

    return load_file(str(find_bundled_lora("tiny-b-outline")))


def _corrupt(sd: dict[str, torch.Tensor], how: str, rng) -> tuple[dict[str, torch.Tensor], str]:
    """A copy of a LoRA with one module (picked by ``rng``) broken in way ``how``; its name."""
    sd = {k: v.clone() for k, v in sd.items()}
    mods = sorted({k.rsplit(".", 2)[0] for k in sd if k.endswith(".lora_down.weight")})
    m = rng.choice(mods)
    up, down = sd[f"{m}.lora_up.weight"], sd[f"{m}.lora_down.weight"]
    r = down.shape[0]
    if how == "rank mismatch":
        sd[f"{m}.lora_down.weight"] = down[: rng.randint(1, r - 1)].contiguous()
    elif how == "zero rank":
        sd[f"{m}.lora_down.weight"] = down[:0].contiguous()
        sd[f"{m}.lora_up.weight"] = up[:, :0].contiguous()
    elif how == "alpha of several values":
        sd[f"{m}.alpha"] = torch.ones(rng.randint(2, 5))
    elif how in ("nan alpha", "inf alpha"):
        sd[f"{m}.alpha"] = torch.tensor(float("nan") if how == "nan alpha" else float("-inf"))
    elif how == "nan factor":
        flat = up.reshape(-1)
        flat[rng.randrange(flat.numel())] = float("nan")
    return sd, m


MALFORMED = ["rank mismatch", "zero rank", "alpha of several values", "nan alpha", "inf alpha"]


@pytest.mark.parametrize("how", MALFORMED)
def test_a_malformed_module_is_refused_by_every_lora_command_naming_file_and_module(tmp_path, capsys, how) -> None:
    """Factors that cannot make a ΔW, or a scale that is not one finite number, in a random module:
    opening the LoRA names the file and the module, and apply, merge (both modes), resize, blocks,
    info and an in-place sweep all stop with that one-line error (exit 2), writing nothing. Before,
    some crashed deep in their arithmetic ("internal error") and merge wrote a broken LoRA."""
    import random

    from blockmerge.lora.formats import open_lora

    rng = random.Random(how)
    sd, module = _corrupt(_outline_lora(), how, rng)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(CheckpointError) as e:
        open_lora(bad)
    assert str(bad) in str(e.value) and module in str(e.value)
    out = tmp_path / "out"
    out.mkdir()
    for argv in (["lora", "apply", "tiny-a", bad, "-o", out / "a.safetensors"],
                 ["lora", "merge", "tiny-b-outline", bad, "-o", out / "m.safetensors"],
                 ["lora", "merge", "tiny-b-outline", bad, "--rank", "4", "-o", out / "m.safetensors"],
                 ["lora", "resize", bad, "--rank", "4", "-o", out / "r.safetensors"],
                 ["blocks", bad], ["info", bad, "--no-hash"],
                 ["sweep", "tiny-a", "--lora", bad, "-o", out / "s", "--prompt", "a red circle", "--steps", "1",
                  "--blocks", "IN01"]):
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("blockmerge: error: "), (argv, err)
        assert module in lines[0], (argv, err)
        assert list(out.iterdir()) == [], argv


def test_non_finite_factors_are_never_written_into_a_lora(tmp_path, capsys) -> None:
    """A NaN in a LoRA's factors: merging (concatenated or re-factored) and resizing refuse it, and
    write nothing; the LoRA writer itself refuses any non-finite tensor."""
    import random

    from blockmerge.lora.writer import write_lora
    from blockmerge.merge.executor import NonFiniteError

    rng = random.Random(7)
    for trial in range(3):
        sd, module = _corrupt(_outline_lora(), "nan factor", rng)
        bad = tmp_path / f"nan{trial}.safetensors"
        save_file(sd, str(bad))
        out = tmp_path / f"out{trial}"
        out.mkdir()
        for argv in (["lora", "merge", "tiny-b-outline", bad, "-o", out / "m.safetensors"],
                     ["lora", "merge", "tiny-b-outline", bad, "--rank", "4", "-o", out / "m.safetensors"],
                     ["lora", "resize", bad, "--rank", "4", "-o", out / "r.safetensors"]):
            code = main([str(a) for a in argv])
            err = capsys.readouterr().err
            assert code == 2 and "non-finite" in err and module in err and err.count("\n") == 1, (argv, err)
            assert list(out.iterdir()) == [], argv
    with pytest.raises(NonFiniteError, match="x.lora_up.weight"):
        write_lora(tmp_path / "w.safetensors", {"x.lora_up.weight": torch.tensor([[1.0, float("inf")]]),
                                                "x.lora_down.weight": torch.ones(2, 2)}, {})
    with pytest.raises(NonFiniteError, match="fp16"):  # finite in float32, inf once cast
        write_lora(tmp_path / "w.safetensors", {"x.lora_up.weight": torch.tensor([[1e6]])}, {})
    assert not (tmp_path / "w.safetensors").exists()


def test_lora_arguments_that_name_nothing_usable_are_clear_errors(tmp_path, capsys) -> None:
    """A folder or a FIFO given as a LoRA says what it is; --lora-dir must be a folder even when the
    LoRA is a path; merge's --conv-rank needs --rank; extract of two identical models has nothing to
    extract; extract's --device must be one this machine has."""
    import os

    folder = tmp_path / "adir"
    folder.mkdir()
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    out = tmp_path / "o.safetensors"
    cases = [
        (["lora", "apply", "tiny-a", folder, "-o", out], "is a folder, not a file"),
        (["lora", "apply", "tiny-a", f"{folder}:0.5", "-o", out], "is a folder, not a file"),
        (["lora", "merge", f"{fifo}:0.5", "tiny-b-outline", "-o", out], "FIFO"),
        (["lora", "apply", "tiny-a", "tiny-b-outline", "--lora-dir", tmp_path / "nodir", "-o", out],
         "--lora-dir"),
        (["lora", "merge", "tiny-b-outline", "tiny-b-outline", "--conv-rank", "4", "-o", out], "only with --rank"),
        (["lora", "extract", "tiny-a", "tiny-a", "--rank", "4", "-o", out], "nothing to extract"),
        (["lora", "extract", "tiny-b", "tiny-a", "--rank", "4", "--device", "bogus", "-o", out], "--device"),
    ]
    for argv, must in cases:
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and must in lines[0], (argv, err)
        assert not out.exists(), argv


def test_a_lora_with_non_finite_factors_in_a_prompt_is_named(tmp_path, capsys) -> None:
    """``<lora:NAME:1>`` whose factors hold NaN: generate stops with one line naming the LoRA's file
    (before: the sampler's "latents are not finite") and writes no image."""
    import random

    sd, _ = _corrupt(_outline_lora(), "nan factor", random.Random(3))
    loras = tmp_path / "loras"
    loras.mkdir()
    save_file(sd, str(loras / "bad.safetensors"))
    out = tmp_path / "gen"
    code = main(["generate", "tiny-a", "--prompt", "a red circle <lora:bad:1>", "--lora-dir", str(loras),
                 "-o", str(out), "--steps", "1", "--seed", "1", "-q"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "bad.safetensors" in lines[0] and "non-finite" in lines[0], err
    assert not out.exists() or not any(out.rglob("*.png"))
