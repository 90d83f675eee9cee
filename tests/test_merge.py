"""The merge engine on tiny checkpoints with the real SD1 / SD2 / SDXL layouts, checked against an
independent float64 computation from files loaded with the official safetensors library."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from blockmerge.architectures import SD1, SD2, SDXL, Architecture
from blockmerge.errors import BlockmergeError, CheckpointError
from blockmerge.io import sha256_file
from blockmerge.merge import merge, parse_weights

UNET = "model.diffusion_model."


def mbw_index(key: str, n_in: int, n_out: int) -> str:
    """The block of a key, written the way the Merge Block Weighted extension finds it (substring
    and regex search over the key), independently of blockmerge's own mapping."""
    if not key.startswith(UNET):
        return "BASE"
    if "time_embed" in key or "label_emb" in key:
        return "IN00"
    if f"{UNET}out." in key:
        return f"OUT{n_out - 1:02d}"
    m = re.search(r"\.input_blocks\.(\d+)\.", key)
    if m:
        return f"IN{int(m.group(1)):02d}"
    if re.search(r"\.middle_block\.(\d+)\.", key):
        return "M00"
    m = re.search(r"\.output_blocks\.(\d+)\.", key)
    if m:
        return f"OUT{int(m.group(1)):02d}"
    raise AssertionError(f"unexpected U-Net key {key}")


def expected(method: str, tensors: list[torch.Tensor], a: float, b: float) -> torch.Tensor:
    t = [x.double() for x in tensors]
    if method == "weighted_sum":
        return (1 - a) * t[0] + a * t[1]
    if method == "add_difference":
        return t[0] + a * (t[1] - t[2])
    if method == "scaled_sum":
        return a * t[0] + (b * t[1] if len(t) > 1 else 0)
    raise AssertionError(method)


def assert_fp16_close(got: torch.Tensor, want64: torch.Tensor, key: str) -> None:
    """fp16 output vs a float64 reference: equal up to fp16 rounding of the reference."""
    want = want64.to(torch.float16)
    diff = (got.double() - want.double()).abs()
    # One fp16 step at the value's magnitude (fp32 vs fp64 arithmetic may round the other way).
    tol = want.double().abs() * 2**-10 + 2**-24
    assert bool((diff <= tol).all()), f"{key}: max diff {diff.max().item()}"


SPEC_SD = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0,0.15,0.25,0.35,0.45,0.55,0.65,0.75,0.85,0.95,0.05,0.33,0.66,0.99,0.01,0.5"
SPEC_XL = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0,0.15,0.25,0.35,0.45,0.55,0.65,0.75,0.85,0.95"


def _arch_case(request: pytest.FixtureRequest, name: str) -> tuple[Architecture, tuple[Path, ...], str]:
    if name == "SD1":
        return SD1, request.getfixturevalue("tiny_sd1_paths"), SPEC_SD
    if name == "SD2":
        return SD2, request.getfixturevalue("tiny_sd2_paths"), SPEC_SD
    return SDXL, request.getfixturevalue("tiny_sdxl_paths"), SPEC_XL


@pytest.mark.parametrize("arch_name", ["SD1", "SD2", "SDXL"])
@pytest.mark.parametrize("method", ["weighted_sum", "add_difference", "scaled_sum"])
def test_every_method_on_every_architecture(request, tmp_path, arch_name, method):
    arch, paths, spec = _arch_case(request, arch_name)
    if method == "add_difference":
        if len(paths) < 3:
            paths = (paths[0], paths[1], request.getfixturevalue("tiny_sd2_c_path"))
        models = list(paths[:3])
    else:
        models = list(paths[:2])
    out = tmp_path / "out.safetensors"
    kwargs = {"beta": "0.5,IN01=0.25,OUT=0.7", "base_beta": None} if method == "scaled_sum" else {}
    res = merge(models, out, method=method, alpha=spec, base_alpha=0.4, **kwargs)
    assert res.architecture == arch.name
    inputs = [load_file(p) for p in models]
    got = load_file(out)
    assert set(got) == set(inputs[0])
    alphas = [float(x) for x in spec.split(",")]
    alpha_of = dict(zip(arch.block_ids, alphas, strict=True)) | {"BASE": 0.4}
    beta_w = parse_weights("0.5,IN01=0.25,OUT=0.7", arch, arg="--beta")
    seen_blocks = set()
    for key, g in got.items():
        ta = inputs[0][key]
        if not ta.is_floating_point() or key.endswith("position_ids"):
            assert torch.equal(g, ta), key
            continue
        block = mbw_index(key, arch.n_in, arch.n_out)
        seen_blocks.add(block)
        a = alpha_of[block]
        b = beta_w[block]
        assert g.dtype == torch.float16
        assert_fp16_close(g, expected(method, [t[key] for t in inputs], a, b), key)
    assert seen_blocks == set(arch.all_ids)


