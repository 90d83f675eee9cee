"""Every merge method against an independent float64 implementation written from its formula.

The references below are numpy, in float64, written from the definitions the methods cite
(supermerger, sd-meh, sd-mecha, mergekit, the TIES / DARE / Model Stock papers), not from
blockmerge's kernels: they share no code with them. Also here: whole-tensor methods are never
sliced (a slice smaller than the tensor would change norms, thresholds and filters), seeded
methods give the same bytes for any thread count and other bytes for another seed, and the
edge cases (zero and parallel tensors, all-zero task vectors, p = 0 and p near 1, k = 0 and 1).
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
from safetensors.torch import load_file

from blockmerge.architectures import SD1
from blockmerge.merge import TensorSource, write_source
from blockmerge.merge import executor as ex
from blockmerge.merge.declare import Context, Model, Param, derive_seed, merge_method, unregister
from blockmerge.merge.methods import METHODS
from blockmerge.merge.nodes import MergeNode
from blockmerge.merge.params import resolve_params

F64 = np.float64


# --- independent references (numpy float64) -------------------------------------------------------

def lerp(a, b, t):
    return a + t * (b - a)


def r_weighted_sum(a, b, alpha):
    return (1 - alpha) * a + alpha * b


def r_add_difference(a, b, c, alpha):
    return a + alpha * (b - c)


def r_scaled_sum(a, b=None, *, alpha, beta=0.0):
    return alpha * a + (beta * b if b is not None else 0.0)


def r_triple_sum(a, b, c, alpha, beta):
    return (1 - alpha - beta) * a + alpha * b + beta * c


def r_sum_twice(a, b, c, alpha, beta):
    return (1 - beta) * ((1 - alpha) * a + alpha * b) + beta * c


def r_n_average(*ms, w):
    return sum(wi * m for wi, m in zip(w, ms, strict=True)) / sum(w)


def r_difference(a, b):
    return a - b


def r_add_delta(a, d, alpha):
    return a + alpha * d


def r_train_difference(a, b, c, alpha):
    # supermerger: diff = B - C; scale = |B - A| / (|B - C| + |B - A|), 0 where that sum is 0;
    # new = sign(B - C) * scale * |B - C|; A + new * alpha * 1.8
    diff = b - c
    d0, d1 = np.abs(b - c), np.abs(b - a)
    s = d0 + d1
    scale = np.where(s != 0, d1 / np.where(s != 0, s, 1), 0.0)
    return a + np.sign(diff) * scale * np.abs(diff) * alpha * 1.8


def r_multiply_difference(a, b, c, alpha, beta):
    mag = np.abs(a - c) ** (1 - alpha) * np.abs(b - c) ** alpha
    return c + np.copysign(mag, (1 - beta) * a + beta * b - c)


def r_geometric_sum(a, b, alpha):
    return np.real(np.power(a.astype(np.complex128), 1 - alpha) * np.power(b.astype(np.complex128), alpha))


def r_slerp(a, b, alpha):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return lerp(a, b, alpha)
    dot = np.clip(np.sum(a * b) / (na * nb), -1, 1)
    om = np.arccos(dot)
    if abs(np.sin(om)) < 1e-8:
        return lerp(a, b, alpha)
    unit = (a / na * np.sin((1 - alpha) * om) + b / nb * np.sin(alpha * om)) / np.sin(om)
    return unit * lerp(na, nb, alpha)


def r_add_perpendicular(a, b, c, alpha):
    da, db = a - c, b - c
    n2 = np.sum(da * da)
    if n2 == 0:
        return a
    return a + alpha * (db - da * np.sum(da * db) / n2)


def r_smooth_add_difference(a, b, c, alpha):
    d = b - c
    return a + alpha * scipy.ndimage.gaussian_filter(scipy.ndimage.median_filter(d, size=3), sigma=1)


def r_top_k(d, k):
    n = d.size
    m = int(k * n)
    if m >= n:
        return d.copy()
    if m <= 0:
        return np.zeros_like(d)
    thr = np.sort(np.abs(d).ravel())[n - m]  # the m-th largest magnitude
    return np.where(np.abs(d) >= thr, d, 0.0)


def r_mix(deltas, w, count_signs):
    weighted = [wi * d for wi, d in zip(w, deltas, strict=True)]
    votes = sum(np.sign(x) for x in weighted) if count_signs else sum(weighted)
    majority = np.where(votes >= 0, 1.0, -1.0)
    masks = [np.sign(x) == majority for x in weighted]
    mixed = sum(x * mk for x, mk in zip(weighted, masks, strict=True))
    div = sum(wi * mk for wi, mk in zip(w, masks, strict=True)).astype(F64)
    div[div == 0] = 1.0
    return mixed / div


def r_ties(base, *ms, alpha, k, w, count_signs):
    return base + alpha * r_mix([r_top_k(m - base, k) for m in ms], w, count_signs)


def _dare_masks(shape, p, seed, key, n):
    # The documented stream: torch's CPU generator seeded with derive_seed(seed, key, model index).
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(derive_seed(seed, key, i))
        out.append((torch.rand(shape, generator=g, dtype=torch.float32) >= p).numpy())
    return out


def r_dare(base, *ms, alpha, p, w, seed, key):
    masks = _dare_masks(base.shape, p, seed, key, len(ms))
    return base + alpha * sum(wi * (m - base) * mk / (1 - p) for wi, m, mk in zip(w, ms, masks, strict=True))


def r_dare_ties(base, *ms, alpha, p, w, count_signs, seed, key):
    masks = _dare_masks(base.shape, p, seed, key, len(ms))
    deltas = [(m - base) * mk / (1 - p) for m, mk in zip(ms, masks, strict=True)]
    return base + alpha * r_mix(deltas, w, count_signs)


def r_model_stock(base, *ms):
    ds = [(m - base).ravel() for m in ms]
    n = len(ds)
    cos = [np.clip(np.dot(ds[i], ds[j]) / max(np.linalg.norm(ds[i]) * np.linalg.norm(ds[j]), 1e-6), -1, 1)
           for i in range(n) for j in range(i + 1, n)]
    c = np.mean(cos)
    t = n * c / (1 + (n - 1) * c)
    return t * sum(ms) / n + (1 - t) * base


def r_geometric_median(*ms, eps, maxiter, ftol):
    def avg(wt):
        return sum(wi * m for wi, m in zip(wt, ms, strict=True)) / np.sum(wt)

    ones = np.ones(len(ms))
    med = avg(ones)
    obj = np.mean([np.linalg.norm(m - med) for m in ms])
    for _ in range(maxiter):
        prev = obj
        wt = ones / np.maximum([np.linalg.norm(m - med) for m in ms], eps)
        med = avg(wt)
        obj = np.mean([np.linalg.norm(m - med) for m in ms])
        if abs(prev - obj) <= ftol * obj:
            break
    return med


# name -> (reference, number of operands, parameter values)
CASES = {
    "weighted_sum": (r_weighted_sum, 2, {"alpha": 0.3}),
    "add_difference": (r_add_difference, 3, {"alpha": 0.7}),
    "scaled_sum": (lambda a, b, alpha, beta: r_scaled_sum(a, b, alpha=alpha, beta=beta), 2, {"alpha": 0.75, "beta": 0.4}),
    "triple_sum": (r_triple_sum, 3, {"alpha": 0.25, "beta": 0.35}),
    "sum_twice": (r_sum_twice, 3, {"alpha": 0.4, "beta": 0.3}),
    "n_average": (lambda *m, w1, w2, w3: r_n_average(*m, w=[w1, w2, w3]), 3, {"w1": 1.0, "w2": 2.0, "w3": 0.5}),
    "difference": (r_difference, 2, {}),
    "add_delta": (r_add_delta, 2, {"alpha": 0.6}),
    "train_difference": (r_train_difference, 3, {"alpha": 0.8}),
    "multiply_difference": (r_multiply_difference, 3, {"alpha": 0.4, "beta": 0.6}),
    "geometric_sum": (r_geometric_sum, 2, {"alpha": 0.35}),
    "slerp": (r_slerp, 2, {"alpha": 0.3}),
    "add_perpendicular": (r_add_perpendicular, 3, {"alpha": 0.9}),
    "smooth_add_difference": (r_smooth_add_difference, 3, {"alpha": 0.5}),
    "ties": (lambda b, *m, alpha, k, w1, w2, w3, count_signs: r_ties(b, *m, alpha=alpha, k=k, w=[w1, w2, w3],
                                                                        count_signs=count_signs),
             4, {"alpha": 0.9, "k": 0.3, "w1": 1.0, "w2": 0.5, "w3": 2.0, "count_signs": 0}),
    "dare": (lambda b, *m, alpha, p, w1, w2, seed, key: r_dare(b, *m, alpha=alpha, p=p, w=[w1, w2], seed=seed, key=key),
             3, {"alpha": 0.8, "p": 0.6, "w1": 1.0, "w2": 0.7, "seed": 11}),
    "dare_ties": (lambda b, *m, alpha, p, w1, w2, w3, count_signs, seed, key: r_dare_ties(
        b, *m, alpha=alpha, p=p, w=[w1, w2, w3], count_signs=count_signs, seed=seed, key=key),
        4, {"alpha": 1.0, "p": 0.5, "w1": 1.0, "w2": 1.0, "w3": 0.5, "count_signs": 1, "seed": 5}),
    "model_stock": (r_model_stock, 4, {}),
    "geometric_median": (lambda *m, eps, maxiter, ftol: r_geometric_median(*m, eps=eps, maxiter=int(maxiter), ftol=ftol),
                         4, {"eps": 1e-6, "maxiter": 100, "ftol": 1e-20}),
}
# supermerger's cosine methods need model-wide statistics: tested over a whole model below.
MODEL_WIDE = {"add_cosine_a", "add_cosine_b"}
SHAPES = [(37,), (13, 7), (6, 5, 3, 3)]
KEY = "model.diffusion_model.input_blocks.4.1.proj_in.weight"


def test_every_method_has_a_reference() -> None:
    assert set(CASES) | MODEL_WIDE == set(METHODS)


def _operands(n: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    # related models (a shared base plus small changes), as real merges are
    return [base + 0.3 * torch.randn(shape, generator=g) for _ in range(n)]


def _run(name: str, ops: list[torch.Tensor], values: dict[str, float], key: str = KEY) -> torch.Tensor:
    m = METHODS[name]
    ctx = Context(key=key, seed=int(values.get("seed", 0)))
    return m.fn(ops, values, ctx)


def _reference(name: str, ops: list[torch.Tensor], values: dict[str, float], key: str = KEY) -> np.ndarray:
    ref, _, _ = CASES[name]
    arrs = [t.double().numpy() for t in ops]
    kw = dict(values)
    if name in ("dare", "dare_ties"):
        kw["key"] = key
    return ref(*arrs, **kw)


def _close(got: torch.Tensor, want: np.ndarray, what: str) -> None:
    got64 = got.double().numpy()
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got64, want, rtol=2e-5, atol=2e-5 * scale, err_msg=what)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(CASES))
def test_method_matches_float64_reference(name: str, shape: tuple[int, ...]) -> None:
    _, n, values = CASES[name]
    ops = _operands(n, shape, seed=len(name))
    before = [t.clone() for t in ops]
    got = _run(name, ops, values)
    assert all(torch.equal(a, b) for a, b in zip(ops, before, strict=True)), "fn must not modify its inputs"
    assert got.dtype == torch.float32 and tuple(got.shape) == shape
    _close(got, _reference(name, ops, values), name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_method_differs_from_its_inputs(name: str) -> None:
    """The reference comparison must be able to fail: the result is not simply an operand."""
    _, n, values = CASES[name]
    ops = _operands(n, (13, 7), seed=3)
    got = _run(name, ops, values)
    assert not any(torch.allclose(got, t) for t in ops)


def _model(seed: int, n_keys: int = 6) -> dict[str, torch.Tensor]:
    keys = [
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.input_blocks.4.0.in_layers.2.weight",
        "model.diffusion_model.middle_block.1.proj_out.bias",
        "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
        "first_stage_model.decoder.conv_in.weight",
    ][:n_keys]
    shapes = [(16, 8), (8, 4, 3, 3), (24,), (12, 10), (20, 6), (6, 4, 3, 3)]
    g = torch.Generator().manual_seed(100)
    base = {k: torch.randn(s, generator=g) for k, s in zip(keys, shapes, strict=False)}
    g2 = torch.Generator().manual_seed(seed)
    return {k: v + 0.5 * torch.randn(v.shape, generator=g2) for k, v in base.items()}


def r_cosine(models: list[dict[str, np.ndarray]], alpha: float, variant: str) -> dict[str, np.ndarray]:
    """supermerger's cosineA / cosineB over a whole model, written from its two stages."""
    a_sd, b_sd = models

    def norm0(x):
        n = np.sqrt(np.sum(x * x, axis=0, keepdims=True))
        return x / np.maximum(n, 1e-12)

    def cos0(x, y):
        num = np.sum(x * y, axis=0)
        den = np.maximum(np.sqrt(np.sum(x * x, axis=0)) * np.sqrt(np.sum(y * y, axis=0)), 1e-8)
        return num / den

    def combined(x, y):
        return (cos0(x, y) + np.sum(x * y) / (np.linalg.norm(x) * np.linalg.norm(y))) / 2

    sims = []
    for k in a_sd:
        if "first_stage_model" in k:
            continue
        a, b = a_sd[k], b_sd[k]
        sims.append(np.ravel(cos0(norm0(a), norm0(b)) if variant == "a" else combined(a, b)))
    s = np.concatenate(sims)
    s = s[~np.isnan(s)]
    s = s[~(s < np.percentile(s, 1, method="midpoint"))]
    s = s[~(s > np.percentile(s, 99, method="midpoint"))]
    lo, hi = s.min(), s.max()
    out = {}
    for k in a_sd:
        a, b = a_sd[k], b_sd[k]
        c = combined(norm0(a), norm0(b)) if variant == "a" else combined(a, b)
        kk = np.clip((c - lo) / (hi - lo) - (abs(alpha) if variant == "a" else alpha), 0, 1)
        out[k] = b * (1 - kk) + a * kk
    return out


