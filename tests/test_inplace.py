"""In-place block edits on a loaded pipeline: the mapping, bypass exactness, restore, and agreement
with ``blockmerge merge`` to a file (SD1 and SDXL tiny layouts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from blockmerge.architectures import BASE, SD1, SDXL
from blockmerge.architectures.ldm_names import unet_diffusers_to_ldm_name
from blockmerge.errors import BlockmergeError
from blockmerge.experiments.inplace import BypassEdit, InPlaceModel, MergeEdit
from blockmerge.experiments.sweep import swap_variants
from blockmerge.generation.generate import GenerationParams, generate
from blockmerge.generation.loader import load_pipeline
from blockmerge.merge import merge, parse_weights

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def sd1(tiny_sd1_paths):
    return load_pipeline(tiny_sd1_paths[0], device="cpu")


@pytest.fixture(scope="module")
def sd1_b(tiny_sd1_paths):
    return load_pipeline(tiny_sd1_paths[1], device="cpu")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_paths):
    return load_pipeline(tiny_sdxl_paths[0], device="cpu")


@pytest.fixture(scope="module")
def sdxl_b(tiny_sdxl_paths):
    return load_pipeline(tiny_sdxl_paths[1], device="cpu")


def _state(ipm: InPlaceModel) -> dict[str, torch.Tensor]:
    return {q: p.detach().clone() for q, p in ipm.params.items()}


def _same(ipm: InPlaceModel, ref: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, ref[q]) for q, p in ipm.params.items())


@pytest.mark.parametrize("which", ["sd1", "sdxl"])
def test_block_map_covers_every_parameter_once_and_agrees_with_the_ldm_side(which, request) -> None:
    loaded = request.getfixturevalue(which)
    arch = SD1 if which == "sd1" else SDXL
    ipm = InPlaceModel(loaded)
    assert list(ipm.map.blocks) == list(arch.all_ids)
    seen = [q for qs in ipm.map.blocks.values() for q in qs]
    assert len(seen) == len(set(seen)) == len(ipm.params)
    cfg = dict(loaded.pipeline.unet.config)
    for block, qs in ipm.map.blocks.items():
        for q in qs:
            if q.startswith("unet."):
                # The hand-written reverse names (checked against diffusers elsewhere) give the same block.
                assert arch.block_of(unet_diffusers_to_ldm_name(q.removeprefix("unet."), cfg)) == block
            else:
                assert block == BASE
    assert all(ipm.map.blocks[b] for b in arch.block_ids)  # no empty block
    assert any(q.startswith("vae.") for q in ipm.map.blocks[BASE])
    assert any(q.startswith("text_encoder.") for q in ipm.map.blocks[BASE])


def test_edit_changes_only_its_block_and_restores_bit_exactly_even_on_error(sd1) -> None:
    ipm = InPlaceModel(sd1)
    ref = _state(ipm)
    edit = MergeEdit("scaled_sum", {"alpha": parse_weights("IN04=0.75", SD1, keep_a=1.0)})
    assert edit.changed_blocks() == ["IN04"]
    in04 = set(ipm.map.blocks["IN04"])
    with ipm.applied(edit):
        for q, p in ipm.params.items():
            if q in in04:
                assert torch.equal(p, (ref[q] * 0.75).to(p.dtype)), q
            else:
                assert torch.equal(p, ref[q]), q
    assert _same(ipm, ref)
    with pytest.raises(RuntimeError, match="boom"), ipm.applied(BypassEdit("M00")):
        assert not _same(ipm, ref)
        raise RuntimeError("boom")
    assert _same(ipm, ref)


def _resnet_io(block: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, block.in_channels, 4, 4, generator=g)
    temb = torch.randn(2, block.time_emb_proj.in_features, generator=g)
    return x, temb


def test_ones_like_is_not_transparent_but_a_zeroed_residual_branch_is(sd1) -> None:
    """The article's first attempt, on a real diffusers ResBlock: all-ones weights sum the inputs."""
    ipm = InPlaceModel(sd1)
    unet = sd1.pipeline.unet
    block = unet.down_blocks[0].resnets[0]  # IN01's ResBlock (same width in and out)
    x, temb = _resnet_io(block)
    with torch.no_grad():
        saved = {n: p.clone() for n, p in block.named_parameters()}
        for p in block.parameters():
            p.copy_(torch.ones_like(p))
        y_ones = block(x, temb)
        for n, p in block.named_parameters():
            p.copy_(saved[n])
        assert (y_ones - x).abs().mean() > 10 * x.abs().mean()  # far from the identity
        with ipm.applied(BypassEdit("IN01")):
            assert torch.equal(block(x, temb), x)
            attn = unet.down_blocks[0].attentions[0]
            h = torch.randn(2, attn.config.in_channels, 4, 4)
            enc = torch.randn(2, 77, unet.config.cross_attention_dim)
            assert torch.equal(attn(h, encoder_hidden_states=enc).sample, h)


