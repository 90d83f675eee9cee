"""Numbers for "how much, and in what way, did this block change the image".

Every image of a variant is compared with the baseline image of the same prompt and seed. The
metrics split the change into kinds the article's author judged by eye: overall (RMSE, PSNR,
SSIM), composition (large shapes: difference of strongly blurred lightness), detail (texture and
edges: difference of high-pass residuals), colour (CIEDE2000 of the mean colours and a circular
distance between hue histograms), and, when the sweep saved them, the final latents. The
formulas, and why each one, are in docs/metrics.md.

Everything is float64 numpy and deterministic (no threads, no random state).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter
from skimage.color import deltaE_ciede2000, rgb2lab
from skimage.metrics import structural_similarity

from ..errors import BlockmergeError
from .results import SweepResult

# Fractions of the shorter image side; see docs/metrics.md.
COMPOSITION_SIGMA = 1 / 16
DETAIL_SIGMA = 1 / 256
HUE_BINS = 36
# Below this mean CIELAB chroma (C*ab, about one just-noticeable difference) an image is "grey".
GREY_CHROMA = 1.0


@dataclass(frozen=True)
class Metric:
    """One entry of the registry: what a number means and which way is "more change"."""

    key: str
    label: str
    unit: str
    higher_is_more_change: bool
    description: str


METRICS: tuple[Metric, ...] = (
    Metric("rmse", "RMSE", "", True, "Root-mean-square difference of RGB pixels on a 0-1 scale: overall change."),
    Metric("psnr", "PSNR", "dB", False, "Peak signal-to-noise ratio (peak 1): overall similarity; inf for identical images."),
    Metric("ssim", "SSIM", "", False, "Structural similarity of CIELAB lightness (scikit-image, 7x7 window): 1 = same structure."),
    Metric("composition", "Composition", "", True,
           "RMSE of lightness after a Gaussian blur of 1/16 of the image side: layout, pose, large shapes."),
    Metric("detail", "Detail", "", True,
           "RMSE of the difference of high-pass residuals (lightness minus its blur at 1/256 side): texture, edges."),
    Metric("colour_de", "Colour ΔE", "ΔE00", True, "CIEDE2000 colour difference between the two images' mean CIELAB colours."),
    Metric("hue_emd", "Hue shift", "°", True,
           "Circular earth mover's distance between chroma-weighted 36-bin CIELAB hue histograms, in degrees."),
    Metric("latent", "Latent distance", "", True, "Relative L2 distance of the final latents, ||l - l0|| / ||l0||."),
)
METRIC_KEYS: tuple[str, ...] = tuple(m.key for m in METRICS)


def metric(key: str) -> Metric:
    for m in METRICS:
        if m.key == key:
            return m
    raise BlockmergeError(f"unknown metric {key!r} (one of {', '.join(METRIC_KEYS)})")


# ---------------------------------------------------------------------------------------------
# images and latents
# ---------------------------------------------------------------------------------------------
def as_float_image(img: np.ndarray, name: str = "image") -> np.ndarray:
    """HxWx3 float64 in [0, 1] from uint8 / uint16 / float arrays (greyscale is broadcast)."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise BlockmergeError(f"{name}: expected an HxWx3 image, got shape {a.shape}")
    a = a[:, :, :3]
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float64) / 65535.0
    if np.issubdtype(a.dtype, np.floating):
        return np.clip(a.astype(np.float64), 0.0, 1.0)
    raise BlockmergeError(f"{name}: unsupported pixel type {a.dtype}")


def load_image(path: Path) -> np.ndarray:
    """An image file as HxWx3 float64 in [0, 1]."""
    from PIL import Image

    from ..io import check_input_file

    check_input_file(path, f"{path}: cannot read image")  # a FIFO listed in a sweep would block the read
    try:
        with Image.open(path) as im:
            return as_float_image(np.asarray(im.convert("RGB")), str(path))
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise BlockmergeError(f"{path}: cannot read image ({str(e)[:200]})") from None