@pytest.mark.parametrize("variant", ["a", "b"])
def test_cosine_methods_match_supermerger_over_a_whole_model(variant: str) -> None:
    sds = [_model(1), _model(2)]
    srcs = [TensorSource(sd, SD1, name=f"m{i}") for i, sd in enumerate(sds)]
    m = METHODS[f"add_cosine_{variant}"]
    pv = resolve_params(m, SD1, 2, {"alpha": 0.1})
    node = MergeNode(m, srcs, pv)
    want = r_cosine([{k: v.double().numpy() for k, v in sd.items()} for sd in sds], 0.1, variant)
    for k in sds[0]:
        _close(node.get(k), want[k], k)
    # the statistics are model-wide: the same tensor merged inside a different model changes
    b2 = dict(sds[1])
    key_te = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    b2[key_te] = sds[0][key_te].clone()  # one tensor identical in A and B: similarity 1 widens the range
    other = MergeNode(m, [TensorSource(sds[0], SD1), TensorSource(b2, SD1)], resolve_params(m, SD1, 2, {"alpha": 0.1}))
    assert other._ensure_stats() != node._ensure_stats()
    assert any(not torch.allclose(other.get(k), node.get(k)) for k in other.keys())


# --- never sliced -------------------------------------------------------------------------------

WHOLE = sorted(n for n, m in METHODS.items() if not m.elementwise)


