"""Web UI preview latency (issue 12): from the click to 4 images shown, on the bundled models.

    PYTHONPATH=src python bench/bench_ui.py              # writes bench/RESULTS.md
    PYTHONPATH=src python bench/bench_ui.py --no-write --repeat 3

What is timed is what a user waits for, in a real browser: ``blockmerge ui`` runs as its own process
on a free loopback port, headless Chromium (selenium, as the browser test) loads the page, applies
GRAD_V, clicks "Preview" (4 seeds, 64x64, 15 steps, Euler a) and the clock stops when the 4 merged
images are shown (loaded in their <img> tags). The first preview also loads the pipelines of A and B
and renders their reference images (reported separately); before every later one a slider is moved
(M00, so the merge really changes). Target: <= 1.5 s after the first.
The server's own breakdown (edit, images, restore) is read from the preview's info line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _common as common  # noqa: E402

HEADING = "Web UI preview (issue 12)"
TARGET_S = 1.5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(repeat: int, threads: int) -> dict:
    from selenium.webdriver.common.keys import Keys

    from _ui import ui_server
    from test_ui_browser import Page, _driver

    driver = _driver()
    try:
        with tempfile.TemporaryDirectory() as tmp, ui_server(Path(tmp), "--threads", str(threads)) as (url, _, _):
            page = Page(driver, url)
            driver.get(url)
            page.wait(lambda: "tiny-b" in page.js("return document.body.innerText"), what="page")
            page.tab("Merge & Preview")
            page.wait(lambda: (page.value("weights-text") or "").count(",") == 24, what="sliders")
            page.type_into("weights-text", "GRAD_V")
            page.wait(lambda: page.value("weights-text").startswith("1,0.9166"), what="preset applied")

            def preview() -> tuple[float, str]:
                before = page.value("preview-info") or ""
                t0 = time.perf_counter()
                driver.find_element("id", "preview-btn").click()
                page.wait(lambda: (page.value("preview-info") or "") not in (before, "") and page.js(
                    "var i = document.querySelectorAll('#gallery-merged img'); return i.length == 4 && "
                    "Array.from(i).every(x => x.complete && x.naturalWidth > 0)"), 600, "preview")
                return time.perf_counter() - t0, page.value("preview-info")

            first, first_info = preview()
            log(f"first preview {first:.2f} s: {first_info}")
            later, infos = [], []
            m00 = driver.find_element("css selector", "#slider-M00 input[type=range]")
            for i in range(repeat):
                m00.send_keys(Keys.ARROW_RIGHT)  # one slider moved: the merge changes every time
                time.sleep(0.3)
                t, info = preview()
                later.append(t)
                infos.append(info)
                log(f"preview {i + 2}: {t:.3f} s: {info}")
            return {"first": first, "first_info": first_info, "later": later, "infos": infos}
    finally:
        driver.quit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=10, help="previews after the first (default 10)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()
    load_before = common.loadavg()
    r = run(args.repeat, args.threads)
    load_after = common.loadavg()
    later = r["later"]
    med = statistics.median(later)
    info = common.machine_info(("torch", "diffusers", "gradio"))
    machine = "; ".join(f"{k}: {v}" for k, v in info.items())
    rows = [
        ["first preview (loads A and B, renders their reference images)", f"{r['first']:.2f} s", "-"],
        [f"later previews, median of {len(later)} (one slider moved each time)", f"**{med:.2f} s**",
         "met" if med <= TARGET_S else "not met"],
        ["later previews, fastest / slowest", f"{min(later):.2f} / {max(later):.2f} s", ""],
    ]
    body = "\n".join([
        "From the click on Preview to 4 images shown, in headless Chromium against `blockmerge ui` in its own "
        "process on a loopback port (bundled tiny-a + tiny-b, `weighted_sum` GRAD_V, 4 seeds, 64x64, 15 steps, "
        "Euler a, CFG 6; the merge applied in place and rounded to fp16, as the file would be). "
        f"Torch threads in the server: {args.threads}. Reproduce: `PYTHONPATH=src python bench/bench_ui.py`.",
        "",
        f"Machine: {machine}",
        "",
        common.md_table(["what", "time", f"target <= {TARGET_S} s"], rows),
        "",
        f"- the server's breakdown of the first: {r['first_info']}",
        f"- and of the last: {r['infos'][-1] if r['infos'] else '-'}",
        f"- load average before -> after: {load_before:.1f} -> {load_after:.1f} (the machine is shared; "
        "wall times include that)",
    ])
    print(body)
    if not args.no_write:
        common.write_results_section(HEADING, body)


if __name__ == "__main__":
    main()
