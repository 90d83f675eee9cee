"""``blockmerge demo``: the article's experiment, done properly, on the two bundled tiny models.

One command, nothing downloaded, a few minutes on a 2-core CPU: model A (``tiny-a``) loaded once,
then for each of its 25 blocks the block scaled by 0.75 (the article's experiment 2), the block
bypassed (experiment 1 done right), and the block taken from model B (``tiny-b``, a fine-tune of
A); and the reverse swap (B with each block from A). Same prompts, seeds 1-4. The result is two
report folders (the U-shaped page, the table, heat maps, results.json/csv).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import BlockmergeError
from ..io.atomic import made_folders_guard
from .sweep import DEFAULT_SEEDS, bypass_variants, run_sweep, scale_variants, swap_variants

__all__ = ["DemoConfig", "DemoResult", "demo_config", "run_demo"]

# The article's A1111 parameters (Steps 40, Euler a, CFG 7, 512x512) with the bundled models'
# own size (64x64) and 15 steps. The U-Net is 80% of the demo's time (bench/RESULTS.md), so steps
# are the knob: 15 keeps the whole demo (102 variants x 4 seeds) within 3 minutes on a busy 2-core
# CPU (20 steps took 221 s wall / 112 CPU s at load average 5; 40 would double that).
DEMO_PARAMS = "Steps: 15, Sampler: Euler a, CFG scale: 7, Size: 64x64"
DEMO_PROMPTS = (
    "a large red circle on the left, white background",
    "a small blue triangle at the top, gray background",
)
# The article rendered one prompt; so does the demo (a second prompt doubles the time). Sweeps take
# any number of prompts and the report switches between them.
DEMO_N_PROMPTS = 1


@dataclass(frozen=True)
class DemoConfig:
    model_a: str = "tiny-a"
    model_b: str = "tiny-b"
    prompts: tuple[str, ...] = tuple(f"{p}\n{DEMO_PARAMS}" for p in DEMO_PROMPTS[:DEMO_N_PROMPTS])
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    k: float = 0.75
    blocks: str | None = None  # a subset (weight-spec grammar) or all blocks
    reverse: bool = True  # also B with each block from A
    overrides: dict[str, Any] = field(default_factory=dict)


def demo_config(quick: bool = False) -> DemoConfig:
    """The full demo, or a quick one (one prompt, 2 seeds, 8 steps) for tests and a first look."""
    if not quick:
        return DemoConfig()
    return DemoConfig(prompts=(f"{DEMO_PROMPTS[0]}\n{DEMO_PARAMS}",), seeds=(1, 2), overrides={"steps": 8})


@dataclass
class DemoResult:
    index: Path  # the main report: tiny-a scaled, bypassed, with blocks from tiny-b
    reverse_index: Path | None  # tiny-b with blocks from tiny-a
    timings: dict[str, float]


def _default_names() -> tuple[str, str]:
    from ..models import list_models

    ms = list_models()
    if len(ms) < 2:
        raise BlockmergeError("demo: the bundled models are missing from this installation (blockmerge/data/models)")
    return ms[0].name, ms[1].name


@made_folders_guard()  # a failure removes the (empty) folders this call made, as the CLI does
def run_demo(out_dir: str | os.PathLike[str], config: DemoConfig | None = None, *, progress: bool = True,
             device: str | None = None, overwrite: bool = False) -> DemoResult:
    """Run the demo into ``out_dir`` (resumable: a rerun reuses the images) and write the reports.

    ``overwrite`` lets it replace files in ``out_dir`` that blockmerge did not write (its own earlier
    report and sweep files are replaced anyway)."""
    from ..generation.loader import load_pipeline
    from ..models import resolve_model
    from .inplace import InPlaceModel
    from .report import write_report
    from .sweep import parse_blocks

    cfg = config or DemoConfig()
    if cfg.model_a == DemoConfig.model_a and cfg.model_b == DemoConfig.model_b:
        cfg = replace(cfg, model_a=_default_names()[0], model_b=_default_names()[1])
    path_a, path_b = resolve_model(cfg.model_a), resolve_model(cfg.model_b)
    # Bundled models go by their names, files by their stems (the names in labels and infotexts).
    name_a = cfg.model_a if str(cfg.model_a) != str(path_a) else path_a.stem
    name_b = cfg.model_b if str(cfg.model_b) != str(path_b) else path_b.stem
    if name_a == name_b:
        raise BlockmergeError(f"demo: models A and B are both {name_a!r}; give two different models")
    from ..io import check_output_dir

    out = check_output_dir(out_dir, make=False)
    t0 = time.perf_counter()
    a = load_pipeline(path_a, device=device)
    b = load_pipeline(path_b, device=device)
    arch = a.architecture
    blocks = parse_blocks(cfg.blocks, arch)
    t_load = time.perf_counter() - t0

    variants = scale_variants(arch, blocks, (cfg.k,)) + bypass_variants(blocks) + swap_variants(arch, blocks, name_b)
    main_dir = out
    rev_dir = out / "reverse"
    ipm_a = InPlaceModel(a, {name_b: b})
    t1 = time.perf_counter()
    res = run_sweep(a, variants, cfg.prompts, main_dir, seeds=cfg.seeds, donors={name_b: b},
                    overrides=cfg.overrides, progress=progress, inplace=ipm_a, model_name=name_a,
                    overwrite=overwrite)
    t_sweep = time.perf_counter() - t1
    rev = None
    t_rev = 0.0
    if cfg.reverse:
        ipm_b = InPlaceModel(b, {name_a: a})
        t2 = time.perf_counter()
        rev = run_sweep(b, swap_variants(arch, blocks, name_a), cfg.prompts, rev_dir, seeds=cfg.seeds,
                        donors={name_a: a}, overrides=cfg.overrides, progress=progress, inplace=ipm_b,
                        model_name=name_b, overwrite=overwrite)
        t_rev = time.perf_counter() - t2
        res.meta["links"] = [["reverse swap: " + name_b + " with blocks from " + name_a, "reverse/index.html"]]
        rev.meta["links"] = [["main report: " + name_a, "../index.html"]]
        rev.save(overwrite=overwrite)
    res.save(overwrite=overwrite)
    t3 = time.perf_counter()
    index = write_report(main_dir, res, title=f"blockmerge demo: {name_a} (scaled ×{cfg.k:g}, bypassed, "
                                               f"blocks from {name_b})", overwrite=overwrite)
    rev_index = None
    if rev is not None:
        rev_index = write_report(rev_dir, rev, title=f"blockmerge demo: {name_b} with blocks from {name_a}",
                                 overwrite=overwrite)
    t_report = time.perf_counter() - t3
    timings = {"load_s": t_load, "sweep_s": t_sweep, "reverse_s": t_rev, "report_s": t_report,
               "total_s": time.perf_counter() - t0}
    return DemoResult(index, rev_index, {k: round(v, 2) for k, v in timings.items()})