def _write(source, path: Path, threads: int) -> dict[str, torch.Tensor]:
    write_source(source, path, dtype="fp32", threads=threads)
    return load_file(str(path))


@pytest.mark.parametrize("name", WHOLE)
def test_whole_tensor_methods_are_never_sliced(name: str, tmp_path: Path, monkeypatch) -> None:
    """With slices of 64 elements, a 40x9 tensor would be cut in six; the written result must still
    be the method on the whole tensor, bit for bit."""
    monkeypatch.setattr(ex, "SLICE", 64)
    n = CASES[name][1] if name in CASES else 2
    values = dict(CASES[name][2]) if name in CASES else {"alpha": 0.2}
    ops = _operands(n, (40, 9), seed=7)
    m = METHODS[name]
    extra = ["model.diffusion_model.input_blocks.2.1.proj_in.weight"]
    srcs = [TensorSource({KEY: t, extra[0]: t[:3] * (1 + i)}, SD1, name=f"op{i}") for i, t in enumerate(ops)]
    given = {k: v for k, v in values.items()}
    node = MergeNode(m, srcs, resolve_params(m, SD1, n, given))
    got = _write(node, tmp_path / "o.safetensors", threads=2)[KEY]
    whole = node.get(KEY)
    assert torch.equal(got, whole.float())
    if name in CASES:
        _close(got, _reference(name, ops, values), name)


