"""The demo report in a real browser: headless Chromium (Debian ``chromium`` + ``chromium-driver``)
driven by selenium, from file://, with no network.

Checks that all 26 cells of the U (baseline + 25 blocks) show their images loaded, that the
metric switch changes the numbers, tints and heat map, and saves a screenshot. Skips only when
Chromium, its driver or selenium cannot be found, and says which.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from test_demo import run_quick_demo

pytestmark = pytest.mark.slow  # real model runs / a browser: seconds each


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _driver(capabilities: dict | None = None):
    """Headless Debian Chromium (skips where it is not installed); ``capabilities`` are added to its options."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium)")
    for path, pkg in ((CHROMIUM, "chromium"), (DRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} not found: install the Debian package {pkg} (apt-get install -y {pkg})")
    # selenium-manager must never download a browser or driver: both are given explicitly.
    os.environ["SE_OFFLINE"] = "true"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--window-size=1600,1400"):
        opts.add_argument(flag)
    for k, v in (capabilities or {}).items():
        opts.set_capability(k, v)
    return webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)


@pytest.fixture(scope="module")
def browser():
    d = _driver()
    yield d
    d.quit()


ALL_LOADED = """
var cells = document.querySelectorAll('div.cell[data-block]');
var out = [];
for (var i = 0; i < cells.length; i++) {
  var imgs = cells[i].querySelectorAll('.imgs img');
  var ok = imgs.length > 0;
  for (var j = 0; j < imgs.length; j++) ok = ok && imgs[j].complete && imgs[j].naturalWidth > 0;
  out.push([cells[i].getAttribute('data-block'), imgs.length, ok]);
}
return out;
"""


def test_demo_report_in_headless_chromium(browser, tmp_path_factory) -> None:
    from selenium.webdriver.support.ui import Select, WebDriverWait

    demo = run_quick_demo(tmp_path_factory)
    browser.get(demo.index.resolve().as_uri())
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")
    WebDriverWait(browser, 20).until(lambda d: all(ok for _, _, ok in d.execute_script(ALL_LOADED)))
    cells = browser.execute_script(ALL_LOADED)
    assert len(cells) == 26
    assert cells[0][0] == "baseline"
    n_seeds = cells[0][1]
    assert n_seeds >= 2 and all(n == n_seeds and ok for _, n, ok in cells), cells

    def state():
        return browser.execute_script("""
            var c = document.querySelector('div.cell[data-block="OUT05"]');
            return [c.querySelector('.metric-value').textContent, c.style.background,
                    document.getElementById('heatmap').getAttribute('src'),
                    document.getElementById('metric-desc').textContent];
        """)

    metric = Select(browser.find_element("id", "metric"))
    keys = [o.get_attribute("value") for o in metric.options]
    assert keys[:2] == ["rmse", "psnr"] and "composition" in keys
    before = state()
    metric.select_by_value("composition")
    after = state()
    assert after[0] != before[0] and after[2] != before[2] and after[2].endswith("__composition.svg")
    assert after[3].startswith("Composition")
    assert browser.execute_script(
        "return document.getElementById('heatmap').complete && document.getElementById('heatmap').naturalWidth > 0")
    # The group switch shows the other experiments in the same cells.
    group = Select(browser.find_element("id", "group"))
    group.select_by_index(1)
    assert browser.execute_script(
        "return document.querySelector('div.cell[data-block=\"M00\"]').getAttribute('data-variant')") == "bypass:M00"
    WebDriverWait(browser, 20).until(lambda d: all(ok for _, _, ok in d.execute_script(ALL_LOADED)))
    shot = Path(demo.index.parent) / "screenshot.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