def load_latent(path: Path) -> np.ndarray:
    """A saved final latent (``.npy``, or a tensor in ``.pt`` loaded with weights_only) as float64."""
    import pickle

    from ..io import check_input_file

    path = Path(path)
    check_input_file(path, f"{path}: cannot read latent")
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif path.suffix in (".pt", ".pth"):
            import torch

            t = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(t, torch.Tensor):
                raise BlockmergeError(f"{path}: expected a single tensor")
            arr = t.detach().to(torch.float64).numpy()
        else:
            raise BlockmergeError(f"{path}: latent must be .npy or .pt")
    except (OSError, ValueError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
        raise BlockmergeError(f"{path}: cannot read latent ({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})") from None
    try:
        return np.asarray(arr, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise BlockmergeError(f"{path}: the latent is not numeric ({e})") from None


# ---------------------------------------------------------------------------------------------
# per-image features (computed once per image; the baseline's are reused for every variant)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageFeatures:
    rgb: np.ndarray          # HxWx3 in [0, 1]
    light: np.ndarray        # CIELAB L* / 100, HxW in [0, 1]
    low: np.ndarray          # light blurred at the composition scale (sampled every k pixels)
    residual: np.ndarray     # light minus its blur at the detail scale
    mean_lab: np.ndarray     # (3,)
    hue_hist: np.ndarray     # (HUE_BINS,), sums to 1


def _sigma(shape: tuple[int, ...], frac: float) -> float:
    return max(1.0, frac * min(shape[0], shape[1]))


def hue_histogram(lab: np.ndarray, bins: int = HUE_BINS) -> np.ndarray:
    """Chroma-weighted histogram of CIELAB hue angle (CIELCh h_ab), normalised to sum 1.

    Chroma C*_ab weights each pixel so greys and near-blacks, whose hue is noise, count for
    almost nothing. Each pixel's weight is split linearly between the two nearest bin centres
    so that the histogram (and the distance built on it) moves continuously with hue. An image
    with mean chroma under :data:`GREY_CHROMA` has no meaningful hue: it gets a uniform histogram.
    """
    a = lab[..., 1].ravel()
    b = lab[..., 2].ravel()
    w = np.hypot(a, b)
    if float(w.mean()) < GREY_CHROMA:
        return np.full(bins, 1.0 / bins)
    h = (np.arctan2(b, a) / (2 * np.pi)) % 1.0
    x = h * bins - 0.5
    lo = np.floor(x)
    frac = x - lo
    lo_i = lo.astype(np.int64) % bins
    hi_i = (lo_i + 1) % bins
    hist = np.bincount(lo_i, weights=w * (1 - frac), minlength=bins) + np.bincount(
        hi_i, weights=w * frac, minlength=bins
    )
    return hist / hist.sum()


def circular_emd(p: np.ndarray, q: np.ndarray, period: float = 360.0) -> float:
    """Earth mover's distance between two histograms on a circle, in units of ``period``.

    Hand-written because scipy's wasserstein_distance is for the line: on the line, hue 355°
    and 5° would be 350° apart. Closed form for the L1 ground distance on the circle (Rabin,
    Delon & Gousseau 2008): with D the cumulative sum of p - q, EMD = w * sum |D - median(D)|,
    w the bin width.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    d = np.cumsum(p / p.sum() - q / q.sum())
    return float(period / p.size * np.abs(d - np.median(d)).sum())


def image_features(img: np.ndarray, composition_sigma: float = COMPOSITION_SIGMA,
                   detail_sigma: float = DETAIL_SIGMA) -> ImageFeatures:
    """Everything the comparisons need from one image (see :func:`compare_features`)."""
    rgb = as_float_image(img)
    lab = rgb2lab(rgb)
    light = lab[..., 0] / 100.0
    low = _low_pass(light, _sigma(light.shape, composition_sigma))
    residual = light - gaussian_filter(light, _sigma(light.shape, detail_sigma), mode="reflect")
    return ImageFeatures(rgb, light, low, residual, lab.reshape(-1, 3).mean(axis=0), hue_histogram(lab))


def _low_pass(light: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur at ``sigma``, computed on a k×k area-averaged image (k = sigma // 4).

    The blurred image holds nothing finer than sigma, so it can be sampled every k pixels
    without loss; the k×k box adds a negligible k²/12 to sigma² and makes the wide blur
    (a 257-tap kernel at 512 px) about ten times cheaper. Both images of a comparison go
    through the same steps, and the RMS of the small images equals the mean over the full ones.
    """
    k = max(1, int(sigma // 4))
    h, w = (light.shape[0] // k) * k, (light.shape[1] // k) * k
    small = light[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3))
    return gaussian_filter(small, sigma / k, mode="reflect")


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a))))