@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if m.elementwise))
def test_elementwise_methods_give_the_same_bytes_sliced(name: str, tmp_path: Path, monkeypatch) -> None:
    _, n, values = CASES[name]
    ops = _operands(n, (40, 9), seed=9)
    m = METHODS[name]
    spaces = [r.space if r.space != "task" else "model" for r in m.roles(n)]
    srcs = [TensorSource({KEY: t}, SD1, name=f"op{i}", space=sp) for i, (t, sp) in enumerate(zip(ops, spaces, strict=True))]
    whole = _write(MergeNode(m, srcs, resolve_params(m, SD1, n, values)), tmp_path / "w.safetensors", 1)[KEY]
    monkeypatch.setattr(ex, "SLICE", 64)
    sliced = _write(MergeNode(m, srcs, resolve_params(m, SD1, n, values)), tmp_path / "s.safetensors", 3)[KEY]
    assert torch.equal(whole, sliced)


# --- seeds ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dare", "dare_ties"])
def test_seeded_methods_same_bytes_any_threads_other_bytes_other_seed(name: str, tmp_path: Path) -> None:
    _, n, values = CASES[name]
    sds = [{k: v for k, v in _model(s).items()} for s in range(n)]
    srcs = [TensorSource(sd, SD1, name=f"m{i}") for i, sd in enumerate(sds)]
    m = METHODS[name]

    def run(seed: int, threads: int, out: str) -> dict[str, torch.Tensor]:
        node = MergeNode(m, srcs, resolve_params(m, SD1, n, {**values, "seed": seed}))
        return _write(node, tmp_path / out, threads)

    one, other = run(3, 1, "a.safetensors"), run(4, 2, "c.safetensors")
    run(3, 3, "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    merged = [k for k in one if "first_stage" not in k]
    assert all(not torch.equal(one[k], other[k]) for k in merged)
    # each tensor's stream comes from its own name: two keys never share their drops
    k1, k2 = merged[0], merged[3]
    assert derive_seed(3, k1) != derive_seed(3, k2)


# --- edge cases ---------------------------------------------------------------------------------

def test_slerp_degenerate_angles_are_linear() -> None:
    a = torch.randn(50)
    for b in (a * 3.0, torch.zeros(50)):  # parallel; zero norm
        got = _run("slerp", [a, b], {"alpha": 0.25})
        assert torch.isfinite(got).all()
        assert torch.allclose(got, torch.lerp(a, b, 0.25), atol=1e-6)
    z = _run("slerp", [torch.zeros(5), torch.zeros(5)], {"alpha": 0.5})
    assert torch.equal(z, torch.zeros(5))


def test_add_perpendicular_without_a_direction_keeps_a() -> None:
    a, b = torch.randn(20), torch.randn(20)
    got = _run("add_perpendicular", [a, b, a.clone()], {"alpha": 1.0})  # A - C = 0
    assert torch.equal(got, a)


def test_perpendicular_component_is_orthogonal() -> None:
    a, b, c = _operands(3, (64,), seed=1)
    got = _run("add_perpendicular", [a, b, c], {"alpha": 1.0}).double()
    added = got - a.double()
    assert abs(float(torch.dot(added, (a - c).double()))) < 1e-4 * float(added.norm() * (a - c).double().norm())


@pytest.mark.parametrize("name", ["ties", "dare", "dare_ties", "model_stock"])
def test_all_zero_task_vectors_give_the_base(name: str) -> None:
    _, n, values = CASES[name]
    base = torch.randn(30)
    got = _run(name, [base] + [base.clone() for _ in range(n - 1)], values)
    assert torch.equal(got, base)


def test_dare_p0_is_the_weighted_task_sum_and_p_near_1_stays_finite() -> None:
    base, m1, m2 = _operands(3, (400,), seed=4)
    got = _run("dare", [base, m1, m2], {"alpha": 1.0, "p": 0.0, "w1": 1.0, "w2": 0.5, "seed": 0})
    _close(got, (base + (m1 - base) + 0.5 * (m2 - base)).double().numpy(), "p=0")
    hi = _run("dare", [base, m1, m2], {"alpha": 1.0, "p": 0.999, "w1": 1.0, "w2": 0.5, "seed": 0})
    assert torch.isfinite(hi).all()
    _close(hi, _reference("dare", [base, m1, m2], {"alpha": 1.0, "p": 0.999, "w1": 1.0, "w2": 0.5, "seed": 0}), "p")
    kept = (hi != base).float().mean().item()
    assert kept < 0.02  # ~0.1% of elements survive each task vector


def test_dare_rescale_keeps_the_expected_task_vector() -> None:
    base = torch.zeros(200_000)
    m1 = torch.ones(200_000)
    got = _run("dare", [base, m1], {"alpha": 1.0, "p": 0.9, "w1": 1.0, "seed": 1})
    assert all(v == 0.0 or v == pytest.approx(10.0) for v in torch.unique(got).tolist())
    assert got.mean().item() == pytest.approx(1.0, abs=0.03)  # E[mask / (1 - p)] = 1


def test_ties_k_0_is_the_base_and_k_1_trims_nothing() -> None:
    base, m1, m2 = _operands(3, (60,), seed=2)
    v = {"alpha": 1.0, "w1": 1.0, "w2": 1.0, "count_signs": 0}
    assert torch.equal(_run("ties", [base, m1, m2], {**v, "k": 0.0}), base)
    full = _run("ties", [base, m1, m2], {**v, "k": 1.0}).double().numpy()
    d1, d2 = (m1 - base).double().numpy(), (m2 - base).double().numpy()
    agree = np.sign(d1) == np.sign(d2)
    want = np.where(agree, (d1 + d2) / 2, np.where(np.abs(d1) > np.abs(d2), d1, d2))
    np.testing.assert_allclose(full - base.double().numpy(), want, atol=1e-6)


def test_ties_keeps_ties_at_the_threshold() -> None:
    base = torch.zeros(10)
    m = torch.tensor([5.0, 4.0, 4.0, 4.0, 1.0, 0.5, -0.2, 0.1, 3.0, -4.0])
    got = _run("ties", [base, m], {"alpha": 1.0, "k": 0.2, "w1": 1.0, "count_signs": 0})
    # top 2 by magnitude is {5, 4}; every element of magnitude 4 is kept
    assert got.tolist() == [5.0, 4.0, 4.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, -4.0]


def test_sign_election_by_mass_and_by_count_differ() -> None:
    base = torch.zeros(1)
    ms = [torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([-5.0])]
    v = {"alpha": 1.0, "k": 1.0, "w1": 1.0, "w2": 1.0, "w3": 1.0}
    assert _run("ties", [base, *ms], {**v, "count_signs": 0}).item() == -5.0
    assert _run("ties", [base, *ms], {**v, "count_signs": 1}).item() == 1.0


def test_model_stock_with_identical_task_vectors_is_their_model() -> None:
    base, m1 = _operands(2, (50,), seed=5)
    got = _run("model_stock", [base, m1, m1.clone()], {})
    assert torch.allclose(got, m1, atol=1e-6)  # cos = 1 -> t = 1
    opposite = base - (m1 - base)
    got = _run("model_stock", [base, m1, opposite], {})
    assert torch.allclose(got, base, atol=1e-6)  # cos = -1 with N = 2 -> t = -2 / -1... the mean is the base


def test_geometric_median_resists_one_outlier() -> None:
    g = torch.Generator().manual_seed(0)
    good = [torch.randn(100, generator=g) * 0.01 + 1.0 for _ in range(4)]
    bad = torch.full((100,), 1000.0)
    med = _run("geometric_median", [*good, bad], {"eps": 1e-6, "maxiter": 200, "ftol": 1e-20})
    mean = sum([*good, bad]) / 5
    assert (med - 1.0).abs().max() < 1.0 < (mean - 1.0).abs().max()


def test_n_average_weights_must_not_sum_to_zero() -> None:
    from blockmerge.errors import BlockmergeError

    m = METHODS["n_average"]
    srcs = [TensorSource({KEY: t}, SD1) for t in _operands(2, (5,))]
    with pytest.raises(BlockmergeError, match="sum to 0"):
        MergeNode(m, srcs, resolve_params(m, SD1, 2, {"w1": 1.0, "w2": -1.0}))


def test_clamp_keeps_results_inside_the_model_operands() -> None:
    a, b = _operands(2, (200,), seed=6)
    m = METHODS["weighted_sum"]
    srcs = [TensorSource({KEY: a}, SD1), TensorSource({KEY: b}, SD1)]
    free = MergeNode(m, srcs, resolve_params(m, SD1, 2, {"alpha": 1.5})).get(KEY)
    clamped = MergeNode(m, srcs, resolve_params(m, SD1, 2, {"alpha": 1.5}), clamp=True).get(KEY)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    assert ((free < lo) | (free > hi)).any()
    assert torch.equal(clamped, torch.minimum(torch.maximum(free, lo), hi))


def test_geometric_sum_of_negative_weights_is_real() -> None:
    a, b = torch.tensor([-2.0, 4.0, 0.0]), torch.tensor([8.0, -1.0, 3.0])
    got = _run("geometric_sum", [a, b], {"alpha": 0.5})
    want = r_geometric_sum(a.double().numpy(), b.double().numpy(), 0.5)
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-6)
    assert all(math.isfinite(x) for x in got.tolist())


