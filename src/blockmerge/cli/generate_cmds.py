"""generate, models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import BATCH, CLIP_SKIP, IMAGE_SIDE, STEPS, device, finite_float, printable


def _params_from_args(args: argparse.Namespace):
    from ..errors import BlockmergeError
    from ..generation.generate import GenerationParams, parse_seeds
    from ..generation.infotext import Infotext, parse_infotext, read_png_infotext
    from ..io.text import read_user_text

    text = None
    source = "--infotext"
    if sum(x is not None for x in (args.infotext, args.infotext_file, args.from_png)) > 1:
        raise BlockmergeError("give only one of --infotext, --infotext-file, --from-png")
    if args.infotext is not None:
        text = args.infotext
    elif args.infotext_file is not None:
        source = args.infotext_file
        text = read_user_text(args.infotext_file, f"--infotext-file {args.infotext_file}")
    elif args.from_png is not None:
        from ..io import check_input_file

        source = args.from_png
        check_input_file(args.from_png, f"--from-png {args.from_png}")
        text = read_png_infotext(args.from_png)
        if text is None:
            raise BlockmergeError(f"--from-png {args.from_png}: the PNG has no A1111 parameters")
    info = parse_infotext(text, source=source, require_params=False) if text is not None else Infotext()
    seeds = parse_seeds(args.seed) if args.seed is not None else None
    params = GenerationParams.from_infotext(
        info, prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, sampler=args.sampler,
        cfg_scale=args.cfg_scale, width=args.width, height=args.height, clip_skip=args.clip_skip, seeds=seeds,
        schedule_type=args.schedule_type, rng=args.rng, ensd=args.ensd, emphasis=args.emphasis,
        pad_conds=True if args.pad_conds else None,
    )
    if seeds is not None:  # other seeds: the infotext's batch neighbours mean nothing for them
        from dataclasses import replace

        params = replace(params, source_batch=None)
    return params


def _png_name(n: int, seed: int) -> str:
    return f"{n:05d}-{seed}.png"


def _batch_size_used(params, batch_size: int | None) -> int:
    """The largest U-Net batch :func:`generate` will draw (DPM adaptive: 1; an infotext's Batch size;
    else ``--batch-size`` or all seeds): asked of generate's own batching, not guessed again."""
    from ..generation.generate import _batches
    from ..generation.samplers import SAMPLERS

    spec = SAMPLERS[params.sampler_name]
    return max(len(chunk) for chunk, _ in _batches(list(params.seeds), params, spec, batch_size))


def _check_memory(dims, params, args: argparse.Namespace, default_size: int, device, dtype) -> None:
    from ..generation.budget import check_batch_memory

    batch = _batch_size_used(params, args.batch_size)
    batch_arg = (f"--batch-size {args.batch_size}" if args.batch_size and batch == args.batch_size
                 else f"--seed ({len(params.seeds)} seeds)")
    check_batch_memory(dims, width=params.width or default_size, height=params.height or default_size,
                       batch=batch, device=device, dtype_bytes=dtype.itemsize, batch_arg=batch_arg)


