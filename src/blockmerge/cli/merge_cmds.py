"""merge, methods, blocks, info, hash, presets, synthetic."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import THREADS, finite_float, output_file, printable


def _fmt_count(n: int) -> str:
    return f"{n:,}"


def cmd_merge(args: argparse.Namespace) -> int:
    from ..merge import load_presets, merge
    from ..merge.params import parse_param_args

    presets = load_presets(args.presets or [])
    result = merge(
        args.models,
        args.output,
        method=args.method,
        params=parse_param_args(args.param),
        alpha=args.alpha,
        beta=args.beta,
        base_alpha=args.base_alpha,
        base_beta=args.base_beta,
        clamp=args.clamp,
        allow_non_finite=args.allow_non_finite,
        dtype=args.dtype,
        fmt=args.format,
        overwrite=args.overwrite,
        vae=args.vae,
        keep_ema=args.keep_ema,
        fix_position_ids=args.fix_position_ids,
        presets=presets,
        progress=not args.quiet,
        threads=args.threads,
    )
    for w in result.report.warnings:
        print(f"blockmerge: warning: {w}", file=sys.stderr)
    if not args.quiet:
        rep = result.report
        print(f"wrote {printable(result.output)} ({result.architecture}, {result.method}, {args.dtype}, "
              f"{result.n_tensors} tensors, {result.bytes_written / 2**20:.1f} MiB)")
        if rep.partial_channels:
            print(f"merged the shared input channels of {', '.join(rep.partial_channels)}; the rest kept from A")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from ..merge.methods import METHODS

    if args.json:
        print(json.dumps([method_as_data(m) for m in METHODS.values()], indent=2))
        return 0
    for m in METHODS.values():
        kind = "elementwise" if m.elementwise else "whole tensors"
        print(f"{m.name}  [{kind}; result: {m.result}]")
        print(f"    {m.formula}")
        if m.summary:
            print(f"    {m.summary}")
        print(f"    operands: {m.operands_text()}")
        for p in m.params:
            default = "required" if p.default is None else f"default {p.default:g}"
            name = f"{p.name}1..{p.name}N" if p.per_operand else p.name
            print(f"    {name:<14} {default:<16} {p.range_text():<14} {p.meaning}")
        if m.source:
            print(f"    from: {m.source}")
        print()
    return 0


def method_as_data(m: object) -> dict[str, object]:
    """A method's declaration as plain data (``blockmerge methods --json``, the UI)."""
    from ..merge.declare import MergeMethod

    assert isinstance(m, MergeMethod)
    return {
        "name": m.name, "formula": m.formula, "summary": m.summary, "elementwise": m.elementwise,
        "result": m.result, "source": m.source, "identity": dict(m.identity),
        "operands": [{"name": o.name, "space": o.space, "variadic": o.variadic, "optional": o.optional}
                     for o in m.operands],
        "min_operands": m.min_operands, "max_operands": m.max_operands,
        "params": [{"name": p.name, "default": p.default, "range": p.range_text(), "kind": p.kind,
                    "per_operand": p.per_operand, "requires": p.requires, "meaning": p.meaning} for p in m.params],
    }


def bundled_or_path(name: str) -> str:
    """A file path as given, else a bundled LoRA's or model's file by its name (``tiny-b-outline``)."""
    from ..models import find_bundled_lora, resolve_model

    if Path(name).exists():
        return name
    found = find_bundled_lora(name)
    if found is not None:
        return str(found)
    try:
        return str(resolve_model(name))
    except Exception:
        return name  # the reader says what is wrong with it


def cmd_blocks(args: argparse.Namespace) -> int:
    from ..inspect import block_table
    from ..lora import is_lora_file

    args.model = bundled_or_path(args.model)

    if is_lora_file(args.model):
        return _lora_blocks(args)
    if args.lora_model:
        from ..errors import BlockmergeError

        raise BlockmergeError(f"--model: {args.model} is not a LoRA; --model names the checkpoint a LoRA is for")
    if args.alpha is not None or args.beta is not None or args.param:
        return _blocks_values(args)
    arch, rows, comps = block_table(args.model)
    if args.json:
        print(json.dumps({"architecture": arch, "blocks": [r.__dict__ for r in rows],
                          "base_components": [r.__dict__ for r in comps]}, indent=2))
        return 0
    print(f"{printable(args.model)}: {arch}")
    print(f"{'block':<8} {'tensors':>8} {'parameters':>15}")
    for r in rows:
        print(f"{r.block:<8} {r.tensors:>8} {_fmt_count(r.parameters):>15}")
    print(f"{'total':<8} {sum(r.tensors for r in rows):>8} {_fmt_count(sum(r.parameters for r in rows)):>15}")
    for c in comps:
        print(f"  BASE/{c.block:<5} {c.tensors:>6} {_fmt_count(c.parameters):>15}")
    return 0