@pytest.mark.parametrize("alpha", [-0.7, 0.25, 0.5, 0.8, 1.0, 1.6])
def test_geometric_sum_real_arithmetic_is_the_complex_formula(alpha: float) -> None:
    """geometric_sum computes Re(A^(1-α)·B^α) without complex numbers (|A|^(1-α)·|B|^α times the
    cosine of the summed phases): every sign pair, zeros of both signs and α outside [0, 1] agree
    with the principal-branch complex formula in float64, NaN where that gives NaN (0 to a negative
    power)."""
    vals = torch.tensor([-2.0, -0.5, -3e-4, -0.0, 0.0, 1e-3, 0.75, 4.0, -7.0])
    a, b = vals.repeat_interleave(len(vals)), vals.repeat(len(vals))
    g = torch.Generator().manual_seed(12)
    ra, rb = torch.randn(500, generator=g), torch.randn(500, generator=g)  # random signs and sizes
    a, b = torch.cat([a, ra]), torch.cat([b, rb])
    got = _run("geometric_sum", [a, b], {"alpha": alpha}).double().numpy()
    with np.errstate(all="ignore"):
        want = r_geometric_sum(a.double().numpy(), b.double().numpy(), alpha)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=2e-6, atol=1e-7)
    if 0.0 <= alpha <= 1.0:
        assert np.isfinite(got).all()


