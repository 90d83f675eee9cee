"""The report of a small fake sweep made of real PNG files: layout, links, numbers, offline-ness."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from blockmerge.architectures import SD1, SDXL
from blockmerge.errors import BlockmergeError
from blockmerge.experiments.heatmap import u_heatmap_svg, u_positions
from blockmerge.experiments.metrics import METRIC_KEYS, image_metrics, load_image, sweep_metrics
from blockmerge.experiments.report import write_report
from blockmerge.experiments.results import ImageRecord, SweepResult, Variant

S = 32  # image side: small keeps the suite fast, large enough for every metric's window


def _img(prompt: int, seed: int, shift: int, tint: float) -> np.ndarray:
    y, x = np.mgrid[0:S, 0:S].astype(np.float64)
    cx, cy = 10 + 3 * prompt + shift, 12 + seed
    blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 5.0**2))
    r = 0.2 + 0.6 * blob
    g = 0.3 + 0.2 * x / S + 0.3 * blob * (1 - tint)
    b = 0.4 + tint * blob * 0.5 + 0.02 * np.sin(x * 2.5 + seed)
    return np.clip(np.stack([r, g, b], axis=-1), 0, 1)


def make_sweep(root: Path, arch_name: str, block_ids: list[str], prompts: int, seeds: list[int],
               bypass_blocks: tuple[str, ...] = (), latents: bool = False) -> SweepResult:
    """A sweep folder with real PNGs: block i moves the blob by i % 5 px and tints it by i / n."""
    variants = [Variant.baseline()] + [Variant.scale(b, 0.75) for b in block_ids]
    variants += [Variant.bypass(b) for b in bypass_blocks]
    res = SweepResult(arch_name, list(block_ids), [f"a cat number {p}, masterpiece\nNegative prompt: dog\n"
                                                   "Steps: 40, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"
                                                   for p in range(prompts)], list(seeds), variants, root=root)
    for vi, v in enumerate(variants):
        i = block_ids.index(v.block) if v.block else 0
        for p in range(prompts):
            for s in seeds:
                if v.kind == "baseline":
                    a = _img(p, s, 0, 0.0)
                elif v.kind == "scale":
                    a = _img(p, s, i % 5, i / len(block_ids))
                else:
                    a = _img(p, s, 6, 0.9)
                rel = f"img/{v.id.replace(':', '_')}/p{p}_s{s}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray((a * 255).round().astype(np.uint8)).save(root / rel)
                lat = None
                if latents:
                    lat = rel[:-4] + ".npy"
                    np.save(root / lat, np.full((4, 4, 4), 1.0 + 0.01 * vi) + s)
                res.images.append(ImageRecord(v.id, p, s, rel, lat))
    res.save()
    return SweepResult.load(root)


class _Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, dict[str, str]] = {}
        self.imgs: list[tuple[str | None, str]] = []  # (cell block, src)
        self.links: list[str] = []
        self.selects: dict[str, list[str]] = {}
        self.metric_values: dict[str, str] = {}
        self._cell: str | None = None
        self._depth = 0
        self._sel: str | None = None
        self._mv: str | None = None
        self.json_blob = ""
        self._in_json = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "div":
            if "cell" in a.get("class", "").split():
                self._cell = a["data-block"]
                self._depth = 0
                self.cells[self._cell] = a
            elif self._cell is not None:
                self._depth += 1
        if tag == "img" and "src" in a:  # the lightbox's <img> gets its src from a click
            self.imgs.append((self._cell, a["src"]))
        if tag == "a" and "full" in a.get("class", ""):
            self.links.append(a["href"])
        if tag == "select":
            self._sel = a["id"]
            self.selects[self._sel] = []
        if tag == "option" and self._sel:
            self.selects[self._sel].append(a["value"])
        if tag == "span" and "metric-value" in a.get("class", "") and self._cell:
            self._mv = self._cell
            self.metric_values[self._cell] = ""
        if tag == "script" and a.get("id") == "report-data":
            self._in_json = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self._cell is not None:
            if self._depth == 0:
                self._cell = None
            else:
                self._depth -= 1
        if tag == "select":
            self._sel = None
        if tag == "span":
            self._mv = None
        if tag == "script":
            self._in_json = False

    def handle_data(self, data: str) -> None:
        if self._mv:
            self.metric_values[self._mv] += data
        if self._in_json:
            self.json_blob += data


def _grid(style: str) -> tuple[int, int]:
    r = re.search(r"grid-row:(\d+)", style)
    c = re.search(r"grid-column:(\d+)", style)
    assert r and c, style
    return int(r.group(1)), int(c.group(1))


@pytest.fixture(scope="module")
def sd1_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[SweepResult, Path]:
    root = tmp_path_factory.mktemp("sweep_sd1")
    res = make_sweep(root, "SD1", list(SD1.block_ids), prompts=2, seeds=[1, 2], bypass_blocks=("IN04", "M00"),
                     latents=True)
    index = write_report(root / "report", res)
    return res, index


def test_u_positions_sd1_and_sdxl() -> None:
    p = u_positions(SD1.block_ids)
    assert p["IN00"] == (2, 1) and p["IN11"] == (13, 1) and p["M00"] == (14, 2)
    assert p["OUT00"] == (13, 3) and p["OUT11"] == (2, 3)
    q = u_positions(SDXL.block_ids)
    assert q["IN08"] == (10, 1) and q["M00"] == (11, 2) and q["OUT08"] == (2, 3) and q["OUT00"] == (10, 3)
    with pytest.raises(BlockmergeError):
        u_positions(["IN00", "FOO"])


def test_index_layout_images_and_controls(sd1_report: tuple[SweepResult, Path]) -> None:
    res, index = sd1_report
    out = index.parent
    p = _Cells()
    p.feed(index.read_text(encoding="utf-8"))
    assert len(p.cells) == 26
    assert set(p.cells) == {"baseline", *SD1.block_ids}
    pos = {b: _grid(a["style"]) for b, a in p.cells.items()}
    assert pos["baseline"] == (1, 2)
    for i in range(12):
        assert pos[f"IN{i:02d}"] == (2 + i, 1)
        assert pos[f"OUT{i:02d}"] == (13 - i, 3)
    assert pos["M00"] == (14, 2)
    # Each cell shows its seeds' images side by side; all files exist relative to the folder.
    per_cell: dict[str | None, int] = {}
    for cell, src in p.imgs:
        per_cell[cell] = per_cell.get(cell, 0) + 1
        assert (out / unquote(src)).is_file(), src
    assert all(per_cell[b] == 2 for b in ["baseline", *SD1.block_ids])
    assert per_cell[None] == 1  # the heat map below the U
    assert len(p.links) == 52 and all((out / unquote(h)).is_file() for h in p.links)
    # Thumbnails are small copies, full-size links point at the sweep's own PNGs.
    assert all(src.startswith("thumbs/") for cell, src in p.imgs if cell)
    assert all(Image.open(out / unquote(h)).size == (S, S) for h in p.links[:3])
    assert p.selects["group"] == ["scale:k=0.75", "bypass"]
    assert p.selects["prompt"] == ["0", "1"]
    assert p.selects["metric"] == list(METRIC_KEYS)  # latents were saved, so all eight
    assert p.cells["IN04"]["data-variant"] == "scale:IN04:0.75"


def test_metric_value_text_and_script_data_agree(sd1_report: tuple[SweepResult, Path]) -> None:
    res, index = sd1_report
    p = _Cells()
    p.feed(index.read_text(encoding="utf-8"))
    data = json.loads(p.json_blob)
    table = sweep_metrics(res)
    # The initial view (group 0, prompt 0, metric rmse) shows the seed mean of that block's RMSE.
    for b in ("IN00", "M00", "OUT11"):
        rows = [r.values["rmse"] for r in table.rows if r.variant == f"scale:{b}:0.75" and r.prompt == 0]
        shown = float(p.metric_values[b])
        assert shown == pytest.approx(np.mean(rows), rel=5e-3)
        assert data["cells"]["scale:k=0.75"][b]["v"]["0"]["rmse"][0] == p.metric_values[b]
    # Every lookup the script makes exists for every option of every switch.
    for g in p.selects["group"]:
        for b, c in data["cells"][g].items():
            assert b in SD1.block_ids
            for pr in p.selects["prompt"]:
                assert len(c["imgs"][int(pr)]) == 2
                for m in p.selects["metric"]:
                    text, _title, bg, fg = c["v"][pr][m]
                    assert re.fullmatch(r"#[0-9a-f]{6}", bg) and fg in ("#000000", "#ffffff")
            for m in p.selects["metric"]:
                assert data["heatmaps"][g][m].startswith("heatmaps/")
                assert (index.parent / unquote(data["heatmaps"][g][m])).is_file()
    # The bypass group ran only two blocks: the others have no entry ("not run" in the page).
    assert set(data["cells"]["bypass"]) == {"IN04", "M00"}
    # Switching metric changes the shown text (what the script writes into .metric-value).
    c = data["cells"]["scale:k=0.75"]["OUT05"]["v"]["1"]
    assert c["rmse"][0] != c["psnr"][0]


def test_no_network_references(sd1_report: tuple[SweepResult, Path]) -> None:
    out = sd1_report[1].parent
    svg_ns = 'xmlns="http://www.w3.org/2000/svg"'  # a namespace name, never fetched
    n = 0
    for f in out.rglob("*"):
        if f.suffix in (".html", ".css", ".js", ".svg", ".json", ".csv"):
            text = f.read_text(encoding="utf-8").replace(svg_ns, "")
            assert not re.search(r"https?://", text, re.IGNORECASE), f
            n += 1
    assert n >= 6
    assert not re.search(r"<(script|link)[^>]+(src|href)=\"(https?:)?//", (out / "index.html").read_text())


def test_results_json_and_csv_equal_the_metric_function(sd1_report: tuple[SweepResult, Path]) -> None:
    res, index = sd1_report
    out = index.parent
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert doc["sweep"]["block_ids"] == list(SD1.block_ids)
    per_image = {(r["variant"], r["prompt"], r["seed"]): r["values"] for r in doc["per_image"]}
    assert len(per_image) == (25 + 2) * 2 * 2
    with (out / "results.csv").open(encoding="utf-8") as f:
        csv_rows = list(csv.DictReader(f))
    csv_image = {(r["variant"], int(r["prompt"]), int(r["seed"])): r for r in csv_rows if r["level"] == "image"}
    for key in [("scale:IN00:0.75", 0, 1), ("scale:M00:0.75", 1, 2), ("bypass:IN04", 0, 2), ("scale:OUT11:0.75", 1, 1)]:
        rec = res.image(*key)
        base = res.image("baseline", key[1], key[2])
        assert rec is not None and base is not None
        expect = image_metrics(load_image(res.path_of(base.path)), load_image(res.path_of(rec.path)),
                               np.load(res.path_of(base.latent)), np.load(res.path_of(rec.latent)))
        for k, v in expect.items():
            assert float(per_image[key][k]) == v, (key, k)
            assert float(csv_image[key][k]) == v, (key, k)
    # Aggregates: mean over seeds, and over all prompts and seeds.
    over = {r["variant"]: r for r in doc["overall"]}
    vals = [float(per_image[("scale:M00:0.75", p, s)]["detail"]) for p in (0, 1) for s in (1, 2)]
    assert float(over["scale:M00:0.75"]["mean"]["detail"]) == pytest.approx(np.mean(vals))
    assert float(over["scale:M00:0.75"]["std"]["detail"]) == pytest.approx(np.std(vals, ddof=1))
    csv_all = [r for r in csv_rows if r["level"] == "all" and r["variant"] == "scale:M00:0.75"]
    assert len(csv_all) == 1 and float(csv_all[0]["detail"]) == pytest.approx(np.mean(vals))
    # The block with the biggest shift and tint ranks first on composition.
    ranking = doc["ranking"]["scale:k=0.75"]["composition"]
    assert len(ranking) == 25
    comp = {b: float(over[f"scale:{b}:0.75"]["mean"]["composition"]) for b in SD1.block_ids}
    assert ranking[0][0] == max(comp, key=lambda b: comp[b])


def test_heatmap_svgs_are_well_formed(sd1_report: tuple[SweepResult, Path]) -> None:
    out = sd1_report[1].parent
    svgs = sorted((out / "heatmaps").glob("*.svg"))
    assert len(svgs) == 2 * len(METRIC_KEYS)
    ns = "{http://www.w3.org/2000/svg}"
    for f in svgs:
        root = ET.parse(f).getroot()
        rects = [r.get("data-block") for r in root.iter(ns + "rect") if r.get("data-block")]
        assert sorted(rects) == sorted(SD1.block_ids), f


def test_u_heatmap_svg_generic_with_extras() -> None:
    vals = {b: float(i) for i, b in enumerate(SDXL.block_ids)}
    vals["M00"] = math.inf
    svg = u_heatmap_svg(SDXL.block_ids, vals, "PSNR <test> & co", extra={"BASE": 3.0, "TE1": math.nan},
                        higher_is_more=False, unit="dB")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    rects = {r.get("data-block"): r for r in root.iter(ns + "rect") if r.get("data-block")}
    assert list(rects) == list(SDXL.block_ids)
    extras = {r.get("data-extra"): r for r in root.iter(ns + "rect") if r.get("data-extra")}
    assert set(extras) == {"BASE", "TE1"} and extras["TE1"].get("fill") == "#dddddd"
    # Lower PSNR is more change: IN00 (0 dB) is darkest, M00 (inf, unchanged) lightest.
    assert rects["IN00"].get("fill") == "#7f0000"
    assert rects["M00"].get("fill") == "#fff7ec"
    # Rows: IN00 above IN08, M00 at the bottom, OUT08 at the top of the right arm.
    y = {b: float(r.get("y")) for b, r in rects.items()}
    assert y["IN00"] == y["OUT08"] < y["IN08"] == y["OUT00"] < y["M00"]
    assert float(rects["OUT00"].get("x")) > float(rects["M00"].get("x")) > float(rects["IN00"].get("x"))


def test_sdxl_report_has_20_cells_and_hides_latent(tmp_path: Path) -> None:
    res = make_sweep(tmp_path, "SDXL", list(SDXL.block_ids), prompts=1, seeds=[7])
    index = write_report(tmp_path / "rep", res, thumb_size=None, copy_images=True)
    p = _Cells()
    p.feed(index.read_text(encoding="utf-8"))
    assert len(p.cells) == 20
    pos = {b: _grid(a["style"]) for b, a in p.cells.items()}
    assert pos["IN08"] == (10, 1) and pos["M00"] == (11, 2) and pos["OUT08"] == (2, 3) and pos["OUT00"] == (10, 3)
    assert "latent" not in p.selects["metric"]  # no latents saved
    # Self-contained: the images were copied into the report folder.
    for cell, src in p.imgs:
        assert cell is None or src.startswith("images/")
        assert (index.parent / unquote(src)).is_file()
    shutil.rmtree(tmp_path / "img")
    assert all((index.parent / unquote(src)).is_file() for _, src in p.imgs)


def test_missing_baseline_and_missing_file_are_user_errors(tmp_path: Path) -> None:
    res = make_sweep(tmp_path, "SDXL", list(SDXL.block_ids), prompts=1, seeds=[1])
    (tmp_path / res.image("scale:IN03:0.75", 0, 1).path).unlink()
    with pytest.raises(BlockmergeError, match="cannot read image"):
        sweep_metrics(res)
    res.images = [r for r in res.images if r.variant != "baseline"]
    with pytest.raises(BlockmergeError, match="no baseline image"):
        sweep_metrics(res)


def test_sweep_json_round_trip(tmp_path: Path) -> None:
    res = make_sweep(tmp_path, "SDXL", list(SDXL.block_ids), prompts=1, seeds=[1])
    again = SweepResult.load(tmp_path / "sweep.json")
    assert again.to_dict() == res.to_dict()
    assert again.variant("scale:OUT08:0.75").params == {"k": 0.75}
    assert again.groups() == ["scale:k=0.75"]
    bad = res.to_dict()
    bad["variants"].append(Variant.scale("IN03", 0.75).to_dict())
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(BlockmergeError, match="duplicate variant"):
        SweepResult.load(tmp_path / "bad.json").validate()


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_report_js_parses() -> None:
    from importlib.resources import files

    js = files("blockmerge").joinpath("data", "report", "report.js")
    r = subprocess.run(["node", "--check", str(js)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# A minimal DOM, just what report.js touches, so the switching logic runs without a browser.
_FAKE_DOM = r"""
const fs = require("fs");
const [jsPath, dataPath, blocksJson] = process.argv.slice(2);
function El(tag, cls) {
  this.tagName = tag; this.className = cls || ""; this.attrs = {}; this.children = []; this.style = {};
  this.textContent = ""; this.listeners = {}; this.hidden = false;
}
El.prototype.getAttribute = function (k) { return k in this.attrs ? this.attrs[k] : null; };
El.prototype.setAttribute = function (k, v) { this.attrs[k] = String(v); };
El.prototype.removeAttribute = function (k) { delete this.attrs[k]; };
El.prototype.appendChild = function (c) { this.children.push(c); return c; };
El.prototype.removeChild = function (c) { this.children.splice(this.children.indexOf(c), 1); return c; };
Object.defineProperty(El.prototype, "firstChild", { get: function () { return this.children[0] || null; } });
El.prototype.querySelector = function (sel) {
  const cls = sel.slice(1);
  for (const c of this.children) {
    if (c.className.split(" ").includes(cls)) return c;
    const r = c.querySelector(sel); if (r) return r;
  }
  return null;
};
El.prototype.addEventListener = function (ev, f) { this.listeners[ev] = f; };
El.prototype.contains = function () { return false; };
const byId = {};
for (const id of ["group", "prompt", "metric"]) { byId[id] = new El("select"); }
byId["report-data"] = new El("script"); byId["report-data"].textContent = fs.readFileSync(dataPath, "utf8");
for (const id of ["heatmap", "prompt-text", "metric-desc"]) byId[id] = new El("x");
const cells = JSON.parse(blocksJson).map(function (b) {
  const c = new El("div", "cell"); c.setAttribute("data-block", b);
  for (const k of ["metric-value", "metric-all", "imgs", "vals"]) c.appendChild(new El("span", k));
  return c;
});
global.document = {
  getElementById: function (id) { return byId[id] || null; },
  querySelectorAll: function (sel) { return sel === ".cell[data-block]" ? cells : []; },
  createElement: function (t) { return new El(t); },
  addEventListener: function () {},
};
const data = JSON.parse(byId["report-data"].textContent);
byId.group.value = data.groups[0]; byId.prompt.value = "0"; byId.metric.value = data.metrics[0];
eval(fs.readFileSync(jsPath, "utf8"));
function snap() {
  const o = {};
  for (const c of cells) {
    const imgs = c.querySelector(".imgs").children.map(function (a) { return a.children.length ? a.children[0].src : null; });
    o[c.getAttribute("data-block")] = [c.querySelector(".metric-value").textContent, c.style.background || "", imgs];
  }
  o._heatmap = byId.heatmap.src; return o;
}
const states = [snap()];
byId.metric.value = "psnr"; byId.metric.listeners.change(); states.push(snap());
byId.prompt.value = "1"; byId.prompt.listeners.change(); states.push(snap());
byId.group.value = "bypass"; byId.group.listeners.change(); states.push(snap());
process.stdout.write(JSON.stringify(states));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_report_js_switches_metric_prompt_and_group(sd1_report: tuple[SweepResult, Path], tmp_path: Path) -> None:
    from importlib.resources import files

    res, index = sd1_report
    p = _Cells()
    p.feed(index.read_text(encoding="utf-8"))
    data = json.loads(p.json_blob)
    (tmp_path / "data.json").write_text(p.json_blob, encoding="utf-8")
    (tmp_path / "dom.js").write_text(_FAKE_DOM, encoding="utf-8")
    js = files("blockmerge").joinpath("data", "report", "report.js")
    blocks = ["baseline", *SD1.block_ids]
    r = subprocess.run(["node", str(tmp_path / "dom.js"), str(js), str(tmp_path / "data.json"), json.dumps(blocks)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    first, psnr, prompt1, bypass = json.loads(r.stdout)
    g = data["cells"]["scale:k=0.75"]
    # On load the script shows what Python rendered; each switch shows the precomputed view.
    assert first["IN04"][0] == p.metric_values["IN04"] == g["IN04"]["v"]["0"]["rmse"][0]
    assert psnr["IN04"][0] == g["IN04"]["v"]["0"]["psnr"][0] != first["IN04"][0]
    assert psnr["IN04"][1] == g["IN04"]["v"]["0"]["psnr"][2]
    assert prompt1["OUT05"][0] == g["OUT05"]["v"]["1"]["psnr"][0]
    assert prompt1["OUT05"][2] == [im["src"] for im in g["OUT05"]["imgs"][1]] != psnr["OUT05"][2]
    assert prompt1["baseline"][2] == [im["src"] for im in data["baseline"]["imgs"][1]]
    assert bypass["M00"][0] == data["cells"]["bypass"]["M00"]["v"]["1"]["psnr"][0]
    assert bypass["IN05"][0] == "not run" and bypass["IN05"][2] == []
    assert bypass["_heatmap"] == data["heatmaps"]["bypass"]["psnr"] != prompt1["_heatmap"]
