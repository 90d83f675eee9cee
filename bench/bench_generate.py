"""Generation overhead: `blockmerge generate`'s code path vs a plain diffusers pipeline call with the
same model and settings, and four seeds in one batch vs one at a time.

    python bench/bench_generate.py [--model NAME_OR_PATH] [--size PX] [--steps N] [--repeats R]

Both contenders run in this process on the same loaded pipeline (the model load is common to both
and timed separately), alternating so that neither gets a warmer cache. The plain call is what a
diffusers user writes: ``pipe(prompt, negative_prompt, ...)`` with a seeded generator and diffusers'
Euler ancestral scheduler; blockmerge runs A1111's own loop instead (prompt weighting/chunking and
schedules, k-diffusion's Euler a over the CompVis wrapper, the NV noise stream per seed, final
latents, a separate VAE decode).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, md_table, write_results_section  # noqa: E402

PROMPT = "a large red circle on the left, white background"
NEGATIVE = "blurry"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="bundled model name or checkpoint (default: bundled default)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    args = ap.parse_args()

    from diffusers import EulerAncestralDiscreteScheduler

    from blockmerge.generation.generate import GenerationParams, generate
    from blockmerge.generation.loader import load_pipeline
    from blockmerge.generation.samplers import SD_SCHEDULER_CONFIG

    try:
        from blockmerge.models import resolve_model

        model_path = resolve_model(args.model)
    except ImportError:
        from blockmerge.architectures.synthetic import write_synthetic

        model_path = write_synthetic(Path(tempfile.mkdtemp()) / "tiny.safetensors", "SD1", "tiny", seed=1)
    t0 = time.perf_counter()
    loaded = load_pipeline(model_path, device="cpu")
    load_s = time.perf_counter() - t0
    size = args.size or loaded.resolution
    pipe = loaded.pipeline
    params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=args.steps, sampler="Euler a",
                              cfg_scale=7.0, width=size, height=size, seeds=(1,))

    def plain(seed: int) -> None:
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(
            {**SD_SCHEDULER_CONFIG, "timestep_spacing": "linspace", "prediction_type": loaded.prediction_type})
        with torch.inference_mode():
            pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=7.0,
                 width=size, height=size, generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")

    def ours(seed: int) -> None:
        generate(loaded, params, seeds=[seed])

    plain(0)
    ours(0)  # warm-up: first calls allocate and pick kernels
    t_plain, t_ours = [], []
    for r in range(args.repeats):
        for name, fn, acc in (("plain", plain, t_plain), ("ours", ours, t_ours))[:: 1 if r % 2 == 0 else -1]:
            t = time.perf_counter()
            fn(r + 1)
            acc.append(time.perf_counter() - t)
            del name
    med_plain, med_ours = statistics.median(t_plain), statistics.median(t_ours)

    t_single, t_batch = [], []
    for _ in range(max(2, args.repeats // 2)):
        t = time.perf_counter()
        for s in (1, 2, 3, 4):
            generate(loaded, params, seeds=[s])
        t_single.append(time.perf_counter() - t)
        t = time.perf_counter()
        generate(loaded, params, seeds=[1, 2, 3, 4])
        t_batch.append(time.perf_counter() - t)
    single, batch = statistics.median(t_single), statistics.median(t_batch)

    rows = [
        ["plain diffusers pipeline call (1 image)", f"{med_plain:.3f} s", "1.00x"],
        ["blockmerge generate (1 image)", f"{med_ours:.3f} s", f"{med_ours / med_plain:.3f}x "
         f"(overhead {100 * (med_ours / med_plain - 1):+.1f}%)"],
        ["4 seeds one at a time", f"{single:.3f} s", "1.00x"],
        ["4 seeds in one batch", f"{batch:.3f} s", f"{batch / single:.2f}x ({4 / batch:.2f} images/s)"],
    ]
    info = machine_info(("torch", "diffusers", "transformers"))
    body = "\n".join([
        f"Model: `{Path(model_path).name}`, {size}x{size}, {args.steps} steps Euler a, CFG 7, CPU float32; "
        f"median of {args.repeats} alternating runs; model load {load_s:.2f} s (not counted).",
        "",
        md_table(["run", "time", "ratio"], rows),
        "",
        "Target: overhead <= 5% on the tiny model, CPU. Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
    ])
    print(body)
    if not args.no_write:
        write_results_section("Generation (issue 3)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