def cmd_generate(args: argparse.Namespace) -> int:
    from ..generation.budget import dims_from_configs, dims_from_file
    from ..generation.generate import generate, save_png
    from ..generation.loader import default_device_dtype, load_pipeline
    from ..io import check_output_dir, check_output_path
    from ..merge.executor import output_dtype

    params = _params_from_args(args)  # validate everything before the slow load
    from ..generation.extra_networks import lora_calls
    from ..merge import load_presets
    from ..models import resolve_model

    lora_calls(params.prompt)  # a malformed <lora:...> is an error before the slow load

    presets = load_presets(args.presets or [])  # read (and so protected) before the outputs are checked
    out = check_output_dir(args.output, make=False)
    if args.overwrite and out.is_dir():
        # --overwrite reuses the names 00000-SEED.png, ...: one of them may be a file this command
        # reads (--from-png out/00000-1.png); refused now, not after sampling.
        for n, seed in enumerate(params.seeds):
            check_output_path(out / _png_name(n, seed), (), True)
    model_path = resolve_model(args.model)
    dtype = output_dtype(args.dtype) if args.dtype else None
    device, compute_dtype = default_device_dtype(args.device, dtype)
    early = dims_from_file(model_path)  # a safetensors header: the widths without loading anything
    if early is not None:
        _check_memory(early[0], params, args, early[1], device, compute_dtype)
    for note in params.ignored:
        print(f"blockmerge: warning: {note}", file=sys.stderr)
    loaded = load_pipeline(model_path, device=args.device, dtype=dtype, prediction_type=args.prediction_type)
    if loaded.configs is not None:  # exact widths and size, and the memory left after loading
        _check_memory(dims_from_configs(loaded.configs), params, args, loaded.resolution, loaded.device,
                      loaded.dtype)
    check_output_dir(out)  # a folder made here and left empty by a failure is removed by the CLI
    written: list[Path] = []

    def save(img) -> None:
        path = out / _png_name(len(written), img.seed)
        n = len(written)
        while (path.exists() or path.is_symlink()) and not args.overwrite:
            n += 1
            path = out / _png_name(n, img.seed)
        written.append(save_png(img, path, overwrite=args.overwrite))
        if not args.quiet:
            print(printable(path))

    notes: list[str] = []
    generate(loaded, params, batch_size=args.batch_size, on_image=save, lora_dir=args.lora_dir, notes=notes,
             presets=presets)
    for note in dict.fromkeys(notes):
        print(f"blockmerge: warning: {note}", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ..models import list_bundled_loras, list_models

    for m in list_models():
        print(f"{m.name:<12} {m.path}")
        print(f"  {m.style}{f' (fine-tuned from {m.parent})' if m.parent and m.parent not in m.style else ''}; "
              f"{m.image_size}x{m.image_size} images")
        print(f"  e.g. {m.example_prompt!r}")
        if m.vocabulary:
            for k, v in m.vocabulary.items():
                print(f"  {k}: {', '.join(v) if isinstance(v, list) else v}")
    for lo in list_bundled_loras():
        print(f"{lo.name:<12} {lo.path}")
        print(f"  a LoRA for {lo.base}: {lo.style}")
    return 0


def add_prediction_option(p: argparse.ArgumentParser) -> None:
    """``--prediction v|eps`` (also spelt ``--prediction-type``, with ``v_prediction`` / ``epsilon``)."""
    p.add_argument("--prediction", "--prediction-type", dest="prediction_type",
                   choices=["v", "eps", "v_prediction", "epsilon"],
                   help="override prediction-type detection (SD2 768-v; SDXL v_pred / ztsnr marker keys); "
                        "v keeps the zero-terminal-SNR schedule of a file with the ztsnr marker")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images offline from a single-file checkpoint",
                       description="Generate images with A1111 semantics; explicit options override the infotext.")
    p.add_argument("model", nargs="?", default=None, help="checkpoint path or bundled model name (default: bundled)")
    p.add_argument("-o", "--output", required=True, help="output folder for PNGs")
    src = p.add_argument_group("infotext")
    src.add_argument("--infotext", metavar="TEXT", help="A1111 'PNG Info' text")
    src.add_argument("--infotext-file", metavar="FILE", help="a file holding A1111 infotext")
    src.add_argument("--from-png", metavar="PNG", help="take the infotext from a PNG's parameters")
    p.add_argument("--prompt")
    p.add_argument("--negative-prompt")
    p.add_argument("--steps", type=STEPS)
    p.add_argument("--sampler", help="A1111 sampler name, e.g. 'Euler a', 'DPM++ 2M' (old names like "
                   "'DPM++ 2M Karras' work)")
    p.add_argument("--schedule-type", help="A1111 Schedule type: Automatic, Karras, Exponential, SGM Uniform, ...")
    p.add_argument("--cfg-scale", type=finite_float)
    p.add_argument("--seed", help="one seed, a list (1,2,3,4) or a range (1-4)")
    p.add_argument("--width", type=IMAGE_SIDE, help="a multiple of 8 up to 8192")
    p.add_argument("--height", type=IMAGE_SIDE, help="a multiple of 8 up to 8192")
    p.add_argument("--batch-size", type=BATCH, help="images per U-Net batch (default: all seeds at once)")
    p.add_argument("--clip-skip", type=CLIP_SKIP)
    p.add_argument("--rng", choices=["GPU", "CPU", "NV"],
                   help="A1111's noise source (default GPU; drawn as NV, the same stream, without CUDA)")
    p.add_argument("--ensd", type=int, help="A1111's Eta noise seed delta (ENSD)")
    p.add_argument("--emphasis", choices=["Original", "No norm", "Ignore", "None"], help="A1111 emphasis mode")
    p.add_argument("--pad-conds", action="store_true",
                   help="pad prompt/negative prompt to the same length (A1111's 'Pad conds')")
    p.add_argument("--device", type=device, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="default: fp16 on CUDA, fp32 on CPU")
    add_prediction_option(p)
    p.add_argument("--lora-dir", metavar="DIR",
                   help="where <lora:NAME:...> in the prompt finds NAME (as A1111's models/Lora; the bundled "
                        "LoRAs are found by name too)")
    p.add_argument("--presets", action="append", metavar="FILE",
                   help="extra preset file for lbw= (LoRA Block Weight's NAME:values, or NAME<TAB>values)")
    p.add_argument("--overwrite", action="store_true", help="reuse file names in the output folder")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("models", help="list the bundled models and what they can draw")
    p.set_defaults(func=cmd_models)
