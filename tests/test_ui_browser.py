"""``blockmerge ui`` in a real browser: headless Chromium (Debian ``chromium`` + ``chromium-driver``)
driven by selenium against a real server on a free loopback port.

A slider moved changes the text box; 25 values pasted move the sliders; a preview of 4 seeds gives
the pixels of ``blockmerge merge`` + ``blockmerge generate`` with the same values (within 1/255);
"Merge to file" writes the same bytes as ``blockmerge merge``; bad weights text shows the one-line
error; a sweep is cancelled. Every request the page makes is recorded (Chrome's performance log) and
any that is not to the local server fails the test. A screenshot is saved (``docs/ui.png`` when
``BLOCKMERGE_UPDATE_SCREENSHOT=1``).
"""

from __future__ import annotations

import io
import json
import os
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from _ui import ROOT, ui_server
from blockmerge.cli import main
from blockmerge.models import resolve_model
from blockmerge.workbench import DEFAULT_PROMPT
from blockmerge.workbench.settings import fmt_value
from test_browser import _driver as _browser_driver

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_torch_thread")]

VALUES = [round(0.04 * i, 2) for i in range(25)]  # IN00 .. OUT11, distinct, exact at step 0.01


def _driver():
    # every request the page makes is in the performance log (checked: none leaves the local server)
    return _browser_driver({"goog:loggingPrefs": {"performance": "ALL", "browser": "ALL"}})


class Page:
    def __init__(self, d, url: str) -> None:
        self.d, self.url = d, url

    def js(self, script: str, *args):
        return self.d.execute_script(script, *args)

    def wait(self, cond, timeout: float = 120, what: str = ""):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.d, timeout, poll_frequency=0.25).until(lambda d: cond(), what)

    def value(self, elem_id: str) -> str:
        return self.js(f"var e = document.querySelector('#{elem_id} textarea, #{elem_id} input'); return e ? e.value : null")

    def field(self, elem_id: str):
        return self.d.find_element("css selector", f"#{elem_id} textarea, #{elem_id} input")

    def tab(self, title: str) -> None:
        for t in self.d.find_elements("css selector", "button[role=tab]"):
            if t.text.strip() == title:
                t.click()
                return
        raise AssertionError(f"no tab {title!r}")

    def slider_values(self, ids) -> list[float]:
        return [float(v) for v in self.js(
            "return arguments[0].map(b => document.querySelector('#slider-' + b + ' input[type=number]').value)", list(ids))]

    def type_into(self, elem_id: str, text: str, enter: bool = True) -> None:
        from selenium.webdriver.common.keys import Keys

        f = self.field(elem_id)
        f.click()
        f.send_keys(Keys.CONTROL, "a")
        f.send_keys(Keys.DELETE)
        f.send_keys(text)
        if enter:
            f.send_keys(Keys.ENTER)