@pytest.mark.parametrize("count_signs", [0, 1])
@pytest.mark.parametrize("n_models", [2, 130])
def test_ties_sign_election_any_number_of_models(count_signs: int, n_models: int) -> None:
    """The election by count runs in int8 below 128 task vectors and in floats above; both, and
    the election by mass, match the float64 reference."""
    ops = _operands(n_models + 1, (9, 5), seed=n_models)
    w = {f"w{i + 1}": 1.0 + 0.1 * (i % 3) for i in range(n_models)}
    values = {"alpha": 0.9, "k": 0.5, "count_signs": count_signs, **w}
    got = _run("ties", ops, values)
    arrs = [t.double().numpy() for t in ops]
    want = r_ties(arrs[0], *arrs[1:], alpha=0.9, k=0.5, w=list(w.values()), count_signs=count_signs)
    _close(got, want, f"ties {n_models} models, count_signs={count_signs}")


# --- the executor's bound on whole tensors in flight ------------------------------------------------

@pytest.fixture
def probe_method():
    """A whole-tensor method that records, as it runs, how many elements every running call holds."""
    lock = threading.Lock()
    running: dict[int, int] = {}
    seen: list[tuple[int, ...]] = []  # the sizes running together, each time one starts

    @merge_method(formula="A (records concurrency)", elementwise=False, source="this test")
    def budget_probe(a: Model, b: Model, *, alpha: float = Param(None, "unused")) -> Model:
        """A test method."""
        with lock:
            running[id(a)] = a.numel()
            seen.append(tuple(sorted(running.values(), reverse=True)))
        time.sleep(0.15 if a.numel() > 1000 else 0.03)  # sleeping releases the GIL: threads overlap
        with lock:
            del running[id(a)]
        return a

    yield budget_probe, seen
    unregister("budget_probe")


