"""Signals really sent to running merges, recipes and sweeps (issue 10, class 2: debris after faults).

SIGTERM, SIGINT and SIGHUP arrive while the output is being written (the test waits until the
temporary file exists); the command must exit with 128 + N, say so in one line, and leave no
partial file. After SIGKILL, which nothing can catch, the next run in the folder removes the dead
process's temporary file; a killed sweep resumes without trusting anything half-written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from blockmerge.architectures.synthetic import write_synthetic

pytestmark = pytest.mark.slow
SRC = str(Path(__file__).resolve().parents[1] / "src")
SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny SD1 models, A with one extra 128 MB tensor (kept from A by the merge), so writing the
    output takes long enough to be interrupted in the middle."""
    d = tmp_path_factory.mktemp("signals")
    a0 = write_synthetic(d / "a0.safetensors", "SD1", "tiny", seed=1)
    b = write_synthetic(d / "b.safetensors", "SD1", "tiny", seed=2)
    sd = load_file(a0)
    sd["cond_stage_model.extra_padding.weight"] = torch.zeros(64 << 20, dtype=torch.float16)
    a = d / "a.safetensors"
    save_file(sd, a)
    a0.unlink()
    return a, b


def partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith("blockmerge-partial")]


def start(argv: list[str], cache: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "BLOCKMERGE_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "-m", "blockmerge", *map(str, argv)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(p: subprocess.Popen, cond, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not cond():
        assert p.poll() is None, f"the command ended before the signal: {p.stderr.read()}"
        assert time.monotonic() - t0 < timeout
        time.sleep(0.002)


def recipe(folder: Path, a: Path, b: Path) -> Path:
    r = folder / "chain.toml"
    r.write_text(f'version = 1\n[inputs.A]\npath = "{a}"\n[inputs.B]\npath = "{b}"\n'
                 '[[steps]]\nmodels = ["A", "B"]\nalpha = 0.5\n[[steps]]\nmodels = ["O1", "B"]\nalpha = 0.25\n'
                 '[[outputs]]\npath = "out.safetensors"\n', encoding="utf-8")
    return r


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("command", ["merge", "run"])
def test_a_signal_during_the_write_leaves_nothing(tmp_path: Path, big_pair, command: str, sig) -> None:
    a, b = big_pair
    out = tmp_path / "out.safetensors"
    argv = (["merge", a, b, "-o", out, "--alpha", "0.5", "-q"] if command == "merge"
            else ["run", recipe(tmp_path, a, b), "-q"])
    before = sorted(p.name for p in tmp_path.iterdir())
    p = start(argv, tmp_path.parent / "cache")
    wait_for(p, lambda: partials(tmp_path))  # the output is being written right now
    p.send_signal(sig)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 128 + sig, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == [f"blockmerge: interrupted by {sig.name}; no partial output was left"], err
    assert not out.exists() and partials(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_after_sigkill_the_next_run_removes_the_dead_writers_file(tmp_path: Path, big_pair) -> None:
    a, b = big_pair
    out = tmp_path / "out.safetensors"
    p = start(["merge", a, b, "-o", out, "--alpha", "0.5", "-q"], tmp_path.parent / "cache")
    wait_for(p, lambda: partials(tmp_path))
    p.kill()
    p.wait(60)
    left = partials(tmp_path)
    assert len(left) == 1 and not out.exists()  # SIGKILL cannot be caught: debris, but recognisable
    assert f".{p.pid}-" in left[0].name
    again = start(["merge", a, b, "-o", out, "--alpha", "0.5", "-q"], tmp_path.parent / "cache")
    err = again.communicate(timeout=300)[1]
    assert again.returncode == 0, err
    assert f"removed {left[0]}" in err and f"blockmerge process {p.pid}, which no longer runs" in err
    assert partials(tmp_path) == [] and out.stat().st_size > 128 << 20
    assert torch.equal(load_file(out)["cond_stage_model.extra_padding.weight"], torch.zeros(64 << 20).half())


PROMPT = "a large red circle on the left, white background\nSteps: 6, Sampler: Euler a, CFG scale: 6, Size: 64x64"


def _complete(folder: Path) -> list[Path]:
    """Every image of the sweep folder, each checked to read back whole (PNG CRCs, latent header)."""
    pngs = sorted(folder.rglob("*.png"))
    for png in pngs:
        with Image.open(png) as im:
            im.verify()
        lat = np.load(png.with_suffix(".npy"), allow_pickle=False)
        assert lat.ndim == 3 and lat.shape[0] == 4 and np.isfinite(lat).all()
    return pngs


@pytest.mark.parametrize("sig", [*SIGNALS, signal.SIGKILL], ids=lambda s: s.name)
def test_a_killed_sweep_leaves_only_whole_images_and_resumes(tmp_path: Path, sig) -> None:
    out = tmp_path / "sweep"
    argv = ["sweep", "tiny-a", "-o", out, "--prompt", PROMPT, "--seeds", "1-2", "--scale", "0.5",
            "--blocks", "IN00-IN05", "--no-report", "-q", "--threads", "1"]
    p = start(argv, tmp_path / "cache")
    wait_for(p, lambda: out.exists() and len(list(out.rglob("*.png"))) >= 3)
    p.send_signal(sig)
    err = p.communicate(timeout=120)[1]
    if sig == signal.SIGKILL:
        assert p.returncode == -signal.SIGKILL
    else:
        assert p.returncode == 128 + sig and "no partial output was left" in err, err
        assert partials(out) == []
    done = _complete(out)
    assert 3 <= len(done) < 14 and not (out / "sweep.json").exists()
    again = start(argv, tmp_path / "cache")
    err = again.communicate(timeout=300)[1]
    assert again.returncode == 0, err
    assert partials(out) == []
    meta = json.loads((out / "sweep.json").read_text())["meta"]
    assert meta["images_reused"] == len(done) and meta["images_made"] == 14 - len(done)
    assert len(_complete(out)) == 14


def test_a_damaged_cached_image_is_made_again_not_trusted(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    argv = ["sweep", "tiny-a", "-o", out, "--prompt", PROMPT, "--seeds", "1", "--scale", "0.5", "--blocks", "IN00",
            "--no-report", "-q"]
    p = start(argv, tmp_path / "cache")
    assert p.wait(300) == 0
    png = sorted(out.rglob("*.png"))[0]
    good = png.read_bytes()
    png.write_bytes(good[: len(good) // 2])  # damaged behind our back (a disk, a copy tool)
    npy = sorted(out.rglob("*.npy"))[-1]
    npy.write_bytes(npy.read_bytes()[:100])
    again = start(argv, tmp_path / "cache")
    err = again.communicate(timeout=300)[1]
    assert again.returncode == 0, err
    meta = json.loads((out / "sweep.json").read_text())["meta"]
    assert meta["images_made"] == 2 - meta["images_reused"] and meta["images_made"] >= 1
    assert len(_complete(out)) == 2 and png.read_bytes() == good