def _lora_blocks(args: argparse.Namespace) -> int:
    """``blocks LORA [--model MODEL]``: per block, the modules a LoRA touches, their ranks and ||ΔW||."""
    from ..lora import lora_blocks

    if args.alpha is not None or args.beta is not None or args.param:
        from ..errors import BlockmergeError

        raise BlockmergeError(f"{args.model}: is a LoRA; --alpha/--beta/--param apply to checkpoints "
                              "(a LoRA's block strengths are given as LORA:STRENGTH:BLOCKS to `lora apply`)")
    rep = lora_blocks(args.model, args.lora_model)
    if args.json:
        print(json.dumps(rep.as_dict(), indent=2))
        return 0
    on = f" on {printable(rep.for_model)}" if rep.for_model else ""
    print(printable(f"{args.model}: LoRA for {rep.architecture} ({rep.title}){on}, "
                    f"{rep.matched} of {rep.modules} modules placed"))
    print(f"{'block':<8} {'modules':>8} {'rank':>10} {'kind':<12} {'||ΔW||':>10}")
    for b in rep.blocks:
        if not b.modules:
            print(f"{b.block:<8} {0:>8} {'-':>10} {'-':<12} {0.0:>10.4g}")
            continue
        ranks = ",".join(map(str, b.ranks)) or "-"
        print(f"{b.block:<8} {b.modules:>8} {ranks:>10} {','.join(b.kinds):<12} {b.norm:>10.4g}")
    if rep.unmatched:
        print(printable(f"  {len(rep.unmatched)} modules fit nothing (e.g. {rep.unmatched[0]})"))
    if rep.unknown_keys:
        print(printable(f"  {len(rep.unknown_keys)} keys are no LoRA module (e.g. {rep.unknown_keys[0]})"))
    return 0


