"""Text never becomes code or structure (issue 10, class 5).

Hypothesis throws hostile text (``</script>``, ``<!--<script>``, quotes, ``javascript:`` links,
control characters, the lone surrogates a file name's undecodable bytes become) at everything
the report embeds — prompts, model names, labels, group names, notes, links — and at everything
the TOML writers write — Merge Board names, notes, paths, file names. The report must parse to
exactly the page it should be (no new element, no event attribute, the JSON island reading back
to the same values, only http/https/relative links) and the TOML must read back to the same values.
"""

from __future__ import annotations

import json
import re
import tomllib
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockmerge.experiments.report import safe_href, write_report
from blockmerge.experiments.results import SweepResult, Variant
from blockmerge.recipes.mergeboard import mergeboard_to_toml, parse_mergeboard
from blockmerge.recipes.schema import RecipeError, to_toml
from test_report import make_sweep

NASTY = ["</script>", "<!--<script>", "<script>alert(1)</script>", "-->", "<!--", "]]>", '"', "'", "&amp;",
         "<img src=x onerror=alert(1)>", "</textarea>", "\u2028", "\u2029", "\x00", "\x1b[31m", "\r\n", "\ufeff",
         "javascript:alert(1)", "{{x}}", "\\", "</SCRIPT >", "<svg onload=alert(1)>", "\udcff"]
hostile = st.lists(st.sampled_from(NASTY) | st.text(max_size=8), min_size=1, max_size=6).map("".join)
HREFS = ["javascript:alert(1)", " JaVaScRiPt:alert(1)", "java\tscript:alert(1)", "\x01javascript:x",
         "data:text/html,<script>alert(1)</script>", "vbscript:x", "file:///etc/passwd", "jav&#x09;ascript:x",
         "https://example.org/a?b=<c>", "http://x", "reverse/index.html", "../index.html", "a b.html", "//host/x",
         "//evil.com/x", "\\\\evil/x", "/\\evil.com", "\\/evil.com", " //evil.com", "https:evil.com", "/index.html"]


@pytest.fixture(scope="module")
def base_sweep(tmp_path_factory) -> tuple[SweepResult, object]:
    from blockmerge.experiments.metrics import sweep_metrics

    res = make_sweep(tmp_path_factory.mktemp("esc"), "SD1", ["IN00", "M00", "OUT00"], prompts=2, seeds=[1])
    return res, sweep_metrics(res)  # labels and texts change per example, the numbers do not


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.data: dict[str, list[str]] = {}
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs
        ident = dict(attrs).get("id")
        self._in = ident if ident in ("prompt-text", "report-data") else None

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in:
            self.data.setdefault(self._in, []).append(data)


ALLOWED_TAGS = {"html", "head", "meta", "title", "link", "body", "header", "h1", "h2", "p", "nav", "a", "div",
                "label", "select", "option", "main", "span", "img", "section", "script", "table", "thead", "tbody",
                "tr", "th", "td", "ol", "li", "pre"}


def _island(page: str) -> str:
    """The JSON island as a browser delimits it: up to the first ``</script`` in any case."""
    start = page.index('<script id="report-data" type="application/json">') + len(
        '<script id="report-data" type="application/json">')
    end = re.search(r"</script", page[start:], re.I).start() + start
    return page[start:end]


def _clean(s: str) -> str:
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in s)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(hostile, min_size=2, max_size=2), model=hostile, label=hostile, group=hostile,
       note=hostile, link_text=hostile, href=st.sampled_from(HREFS))
