"""ui: the local web app."""

from __future__ import annotations

import argparse

from .common import device, int_range


def cmd_ui(args: argparse.Namespace) -> int:
    from ..ui import launch

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    launch(output_dir=args.output_dir, models_dir=args.models_dir, host=args.host, port=args.port,
           auth=args.auth, device=args.device)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ui", help="a local web app: block sliders, previews without a file, merges, sweeps, compare, recipes",
        description="Start the web UI (gradio; pip install -e .[ui]) and print its URL. It reads models only "
                    "from --models-dir and the bundled models and writes only into --output-dir; it listens "
                    "on 127.0.0.1 unless --host is given, which then needs --auth.")
    p.add_argument("--models-dir", metavar="DIR", help="folder of checkpoints to offer (besides the bundled models)")
    p.add_argument("--output-dir", metavar="DIR", default="blockmerge-ui",
                   help="folder every merge, sweep and the history go to (default ./blockmerge-ui)")
    p.add_argument("--port", type=int_range(1, 65535), default=7860, help="port (default 7860)")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                   help="address to listen on (default 127.0.0.1; any other needs --auth)")
    p.add_argument("--auth", metavar="USER:PASS", help="require this login (needed beyond loopback)")
    p.add_argument("--device", type=device, help="cpu, cuda ... for previews and sweeps (default: CUDA if available)")
    p.add_argument("--threads", type=int_range(1, 256), metavar="N", help="torch CPU threads")
    p.set_defaults(func=cmd_ui)