@pytest.fixture(scope="session")
def tiny_sd2_c_path(tmp_path_factory):
    from blockmerge.architectures.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("sd2c") / "c.safetensors", "SD2", "tiny", seed=3)


def test_scaled_sum_single_model_is_the_articles_experiment(tiny_sd1_paths, tmp_path):
    """α·A with IN04 at 0.75 and everything else at 1: only IN04 changes, the rest is bit-exact A."""
    a_path = tiny_sd1_paths[0]
    out = tmp_path / "in04.safetensors"
    merge([a_path], out, method="scaled_sum", alpha="IN04=0.75")
    a, got = load_file(a_path), load_file(out)
    changed = 0
    for key, g in got.items():
        if SD1.block_of(key) == "IN04" and g.is_floating_point():
            assert_fp16_close(g, a[key].double() * 0.75, key)
            changed += 1
        else:
            assert torch.equal(g, a[key]), key
    assert changed > 5


def test_weighted_sum_endpoints_reproduce_inputs_exactly(tiny_sd1_paths, tmp_path):
    a, b = tiny_sd1_paths[:2]
    merge([a, b], tmp_path / "a.safetensors", alpha=0)
    merge([a, b], tmp_path / "b.safetensors", alpha=1)
    ta, tb = load_file(a), load_file(b)
    oa, ob = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    for k in ta:
        assert torch.equal(oa[k], ta[k])
        if ta[k].is_floating_point() and not k.endswith("position_ids"):
            assert torch.equal(ob[k], tb[k])


def test_dtypes_and_fp32_arithmetic(tiny_sd1_paths, tmp_path):
    a, b = tiny_sd1_paths[:2]
    for dt, torch_dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out = tmp_path / f"o_{dt}.safetensors"
        merge([a, b], out, alpha=0.3, dtype=dt)
        got = load_file(out)
        ta, tb = load_file(a), load_file(b)
        key = f"{UNET}middle_block.1.proj_in.weight"
        assert got[key].dtype == torch_dt
        want = (0.7 * ta[key].double() + 0.3 * tb[key].double()).to(torch_dt)
        assert torch.allclose(got[key].double(), want.double(), rtol=1e-2 if dt == "bf16" else 1e-6, atol=1e-7)


def _edit(src: Path, dst: Path, fn) -> Path:
    sd = load_file(src)
    fn(sd)
    save_file(sd, dst)
    return dst


def test_inpainting_conv_in_merges_shared_channels(tiny_sd1_paths, tmp_path):
    key = f"{UNET}input_blocks.0.0.weight"

    def widen(sd):
        w = sd[key]
        extra = torch.full((w.shape[0], 5, *w.shape[2:]), 0.25, dtype=w.dtype)
        sd[key] = torch.cat([w, extra], dim=1)

    inpaint = _edit(tiny_sd1_paths[0], tmp_path / "inpaint.safetensors", widen)
    out = tmp_path / "o.safetensors"
    res = merge([inpaint, tiny_sd1_paths[1]], out, alpha=0.5)
    assert res.report.partial_channels == [key]
    a, b, got = load_file(inpaint), load_file(tiny_sd1_paths[1]), load_file(out)
    assert got[key].shape == a[key].shape
    assert_fp16_close(got[key][:, :4], 0.5 * a[key][:, :4].double() + 0.5 * b[key].double(), key)
    assert torch.equal(got[key][:, 4:], a[key][:, 4:])
    with pytest.raises(CheckpointError, match="must be model A"):
        merge([tiny_sd1_paths[1], inpaint], tmp_path / "x.safetensors", alpha=0.5)
    assert not (tmp_path / "x.safetensors").exists()


def test_other_shape_mismatch_names_the_key(tiny_sd1_paths, tmp_path):
    key = f"{UNET}middle_block.0.in_layers.2.weight"
    bad = _edit(tiny_sd1_paths[1], tmp_path / "bad.safetensors", lambda sd: sd.__setitem__(key, sd[key][:1].clone()))
    with pytest.raises(CheckpointError, match=re.escape(key)):
        merge([tiny_sd1_paths[0], bad], tmp_path / "x.safetensors", alpha=0.5)


