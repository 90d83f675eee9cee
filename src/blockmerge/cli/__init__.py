"""The ``blockmerge`` command: thin wrappers over the library, one module per group of commands.

Every command module has ``register(subparsers)``; each subcommand's handler takes the parsed
arguments and returns an exit code. :func:`main` is the one error boundary: every expected failure
(bad input, a file that cannot be read or written, memory that cannot be allocated, a signal)
becomes one line on stderr naming the file or argument, exit code 2 (128 + N for signal N), with
no traceback unless ``--debug``. Anything else is a bug: "internal error", exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from .. import __version__
from ..errors import BlockmergeError, BlockmergeWarning, Interrupted
from .common import one_line

# Command modules, in the order their commands appear in --help.
COMMAND_MODULES = (
    "blockmerge.cli.merge_cmds",
    "blockmerge.cli.generate_cmds",
    "blockmerge.cli.sweep_cmds",
    "blockmerge.cli.recipe_cmds",
    "blockmerge.cli.lora_cmds",
    "blockmerge.cli.ui_cmds",
)

# Signals that end a command cleanly: the handler raises in the main thread, so the write policy's
# cleanup (and every other ``finally``) runs, then the process exits with 128 + N.
SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, n))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        self.exit(2, f"blockmerge: error: {one_line(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="blockmerge",
        description="Block-weighted merging of Stable Diffusion checkpoints and block-influence experiments.",
    )
    parser.add_argument("--version", action="version", version=f"blockmerge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and library warnings")
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


@contextlib.contextmanager
def interrupt_signals() -> Iterator[None]:
    """SIGTERM, SIGHUP and SIGINT raise :class:`Interrupted` (in the main thread) while a command
    runs; the first one also restores the default action, so a second one ends the process at once.
    The previous handlers are back afterwards (``main`` may be called from a program of its own)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        signal.signal(signum, signal.SIG_DFL)
        raise Interrupted(signum)

    old = {}
    for s in SIGNALS:
        with contextlib.suppress(OSError, ValueError):
            old[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(s, h)


_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


@contextlib.contextmanager
def _warnings_to_stderr(debug: bool) -> Iterator[None]:
    """blockmerge's own warnings print as ``blockmerge: warning: ...``; the libraries' (diffusers,
    transformers, numpy deprecations) are noise to a user and shown only with ``--debug``."""
    with warnings.catch_warnings():
        warnings.simplefilter("default" if debug else "ignore")
        warnings.simplefilter("always", BlockmergeWarning)
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
            ours = issubclass(category, BlockmergeWarning) or str(filename).startswith(_PACKAGE_DIR)
            if ours:
                print(f"blockmerge: warning: {one_line(str(message))}", file=sys.stderr)
            elif debug:
                original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        if not debug:
            warnings.filterwarnings("default", module=r"blockmerge(\..*)?$")
        try:
            yield
        finally:
            warnings.showwarning = original


def _quiet_libraries(debug: bool) -> None:
    """transformers and diffusers log through their own loggers (the "requires torchvision" lines
    every command printed); their verbosity is read from the environment when first imported."""
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("transformers", "diffusers"):
        mod = sys.modules.get(name)
        if mod is not None and not debug:  # already imported (main() called from Python)
            with contextlib.suppress(Exception):
                mod.utils.logging.set_verbosity_error()


def _text_streams() -> None:
    # A path with undecodable bytes (or a model's metadata) must not crash a print: write what cannot
    # be encoded as escapes.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]


def _is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def _out_of_memory_message(e: BaseException, args: argparse.Namespace) -> str:
    """What to try after an allocation failed: never the device already in use. A CUDA failure
    (torch.OutOfMemoryError, "CUDA out of memory") may fit in RAM with ``--device cpu``; a failure
    on the CPU can only be made smaller."""
    on_gpu = "cuda" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"
    where = "the GPU" if on_gpu else "the machine"
    tips = []
    if hasattr(args, "batch_size"):
        tips.append("a smaller --batch-size")
    if hasattr(args, "width"):
        tips.append("smaller --width/--height")
    if on_gpu and hasattr(args, "device") and not str(getattr(args, "device", "") or "").startswith("cpu"):
        tips.append("--device cpu")
    advice = f" (try {', '.join(tips[:-1]) + ' or ' + tips[-1] if len(tips) > 1 else tips[0]})" if tips else ""
    return f"out of memory: {where} cannot allocate what this command needs{advice}"


def _error(msg: str) -> int:
    print(f"blockmerge: error: {one_line(msg)}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    try:
        # Installed first: a signal during the (slow) imports must not bypass the cleanup either.
        with interrupt_signals():
            return _run(args_list)
    except Interrupted as e:
        if debug:
            raise
        print(f"blockmerge: interrupted by {e.signame}; no partial output was left", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        if debug:
            raise
        print("blockmerge: interrupted; no partial output was left", file=sys.stderr)
        return 130


def _run(args_list: list[str]) -> int:
    _text_streams()
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if not getattr(args, "func", None):
        return _error("no command given (`blockmerge --help` lists them)")
    debug = bool(getattr(args, "debug", False))
    _quiet_libraries(debug)
    from ..io import input_guard, made_folders_guard

    try:
        with input_guard(), made_folders_guard(), _warnings_to_stderr(debug):
            return int(args.func(args) or 0)
    except BlockmergeError as e:
        if debug:
            raise
        return _error(str(e))
    except BrokenPipeError:  # e.g. `blockmerge blocks X | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        # A file the command could not read or write (permissions, I/O errors, a full disk in a place
        # the write policy does not cover): the user's environment, not a bug, when a file is named.
        if debug or not (e.filename or e.errno):
            raise
        where = f"{e.filename}: " if e.filename else ""
        return _error(f"{where}{e.strerror or e}")
    except Exception as e:
        if _is_out_of_memory(e) and not debug:
            return _error(_out_of_memory_message(e, args))
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"blockmerge: internal error: {type(e).__name__}: {one_line(msg)} (run with --debug for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