def test_the_report_escapes_everything_it_embeds(tmp_path_factory, base_sweep, prompts, model, label, group,
                                                 note, link_text, href) -> None:
    base_sweep, table = base_sweep
    variants = []
    for v in base_sweep.variants:
        if v.block == "M00":
            v = Variant(v.id, v.kind, v.block, v.params, label=label, group=v.group)
        if v.block == "OUT00":
            v = Variant(v.id, v.kind, v.block, v.params, label=v.label, group=group or "g")
        variants.append(v)
    res = SweepResult(base_sweep.architecture, base_sweep.block_ids, prompts, base_sweep.seeds, variants,
                      list(base_sweep.images), {"model": model, "notes": {variants[1].id: note},
                                                "links": [[link_text, href]]}, base_sweep.root)
    out = tmp_path_factory.mktemp("rep")
    index = write_report(out, res, table, title=f"sweep of {model}", thumb_size=None)
    for page_path in (index, out / "table.html"):
        page = page_path.read_text(encoding="utf-8")
        p = _Page()
        p.feed(page)
        assert set(p.tags) <= ALLOWED_TAGS, set(p.tags) - ALLOWED_TAGS
        assert p.tags.count("script") == (2 if page_path == index else 1)
        assert not [k for k, _ in p.attrs if k.startswith("on")], "an event-handler attribute got in"
        for k, v in p.attrs:
            if k in ("href", "src") and v:
                assert urlsplit(v.strip()).scheme in ("", "http", "https"), v
                assert not re.match(r"\s*[a-z]+script\s*:", v, re.I), v
    page = index.read_text(encoding="utf-8")
    island = _island(page)
    assert "<" not in island and ">" not in island  # nothing for the HTML tokenizer to act on
    data = json.loads(island)
    assert data["prompts"] == [_clean(x) for x in prompts]
    assert data["cells"][variants[2].group]["M00"]["label"] == (_clean(label) if label else variants[2].id)
    # HTML turns every line break (\r\n, and a lone \r too) into \n; nothing else may change.
    assert "".join(_Page_data(page, "prompt-text")) == re.sub(r"\r\n?", "\n", _clean(prompts[0])) \
        or "".join(_Page_data(page, "prompt-text")) == _clean(prompts[0])
    for svg in (out / "heatmaps").glob("*.svg"):
        ET.fromstring(svg.read_text(encoding="utf-8"))  # a well-formed XML document, whatever the group name


def _Page_data(page: str, ident: str) -> list[str]:
    p = _Page()
    p.feed(page)
    return p.data.get(ident, [])


SAFE_HREFS = {"https://example.org/a?b=<c>", "http://x", "reverse/index.html", "../index.html", "a b.html",
              "/index.html"}


@pytest.mark.parametrize("href", HREFS)
def test_only_http_https_and_relative_links_survive(href: str) -> None:
    assert (safe_href(href) is not None) == (href in SAFE_HREFS)


def _as_a_browser_reads(href: str) -> tuple[str, str]:
    """(scheme, host) of ``href`` as a WHATWG URL parser resolves it against an http(s) or file page:
    leading/trailing C0 controls and spaces dropped, tabs and newlines removed, a backslash read as a
    slash; "" for the host of a same-site link."""
    h = href.strip("".join(map(chr, range(0x21)))).replace("\t", "").replace("\n", "").replace("\r", "")
    h = h.replace("\\", "/")
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):(.*)$", h, re.S)
    if m:
        rest = m.group(2).lstrip("/")
        return m.group(1).lower(), rest.split("/", 1)[0]
    if h.startswith("//"):
        return "", h[2:].split("/", 1)[0] or "?"
    return "", ""


slashes = st.text(st.sampled_from("/\\ \t"), max_size=4)
hosts = st.sampled_from(["evil.com", "evil", "127.0.0.1", "evil.com:8080", "user@evil.com", ""])
paths = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)
schemes = st.sampled_from(["", "http:", "https:", "HTTPS:", "javascript:", "data:", "file:", "jAvAsCrIpT:", "ftp:"])
hrefs = st.builds(lambda sc, sl, h, p: sc + sl + h + ("/" if p else "") + p, schemes, slashes, hosts, paths) | \
    st.sampled_from(HREFS)


@settings(max_examples=500, deadline=None)
@given(href=hrefs)
def test_a_link_that_survives_stays_on_the_site_or_is_http(href: str) -> None:
    """Whatever mix of slashes, backslashes, spaces and schemes: a kept link is same-site (no host) or
    an absolute http(s) URL, as a browser would resolve it."""
    safe = safe_href(href)
    if safe is None:
        return
    scheme, host = _as_a_browser_reads(safe)
    assert (scheme == "" and host == "") or (scheme in ("http", "https") and host), (href, scheme, host)