def _pngs(page: Page, gallery: str) -> list[np.ndarray]:
    from PIL import Image

    srcs = page.js(f"return Array.from(document.querySelectorAll('#{gallery} img')).map(i => i.src)")
    out = []
    for s in srcs:
        assert s.startswith(page.url), s
        with urllib.request.urlopen(s, timeout=30) as r:
            out.append(np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"), dtype=int))
    return out


def _requests(d) -> list[str]:
    urls = []
    for e in d.get_log("performance"):
        m = json.loads(e["message"])["message"]
        if m["method"] == "Network.requestWillBeSent":
            urls.append(m["params"]["request"]["url"])
        elif m["method"] == "Network.webSocketCreated":
            urls.append(m["params"]["url"])
    return urls


def test_ui_in_headless_chromium(tmp_path: Path, capsys) -> None:
    from selenium.webdriver.common.keys import Keys

    driver = _driver()
    seen: list[str] = []
    try:
        with ui_server(tmp_path) as (url, proc, log):
            page = Page(driver, url)
            driver.get(url)
            page.wait(lambda: "989d3042d6" in page.js("return document.body.innerText"), what="models table")
            page.tab("Merge & Preview")
            page.wait(lambda: page.js("return !!document.querySelector('#slider-IN04 input[type=range]')"))
            page.wait(lambda: (page.value("weights-text") or "").count(",") == 24, what="text box filled")
            assert page.value("weights-text") == ",".join(["0"] * 25)

            # a slider moved -> the text box changes (that block only)
            rng = driver.find_element("css selector", "#slider-IN04 input[type=range]")
            rng.send_keys(Keys.ARROW_RIGHT)
            rng.send_keys(Keys.ARROW_RIGHT)
            page.wait(lambda: page.value("weights-text").split(",")[4] == "0.02", what="text follows slider")
            assert page.value("weights-text").split(",") == ["0"] * 4 + ["0.02"] + ["0"] * 20

            # 25 values pasted -> every slider follows
            page.type_into("weights-text", ",".join(map(str, VALUES)))
            ids = [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
            page.wait(lambda: page.slider_values(ids) == VALUES, what="sliders follow the text")
            assert page.slider_values(["BASE"]) == [0.0]

            # bad weights text -> one-line error, nothing changes
            page.type_into("weights-text", "1,2,abc")
            page.wait(lambda: (page.value("merge-status") or "").startswith("error"), what="error shown")
            assert page.value("merge-status") == "error: alpha: 'abc' is not a number"
            assert page.slider_values(ids) == VALUES
            page.type_into("weights-text", ",".join(map(str, VALUES)))  # fixed: the error goes away
            page.wait(lambda: page.value("merge-status") == "", what="error cleared")

            # preview of 4 seeds == CLI merge + generate of the same values
            page.type_into("seeds", "1-4", enter=False)
            driver.find_element("id", "preview-btn").click()
            page.wait(lambda: page.js("var i = document.querySelectorAll('#gallery-merged img'); return i.length == 4 && "
                                      "Array.from(i).every(x => x.complete && x.naturalWidth > 0)"), 600, "preview")
            page.wait(lambda: page.js("return document.querySelectorAll('#gallery-b img').length") == 4)
            assert page.value("preview-info").startswith("seeds 1,2,3,4:")
            shown = _pngs(page, "gallery-merged")
            spec = "0," + ",".join(map(str, VALUES))
            cli_file = tmp_path / "cli.safetensors"
            a, b = resolve_model("tiny-a"), resolve_model("tiny-b")
            assert main(["merge", str(a), str(b), "-o", str(cli_file), "--param", f"alpha={spec}", "-q"]) == 0
            gen_dir = tmp_path / "cli-gen"
            assert main(["generate", str(cli_file), "-o", str(gen_dir), "--infotext", DEFAULT_PROMPT,
                         "--seed", "1-4", "-q"]) == 0
            capsys.readouterr()
            from PIL import Image

            for seed, img in zip((1, 2, 3, 4), shown, strict=True):
                ref = np.asarray(Image.open(next(gen_dir.glob(f"*-{seed}.png"))).convert("RGB"), dtype=int)
                assert img.shape == ref.shape == (64, 64, 3)
                assert np.abs(img - ref).max() <= 1, (seed, np.abs(img - ref).max())
            assert any(np.abs(x - y).max() > 8 for x, y in zip(shown, _pngs(page, "gallery-a"), strict=True))
            shot = tmp_path / "ui.png"
            driver.execute_script("window.scrollTo(0, 0)")
            assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
            if os.environ.get("BLOCKMERGE_UPDATE_SCREENSHOT") == "1":
                (ROOT / "docs" / "ui.png").write_bytes(shot.read_bytes())

            # merge to a file == blockmerge merge, byte for byte
            page.type_into("output-name", "ui.safetensors", enter=False)
            driver.find_element("id", "merge-btn").click()
            page.wait(lambda: (page.value("merge-status") or "").startswith(("wrote", "error", "internal")), 300,
                      "merge")
            assert page.value("merge-status").startswith("wrote ui.safetensors"), page.value("merge-status")
            written = tmp_path / "out" / "ui.safetensors"
            assert written.read_bytes() == cli_file.read_bytes()
            assert "--param alpha=0," + ",".join(fmt_value(v) for v in VALUES) in page.value("merge-result")

            # the clamp box reaches the merge: the same bytes as blockmerge merge --clamp
            driver.find_element("css selector", "#clamp input[type=checkbox]").click()
            time.sleep(0.5)
            page.type_into("output-name", "ui-clamped.safetensors", enter=False)
            driver.find_element("id", "merge-btn").click()
            page.wait(lambda: (page.value("merge-status") or "").startswith(("wrote ui-clamped", "error", "internal")),
                      300, "clamped merge")
            assert page.value("merge-status").startswith("wrote ui-clamped.safetensors"), page.value("merge-status")
            assert "--clamp" in page.value("merge-result")
            cli_clamped = tmp_path / "cli-clamped.safetensors"
            assert main(["merge", str(a), str(b), "-o", str(cli_clamped), "--param", f"alpha={spec}", "--clamp", "-q"]) == 0
            assert (tmp_path / "out" / "ui-clamped.safetensors").read_bytes() == cli_clamped.read_bytes()

            # a sweep, cancelled while it runs: stopped, with only whole files left
            page.tab("Sweep")
            page.wait(lambda: page.js("return !!document.getElementById('sweep-btn')"))
            page.type_into("sweep-seeds", "1-4", enter=False)
            page.type_into("sweep-folder", "cancelled-sweep", enter=False)
            driver.find_element("id", "sweep-btn").click()
            folder = tmp_path / "out" / "cancelled-sweep"
            page.wait(lambda: len(list(folder.rglob("*.png"))) >= 4, 300, "sweep started")
            driver.find_element("id", "cancel-sweep").click()
            page.wait(lambda: (page.value("sweep-status") or "").startswith("cancelled"), 120, "sweep cancelled")
            assert page.value("sweep-status") == "cancelled: sweep: cancelled"
            n = len(list(folder.rglob("*.png")))
            time.sleep(2)
            assert 4 <= n < 104 and len(list(folder.rglob("*.png"))) == n  # it really stopped
            assert not list(folder.rglob("*blockmerge-partial")) and not (folder / "index.html").exists()
            assert proc.poll() is None
            seen = _requests(driver)
    finally:
        driver.quit()
    assert len(seen) > 20
    foreign = [u for u in seen if not u.startswith((url, url.replace("http", "ws"), "data:", "blob:"))]
    assert not foreign, foreign
