"""``blockmerge ui`` as a server, without a browser: gradio's own client and plain HTTP against a real
process on a free loopback port. Names the page sends that would leave the models or output folder
are refused (one line, nothing written outside), bad weights text is a one-line error, the output
folder is served only inside itself and behind the login, and the command refuses to listen beyond
loopback without --auth, or to start without gradio."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest

from _ui import ROOT, ui_server
from blockmerge.cli import main

pytestmark = pytest.mark.slow  # starts real servers (seconds each)

RECIPE = """version = 1
[inputs]
A = "{a}"
B = "tiny-b"
[[steps]]
name = "ab"
models = ["A", "B"]
alpha = {alpha}
[[outputs]]
path = "{out}"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("gradio_client")
    tmp = tmp_path_factory.mktemp("ui-server")
    (tmp / "outside").mkdir()
    (tmp / "outside" / "secret.txt").write_text("secret")
    with ui_server(tmp) as (url, proc, log):
        yield url, tmp, proc, log


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False, download_files=False)


def _status(result) -> str:
    return str(result[-1] if isinstance(result, (tuple, list)) else result)


def _get(url: str, cookie: str | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_recipe_names_outside_the_folders_are_refused(server, client) -> None:
    url, tmp, proc, _ = server
    out = tmp / "out"
    cases = [
        (RECIPE.format(a="tiny-a", alpha=0.5, out="../escape.safetensors"), "'..' and '.' are not allowed"),
        (RECIPE.format(a="tiny-a", alpha=0.5, out=str(tmp / "outside" / "abs.safetensors")), "absolute path"),
        (RECIPE.format(a="../outside/secret.txt", alpha=0.5, out="x.safetensors"), "input 'A'"),
        (RECIPE.format(a="/etc/passwd", alpha=0.5, out="x.safetensors"), "absolute path is not allowed"),
    ]
    for text, want in cases:
        for api in ("/validate_recipe", "/run_recipe"):
            args = (text,) if api == "/validate_recipe" else (text, False)
            status = _status(client.predict(*args, api_name=api))
            assert status.startswith("error: ") and want in status and "\n" not in status, (api, status)
            assert "Traceback" not in status
    assert not (tmp / "escape.safetensors").exists() and not (tmp / "outside" / "abs.safetensors").exists()
    assert not list(out.glob("*.safetensors"))
    # the same recipe with names inside runs, and writes where it should
    status = _status(client.predict(RECIPE.format(a="tiny-a", alpha=0.5, out="ok.safetensors"), False,
                                    api_name="/run_recipe"))
    assert status == "wrote ok.safetensors" and (out / "ok.safetensors").is_file()
    assert proc.poll() is None  # the errors did not stop the server


def test_bad_weights_text_is_one_line_error(server, client) -> None:
    status = _status(client.predict(RECIPE.format(a="tiny-a", alpha='"1,2,abc"', out="w.safetensors"),
                                    api_name="/validate_recipe"))
    assert status == "error: recipe: step 'ab': --alpha: 'abc' is not a number" or (
        status.startswith("error: ") and "'abc' is not a number" in status), status
    status = _status(client.predict(RECIPE.format(a="tiny-a", alpha='"0.5,0.5,0.5"', out="w.safetensors"),
                                    api_name="/validate_recipe"))
    assert status.startswith("error: ") and "3 values" in status and "SD1 needs" in status


def test_model_and_folder_names_from_the_page_are_refused(server, client) -> None:
    _, tmp, _, _ = server
    # a sweep folder is a free text box: our policy answers
    status = _status(client.predict("tiny-a", "tiny-b", True, "0.5", False, False, "", "(none)", "IN00", "", False,
                                    "a red circle", "1", "../outside/sweep", False, api_name="/sweep"))
    assert status.startswith("error: sweep folder '../outside/sweep'"), status
    # the custom variants' other parameters are read as sweep --param reads them
    status = _status(client.predict("tiny-a", "tiny-b", False, "0.5", False, False, "t=1", "ties", "IN00", "k", True,
                                    "a red circle", "1", "sweep", False, api_name="/sweep"))
    assert status.startswith("error: parameters 'k': expected NAME=SPEC"), status
    # custom variant lines go through the same parser: a line without a spec, and a name given twice
    for custom, want in (("t", "error: custom 't': expected NAME=SPEC (e.g. gradv=GRAD_V)"),
                         ("t=1\n u=0.2\nt=0.5", "error: custom t: given twice")):
        status = _status(client.predict("tiny-a", "tiny-b", False, "0.5", False, False, custom, "(none)", "IN00", "",
                                        False, "a red circle", "1", "sweep", False, api_name="/sweep"))
        assert status.startswith(want), status
    assert sorted(p.name for p in (tmp / "outside").iterdir()) == ["secret.txt"]
    # model names come from dropdowns: a name that is not offered never reaches a file
    for bad in ("../outside/secret.txt", "/etc/passwd"):
        try:
            result = client.predict(bad, "tiny-b", "(none)", "distance", api_name="/compare")
        except Exception as e:  # gradio's own check of the dropdown's choices
            assert "choices" in str(e) or "error" in str(e).lower(), e
        else:
            assert _status(result).startswith("error: model"), result


def test_output_folder_is_served_only_inside_itself(server) -> None:
    url, tmp, _, _ = server
    out = tmp / "out"
    (out / "r").mkdir(exist_ok=True)
    (out / "r" / "index.html").write_text("<!doctype html><p>report</p>")
    os.symlink(tmp / "outside", out / "link-out")
    code, headers, body = _get(url + "outputs/r/index.html")
    assert code == 200 and body == b"<!doctype html><p>report</p>" and headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in headers["content-security-policy"]
    code, _, body = _get(url + "outputs/r/?list")
    assert code == 200 and b"index.html" in body
    for bad in ("outputs/../outside/secret.txt", "outputs/%2e%2e/outside/secret.txt", "outputs/..%2Foutside%2Fsecret.txt",
                "outputs/%2Fetc%2Fpasswd", "outputs//etc/passwd", "outputs/link-out/secret.txt"):
        code, _, body = _get(url + bad)
        assert code in (404, 400) and body != b"secret", (bad, code, body[:100])
    code, _, _ = _get(url + "gradio_api/file=" + urllib.parse.quote(str(tmp / "outside" / "secret.txt")))
    assert code in (403, 404)


def test_login_guards_the_page_and_the_outputs(tmp_path) -> None:
    pytest.importorskip("gradio_client")
    from gradio_client import Client

    with ui_server(tmp_path, "--auth", "ann:pw") as (url, _, _):
        code, _, _ = _get(url + "outputs/")
        assert code == 401
        with pytest.raises(Exception):  # noqa: B017 - gradio's client raises its own error types
            Client(url, verbose=False)
        c = Client(url, auth=("ann", "pw"), verbose=False)
        assert _status(c.predict("x", api_name="/validate_recipe")).startswith("error: recipe")
        data = urllib.parse.urlencode({"username": "ann", "password": "pw"}).encode()
        req = urllib.request.Request(url + "login", data=data)
        with urllib.request.urlopen(req, timeout=30) as r:
            cookie = "; ".join(v.split(";", 1)[0] for k, v in r.headers.items() if k.lower() == "set-cookie")
        code, _, _ = _get(url + "outputs/", cookie)
        assert code == 200


def test_listening_beyond_loopback_needs_auth(tmp_path, capsys) -> None:
    assert main(["ui", "--host", "0.0.0.0", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "blockmerge: error: --host 0.0.0.0: listening on an address other than loopback needs --auth USER:PASS"
    assert main(["ui", "--auth", "nopassword", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--auth: expected USER:PASS" in capsys.readouterr().err


def test_without_gradio_a_one_line_error_says_what_to_install(tmp_path) -> None:
    code = ("import sys; sys.modules['gradio'] = None; from blockmerge.cli import main; "
            f"sys.exit(main(['ui', '--output-dir', {str(tmp_path / 'o')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install -e .[ui]" in lines[0] and lines[0].startswith("blockmerge: error:")
