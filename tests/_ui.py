"""Start ``blockmerge ui`` as its own process on a free loopback port, for the server and browser tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def ui_server(tmp: Path, *args: str, timeout: float = 240) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """``(base url, process, log file)`` of a running ``blockmerge ui`` with its output folder in ``tmp``;
    stopped with SIGTERM afterwards."""
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "ui.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "BLOCKMERGE_CACHE": str(tmp / "cache"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "blockmerge", "ui", "--output-dir", str(tmp / "out"), "--port", str(port),
           "--threads", "1", *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"blockmerge ui exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "config", timeout=5):
                    break
            except urllib.error.HTTPError:  # it answers (behind a login: 401)
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"blockmerge ui did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