def _blocks_values(args: argparse.Namespace) -> int:
    """``blocks MODEL --alpha SPEC``: the value of each parameter every tensor would get."""
    from ..inspect import tensor_values
    from ..merge import load_presets
    from ..merge.params import parse_param_args

    arch, rows = tensor_values(
        args.model, args.method, parse_param_args(args.param), alpha=args.alpha, beta=args.beta,
        base_alpha=args.base_alpha, base_beta=args.base_beta, presets=load_presets(args.presets or []),
    )
    if args.json:
        print(json.dumps({"architecture": arch, "method": args.method,
                          "tensors": [{"key": r.key, "block": r.block, **r.values} for r in rows]}, indent=2))
        return 0
    names = list(rows[0].values) if rows else []
    print(f"{args.model}: {arch}, {args.method} ({', '.join(names)} per tensor)")
    for r in rows:
        vals = "  ".join(f"{n}={v:g}" for n, v in r.values.items())
        print(f"{r.block:<6} {vals}  {r.key}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..inspect import checkpoint_info

    if getattr(args, "recipe", False):
        from ..errors import BlockmergeError
        from ..recipes import embedded_recipe

        if len(args.files) != 1:
            raise BlockmergeError("info --recipe: give one file")
        text = embedded_recipe(args.files[0])
        if text is None:
            raise BlockmergeError(f"{args.files[0]}: has no embedded recipe (it was not made by `blockmerge run`)")
        sys.stdout.write(printable(text))  # checked as a recipe; printable() in case a string holds escapes
        return 0
    from ..lora import is_lora_file, lora_info

    for path in map(bundled_or_path, args.files):
        lora = is_lora_file(path)
        info = lora_info(path, hashes=not args.no_hash) if lora else checkpoint_info(path, hashes=not args.no_hash)
        if args.json:
            print(json.dumps(info, indent=2))
            continue
        (_print_lora_info if lora else _print_info)(info)
    return 0


def _print_lora_info(info: dict) -> None:
    print(printable(info["path"]))
    print(f"  LoRA for:     {info['architecture']} ({info['title']})")
    kinds = ", ".join(f"{k} {v}" for k, v in info["module_kinds"].items())
    print(f"  modules:      {info['modules']} ({kinds}), {_fmt_count(info['parameters'])} parameters, "
          f"{info['size_bytes'] / 2**20:.1f} MiB")
    ranks = ", ".join(f"rank {k}: {v}" for k, v in info["ranks"].items()) or "-"
    print(f"  ranks:        {ranks}")
    if info["alphas"]:
        print(f"  alphas:       {', '.join(f'{a:g}' for a in info['alphas'])}")
    if info["unknown_keys"]:
        print(f"  other keys:   {info['unknown_keys']} (not LoRA modules; ignored)")
    if "sha256" in info:
        print(f"  sha256:       {info['sha256']}")
        print(f"  Lora hash:    {info['lora_hash']} (A1111's 'Lora hashes'; addnet hash {info['addnet_hash'][:12]})")
    for k, v in info.get("metadata", {}).items():
        print(f"  meta {printable(k)}: {printable(v)}")


def _print_info(info: dict) -> None:
    """The text form of ``info``; every string from the file goes through :func:`printable` (a model's
    metadata may hold terminal escape sequences)."""
    print(f"{printable(info['path'])}")
    print(f"  architecture: {info['architecture']} ({info['title']})")
    print(f"  prediction:   {info['prediction']}")
    print(f"  format:       {info['format']}, {info['size_bytes'] / 2**20:.1f} MiB, "
          f"{info['tensors']} tensors, {_fmt_count(info['parameters'])} parameters")
    dt = ", ".join(f"{k} {v / max(info['parameters'], 1):.0%}" for k, v in info["dtypes"].items())
    print(f"  dtypes:       {dt}")
    if info["ema_tensors"]:
        print(f"  EMA tensors:  {info['ema_tensors']}")
    if "sha256" in info:
        print(f"  sha256:       {info['sha256']}")
        print(f"  model hash:   {info['model_hash']} (legacy {info['legacy_hash']})")
    rec = info.get("merge_record")
    if rec:
        space = " (a delta)" if rec.get("space") == "delta" else ""
        print(printable(f"  merge:        {rec.get('method')} [{rec.get('formula')}] -> {rec.get('dtype')}{space}, "
                        f"by blockmerge {rec.get('version')}"))
        for i in rec.get("inputs", []):
            print(printable(f"    {i['role']}: {i['name']}  sha256 {i['sha256'][:10]}  legacy {i['legacy_hash']}"))
        params = rec.get("params") or {n: rec[n] for n in ("alpha", "beta") if rec.get(n)}
        for wname, w in params.items():
            print(printable(f"    {wname}: " + ",".join(f"{k}={v:g}" for k, v in w.items())))
        for wname, rules in (rec.get("rules") or {}).items():
            print(printable(f"    {wname} rules: " + "; ".join(rules)))
        if rec.get("recipe"):
            print("    recipe:")
            from ..io.text import split_lines

            for line in split_lines(str(rec["recipe"])):
                print(f"      {printable(line)}")
    elif "sd_merge_recipe" in info:
        print(f"  A1111 merge recipe: {printable(info['sd_merge_recipe'])}")
    for k, v in info.get("metadata", {}).items():
        print(f"  meta {printable(k)}: {printable(v)}")


def cmd_hash(args: argparse.Namespace) -> int:
    from ..io import file_hashes

    if not args.quiet:
        print(f"{'legacy':<8}  {'short':<10}  {'sha256':<64}  file")
    for f in args.files:
        h = file_hashes(f, use_cache=not args.no_cache)
        print(f"{h.legacy:<8}  {h.short:<10}  {h.sha256}  {printable(f)}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from ..merge import load_presets
    from ..merge.presets import preset_families

    book = load_presets(args.presets or [])
    for p in book.presets.values():
        vals = ",".join(f"{v:g}" for v in p.values)
        print(f"{p.name:<28} {preset_families(p):<7} {vals}")
    return 0


def cmd_synthetic(args: argparse.Namespace) -> int:
    from ..architectures.synthetic import write_synthetic
    from ..io import check_output_path, output_dtype
    from ..merge.executor import output_format

    out = Path(args.output)
    check_output_path(out, [], args.overwrite)
    fmt = output_format(out, None)
    write_synthetic(out, args.arch, size=args.size, seed=args.seed, dtype=output_dtype(args.dtype), fmt=fmt,
                    variant=args.variant, parts="model" if args.model_only else "all", bare=args.bare,
                    overwrite=args.overwrite)
    if not args.quiet:
        what = " ".join(x for x in (args.size, args.arch, args.variant) if x)
        print(f"wrote {printable(out)} (synthetic {what} {fmt}, seed {args.seed})")
    return 0


def _family_names() -> list[str]:
    from ..architectures import families

    return [a.name for a in families() if a.synthetic is not None]


def _dtype_names() -> list[str]:
    from ..io import OUTPUT_DTYPES

    return list(OUTPUT_DTYPES)


def register(sub: argparse._SubParsersAction) -> None:
    from ..merge.methods import METHODS

    p = sub.add_parser("merge", help="merge checkpoints with a weight per block",
                       description="Merge checkpoints block by block, streaming, into a new file, with any "
                                   "method of `blockmerge methods`.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="the method's operands in order, e.g. A B [C]: checkpoint or delta files (.safetensors/.ckpt)")
    p.add_argument("-o", "--output", required=True, type=output_file, help="output file (.safetensors, or .ckpt)")
    _method_args(p, METHODS)
    p.add_argument("--clamp", action="store_true",
                   help="clip every result element to the range of the model operands there")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="write a result with inf/NaN values anyway (a warning counts them); default: an error")
    p.add_argument("--dtype", default="fp16", choices=_dtype_names(),
                   help="output dtype (default fp16); float8 outputs clamp to their range and say how often")
    p.add_argument("--format", choices=["safetensors", "ckpt"], help="output format (default: from the suffix)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--vae", metavar="FILE", help="bake this VAE into the output")
    p.add_argument("--keep-ema", action="store_true", help="keep model A's model_ema.* tensors (dropped by default)")
    p.add_argument("--fix-position-ids", action="store_true", help="reset CLIP position_ids to 0..76")
    p.add_argument("--presets", action="append", metavar="FILE", help="extra preset file (NAME<TAB>v1,v2,...)")
    p.add_argument("--threads", type=THREADS, default=None,
                   help="worker threads (default: every core, at most 2, one less while uncached inputs are hashed; "
                        "output bytes never depend on it)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("methods", help="list the merge methods with operands, parameters, defaults and formula")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("blocks", help="tensors and parameters per block of a checkpoint (with --alpha etc.: "
                                      "the value every tensor gets)")
    p.add_argument("model", help="checkpoint file, or a LoRA file (its modules, ranks and ||ΔW|| per block)")
    p.add_argument("--model", dest="lora_model", metavar="CHECKPOINT",
                   help="for a LoRA: the checkpoint it is for (its layout names the modules)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _method_args(p, METHODS, for_blocks=True)
    p.add_argument("--presets", action="append", metavar="FILE", help="extra preset file (NAME<TAB>v1,v2,...)")
    p.set_defaults(func=cmd_blocks)

    p = sub.add_parser("info", help="architecture, dtype, size, hashes and merge record of checkpoints (and LoRAs)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-hash", action="store_true", help="skip hashing (fast on large files)")
    p.add_argument("--recipe", action="store_true",
                   help="print only the embedded recipe, as a runnable TOML file (for `blockmerge run`)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("hash", help="A1111 model hashes (legacy 8-hex, sha256 and its 10-hex short form)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--no-cache", action="store_true", help="do not use or update the hash cache")
    p.add_argument("-q", "--quiet", action="store_true", help="no header line")
    p.set_defaults(func=cmd_hash)

    p = sub.add_parser("presets", help="list block-weight presets")
    p.add_argument("--presets", action="append", metavar="FILE", help="extra preset file")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("synthetic", help="write a synthetic checkpoint with a real key layout (random weights)")
    p.add_argument("output", type=output_file, help="output file (.safetensors or .ckpt)")
    p.add_argument("--arch", default="SD1", type=str.upper, choices=_family_names())
    p.add_argument("--variant", help="a variant of the family: FLUX dev/schnell, SD3 sd3-medium/sd3.5-medium")
    p.add_argument("--size", default="tiny", choices=["tiny", "full"])
    p.add_argument("--model-only", action="store_true", help="the diffusion model only (no text encoders, no VAE)")
    p.add_argument("--bare", action="store_true",
                   help="diffusion model keys without model.diffusion_model. (BFL's Flux release names)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (any integer)")
    p.add_argument("--dtype", default="fp16", choices=_dtype_names())
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_synthetic)




def _method_args(p: argparse.ArgumentParser, methods: object, for_blocks: bool = False) -> None:
    """--method, --param and the --alpha/--beta shorthands, read from the method registry."""
    names = list(methods)  # type: ignore[call-overload]
    p.add_argument("--method", default="weighted_sum", choices=names, metavar="METHOD",
                   help=f"merge method (default weighted_sum): {', '.join(names)}; `blockmerge methods` explains each")
    p.add_argument("--param", action="append", metavar="NAME=SPEC",
                   help="a parameter of the method, per block (repeatable), e.g. --param k=0.3 or "
                        "--param 'alpha=IN04-IN08=0.5; OUT:attn2:0'")
    p.add_argument("--alpha", metavar="SPEC",
                   help="the method's α: a number, 25 (SDXL 19) values, 26 (20) with BASE first, a preset, "
                        "'IN04-IN08=0.5', and elemental rules after ';' ('0.5; IN04-IN08:attn2:0')")
    p.add_argument("--base-alpha", type=finite_float, metavar="X", help="α for BASE (text encoder, VAE)")
    p.add_argument("--beta", metavar="SPEC", help="the method's β per block (e.g. scaled_sum's B factor)")
    p.add_argument("--base-beta", type=finite_float, metavar="Y", help="β for BASE")