@settings(max_examples=200, deadline=None)
@given(path=st.lists(st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\:"),
                             min_size=1, max_size=8).filter(lambda s: s.strip() == s), min_size=1, max_size=4))
def test_plain_relative_paths_are_kept_as_they_are(path: list[str]) -> None:
    href = "/".join(path)
    assert safe_href(href) == href
    assert safe_href("../" + href) == "../" + href


# ---- TOML ------------------------------------------------------------------------------------------

toml_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


@settings(max_examples=200, deadline=None)
@given(data=st.fixed_dictionaries({
    "version": st.just(1),
    "architecture": st.none() | toml_text,
    "inputs": st.dictionaries(toml_text.filter(bool), st.fixed_dictionaries(
        {"path": toml_text, "sha256": st.none() | st.just("ab" * 32)}), max_size=3),
    "steps": st.lists(st.fixed_dictionaries({"name": toml_text, "models": st.lists(toml_text, max_size=3),
                                             "alpha": st.floats(allow_nan=False, allow_infinity=False)
                                             | st.lists(st.floats(-2, 2), max_size=3) | toml_text}), max_size=3),
}), header=st.lists(hostile, max_size=3))
def test_recipe_toml_reads_back_to_the_same_values(data, header) -> None:
    text = to_toml(data, header)
    back = tomllib.loads(text)
    want = {k: v for k, v in data.items() if v is not None and k not in ("inputs", "steps")}
    want["inputs"] = {k: {f: x for f, x in v.items() if x is not None} for k, v in data["inputs"].items()}
    if data["steps"]:
        want["steps"] = data["steps"]
    if not want["inputs"]:
        want.pop("inputs")
    assert back == want
    assert len([ln for ln in text.splitlines() if ln.startswith("#")]) == len(header)  # a comment stays one line


def test_a_path_toml_cannot_hold_is_an_error_not_a_different_path() -> None:
    with pytest.raises(RecipeError, match="not valid UTF-8"):
        to_toml({"inputs": {"A": {"path": "model-\udcff.safetensors"}}})


board_name = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="=#,+\n\r"), min_size=1,
                     max_size=12)


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(st.tuples(board_name, board_name, board_name, st.floats(-3, 3)), min_size=1, max_size=4),
       note=hostile, source=hostile, path=toml_text)
def test_merge_board_import_reads_back_to_the_same_recipe(lines, note, source, path) -> None:
    text = "\n".join(f"{o} = {x} + {y}, {m!r}" for o, x, y, m in lines) + f"\n__{lines[0][1].strip()}__ # {note}\n"
    models = {lines[0][1].strip(): path}
    try:
        data, notes = parse_mergeboard(text, source=source, models=models)
        toml = mergeboard_to_toml(text, source=source, models=models)
    except RecipeError:
        return  # a line the importer refuses is an error message, never a broken recipe
    back = tomllib.loads(toml)
    assert back["steps"] == data["steps"]
    assert back.get("outputs", []) == data["outputs"]
    assert {k: v.get("path", "") for k, v in back.get("inputs", {}).items()} == \
        {k: v["path"] for k, v in data["inputs"].items()}


@pytest.mark.parametrize("ch", ["\x85", "\u2028", "\u2029", "\x9f", "\x7f"])
def test_recipe_toml_has_no_line_breaks_other_readers_see(ch: str) -> None:
    """NEL, LS, PS (and the C1 controls) are raw-legal in TOML but Python's splitlines and many editors
    break lines there: in names, values and comments they are written escaped."""
    data = {"version": 1, "architecture": f"a{ch}b", "inputs": {f"{ch}#": {"path": f"p{ch}\n# x = 1"}}}
    text = to_toml(data, [f"note {ch} here"])
    assert ch not in text
    assert tomllib.loads(text) == {"version": 1, "architecture": f"a{ch}b", "inputs": {f"{ch}#": {"path": f"p{ch}\n# x = 1"}}}
    assert len([ln for ln in text.splitlines() if ln.startswith("#")]) == 1
