"""The HTTP side of ``blockmerge ui``: the gradio app mounted on a FastAPI app that also serves the
output folder (sweep reports, images), bound to loopback unless told otherwise.

Why a route of our own for the output folder: gradio's file route sends HTML as a download (its
XSS guard), so a sweep report could not be shown in the page. ``/outputs/NAME`` serves files of
the output folder inline, resolved by the same name policy as every other name the browser sends
(:meth:`Workspace.served_file`: no ``..``, no absolute paths, no links out), behind the same login
as the app, with a Content-Security-Policy that lets a page load nothing from another origin.
"""

from __future__ import annotations

import html
import ipaddress
import mimetypes
import os
import socket
from pathlib import Path
from typing import Any

from fastapi import Request  # module level: FastAPI resolves the handlers' annotations here

from ..errors import BlockmergeError
from ..workbench import Workbench

__all__ = ["CSP", "build_server", "check_bind", "is_loopback", "parse_auth"]

#: Every response: scripts, styles, images, fonts and connections from this server only.
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval' blob:; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; media-src 'self' blob: data:; "
       "worker-src 'self' blob:; frame-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'")

_INLINE = {".html", ".htm", ".css", ".js", ".svg", ".png", ".jpg", ".jpeg", ".webp", ".json", ".csv", ".txt",
           ".toml", ".npy"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost`` (the only places listening needs no login)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``USER:PASS`` -> (user, password); a one-line error names ``--auth`` otherwise."""
    if text is None:
        return None
    user, sep, pw = text.partition(":")
    if not sep or not user or not pw:
        raise BlockmergeError("--auth: expected USER:PASS (both non-empty)")
    return user, pw


def check_bind(host: str, port: int) -> None:
    """Fail at once, with one line, when the address cannot be listened on (in use, not local)."""
    fam = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host.strip("[]"), port))
    except OSError as e:
        raise BlockmergeError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    finally:
        s.close()


def _listing(folder: Path, rel: str) -> str:
    rows = []
    base = rel.rstrip("/")
    if base:
        rows.append('<li><a href="../">../</a></li>')
    for p in sorted(folder.iterdir(), key=lambda x: (not x.is_dir(), x.name)):
        if p.name.startswith("."):
            continue
        name = p.name + ("/" if p.is_dir() else "")
        from urllib.parse import quote

        rows.append(f'<li><a href="{quote(name)}">{html.escape(name)}</a></li>')
    title = html.escape("/" + base if base else "output folder")
    return (f"<!doctype html><meta charset='utf-8'><title>{title}</title>"
            f"<body style='font-family: system-ui, sans-serif'><h1>{title}</h1><ul>{''.join(rows)}</ul></body>")


def build_server(wb: Workbench, blocks: Any, *, auth: tuple[str, str] | None = None, host: str = "127.0.0.1",
                 port: int = 7860) -> Any:
    """The FastAPI app: ``/outputs/...`` and the gradio ``blocks`` at ``/``."""
    import gradio as gr
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
    from starlette.routing import Mount

    from .app import THEME_CSS, theme

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    def gradio_app() -> Any:
        for r in app.routes:
            if isinstance(r, Mount) and hasattr(r.app, "tokens"):
                return r.app
        return None

    def logged_in(request: Request) -> bool:
        """The app's own login: the session cookie gradio's login page set, checked against its tokens."""
        if auth is None:
            return True
        g = gradio_app()
        if g is None:
            return False
        token = (request.cookies.get(f"access-token-{g.cookie_id}")
                 or request.cookies.get(f"access-token-unsecure-{g.cookie_id}"))
        return token is not None and token in g.tokens

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    @app.get("/outputs")
    def outputs_root() -> Any:
        return RedirectResponse("/outputs/")

    @app.api_route("/outputs/{name:path}", methods=["GET", "HEAD"])
    def outputs(name: str, request: Request) -> Any:
        if not logged_in(request):
            raise HTTPException(status_code=401, detail="log in first")
        try:
            path = wb.workspace.served_file(name.rstrip("/"))
        except BlockmergeError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None
        if path.is_dir():
            if name and not name.endswith("/"):
                return RedirectResponse(f"/outputs/{name}/")
            index = path / "index.html"
            if index.is_file() and request.query_params.get("list") is None:
                path = index
            else:
                return HTMLResponse(_listing(path, name))
        if path.suffix.lower() not in _INLINE:
            return FileResponse(path, media_type="application/octet-stream", filename=path.name)
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if path.suffix.lower() in (".toml", ".npy", ".csv"):
            media = "text/plain" if path.suffix.lower() != ".npy" else "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"Cache-Control": "no-store"})

    gr.mount_gradio_app(
        app, blocks, path="/", server_name=host, server_port=port, auth=auth,
        auth_message="blockmerge: log in with the --auth user and password" if auth else None,
        footer_links=["settings"], run_history=False, ssr_mode=False, mcp_server=False, show_error=False,
        allowed_paths=[], blocked_paths=[str(wb.workspace.models_dir)] if wb.workspace.models_dir else [],
        theme=theme(), css=THEME_CSS, enable_monitoring=False, pwa=False,
    )
    return app


def serve(app: Any, host: str, port: int) -> None:
    """Run until SIGINT/SIGTERM (uvicorn's own handling: open requests finish, then it stops)."""
    import uvicorn

    config = uvicorn.Config(app, host=host.strip("[]"), port=port, log_level="warning", access_log=False,
                            lifespan="on", server_header=False)
    uvicorn.Server(config).run()


def private_env(output_dir: Path) -> None:
    """Before gradio is imported: no analytics, no version check, no hub, its cache in our folder."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["GRADIO_SHARE"] = "False"
    os.environ["GRADIO_SSR_MODE"] = "False"
    os.environ["GRADIO_MCP_SERVER"] = "False"
    os.environ["GRADIO_RUN_HISTORY"] = "False"
    os.environ.setdefault("GRADIO_TEMP_DIR", str(output_dir / ".blockmerge-ui-cache"))
