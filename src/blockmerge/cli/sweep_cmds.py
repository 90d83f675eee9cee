"""sweep, demo, report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import BATCH, IMAGE_SIDE, STEPS, THREADS, device, finite_float, printable
from .generate_cmds import add_prediction_option


def _read_prompts(args: argparse.Namespace) -> list[str]:
    from ..errors import BlockmergeError
    from ..io.text import read_user_text, split_lines

    prompts = list(args.prompt or [])
    for f in args.prompt_file or []:
        text = read_user_text(f, f"--prompt-file {f}")
        # One infotext per file, or several separated by a line holding only "---".
        parts: list[list[str]] = [[]]
        for line in split_lines(text):
            if line == "---":
                parts.append([])
            else:
                parts[-1].append(line)
        prompts += [p for p in ("\n".join(lines).strip() for lines in parts) if p]
    if not prompts:
        raise BlockmergeError("give at least one --prompt (A1111 infotext) or --prompt-file")
    return prompts


def _threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def _check_sweep_folder(out: Path, overwrite: bool, reverse: bool) -> None:
    """Before the slow model load: a file the sweep or its report would replace but may not stops it."""
    from ..experiments.outputs import check_sweep_folder

    check_sweep_folder(out, overwrite)
    if reverse:
        check_sweep_folder(out / "reverse", overwrite)


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..errors import BlockmergeError
    from ..experiments.report import write_report
    from ..experiments.sweep import parse_blocks, plan_variants, run_sweep, swap_variants
    from ..generation.generate import parse_seeds
    from ..generation.loader import load_pipeline
    from ..merge import load_presets
    from ..merge.executor import output_dtype
    from ..merge.params import parse_name_specs, parse_param_args
    from ..models import resolve_model

    prompts = _read_prompts(args)
    seeds = parse_seeds(args.seeds, "--seeds")
    customs = [(n, spec.strip()) for n, spec in parse_name_specs(args.custom, "--custom", "--custom gradv=GRAD_V").items()]
    _threads(args)
    if not (args.scale or args.bypass or args.swap or args.custom or args.lora):
        raise BlockmergeError("choose at least one experiment: --scale K, --bypass, --swap, --custom NAME=SPEC "
                              "or --lora FILE")
    if args.lora and (args.scale or args.bypass or args.swap or args.custom or args.reverse):
        raise BlockmergeError("--lora is an experiment of its own (its baseline is the model with the whole LoRA); "
                              "run --scale/--bypass/--swap/--custom in another sweep")
    lora_spec = None
    if args.lora:
        from ..lora.spec import parse_lora_arg

        lora_spec = parse_lora_arg(args.lora, args.lora_dir, "--lora")
        if lora_spec.blocks is not None:
            raise BlockmergeError(f"--lora {args.lora}: give FILE[:STRENGTH]; the sweep varies the blocks itself "
                                  "(--blocks chooses which)")
    if (args.swap or args.reverse) and not args.donor:
        raise BlockmergeError("--swap / --reverse need --donor MODEL (the model blocks are taken from)")
    from ..io import check_output_dir

    presets = load_presets(args.presets or [])  # read (and so protected) before the folder is checked
    out = check_output_dir(args.output, make=False)  # made by the sweep, after the models load
    _check_sweep_folder(out, args.overwrite, args.reverse)
    dtype = output_dtype(args.dtype) if args.dtype else None
    path_a = resolve_model(args.model)
    model = load_pipeline(path_a, device=args.device, dtype=dtype, prediction_type=args.prediction_type)
    arch = model.architecture
    blocks = parse_blocks(args.blocks, arch)
    donor_name = None
    donors = {}
    for spec in args.donor or []:
        path_b = resolve_model(spec)
        name = path_b.stem if spec != path_b.stem else spec
        while name == path_a.stem or name in donors:
            name += "-donor"
        donors[name] = load_pipeline(path_b, device=args.device, dtype=dtype, prediction_type=args.prediction_type)
        donor_name = donor_name or name  # the first donor is the one --swap / --reverse use
    variants = plan_variants(arch, blocks, scale=args.scale or (), bypass=args.bypass,
                             swap_donor=donor_name if args.swap else None, swap_ratios=args.swap_ratio or [1.0],
                             custom=customs, method=args.method, params=parse_param_args(args.param),
                             donors=list(donors), presets=presets, clamp=args.clamp)
    if lora_spec is not None:  # an experiment of its own: never beside the others (checked above)
        from ..experiments.sweep import lora_variants

        chosen = blocks if args.blocks else None
        variants += lora_variants(arch, lora_spec.path, path_a, lora_spec.unet, chosen)
    overrides = {"steps": args.steps, "sampler": args.sampler, "cfg_scale": args.cfg_scale,
                 "width": args.width, "height": args.height}
    result = run_sweep(model, variants, prompts, out, seeds=seeds, donors=donors, overrides=overrides,
                       batch_size=args.batch_size, progress=not args.quiet, model_name=path_a.stem,
                       overwrite=args.overwrite, lora_dir=args.lora_dir)
    for w in result.meta.get("warnings", []):
        print(f"blockmerge: warning: {w}", file=sys.stderr)
    if not args.no_report:
        index = write_report(out, result, overwrite=args.overwrite)
        print(f"report: {printable(index)}")
    if args.reverse:
        b = donors[donor_name]
        rev = run_sweep(b, swap_variants(arch, blocks, path_a.stem, (args.swap_ratio or [1.0])[0]), prompts,
                        out / "reverse", seeds=seeds, donors={path_a.stem: model}, overrides=overrides,
                        batch_size=args.batch_size, progress=not args.quiet, model_name=donor_name,
                        overwrite=args.overwrite)
        if not args.no_report:
            print(f"reverse report: {printable(write_report(out / 'reverse', rev, overwrite=args.overwrite))}")
    m = result.meta
    print(f"{len(result.images)} images in {printable(out)} ({m['images_made']} made, {m['images_reused']} reused)",
          file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..experiments.demo import demo_config, run_demo

    if args.threads is None and (args.device or "cpu").startswith("cpu"):
        # The bundled models are so small that a U-Net step is dispatch-bound: a second thread gains
        # little, and on a shared 2-core machine two OpenMP threads can stall each other badly.
        import torch

        if not torch.cuda.is_available() or args.device:
            args.threads = 1
    _threads(args)
    _check_sweep_folder(Path(args.output), args.overwrite, reverse=True)
    res = run_demo(args.output, demo_config(quick=args.quick), progress=not args.quiet, device=args.device,
                   overwrite=args.overwrite)
    print(f"report: {printable(res.index)}")
    if res.reverse_index:
        print(f"reverse swap report: {printable(res.reverse_index)}")
    print(f"open it in a browser: file://{printable(res.index.resolve())}  ({res.timings['total_s']:.0f} s)", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..experiments.report import write_report
    from ..experiments.results import SweepResult

    result = SweepResult.load(Path(args.folder))
    index = write_report(Path(args.output) if args.output else result.root, result, overwrite=args.overwrite)
    print(f"report: {printable(index)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="one variant per block (scaled, bypassed, swapped) or custom merges, U-shaped report",
        description="Load MODEL once; for each block render the same prompts and seeds with that block changed "
                    "in place (restored bit-exactly after), then write the U-shaped report with metrics. "
                    "Rerunning into the same folder reuses the images already made.")
    p.add_argument("model", help="checkpoint file or bundled model name (tiny-a)")
    p.add_argument("-o", "--output", required=True, help="output folder (images, sweep.json, report)")
    p.add_argument("--prompt", action="append", metavar="INFOTEXT",
                   help="A1111 infotext (prompt, 'Negative prompt:' line, 'Steps: ..' line); repeatable")
    p.add_argument("--prompt-file", action="append", metavar="FILE",
                   help="file of infotexts separated by lines of '---' (e.g. copied from PNG Info)")
    p.add_argument("--seeds", default="1-4", help="seeds, e.g. 1-4 or 1,5,9 (default 1-4)")
    p.add_argument("--blocks", metavar="IDS", help="block subset, e.g. IN04-IN08,M00 or OUT (default all)")
    p.add_argument("--scale", type=finite_float, action="append", metavar="K",
                   help="each block times K, the rest untouched (repeatable: --scale 0.75 --scale 0)")
    p.add_argument("--bypass", action="store_true", help="each block bypassed (its residual branches add zero)")
    p.add_argument("--donor", metavar="MODEL", action="append",
                   help="model B for --swap / --custom / --reverse; repeat for methods of more models (B, C, ...): "
                        "--custom uses all, --swap the first")
    p.add_argument("--swap", action="store_true", help="each block taken from --donor, the rest from MODEL")
    p.add_argument("--swap-ratio", type=finite_float, action="append", metavar="R",
                   help="take the block at ratio R: (1-R)·A + R·B (default 1; repeatable)")
    p.add_argument("--reverse", action="store_true", help="also the reverse swap (donor with each block from MODEL)")
    p.add_argument("--custom", action="append", metavar="NAME=SPEC",
                   help="a named variant from a full weight spec (preset, list, 'IN04-IN08=0.5'); repeatable")
    p.add_argument("--lora", metavar="FILE[:STRENGTH]",
                   help="the experiment on a LoRA: baseline = MODEL + the whole LoRA; per block it touches, the "
                        "LoRA without that block and with only that block (and the model alone)")
    p.add_argument("--lora-dir", metavar="DIR",
                   help="where --lora NAME and the prompts' <lora:NAME:...> are looked up")
    from ..merge.methods import METHODS

    p.add_argument("--method", choices=list(METHODS), metavar="METHOD",
                   help="method of --custom, any of `blockmerge methods` (default weighted_sum with --donor, "
                        "else scaled_sum); SPEC is its α")
    p.add_argument("--param", action="append", metavar="NAME=SPEC",
                   help="another parameter of --custom's method, per block (repeatable), e.g. --param k=0.3")
    p.add_argument("--clamp", action="store_true",
                   help="clip every --custom variant's result to the per-element range of its models (as merge --clamp)")
    p.add_argument("--presets", action="append", metavar="FILE", help="extra preset file")
    p.add_argument("--steps", type=STEPS, help="override the infotexts' Steps")
    p.add_argument("--sampler", help="override the infotexts' Sampler")
    p.add_argument("--cfg-scale", type=finite_float, help="override the infotexts' CFG scale")
    p.add_argument("--width", type=IMAGE_SIDE, help="override the image width (a multiple of 8)")
    p.add_argument("--height", type=IMAGE_SIDE, help="override the image height (a multiple of 8)")
    p.add_argument("--batch-size", type=BATCH, help="seeds per batch (default all seeds of a prompt)")
    p.add_argument("--device", type=device, help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="compute dtype (default fp16 on CUDA, fp32 on CPU)")
    add_prediction_option(p)
    p.add_argument("--no-report", action="store_true", help="only make the images and sweep.json")
    p.add_argument("--threads", type=THREADS, metavar="N",
                   help="torch CPU threads (default torch's; 1 is often faster on a busy 2-core machine)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files in the folder that blockmerge did not write (its own are reused or replaced)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("demo", help="the article's experiment on the bundled models, as a U-shaped report",
                       description="On the bundled tiny models: each of the 25 blocks scaled by 0.75, bypassed, "
                                   "and swapped between the two models; seeds 1-4. Prints where the report is.")
    p.add_argument("-o", "--output", default="blockmerge-demo", help="output folder (default ./blockmerge-demo)")
    p.add_argument("--quick", action="store_true", help="one prompt, seeds 1-2, 8 steps (a first look)")
    p.add_argument("--threads", type=THREADS, metavar="N",
                   help="torch CPU threads (default 1 on CPU: the tiny models gain little from more)")
    p.add_argument("--device", type=device, help="cpu, cuda ... (default: CUDA if available)")
    p.add_argument("--overwrite", action="store_true", help="replace files in the folder that blockmerge did not write")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="(re)write the report of a sweep folder from its sweep.json")
    p.add_argument("folder", help="a sweep folder (with sweep.json)")
    p.add_argument("-o", "--output", help="report folder (default: the sweep folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files there that blockmerge did not write (an earlier report is replaced anyway)")
    p.set_defaults(func=cmd_report)
