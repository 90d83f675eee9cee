"""Shared fixtures: tiny synthetic single-file checkpoints with the real SD1 / SD2 / SDXL layouts.

Written once per test session (a few MB each, fp16). Seeds are fixed so values are stable across
runs: ``tiny_sd1_paths`` are seeds 1, 2, 3 (A, B and C for add-difference), ``tiny_sd2_paths``
seeds 1, 2, ``tiny_sdxl_paths`` seeds 1, 2, 3, and ``tiny_sd1_ckpt_path`` holds the very same
tensors as ``tiny_sd1_paths[0]`` in ``.ckpt`` form (``{"state_dict": ...}``), so readers of the
two formats can be compared value for value.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from blockmerge.architectures.synthetic import write_synthetic

# No test may reach the network; diffusers / transformers must only ever see local configs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_DTYPE = torch.float16


@pytest.fixture(scope="module")
def single_torch_thread():
    """One torch thread for a module whose fixtures run the tiny models: on two shared cores OpenMP
    oversubscription stalls cost far more than the parallelism gains. Use with
    ``pytestmark = pytest.mark.usefixtures("single_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def _private_hash_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests keep their hash cache to themselves instead of writing to ~/.cache."""
    os.environ["BLOCKMERGE_CACHE"] = str(tmp_path_factory.mktemp("hash-cache"))


def _write(tmp: Path, arch: str, seeds: tuple[int, ...]) -> tuple[Path, ...]:
    return tuple(
        write_synthetic(tmp / f"{arch.lower()}_tiny_seed{s}.safetensors", arch, "tiny", seed=s, dtype=TINY_DTYPE)
        for s in seeds
    )


@pytest.fixture(scope="session")
def tiny_sd1_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Three tiny SD1 safetensors files (seeds 1, 2, 3)."""
    a, b, c = _write(tmp_path_factory.mktemp("sd1"), "SD1", (1, 2, 3))
    return a, b, c


@pytest.fixture(scope="session")
def tiny_sd2_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny SD2 safetensors files (seeds 1, 2)."""
    a, b = _write(tmp_path_factory.mktemp("sd2"), "SD2", (1, 2))
    return a, b


@pytest.fixture(scope="session")
def tiny_sdxl_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Three tiny SDXL safetensors files (seeds 1, 2, 3)."""
    a, b, c = _write(tmp_path_factory.mktemp("sdxl"), "SDXL", (1, 2, 3))
    return a, b, c


@pytest.fixture(scope="session")
def tiny_sd1_ckpt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD1 ``.ckpt`` (pickle, ``{"state_dict": ...}``) with the tensors of ``tiny_sd1_paths[0]``."""
    path = tmp_path_factory.mktemp("sd1_ckpt") / "sd1_tiny_seed1.ckpt"
    return write_synthetic(path, "SD1", "tiny", seed=1, dtype=TINY_DTYPE, fmt="ckpt")