def latent_distance(base_latent: np.ndarray, latent: np.ndarray) -> float:
    """||l - l0|| / ||l0|| (0 for identical; inf if the baseline latent is zero and l is not)."""
    l0 = np.asarray(base_latent, dtype=np.float64)
    l1 = np.asarray(latent, dtype=np.float64)
    if l0.shape != l1.shape:
        raise BlockmergeError(f"latent shapes differ: {l0.shape} vs {l1.shape}")
    num = float(np.linalg.norm((l1 - l0).ravel()))
    den = float(np.linalg.norm(l0.ravel()))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def compare_features(f0: ImageFeatures, f1: ImageFeatures, base_latent: np.ndarray | None = None,
                     latent: np.ndarray | None = None) -> dict[str, float]:
    """The metrics of :data:`METRICS` for image 1 against baseline 0."""
    if f0.rgb.shape != f1.rgb.shape:
        raise BlockmergeError(f"image sizes differ: {f0.rgb.shape[:2]} vs {f1.rgb.shape[:2]}")
    mse = float(np.mean(np.square(f1.rgb - f0.rgb)))
    side = min(f0.light.shape)
    if side < 3:
        raise BlockmergeError(f"images of {f0.light.shape} are too small to compare (need 3x3 or more)")
    win = min(7, side if side % 2 else side - 1)
    ssim = float(structural_similarity(f0.light, f1.light, data_range=1.0, win_size=win))
    de = float(deltaE_ciede2000(f0.mean_lab[None, :], f1.mean_lab[None, :])[0])
    out = {
        "rmse": math.sqrt(mse),
        "psnr": math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse),
        "ssim": ssim,
        "composition": _rms(f1.low - f0.low),
        "detail": _rms(f1.residual - f0.residual),
        "colour_de": de,
        "hue_emd": circular_emd(f0.hue_hist, f1.hue_hist),
        "latent": math.nan,
    }
    if base_latent is not None and latent is not None:
        out["latent"] = latent_distance(base_latent, latent)
    return out


def image_metrics(base: np.ndarray, img: np.ndarray, base_latent: np.ndarray | None = None,
                  latent: np.ndarray | None = None) -> dict[str, float]:
    """Every metric of ``img`` against ``base`` (same prompt and seed); keys in METRICS order.

    Images are HxWx3 (uint8, or float in [0, 1]). ``latent`` is NaN unless both latents are
    given; ``psnr`` is ``inf`` for identical images.
    """
    return compare_features(image_features(base), image_features(img), base_latent, latent)


# ---------------------------------------------------------------------------------------------
# a whole sweep
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricRow:
    """The metrics of one image (variant, prompt index, seed) against its baseline."""

    variant: str
    prompt: int
    seed: int
    values: dict[str, float]


@dataclass(frozen=True)
class AggregateRow:
    """Mean and sample std (ddof=1; NaN for one sample) of a variant's metrics.

    ``prompt`` is None for the aggregate over every prompt and seed. NaN values (a latent not
    saved) are left out; ``inf`` (PSNR of an identical image) propagates into the mean.
    """

    variant: str
    prompt: int | None
    n: int
    mean: dict[str, float]
    std: dict[str, float]


@dataclass
class MetricsTable:
    """Per-image rows of a sweep, with the aggregations the report shows."""

    rows: list[MetricRow] = field(default_factory=list)

    def get(self, variant: str, prompt: int, seed: int) -> MetricRow | None:
        for r in self.rows:
            if r.variant == variant and r.prompt == prompt and r.seed == seed:
                return r
        return None

    def aggregate(self) -> list[AggregateRow]:
        """Per (variant, prompt) over seeds, then per variant over all prompts and seeds."""
        keys: dict[tuple[str, int | None], list[MetricRow]] = {}
        for r in self.rows:
            keys.setdefault((r.variant, r.prompt), []).append(r)
        for r in self.rows:
            keys.setdefault((r.variant, None), []).append(r)
        return [_aggregate(v, p, rows) for (v, p), rows in keys.items()]

    def aggregate_of(self, variant: str, prompt: int | None) -> AggregateRow | None:
        rows = [r for r in self.rows if r.variant == variant and (prompt is None or r.prompt == prompt)]
        return _aggregate(variant, prompt, rows) if rows else None


