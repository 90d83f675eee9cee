"""The ``blockmerge`` command: thin wrappers over the library, one module per group of commands.

Every command module has ``register(subparsers)``; each subcommand's handler takes the parsed
arguments and returns an exit code. User errors (:class:`BlockmergeError`) become one line on
stderr and exit code 2; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import BlockmergeError

# Command modules, in the order their commands appear in --help.
COMMAND_MODULES = (
    "blockmerge.cli.merge_cmds",
    "blockmerge.cli.generate_cmds",
    "blockmerge.cli.sweep_cmds",
    "blockmerge.cli.recipe_cmds",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        self.exit(2, f"blockmerge: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="blockmerge",
        description="Block-weighted merging of Stable Diffusion checkpoints and block-influence experiments.",
    )
    parser.add_argument("--version", action="version", version=f"blockmerge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a command group not written yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.func(args) or 0)
    except BlockmergeError as e:
        if debug:
            raise
        print(f"blockmerge: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `blockmerge blocks X | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("blockmerge: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line unless --debug
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"blockmerge: internal error: {type(e).__name__}: {msg} (run with --debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
