"""lora apply, lora extract, lora merge, lora resize."""

from __future__ import annotations

import argparse
import sys

from .common import THREADS, device, int_range, output_file, printable

RANK = int_range(1, 100_000)


def _specs(items: list[str], lora_dir: str | None, arg: str = "LORA") -> list:
    from ..lora.spec import parse_lora_arg

    return [parse_lora_arg(t, lora_dir, arg) for t in items]


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        print(f"blockmerge: warning: {w}", file=sys.stderr)


def _energy_table(arch_name: str, energy: dict[str, tuple[float, float]]) -> None:
    from ..architectures import by_name

    order = by_name(arch_name).all_ids
    print(f"{'block':<8} {'kept ||ΔW||²':>14}")
    for b in order:
        if b in energy:
            kept, total = energy[b]
            print(f"{b:<8} {kept / total if total > 0 else 1.0:>13.1%}")


def cmd_lora_apply(args: argparse.Namespace) -> int:
    from ..lora import apply_loras
    from ..merge import load_presets
    from ..models import resolve_model

    specs = _specs(args.loras, args.lora_dir)
    result = apply_loras(
        resolve_model(args.model), specs, args.output, dtype=args.dtype, fmt=args.format, overwrite=args.overwrite,
        presets=load_presets(args.presets or []), progress=not args.quiet, threads=args.threads,
        allow_non_finite=args.allow_non_finite,
    )
    _warn(result.warnings)
    if not args.quiet:
        names = ", ".join(f"{r['name']} ({r['modules']} modules)" for r in result.loras)
        print(f"wrote {printable(result.output)} ({result.architecture} + {printable(names)}, {args.dtype}, "
              f"{result.n_tensors} tensors, {result.bytes_written / 2**20:.1f} MiB)")
    return 0


def cmd_lora_extract(args: argparse.Namespace) -> int:
    from ..lora import extract_lora
    from ..merge import load_presets
    from ..models import resolve_model

    result = extract_lora(
        resolve_model(args.tuned), resolve_model(args.base), args.output, rank=args.rank, conv_rank=args.conv_rank,
        clamp_quantile=args.clamp_quantile, min_diff=args.min_diff, blocks=args.blocks, dtype=args.dtype,
        device=args.device, overwrite=args.overwrite, presets=load_presets(args.presets or []),
    )
    _warn(result.warnings)
    if not args.quiet:
        conv = f", conv rank {result.conv_rank}" if result.conv_rank else ""
        te = "with" if result.text_encoder else "without"
        print(f"wrote {printable(result.output)} ({result.architecture} LoRA, rank {result.rank}{conv}, "
              f"{result.modules} modules, {te} text encoder)")
        _energy_table(result.architecture, result.energy)
    return 0


def cmd_lora_merge(args: argparse.Namespace) -> int:
    from ..lora import merge_loras
    from ..merge import load_presets

    result = merge_loras(_specs(args.loras, args.lora_dir), args.output, rank=args.rank, conv_rank=args.conv_rank,
                         dtype=args.dtype, overwrite=args.overwrite, presets=load_presets(args.presets or []))
    _warn(result.warnings)
    if not args.quiet:
        ranks = sorted(set(result.ranks.values()))
        how = f"factored to rank {args.rank}" if args.rank else f"concatenated, ranks {', '.join(map(str, ranks))}"
        print(f"wrote {printable(result.output)} ({result.architecture} LoRA, {result.modules} modules, {how})")
        if result.energy:
            _energy_table(result.architecture, result.energy)
    return 0


def cmd_lora_resize(args: argparse.Namespace) -> int:
    from ..lora import resize_lora
    from ..lora.spec import parse_lora_arg

    spec = parse_lora_arg(args.lora, args.lora_dir)
    if spec.blocks is not None or spec.unet != 1.0:
        from ..errors import BlockmergeError

        raise BlockmergeError(f"{args.lora}: resize takes a LoRA file, not a strength or blocks "
                              "(use `lora merge FILE:W:BLOCKS --rank R` to weigh it)")
    result = resize_lora(spec.path, args.output, rank=args.rank, keep_energy=args.keep_energy, dtype=args.dtype,
                         overwrite=args.overwrite)
    _warn(result.warnings)
    if not args.quiet:
        ranks = sorted(result.ranks.values())
        print(f"wrote {printable(result.output)} ({result.architecture} LoRA, {result.modules} modules, "
              f"ranks {ranks[0]}..{ranks[-1]})")
        _energy_table(result.architecture, result.energy)
    return 0


def _common(p: argparse.ArgumentParser, dtype_default: str = "fp16") -> None:
    from ..io import OUTPUT_DTYPES

    p.add_argument("-o", "--output", required=True, type=output_file, help="output file (.safetensors)")
    p.add_argument("--dtype", default=dtype_default, choices=list(OUTPUT_DTYPES), help=f"default {dtype_default}")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("-q", "--quiet", action="store_true")