def test_keys_only_in_a_kept_only_in_b_left_out(tiny_sd1_paths, tmp_path):
    ka = f"{UNET}output_blocks.3.0.skip_connection.weight"
    a = _edit(tiny_sd1_paths[0], tmp_path / "a.safetensors", lambda sd: sd.__setitem__("extra.only_a", torch.ones(3)))
    b = _edit(tiny_sd1_paths[1], tmp_path / "b.safetensors",
              lambda sd: (sd.__setitem__("extra.only_b", torch.ones(2)), sd.pop(ka)))
    res = merge([a, b], tmp_path / "o.safetensors", alpha=0.5)
    got = load_file(tmp_path / "o.safetensors")
    assert "extra.only_a" in got and "extra.only_b" not in got
    assert torch.equal(got[ka], load_file(a)[ka])  # missing in B: A's tensor, untouched
    assert res.report.only_in_others == ["extra.only_b"]
    assert any("only in B" in w for w in res.report.warnings)


def test_position_ids_copied_and_fixed(tiny_sd1_paths, tmp_path):
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"

    def breaks(sd):
        sd[key] = (torch.arange(77, dtype=torch.float32) * 0.9999).reshape(1, 77)

    a = _edit(tiny_sd1_paths[0], tmp_path / "broken.safetensors", breaks)
    res = merge([a, tiny_sd1_paths[1]], tmp_path / "o.safetensors", alpha=0.5)
    got = load_file(tmp_path / "o.safetensors")
    assert torch.equal(got[key], load_file(a)[key])  # never interpolated, copied from A as it is
    assert any("position_ids" in w for w in res.report.warnings)
    merge([a, tiny_sd1_paths[1]], tmp_path / "f.safetensors", alpha=0.5, fix_position_ids=True)
    fixed = load_file(tmp_path / "f.safetensors")[key]
    assert fixed.dtype == torch.int64 and torch.equal(fixed, torch.arange(77).reshape(1, 77))


def test_ema_dropped_unless_kept(tiny_sd1_paths, tmp_path):
    a = _edit(tiny_sd1_paths[0], tmp_path / "ema.safetensors",
              lambda sd: sd.__setitem__("model_ema.diffusion_modelinput_blocks00weight", torch.ones(4)))
    merge([a, tiny_sd1_paths[1]], tmp_path / "o.safetensors", alpha=0.5)
    assert not any(k.startswith("model_ema.") for k in load_file(tmp_path / "o.safetensors"))
    merge([a, tiny_sd1_paths[1]], tmp_path / "k.safetensors", alpha=0.5, keep_ema=True)
    assert "model_ema.diffusion_modelinput_blocks00weight" in load_file(tmp_path / "k.safetensors")


def test_bake_vae(tiny_sd1_paths, tmp_path):
    c = load_file(tiny_sd1_paths[2])
    vae = {k[len("first_stage_model."):]: v * 0 + 0.125 for k, v in c.items() if k.startswith("first_stage_model.")}
    save_file(vae, tmp_path / "vae.safetensors")
    merge(tiny_sd1_paths[:2], tmp_path / "o.safetensors", alpha=0.5, vae=tmp_path / "vae.safetensors")
    got = load_file(tmp_path / "o.safetensors")
    vk = [k for k in got if k.startswith("first_stage_model.")]
    assert len(vk) == len(vae) and all(torch.all(got[k] == 0.125) for k in vk)
    rec = json.loads(safe_open(tmp_path / "o.safetensors", "pt").metadata()["blockmerge"])
    assert rec["vae"]["name"] == "vae.safetensors"


