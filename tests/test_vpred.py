"""SDXL v-prediction models (NoobAI style: empty ``v_pred`` / ``ztsnr`` marker tensors) kept right:
markers copied through merges and never merged, a v/eps mix warned about, ``info`` says the
prediction type, and generation and sweeps run v-prediction on the zero-terminal-SNR schedule
unless ``--prediction`` overrides it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from blockmerge.architectures.synthetic import write_synthetic
from blockmerge.cli import main
from blockmerge.errors import BlockmergeError  # noqa: F401
from blockmerge.generation.generate import GenerationParams, generate
from blockmerge.generation.loader import load_pipeline
from blockmerge.merge import merge

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# What ComfyUI's CheckpointSave and the NoobAI tooling write: torch.tensor([]) (float32, shape [0]).
MARKERS = {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}


@pytest.fixture(scope="module")
def vpred_pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("vpred")
    v1 = write_synthetic(d / "noob_v1.safetensors", "SDXL", seed=1, extra=MARKERS)
    v2 = write_synthetic(d / "noob_v2.safetensors", "SDXL", seed=2, extra=MARKERS)
    eps = write_synthetic(d / "eps.safetensors", "SDXL", seed=3)
    return v1, v2, eps


def _header(path: Path, key: str) -> dict:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n])[key]


def test_markers_are_copied_never_merged(vpred_pair, tmp_path: Path) -> None:
    v1, v2, _ = vpred_pair
    out = tmp_path / "m.safetensors"
    res = merge([v1, v2], out, alpha=0.5, dtype="fp16", threads=1)
    assert not any("v_pred" in w for w in res.report.warnings)
    for k in MARKERS:
        # float32 and empty, exactly as in A, although every merged tensor became fp16
        assert _header(out, k)["dtype"] == "F32" and _header(out, k)["shape"] == [0]
    assert _header(out, "model.diffusion_model.out.2.bias")["dtype"] == "F16"
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("v_pred").numel() == 0


@pytest.mark.parametrize("order", ["v_first", "eps_first"])
def test_a_v_and_an_eps_model_merge_with_a_warning(vpred_pair, tmp_path: Path, capsys, order: str) -> None:
    v1, _, eps = vpred_pair
    a, b = (v1, eps) if order == "v_first" else (eps, v1)
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(a), str(b), "-o", str(out), "--alpha", "0.5", "-q"]) == 0
    err = capsys.readouterr().err
    if order == "v_first":
        assert "merging a v-prediction model (noob_v1.safetensors) with an epsilon one (eps.safetensors)" in err
        assert set(MARKERS) <= set(load_file(out))  # the output keeps A's markers
    else:
        assert "merging an epsilon model (eps.safetensors) with a v-prediction one (noob_v1.safetensors)" in err
        assert not set(MARKERS) & set(load_file(out))


def test_info_shows_the_prediction_type(vpred_pair, tmp_path: Path, capsys) -> None:
    v1, _, eps = vpred_pair
    only_v = write_synthetic(tmp_path / "v_only.safetensors", "SDXL", seed=1, extra={"v_pred": torch.tensor([])})
    assert main(["info", str(v1), str(only_v), str(eps), "--no-hash"]) == 0
    out = capsys.readouterr().out
    lines = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("prediction:")]
    assert lines == ["prediction:   v_prediction, zero terminal SNR", "prediction:   v_prediction",
                     "prediction:   epsilon"]


def test_loader_runs_v_prediction_on_the_zero_terminal_snr_schedule(vpred_pair) -> None:
    v1, _, eps = vpred_pair
    m = load_pipeline(v1, device="cpu", hash_file=False)
    assert m.prediction_type == "v_prediction" and m.zero_snr
    sched = m.pipeline.scheduler
    assert sched.config.prediction_type == "v_prediction" and sched.config.rescale_betas_zero_snr
    # zero terminal SNR: the last step is (almost) pure noise; diffusers keeps 2^-24 to stay finite
    assert float(sched.alphas_cumprod[-1]) == pytest.approx(2.0**-24)
    plain = load_pipeline(eps, device="cpu", hash_file=False)
    assert plain.prediction_type == "epsilon" and not plain.zero_snr
    assert float(plain.pipeline.scheduler.alphas_cumprod[-1]) > 1e-3
    # --prediction overrides the markers
    forced = load_pipeline(v1, device="cpu", hash_file=False, prediction_type="eps")
    assert forced.prediction_type == "epsilon" and not forced.zero_snr
    # v without the ztsnr marker is v on the normal schedule
    v_only = load_pipeline(eps, device="cpu", hash_file=False, prediction_type="v")
    assert v_only.prediction_type == "v_prediction" and not v_only.zero_snr


def test_every_sampler_runs_a_zero_snr_model_on_the_rescaled_schedule(vpred_pair) -> None:
    """blockmerge samples with A1111's own loop, so every sampler takes the zero-terminal-SNR
    schedule (A1111's ``Noise Schedule: Zero Terminal SNR``): finite images, and the PNG says so."""
    from blockmerge.generation.run import model_alphas_cumprod
    from blockmerge.generation.samplers import SAMPLERS

    m = load_pipeline(vpred_pair[0], device="cpu", hash_file=False)
    for name in SAMPLERS:
        params = GenerationParams(prompt="a cat", steps=3, sampler=name, seeds=(1,), width=64, height=64)
        (img,) = generate(m, params)
        assert "Noise Schedule: Zero Terminal SNR" in img.infotext, name
        assert torch.isfinite(img.latent).all(), name
    p = GenerationParams(prompt="a cat", zero_terminal_snr=True)
    assert float(model_alphas_cumprod(p)[-1]) < 1e-6  # the schedule really reaches (almost) zero SNR
    assert float(model_alphas_cumprod(GenerationParams(prompt="a cat"))[-1]) > 1e-3


def _px(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generate_and_sweep_use_the_markers_unless_overridden(vpred_pair, tmp_path: Path) -> None:
    v1 = str(vpred_pair[0])
    args = ["--prompt", "a cat", "--seed", "3", "--steps", "2", "--width", "64", "--height", "64", "--cfg-scale", "5",
            "--sampler", "Euler a", "-q"]
    assert main(["generate", v1, "-o", str(tmp_path / "v"), *args]) == 0
    assert main(["generate", v1, "-o", str(tmp_path / "eps"), *args, "--prediction", "eps"]) == 0
    assert main(["generate", v1, "-o", str(tmp_path / "v2"), *args, "--prediction-type", "v"]) == 0
    (v,), (e,), (v2,) = (sorted((tmp_path / d).glob("*.png")) for d in ("v", "eps", "v2"))
    assert np.array_equal(_px(v), _px(v2))  # the markers already meant v + zero SNR
    assert np.abs(_px(v) - _px(e)).mean() > 1  # another objective, another image
    # the library call gives the CLI's image (the same scheduler is built)
    m = load_pipeline(v1, device="cpu")
    img = generate(m, GenerationParams(prompt="a cat", steps=2, seeds=(3,), width=64, height=64, cfg_scale=5))[0].image
    assert np.abs(np.asarray(img, dtype=np.int16) - _px(v)).max() <= 1
    # sweeps load the model the same way and take the same override
    prompt = "a cat\nSteps: 2, Sampler: Euler a, CFG scale: 5, Size: 64x64"
    for name, extra in (("sv", []), ("se", ["--prediction", "eps"])):
        assert main(["sweep", v1, "-o", str(tmp_path / name), "--prompt", prompt, "--seeds", "3", "--blocks", "M00",
                     "--scale", "0.5", "--no-report", "-q", *extra]) == 0
    base_v, base_e = (next((tmp_path / n / "images" / "baseline").glob("*.png"), None) for n in ("sv", "se"))
    assert base_v is not None and base_e is not None
    assert np.abs(_px(base_v) - _px(v)).max() <= 1
    assert np.abs(_px(base_e) - _px(e)).max() <= 1
