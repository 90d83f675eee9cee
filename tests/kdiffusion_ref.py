"""k-diffusion's own ``sampling.py`` and ``external.py``, read from the k-diffusion wheel, as the
reference the sampler tests compare blockmerge against.

The wheel (0.1.1.post1; A1111 1.10 pins commit ab527a9 of the same code) is fetched by
``scripts/test.sh`` as a test input; its package ``__init__`` imports torchvision and CLIP, so the
two modules are loaded on their own, with a stub for the ``utils`` helpers they use
(``append_dims``) and for ``torchdiffeq`` (only ``log_likelihood`` needs it). Nothing here is used
by blockmerge itself.
"""

from __future__ import annotations

import os
import sys
import types
import zipfile
from functools import lru_cache
from pathlib import Path

WHEEL_NAME = "k_diffusion-0.1.1.post1-py3-none-any.whl"


def wheel_path() -> Path:
    env = os.environ.get("BLOCKMERGE_KDIFFUSION_WHEEL")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / ".cache" / "test-inputs" / WHEEL_NAME
    if not path.is_file():
        raise RuntimeError(f"{path}: the k-diffusion wheel (a test input) is missing; run scripts/test.sh, or "
                           f"pip download --no-deps -d .cache/test-inputs k-diffusion==0.1.1.post1")
    return path


@lru_cache(maxsize=1)
def load() -> tuple[types.ModuleType, types.ModuleType]:
    """(sampling, external) modules of the wheel, in a private package ``kdiff_ref``."""
    with zipfile.ZipFile(wheel_path()) as z:
        sampling_src = z.read("k_diffusion/sampling.py").decode()
        external_src = z.read("k_diffusion/external.py").decode()
    pkg = types.ModuleType("kdiff_ref")
    pkg.__path__ = []
    utils = types.ModuleType("kdiff_ref.utils")

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    diffeq = types.ModuleType("torchdiffeq")
    diffeq.odeint = None
    sys.modules.setdefault("torchdiffeq", diffeq)
    sys.modules["kdiff_ref"] = pkg
    sys.modules["kdiff_ref.utils"] = utils
    pkg.utils = utils
    sampling = types.ModuleType("kdiff_ref.sampling")
    sampling.__package__ = "kdiff_ref"
    sys.modules["kdiff_ref.sampling"] = sampling
    exec(compile(sampling_src, "k_diffusion/sampling.py", "exec"), sampling.__dict__)
    pkg.sampling = sampling
    external = types.ModuleType("kdiff_ref.external")
    external.__package__ = "kdiff_ref"
    sys.modules["kdiff_ref.external"] = external
    exec(compile(external_src, "k_diffusion/external.py", "exec"), external.__dict__)
    return sampling, external
