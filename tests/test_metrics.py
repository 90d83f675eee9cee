"""Metrics on synthetic images whose kind of change is known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.color import lab2rgb

from blockmerge.errors import BlockmergeError
from blockmerge.experiments.metrics import (
    METRIC_KEYS,
    METRICS,
    MetricRow,
    MetricsTable,
    circular_emd,
    hue_histogram,
    image_metrics,
    json_number,
    latent_distance,
    metric,
    rank_blocks,
)
from blockmerge.experiments.results import SweepResult, Variant

N = 96
_Y, _X = np.mgrid[0:N, 0:N].astype(np.float64)


def scene_lab(cx: float, cy: float) -> np.ndarray:
    """A lightness ramp with a soft coloured blob at (cx, cy), in CIELAB (in the sRGB gamut)."""
    blob = np.exp(-((_X - cx) ** 2 + (_Y - cy) ** 2) / (2 * 10.0**2))
    L = 40 + 20 * _X / N + 40 * blob
    a = 5 + 30 * np.exp(-((_X - cx) ** 2 + (_Y - cy) ** 2) / (2 * 14.0**2))
    b = np.full_like(_X, 20.0)
    return np.stack([L, a, b], axis=-1)


BASE_LAB = scene_lab(35, 45)
BASE = lab2rgb(BASE_LAB)


def test_registry_is_ordered_and_complete() -> None:
    assert METRIC_KEYS == ("rmse", "psnr", "ssim", "composition", "detail", "colour_de", "hue_emd", "latent")
    assert {m.key for m in METRICS if not m.higher_is_more_change} == {"psnr", "ssim"}
    assert metric("detail").label == "Detail"
    with pytest.raises(BlockmergeError):
        metric("nope")


def test_identical_images_are_zero_change_and_psnr_inf() -> None:
    m = image_metrics(BASE, BASE.copy(), np.ones((4, 8, 8)), np.ones((4, 8, 8)))
    assert list(m) == list(METRIC_KEYS)
    for k in ("rmse", "composition", "detail", "colour_de", "hue_emd", "latent"):
        assert m[k] == 0.0, k
    assert m["ssim"] == pytest.approx(1.0)
    assert m["psnr"] == math.inf
    assert json_number(m["psnr"]) == "inf"
    # No latents given: the latent distance is "not measured", not zero.
    assert math.isnan(image_metrics(BASE, BASE)["latent"])


def test_moved_shape_is_composition_not_detail() -> None:
    m = image_metrics(BASE, lab2rgb(scene_lab(60, 45)))
    assert m["composition"] > 0.05
    assert m["composition"] > 20 * m["detail"]
    assert m["ssim"] < 0.9


def test_fine_texture_is_detail_not_composition() -> None:
    rng = np.random.default_rng(0)  # fixed seed: the test image is the same every run
    noisy = np.clip(BASE + rng.normal(0, 0.04, (N, N))[..., None], 0, 1)
    m = image_metrics(BASE, noisy)
    assert m["detail"] > 0.02
    assert m["detail"] > 8 * m["composition"]
    assert m["colour_de"] < 0.5


def test_hue_rotation_is_colour_not_structure() -> None:
    th = np.deg2rad(120)
    rot = BASE_LAB.copy()
    rot[..., 1] = np.cos(th) * BASE_LAB[..., 1] - np.sin(th) * BASE_LAB[..., 2]
    rot[..., 2] = np.sin(th) * BASE_LAB[..., 1] + np.cos(th) * BASE_LAB[..., 2]
    m = image_metrics(BASE, lab2rgb(rot))
    assert m["colour_de"] > 15
    # Rotating CIELAB hue by 120° moves the hue histogram by about 120° (gamut clipping aside).
    assert m["hue_emd"] == pytest.approx(120, abs=10)
    # Lightness is kept by the rotation (up to gamut clipping): structure metrics stay near 0.
    assert m["composition"] < 0.005
    assert m["detail"] < 0.002
    assert m["ssim"] > 0.99
    # ... while plain RMSE, which is colour-blind to "what kind", sees a large change.
    assert m["rmse"] > 0.1


def test_deterministic_and_dtype_consistent() -> None:
    other = lab2rgb(scene_lab(50, 40))
    a = image_metrics(BASE, other)
    b = image_metrics(BASE, other)
    assert a == b
    u8 = image_metrics((BASE * 255).round().astype(np.uint8), (other * 255).round().astype(np.uint8))
    for k in ("rmse", "composition", "detail"):
        assert u8[k] == pytest.approx(a[k], rel=0.05, abs=2e-3)


def test_size_mismatch_is_a_user_error() -> None:
    with pytest.raises(BlockmergeError, match="sizes differ"):
        image_metrics(BASE, BASE[:64, :64])


def test_circular_emd_wraps_around() -> None:
    p = np.zeros(36)
    q = np.zeros(36)
    p[0] = 1
    q[35] = 1
    assert circular_emd(p, q) == pytest.approx(10.0)  # 0° vs 350°: 10° apart, not 350°
    rng = np.random.default_rng(1)
    h = rng.random(36)
    assert circular_emd(h, np.roll(h, 3)) <= 30.0 + 1e-9
    assert circular_emd(h, h) == 0.0
    p2 = np.zeros(36)
    p2[18] = 1
    q2 = np.zeros(36)
    q2[0] = 1
    assert circular_emd(p2, q2) == pytest.approx(180.0)


def test_hue_histogram_ignores_greys_and_is_continuous() -> None:
    grey = np.zeros((8, 8, 3))
    grey[..., 0] = 50
    grey[..., 1] = 0.3  # chroma below one ΔE: no meaningful hue
    assert np.allclose(hue_histogram(grey), 1 / 36)
    red = np.zeros((8, 8, 3))
    red[..., 0], red[..., 1] = 50, 40  # hue angle 0
    h = hue_histogram(red)
    assert h.sum() == pytest.approx(1.0)
    # Hue 0 sits between bin centres 355° and 5°: split half and half.
    assert h[0] == pytest.approx(0.5) and h[35] == pytest.approx(0.5)
    # Continuous: turning the hue by 3° moves the distribution by 3°, not by a bin or none.
    th = np.deg2rad(3)
    turned = red.copy()
    turned[..., 1], turned[..., 2] = 40 * np.cos(th), 40 * np.sin(th)
    assert circular_emd(h, hue_histogram(turned)) == pytest.approx(3.0)


def test_latent_distance() -> None:
    l0 = np.ones((4, 8, 8))
    assert latent_distance(l0, l0 * 1.1) == pytest.approx(0.1)
    assert image_metrics(BASE, BASE, l0, -l0)["latent"] == pytest.approx(2.0)
    with pytest.raises(BlockmergeError):
        latent_distance(l0, np.ones((4, 8, 9)))


def _vals(x: float) -> dict[str, float]:
    return {k: (x if k != "psnr" else 1 / x if x else math.inf) for k in METRIC_KEYS}


def test_aggregation_and_ranking() -> None:
    blocks = ["IN00", "M00", "OUT00"]
    res = SweepResult("tiny", blocks, ["p0", "p1"], [1, 2],
                      [Variant.baseline()] + [Variant.scale(b, 0.75) for b in blocks])
    t = MetricsTable()
    data = {"IN00": [0.1, 0.3, 0.2, 0.2], "M00": [0.5, 0.7, 0.6, 0.6], "OUT00": [0.0, 0.0, 0.0, 0.0]}
    for b, vals in data.items():
        for i, (p, s) in enumerate([(0, 1), (0, 2), (1, 1), (1, 2)]):
            t.rows.append(MetricRow(f"scale:{b}:0.75", p, s, _vals(vals[i])))
    agg = {(a.variant, a.prompt): a for a in t.aggregate()}
    a = agg[("scale:IN00:0.75", 0)]
    assert a.n == 2
    assert a.mean["rmse"] == pytest.approx(0.2)
    assert a.std["rmse"] == pytest.approx(np.std([0.1, 0.3], ddof=1))
    allp = agg[("scale:IN00:0.75", None)]
    assert allp.n == 4 and allp.mean["detail"] == pytest.approx(0.2)
    # OUT00 identical everywhere: PSNR mean inf, its spread undefined.
    o = agg[("scale:OUT00:0.75", None)]
    assert o.mean["psnr"] == math.inf and math.isnan(o.std["psnr"])
    assert [b for b, _ in rank_blocks(res, t, "rmse", "scale:k=0.75")] == ["M00", "IN00", "OUT00"]
    # PSNR: lower is more change, so the ranking is the same blocks in the same order.
    assert [b for b, _ in rank_blocks(res, t, "psnr", "scale:k=0.75")] == ["M00", "IN00", "OUT00"]
    assert [b for b, _ in rank_blocks(res, t, "rmse", "scale:k=0.75", prompt=0)] == ["M00", "IN00", "OUT00"]
