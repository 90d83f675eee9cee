"""``blockmerge ui``: a local web app (gradio) over :mod:`blockmerge.workbench`.

Thin by design: :mod:`.app` turns page events into :class:`~blockmerge.workbench.Workbench` calls,
:mod:`.server` serves the page and the output folder. gradio is an optional dependency
(``pip install -e .[ui]``); without it :func:`launch` is a one-line error.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from ..errors import BlockmergeError

__all__ = ["launch", "require_gradio"]


def require_gradio() -> None:
    """A one-line error, not an ImportError traceback, where the ``ui`` extra is not installed."""
    try:
        found = importlib.util.find_spec("gradio") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise BlockmergeError("the web UI needs gradio, which is not installed: pip install -e .[ui] "
                              "(or pip install 'blockmerge[ui]')")


def launch(
    *,
    output_dir: str | os.PathLike[str],
    models_dir: str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: str | None = None,
    device: str | None = None,
    announce: bool = True,
) -> None:
    """Start the UI and serve until interrupted. Listening beyond loopback needs ``auth`` (USER:PASS)."""
    require_gradio()  # first: the server module imports gradio's web stack
    from .server import check_bind, is_loopback, parse_auth, private_env

    creds = parse_auth(auth)
    if not is_loopback(host) and creds is None:
        raise BlockmergeError(f"--host {host}: listening on an address other than loopback needs --auth USER:PASS")
    from ..workbench import Workbench, Workspace

    ws = Workspace(output_dir, models_dir)
    private_env(ws.output_dir)  # before gradio is imported
    check_bind(host, port)
    from .app import build_app
    from .server import build_server, serve

    wb = Workbench(ws, device=device)
    demo = build_app(wb)
    demo.queue(default_concurrency_limit=1)
    app = build_server(wb, demo, auth=creds, host=host, port=port)
    if announce:
        shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
        print(f"blockmerge ui: http://{shown}:{port}/  (models: bundled"
              f"{', ' + str(ws.models_dir) if ws.models_dir else ''}; outputs: {ws.output_dir})", flush=True)
        if wb.history.load_error:
            print(f"blockmerge: warning: {wb.history.load_error}", file=sys.stderr)
    serve(app, host, port)