@pytest.mark.parametrize("which", ["sd1", "sdxl"])
def test_bypassed_middle_block_is_the_exact_identity(which, request) -> None:
    loaded = request.getfixturevalue(which)
    ipm = InPlaceModel(loaded)
    unet = loaded.pipeline.unet
    plan = ipm.bypass_plan("M00")
    assert plan.exact and plan.steps
    c = unet.config.block_out_channels[-1]
    x = torch.randn(2, c, 2, 2)
    temb = torch.randn(2, unet.time_embedding.linear_2.out_features)
    enc = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        assert not torch.equal(unet.mid_block(x, temb, encoder_hidden_states=enc), x)
        with ipm.applied(BypassEdit("M00")):
            assert torch.equal(unet.mid_block(x, temb, encoder_hidden_states=enc), x)


def test_bypass_plans_say_what_cannot_be_exact(sd1) -> None:
    ipm = InPlaceModel(sd1)
    unet = sd1.pipeline.unet
    exact = {b: ipm.bypass_plan(b).exact for b in SD1.block_ids}
    # Same-width ResBlocks and transformers: exact. conv_in, resampling, width-changing skips: not.
    assert [b for b, e in exact.items() if e] == ["IN01", "IN02", "IN05", "IN08", "IN10", "IN11", "M00"]
    assert "conv_in" in ipm.bypass_plan("IN00").describe()
    assert "time_embedding" in ipm.bypass_plan("IN00").describe()
    assert "conv_out" in ipm.bypass_plan("OUT11").describe()
    assert "skip projection" in ipm.bypass_plan("OUT03").describe()
    # The down-sampling conv keeps every second pixel: nearest-neighbour down-sampling.
    down = unet.down_blocks[0].downsamplers[0]
    x = torch.randn(1, down.channels, 8, 8)
    with torch.no_grad(), ipm.applied(BypassEdit("IN03")):
        assert torch.equal(down(x), x[:, :, ::2, ::2])
        up = unet.up_blocks[0].upsamplers[0]
        assert ipm.map.blocks["OUT02"] and any("upsamplers" in q for q in ipm.map.blocks["OUT02"])
        h = torch.randn(1, up.channels, 2, 2)
    with torch.no_grad(), ipm.applied(BypassEdit("OUT02")):
        assert torch.equal(up(h), h.repeat_interleave(2, 2).repeat_interleave(2, 3))
    with torch.no_grad(), ipm.applied(BypassEdit("IN00")):
        lat = torch.randn(1, 4, 4, 4)
        feat = unet.conv_in(lat)
        assert torch.equal(feat[:, :4], lat) and not feat[:, 4:].any()


def test_donor_of_another_architecture_is_refused(sd1, sdxl) -> None:
    with pytest.raises(BlockmergeError, match="cannot be swapped"):
        InPlaceModel(sd1, {"x": sdxl})


def _gen(loaded, seeds=(1, 2)):
    params = GenerationParams(prompt="a red circle", steps=3, width=32, height=32)
    return generate(loaded, params, seeds=list(seeds))


CASES = {
    "sd1": (SD1, ["IN04", "M00", "OUT05"]),
    "sdxl": (SDXL, ["IN04", "M00", "OUT02"]),
}


@pytest.mark.parametrize("which", ["sd1", "sdxl"])
def test_in_place_variants_match_merge_to_a_file(which, request, tmp_path: Path) -> None:
    """Scale (scaled_sum) and swap (weighted_sum) in place == `blockmerge merge` + load that file."""
    arch, blocks = CASES[which]
    a = request.getfixturevalue(which)
    b = request.getfixturevalue(which + "_b")
    paths = request.getfixturevalue(f"tiny_{which}_paths")
    ipm = InPlaceModel(a, {"B": b})
    ref = _state(ipm)
    for i, block in enumerate(blocks):
        if i % 2 == 0:
            edit = MergeEdit("scaled_sum", {"alpha": parse_weights(f"{block}=0.75", arch, keep_a=1.0)})
            out = merge([paths[0]], tmp_path / f"{block}.safetensors", method="scaled_sum",
                        alpha=f"{block}=0.75", dtype="fp32")
        else:
            edit = swap_variants(arch, [block], "B")[0].edit
            out = merge([paths[0], paths[1]], tmp_path / f"{block}.safetensors", method="weighted_sum",
                        alpha=f"{block}=1", dtype="fp32")
        from_file = load_pipeline(out.output, device="cpu", hash_file=False)
        file_params = InPlaceModel(from_file).params
        with ipm.applied(edit):
            for q, p in ipm.params.items():
                assert torch.equal(p, file_params[q]), (block, q)
            inplace_imgs = _gen(a)
        file_imgs = _gen(from_file)
        for x, y in zip(inplace_imgs, file_imgs, strict=True):
            diff = np.abs(np.asarray(x.image, dtype=int) - np.asarray(y.image, dtype=int))
            assert diff.max() <= 1, (block, diff.max())
            assert torch.allclose(x.latent, y.latent, atol=1e-5), block
        assert _same(ipm, ref)