def test_ckpt_input_and_output(tiny_sd1_paths, tiny_sd1_ckpt_path, tmp_path):
    """A .ckpt input gives the same merge as the same tensors in .safetensors; .ckpt output loads."""
    merge([tiny_sd1_ckpt_path, tiny_sd1_paths[1]], tmp_path / "from_ckpt.safetensors", alpha=0.3)
    merge([tiny_sd1_paths[0], tiny_sd1_paths[1]], tmp_path / "from_st.safetensors", alpha=0.3)
    x, y = load_file(tmp_path / "from_ckpt.safetensors"), load_file(tmp_path / "from_st.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    merge([tiny_sd1_paths[0], tiny_sd1_paths[1]], tmp_path / "o.ckpt", alpha=0.3)
    sd = torch.load(tmp_path / "o.ckpt", weights_only=True)["state_dict"]
    assert sd.keys() == y.keys() and all(torch.equal(sd[k], y[k]) for k in sd)


def test_metadata_round_trip(tiny_sd1_paths, tmp_path):
    a, b = tiny_sd1_paths[:2]
    out = tmp_path / "o.safetensors"
    res = merge([a, b], out, alpha="GRAD_V", base_alpha=0.25)
    meta = safe_open(out, "pt").metadata()
    assert meta == res.metadata
    rec = json.loads(meta["blockmerge"])
    assert rec["method"] == "weighted_sum" and rec["architecture"] == "SD1" and rec["dtype"] == "fp16"
    alpha = rec["params"]["alpha"]
    assert alpha["BASE"] == 0.25 and alpha["IN00"] == 1.0 and alpha["M00"] == 0.0
    assert [i["sha256"] for i in rec["inputs"]] == [sha256_file(a), sha256_file(b)]
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["primary_model_hash"] == sha256_file(a) and recipe["interp_method"] == "Weighted sum"
    models = json.loads(meta["sd_merge_models"])
    assert set(models) == {sha256_file(a), sha256_file(b)}
    assert models[sha256_file(a)]["name"] == a.name
    # A merge of a merge carries its parents' records along, as A1111 does.
    out2 = tmp_path / "o2.safetensors"
    merge([out, a], out2, alpha=0.5)
    models2 = json.loads(safe_open(out2, "pt").metadata()["sd_merge_models"])
    assert sha256_file(b) in models2 and models2[sha256_file(out)]["sd_merge_recipe"]["interp_method"] == "Weighted sum"


def test_output_bytes_do_not_depend_on_threads(tiny_sdxl_paths, tmp_path):
    a, b = tiny_sdxl_paths[:2]
    outs = []
    old = torch.get_num_threads()
    try:
        for i, (workers, torch_threads) in enumerate(((1, 1), (2, 2), (4, 1), (3, 2))):
            torch.set_num_threads(torch_threads)
            o = tmp_path / f"o{i}.safetensors"
            merge([a, b], o, alpha=SPEC_XL, base_alpha=0.3, threads=workers)
            outs.append(o.read_bytes())
    finally:
        torch.set_num_threads(old)
    assert all(x == outs[0] for x in outs[1:])


def test_method_needs_right_number_of_models(tiny_sd1_paths, tmp_path):
    with pytest.raises(BlockmergeError, match="needs 3 models"):
        merge(tiny_sd1_paths[:2], tmp_path / "o.safetensors", method="add_difference", alpha=0.5)
    with pytest.raises(BlockmergeError, match="needs 2 models"):
        merge(tiny_sd1_paths[:1], tmp_path / "o.safetensors", alpha=0.5)
    with pytest.raises(BlockmergeError, match="--beta: weighted_sum: unknown parameter .beta."):
        merge(tiny_sd1_paths[:2], tmp_path / "o.safetensors", alpha=0.5, beta=0.5)


def test_slicing_does_not_change_a_byte(tiny_sd1_paths, tmp_path, monkeypatch):
    """Large tensors are streamed in slices through reused buffers; with slices far smaller than the
    tensors (and an odd size, so slices straddle rows) the file is the same as whole-tensor merging."""
    from blockmerge.merge import executor

    a, b, c = tiny_sd1_paths
    outs = {}
    for name, slice_size in (("whole", 1 << 30), ("sliced", 997)):
        monkeypatch.setattr(executor, "SLICE", slice_size)
        for method, models in (("weighted_sum", [a, b]), ("add_difference", [a, b, c])):
            o = tmp_path / f"{name}-{method}.safetensors"
            merge(models, o, method=method, alpha=SPEC_SD, base_alpha=0.2, threads=3)
            outs[(name, method)] = o.read_bytes()
    assert outs[("whole", "weighted_sum")] == outs[("sliced", "weighted_sum")]
    assert outs[("whole", "add_difference")] == outs[("sliced", "add_difference")]


def test_a_copied_slice_is_read_straight_into_the_output_buffer(tiny_sd1_paths):
    """The executor hands a task's output buffer to the sources (``Scratch.dest``): a file read that is
    the result as it is lands there, once per task; a second read of the task gets its own buffer."""
    from blockmerge.merge.nodes import FileSource, Scratch

    src = FileSource(tiny_sd1_paths[0])
    try:
        key = next(k for k in src.keys() if src.info(k).dtype.is_floating_point and len(src.info(k).shape) == 4)
        dt = src.info(key).dtype
        other = torch.float32 if dt != torch.float32 else torch.float16
        n = 1
        for d in src.info(key).shape:
            n *= d
        scratch = Scratch(64)
        dest = torch.empty(n, dtype=dt)
        scratch.dest = dest[: n - 3]
        first = src.get_range(key, 3, n, scratch)
        assert first.data_ptr() == dest.data_ptr() and scratch.dest is None
        second = src.get_range(key, 3, n, scratch)
        assert second.data_ptr() != dest.data_ptr() and torch.equal(first, second)
        assert torch.equal(first, src.get(key).reshape(-1)[3:])
        scratch.dest = torch.empty(n - 3, dtype=other)  # another dtype: not the result as it is
        assert src.get_range(key, 3, n, scratch).data_ptr() != scratch.dest.data_ptr()
    finally:
        src.close()


@pytest.mark.parametrize("cores,plain,compute", [(1, 1, 1), (2, 1, 2), (3, 2, 2), (16, 2, 2)])
def test_default_workers_leave_a_core_to_the_hasher_unless_compute_bound(monkeypatch, cores, plain, compute):
    """Plain merges whose inputs are hashed meanwhile: cores - 1 workers, at most 2; compute-bound
    sources (LoRA products), or nothing to hash: every core, at most 2."""
    import os

    from blockmerge.merge.executor import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_workers() == plain
    assert default_workers(compute_bound=True) == compute
    assert default_workers(hashing=False) == compute == default_workers(compute_bound=True, hashing=False)


def test_a_merge_leaves_a_core_to_hashing_only_when_an_input_is_not_in_the_hash_cache(
        tiny_sd1_paths, tmp_path, monkeypatch):
    """The worker count write_hashed picks: with an empty hash cache a plain merge leaves a core to
    the hasher; once both inputs' hashes are cached it uses every core; a LoRA apply always does.
    The bytes are the same either way."""
    import os

    from blockmerge.io.hashes import cached_hashes
    from blockmerge.merge import executor

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setenv("BLOCKMERGE_CACHE", str(tmp_path / "cache"))
    used: list[int] = []
    real = executor.write_source

    def spy(*args, **kw):
        used.append(kw["threads"])
        return real(*args, **kw)

    monkeypatch.setattr(executor, "write_source", spy)
    a, b, _ = tiny_sd1_paths
    assert cached_hashes(a) is None and cached_hashes(b) is None
    first = executor.merge([a, b], tmp_path / "m1.safetensors", alpha=0.4).output
    assert cached_hashes(a) is not None and cached_hashes(b) is not None  # hashed by that merge
    again = executor.merge([a, b], tmp_path / "m2.safetensors", alpha=0.4).output
    c = tmp_path / "c.safetensors"
    c.write_bytes(b.read_bytes())  # same bytes, not in the cache
    third = executor.merge([a, c], tmp_path / "m3.safetensors", alpha=0.4).output
    assert used == [1, 2, 1]
    assert first.read_bytes() == again.read_bytes()
    x, y = load_file(first), load_file(third)  # c is b under another name: the tensors, not the metadata
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_lora_apply_and_merge_write_the_same_bytes_for_any_worker_count(tiny_sd1_paths, tmp_path):
    """The default worker count is a speed choice only: outputs never depend on it."""
    from blockmerge.lora import LoraSpec, apply_loras
    from blockmerge.models import find_bundled_lora, resolve_model

    lora = find_bundled_lora("tiny-b-outline")
    assert lora is not None
    outs = [apply_loras(resolve_model("tiny-a"), [LoraSpec(lora, 0.7, 0.7)], tmp_path / f"l{t}.safetensors",
                        threads=t).output.read_bytes() for t in (None, 1, 2)]
    assert outs[0] == outs[1] == outs[2]
    outs = [merge(list(tiny_sd1_paths[:2]), tmp_path / f"m{t}.safetensors", alpha=0.3, threads=t).output.read_bytes()
            for t in (None, 1, 2)]
    assert outs[0] == outs[1] == outs[2]
