"""run (recipes), import-mergeboard, compare."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import THREADS, TOP, output_file, printable


def _bindings(items: list[str] | None) -> dict[str, str]:
    from ..errors import BlockmergeError

    out: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise BlockmergeError(f"--model {item!r}: expected NAME=FILE (e.g. SD15=v1-5-pruned.safetensors)")
        out[name.strip()] = path.strip()
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from ..merge import load_presets
    from ..recipes import run_recipe

    results = run_recipe(
        args.recipe,
        output=args.output,
        output_dir=args.output_dir,
        overwrite=args.overwrite,
        presets=load_presets(args.presets or []),
        verify_hashes=not args.no_verify,
        dry_run=args.dry_run,
        progress=not args.quiet,
        threads=args.threads,
        allow_non_finite=args.allow_non_finite,
    )
    if args.dry_run:
        if not args.quiet:
            print(f"{printable(args.recipe)}: OK (names, architectures, weights, output paths"
                  f"{'' if args.no_verify else ', input hashes'} checked; nothing written)")
        return 0
    shown: set[str] = set()
    for r in results:
        for w in r.warnings:
            if w not in shown:
                shown.add(w)
                print(f"blockmerge: warning: {w}", file=sys.stderr)
        if not args.quiet:
            print(f"wrote {printable(r.output)} (step {r.step}, {r.architecture}, {r.n_tensors} tensors, "
                  f"{r.bytes_written / 2**20:.1f} MiB)")
    return 0


def _read_source_text(name: str) -> str:
    """A text file named on the command line, or stdin for '-' (one-line errors either way)."""
    from ..errors import BlockmergeError
    from ..io.text import read_user_text

    if name == "-":
        try:
            return sys.stdin.read()
        except UnicodeDecodeError:
            raise BlockmergeError("stdin: not UTF-8 text") from None
    return read_user_text(Path(name), name)


def _write_imported(args: argparse.Namespace, make_toml) -> int:
    """The import commands: check the output first, read the source, convert, write through the
    write policy (never over the source) or print.

    The files the written recipe names count as this command's inputs too: its checkpoints (the
    TOML must never replace a model it is about, even with --overwrite) and its outputs (a recipe
    saved where it writes its merge would be replaced by that merge)."""
    import os

    from ..errors import BlockmergeError
    from ..io import check_output_path, write_text
    from ..recipes import recipe_files

    inputs = [] if args.source == "-" else [Path(args.source)]
    if args.output:  # before reading anything: a bad output path fails at once
        check_output_path(args.output, inputs, args.overwrite)
    toml = make_toml(_read_source_text(args.source), "stdin" if args.source == "-" else args.source)
    if args.output:
        named_inputs, named_outputs = recipe_files(toml, Path(args.output).absolute().parent, str(args.output))
        target = os.path.realpath(args.output)
        for p in named_outputs:
            if os.path.realpath(p) == target:
                raise BlockmergeError(f"-o/--output {args.output}: is the file the recipe itself writes ({p}); "
                                      "save the recipe under another name")
        out = write_text(args.output, toml, inputs=[*inputs, *named_inputs, *named_outputs],
                         overwrite=args.overwrite, arg="-o/--output")
        if not args.quiet:
            print(f"wrote {printable(out)}")
    else:
        sys.stdout.write(toml)
    return 0


def cmd_import_mergeboard(args: argparse.Namespace) -> int:
    from ..recipes import mergeboard_to_toml

    return _write_imported(args, lambda text, source: mergeboard_to_toml(
        text, source=source, models=_bindings(args.model), models_dir=args.models_dir,
        all_outputs=args.all_outputs, relative_to=Path(args.output).parent if args.output else None,
    ))


def cmd_import_mecha(args: argparse.Namespace) -> int:
    from ..recipes.mecha import mecha_to_toml

    def convert(text: str, source: str) -> str:
        toml, warnings = mecha_to_toml(text, source, output=args.model_output,
                                       base_dir=Path(args.output).resolve().parent if args.output else None)
        for w in warnings:
            print(f"blockmerge: warning: {printable(w)}", file=sys.stderr)
        return toml

    return _write_imported(args, convert)


def cmd_compare(args: argparse.Namespace) -> int:
    from ..compare import compare, compare_json_text, format_table, heatmap_svg
    from ..errors import BlockmergeError
    from ..io import check_output_path, write_text

    if args.metric.startswith("change") and not args.base:
        raise BlockmergeError(f"--metric {args.metric} needs --base C")
    inputs = [Path(p) for p in (args.a, args.b, args.base) if p]
    if args.svg is not None:
        check_output_path(args.svg, inputs, args.overwrite, arg="--svg")
    result = compare(args.a, args.b, args.base, top=args.top, threads=args.threads, progress=not args.quiet)
    if args.svg:
        write_text(args.svg, heatmap_svg(result, args.metric), inputs=inputs, overwrite=args.overwrite, arg="--svg")
    if args.json:
        sys.stdout.write(compare_json_text(result))
    else:
        sys.stdout.write(printable(format_table(result)))
        if args.svg:
            print(f"\nheat map ({args.metric}): {printable(args.svg)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a merge recipe (TOML): several merges streamed in one pass",
                       description="Check a recipe completely, then write each output, streaming every tensor "
                                   "through the whole chain of steps (no temporary files).")
    p.add_argument("recipe", help="recipe file (.toml); `blockmerge info --recipe FILE` prints a file's own")
    p.add_argument("-o", "--output", type=output_file, help="output file for a recipe with one output (or none)")
    p.add_argument("--output-dir", metavar="DIR", help="folder for relative output paths (default: the recipe's)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--presets", action="append", metavar="FILE", help="extra preset file (NAME<TAB>v1,v2,...)")
    p.add_argument("--no-verify", action="store_true", help="do not check the inputs' sha256 against the recipe")
    p.add_argument("--dry-run", action="store_true", help="check everything, write nothing")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="write results with inf/NaN values anyway (a warning counts them); default: an error")
    p.add_argument("--threads", type=THREADS, help="worker threads (default: every core, at most 2; one less while uncached "
                   "inputs are hashed, unless the output bakes a LoRA)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("import-mergeboard", help="turn a Merge Board text recipe into a blockmerge recipe",
                       description="Read Merge Board lines ('NAME = A + B, 0.3', 'NAME = A + B + C, 1.0, fp16, "
                                   "safetensors', __O1__ for line 1's output, # comments) and write TOML.")
    p.add_argument("source", metavar="TEXT", help="Merge Board recipe text file ('-' for stdin)")
    p.add_argument("-o", "--output", type=output_file, help="recipe file to write (default: print it)")
    p.add_argument("--model", action="append", metavar="NAME=FILE",
                   help="bind a variable (__SD15__ or SD15) or model name to a file; repeatable")
    p.add_argument("--models-dir", metavar="DIR", help="look for NAME.safetensors / NAME.ckpt here")
    p.add_argument("--all-outputs", action="store_true",
                   help="write every line's output, as Merge Board did (default: only the final ones)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing recipe file (never the input)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_import_mergeboard)

    p = sub.add_parser("import-mecha", help="turn an sd-mecha recipe (.mecha) into a blockmerge recipe",
                       description="Read an sd-mecha recipe (the text sd_mecha.serialize writes) and write the same "
                                   "merge as a blockmerge TOML recipe, for the methods whose formulas are the same "
                                   "in both; any other method is an error naming it.")
    p.add_argument("source", metavar="RECIPE", help="the .mecha file ('-' for stdin)")
    p.add_argument("-o", "--output", type=output_file, help="recipe file to write (default: print it)")
    p.add_argument("--model-output", metavar="FILE", help="the merged checkpoint the recipe writes when run")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_import_mecha)

    p = sub.add_parser("compare", help="where two models differ, per component and U-Net block",
                       description="Relative distance and cosine per text encoder / VAE / block, the most "
                                   "changed tensors, and with --base C each model's change from C and the "
                                   "cosine between the two changes. Streaming, low memory.")
    p.add_argument("a", metavar="A", help="checkpoint A")
    p.add_argument("b", metavar="B", help="checkpoint B")
    p.add_argument("--base", metavar="C", help="the model both were fine-tuned from")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--svg", metavar="FILE", type=output_file, help="write the U-shaped heat map of --metric")
    p.add_argument("--metric", default="distance",
                   choices=["distance", "cosine", "change_a", "change_b", "change_cosine"],
                   help="what the heat map shows (change_* need --base; default distance)")
    p.add_argument("--top", type=TOP, default=10, help="how many most-changed tensors to list (default 10)")
    p.add_argument("--threads", type=THREADS, default=2, help="worker threads (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --svg file (never an input)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)