def _lora_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora-dir", metavar="DIR", help="look LoRA names up in this folder (as A1111's models/Lora)")
    p.add_argument("--presets", action="append", metavar="FILE",
                   help="extra preset file (Merge Block Weighted's NAME<TAB>values or LoRA Block Weight's NAME:values)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lora", help="bake, extract, merge and resize LoRAs, with block weights",
                       description="LoRAs as low-rank deltas: bake them into checkpoints by block, extract them "
                                   "from two checkpoints, merge and resize them.")
    lsub = p.add_subparsers(dest="lora_command", metavar="LORA_COMMAND", parser_class=type(p))

    a = lsub.add_parser("apply", help="bake LoRAs into a checkpoint (streaming, per-block strengths)",
                        description="Bake one or more LoRAs into a checkpoint: MODEL + Σ strength·block·ΔW, math in "
                                    "float32. BLOCKS is any weight spec: LoRA Block Weight's 17/26 (SD1/SD2), 12/20 "
                                    "(SDXL) or 61 (Flux) values, a preset (ALL, INS, OUTD, ... or Merge Block "
                                    "Weighted's), or IN04-IN08=1 (blocks not named get 0); BASE is the text encoder.")
    a.add_argument("model", metavar="MODEL", help="checkpoint (or bundled model name)")
    a.add_argument("loras", nargs="+", metavar="LORA[:STRENGTH[:BLOCKS]]", help="LoRA file or name, in order")
    _common(a)
    a.add_argument("--format", choices=["safetensors", "ckpt"], help="default: from the output's suffix")
    a.add_argument("--threads", type=THREADS, help="worker threads (default: every core, at most 2: the LoRA products are compute-bound)")
    a.add_argument("--allow-non-finite", action="store_true", help="write inf/NaN results anyway (with a warning)")
    _lora_dir(a)
    a.set_defaults(func=cmd_lora_apply)

    e = lsub.add_parser("extract", help="a LoRA from the difference of two checkpoints (kohya's semantics)",
                        description="Extract TUNED - BASE as a kohya LoRA: per-module SVD to --rank (attention) "
                                    "and --conv-rank (resblock 3x3 convolutions, LoCon), clamped at "
                                    "--clamp-quantile; prints the share of each block's ||ΔW||² the ranks keep.")
    e.add_argument("tuned", metavar="TUNED")
    e.add_argument("base", metavar="BASE")
    _common(e)
    e.add_argument("--rank", type=RANK, required=True, help="rank of Linear and 1x1 modules")
    e.add_argument("--conv-rank", type=RANK, help="also extract 3x3 convolutions, at this rank (LoCon)")
    e.add_argument("--clamp-quantile", type=float, default=0.99, help="clamp factors to this quantile (default 0.99)")
    e.add_argument("--min-diff", type=float, default=0.01,
                   help="extract the text encoders only if a weight there differs by more (default 0.01)")
    e.add_argument("--blocks", metavar="SPEC", help="weight spec: blocks at 0 are left out, others scale ΔW")
    e.add_argument("--device", type=device, default="cpu", help="where the SVDs run (cpu, cuda)")
    e.add_argument("--presets", action="append", metavar="FILE", help="extra preset file")
    e.set_defaults(func=cmd_lora_extract)

    m = lsub.add_parser("merge", help="merge LoRAs (concatenate, or SVD to a rank)",
                        description="Merge LoRAs, each weighed by STRENGTH and BLOCKS: concatenated exactly (ranks "
                                    "add up), or with --rank summed and factored to that rank by SVD.")
    m.add_argument("loras", nargs="+", metavar="LORA[:W[:BLOCKS]]")
    _common(m)
    m.add_argument("--rank", type=RANK, help="factor the sum to this rank (default: concatenate)")
    m.add_argument("--conv-rank", type=RANK, help="rank of 3x3 convolutions with --rank (default: --rank)")
    _lora_dir(m)
    m.set_defaults(func=cmd_lora_merge)

    r = lsub.add_parser("resize", help="re-factor a LoRA to a lower rank, or to keep a share of ||ΔW||²",
                        description="Re-factor every module of a LoRA by SVD: to --rank, or to the smallest rank "
                                    "keeping --keep-energy of its ||ΔW||² (both: whichever is smaller).")
    r.add_argument("lora", metavar="LORA")
    _common(r)
    r.add_argument("--rank", type=RANK)
    r.add_argument("--keep-energy", type=float, metavar="FRACTION", help="e.g. 0.95")
    r.add_argument("--lora-dir", metavar="DIR", help="look the LoRA name up in this folder")
    r.set_defaults(func=cmd_lora_resize)

    def no_sub(args: argparse.Namespace) -> int:
        from ..errors import BlockmergeError

        raise BlockmergeError("lora: give a command: apply, extract, merge or resize (`blockmerge lora --help`)")

    p.set_defaults(func=no_sub)