def test_whole_tensors_in_flight_are_bounded_by_the_largest(probe_method, tmp_path: Path, monkeypatch) -> None:
    """Two threads never compute two large whole tensors at once (together more than WHOLE_BUDGET
    times the largest), yet small ones still run beside a large one; without the bound, the same
    merge does run two large ones at once (so the check can fail)."""
    method, seen = probe_method
    big, small = 30_000, 500
    keys = [f"model.diffusion_model.input_blocks.{i}.1.proj_in.weight" for i in (1, 2, 4, 5, 7, 8)]
    keys += [f"model.diffusion_model.output_blocks.{i}.1.proj_in.weight" for i in (3, 4, 5, 6, 7, 8)]
    sizes = {k: big if i % 3 != 2 else small for i, k in enumerate(sorted(keys))}  # big, big, small, ...
    g = torch.Generator().manual_seed(0)
    sds = [{k: torch.randn(n, generator=g) for k, n in sizes.items()} for _ in range(2)]
    srcs = [TensorSource(sd, SD1, name=f"m{i}") for i, sd in enumerate(sds)]

    def run(out: str) -> list[tuple[int, ...]]:
        seen.clear()
        node = MergeNode(method, srcs, resolve_params(method, SD1, 2, {"alpha": 0.5}))
        write_source(node, tmp_path / out, dtype="fp32", threads=2)
        return list(seen)

    bounded = run("bounded.safetensors")
    assert len(bounded) == len(keys)
    assert all(sum(s) <= ex.WHOLE_BUDGET * big for s in bounded)
    assert not any(s[:2] == (big, big) for s in bounded)
    assert any(len(s) == 2 for s in bounded)  # a small tensor ran beside a large one
    monkeypatch.setattr(ex, "WHOLE_BUDGET", 100.0)
    free = run("free.safetensors")
    assert any(s[:2] == (big, big) for s in free)
    assert (tmp_path / "bounded.safetensors").read_bytes() == (tmp_path / "free.safetensors").read_bytes()


def test_element_budget_takes_and_gives_back() -> None:
    b = ex.ElementBudget(10)
    with b.hold(6):
        assert b.free == 4
        with b.hold(4):
            assert b.free == 0
    with b.hold(25):  # above the capacity: takes all of it, and runs
        assert b.free == 0
    assert b.free == 10