def _mean_std(vals: Sequence[float]) -> tuple[float, float]:
    a = np.array([v for v in vals if not math.isnan(v)], dtype=np.float64)
    if a.size == 0:
        return math.nan, math.nan
    if np.isinf(a).any():
        # inf - inf is NaN, so the spread of values that include inf is undefined.
        return float(np.mean(a)), math.nan
    mean = float(np.mean(a))
    std = float(np.std(a, ddof=1)) if a.size > 1 else math.nan
    return mean, std


def _aggregate(variant: str, prompt: int | None, rows: list[MetricRow]) -> AggregateRow:
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    for k in METRIC_KEYS:
        mean[k], std[k] = _mean_std([r.values.get(k, math.nan) for r in rows])
    return AggregateRow(variant, prompt, len(rows), mean, std)


def sweep_metrics(result: SweepResult, progress: Callable[[int, int], None] | None = None) -> MetricsTable:
    """Compare every non-baseline image of a sweep with its baseline image.

    Each baseline image is read and analysed once and reused for every variant. Images whose
    baseline (same prompt and seed) is missing raise :class:`BlockmergeError`.
    """
    result.validate()
    base_id = result.baseline.id
    index = {(r.variant, r.prompt, r.seed): r for r in result.images}
    todo = [r for r in result.images if r.variant != base_id]
    todo.sort(key=lambda r: (r.prompt, r.seed))
    table = MetricsTable()
    cache_key: tuple[int, int] | None = None
    f0: ImageFeatures | None = None
    l0: np.ndarray | None = None
    for i, rec in enumerate(todo):
        key = (rec.prompt, rec.seed)
        if key != cache_key:
            brec = index.get((base_id, rec.prompt, rec.seed))
            if brec is None:
                raise BlockmergeError(
                    f"sweep: no baseline image for prompt {rec.prompt}, seed {rec.seed} (needed by {rec.path})"
                )
            f0 = image_features(load_image(result.path_of(brec.path)))
            l0 = load_latent(result.path_of(brec.latent)) if brec.latent else None
            cache_key = key
        assert f0 is not None
        f1 = image_features(load_image(result.path_of(rec.path)))
        l1 = load_latent(result.path_of(rec.latent)) if rec.latent else None
        table.rows.append(MetricRow(rec.variant, rec.prompt, rec.seed, compare_features(f0, f1, l0, l1)))
        if progress is not None:
            progress(i + 1, len(todo))
    return table


def rank_blocks(result: SweepResult, table: MetricsTable, metric_key: str, group: str,
                prompt: int | None = None) -> list[tuple[str, float]]:
    """Blocks of one variant group, most changed first, by the mean of one metric.

    Ties and NaN (no data) keep block order; NaN goes last.
    """
    m = metric(metric_key)
    out: list[tuple[str, float]] = []
    for v in result.group_variants(group):
        if v.block is None:
            continue
        agg = table.aggregate_of(v.id, prompt)
        if agg is not None:
            out.append((v.block, agg.mean[metric_key]))
    order = {b: i for i, b in enumerate(result.block_ids)}

    def sort_key(item: tuple[str, float]) -> tuple[int, float, int]:
        val = item[1]
        if math.isnan(val):
            return (1, 0.0, order[item[0]])
        return (0, -val if m.higher_is_more_change else val, order[item[0]])

    return sorted(out, key=sort_key)


# ---------------------------------------------------------------------------------------------
# JSON / CSV numbers: inf and NaN are written as the strings "inf", "-inf", "nan" (plain JSON has
# no such values and browsers' JSON.parse rejects Python's Infinity/NaN tokens).
# ---------------------------------------------------------------------------------------------
def json_number(x: float) -> float | str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(x)


def from_json_number(x: Any) -> float:
    return float(x) if x is not None else math.nan
