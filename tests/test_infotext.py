"""A1111 infotext: parse, format byte-identically, PNG chunk, unsupported-field warnings."""

from __future__ import annotations

import contextlib
import json
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from blockmerge.errors import BlockmergeError
from blockmerge.generation.infotext import (
    KNOWN_UNSUPPORTED,
    PNG_TEXT_KEY,
    Infotext,
    format_infotext,
    parse_infotext,
    png_info,
    read_png_infotext,
    unsupported_fields,
)

# The infotext from the article (shared/seed/000_641b2c3104bd4c59.txt), verbatim.
ARTICLE = (
    "masterpiece, best quality, beautiful anime girl, school uniform, strong rim light, intense shadows, "
    "highly detailed, cinematic lighting, taken by Canon EOS 5D Simga Art Lens 50mm f1.8 ISO 100 Shutter Speed 1000\n"
    "Negative prompt: lowres, bad anatomy, bad hands, error, missing fingers, cropped, worst quality, "
    "low quality, normal quality, jpeg artifacts, blurry\n"
    "Steps: 40, Sampler: Euler a, CFG scale: 7, Seed: 1, Face restoration: CodeFormer, Size: 512x512, "
    "Model hash: a9263745, Model: sd-v1-5-pruned"
)


def test_article_infotext_fields() -> None:
    info = parse_infotext(ARTICLE)
    assert info.prompt.startswith("masterpiece, best quality, beautiful anime girl")
    assert info.prompt.endswith("Shutter Speed 1000")
    assert info.negative_prompt == (
        "lowres, bad anatomy, bad hands, error, missing fingers, cropped, worst quality, "
        "low quality, normal quality, jpeg artifacts, blurry"
    )
    assert list(info.params) == [
        "Steps", "Sampler", "CFG scale", "Seed", "Face restoration", "Size", "Model hash", "Model",
    ]
    assert info.steps == 40
    assert info.sampler == "Euler a"
    assert info.cfg_scale == 7.0
    assert info.seed == 1
    assert (info.width, info.height) == (512, 512)
    assert info.clip_skip == 1  # absent means A1111's default
    assert info.model_hash == "a9263745"
    assert info.model == "sd-v1-5-pruned"
    assert info.params["Face restoration"] == "CodeFormer"


def test_article_infotext_formats_back_byte_identical() -> None:
    assert format_infotext(parse_infotext(ARTICLE)) == ARTICLE


def test_article_text_is_in_the_seed_file() -> None:
    seed = Path("/work/shared/seed/000_641b2c3104bd4c59.txt")
    if not seed.is_file():
        pytest.skip("seed article not present")
    assert ARTICLE in seed.read_text(encoding="utf-8")


def test_unsupported_fields_of_article() -> None:
    info = parse_infotext(ARTICLE)
    assert unsupported_fields(info) == ["Face restoration"]
    assert "Face restoration" in KNOWN_UNSUPPORTED


def test_multiline_prompts_and_quoted_values() -> None:
    text = (
        "line one,\n  line two  \nNegative prompt: bad,\nworse\n"
        'Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 640x768, '
        'Lora hashes: "a: 1a2b, b: 3c4d", Note: "say \\"hi\\"\\nthere", Clip skip: 2, Tiling'
    )
    info = parse_infotext(text)
    assert info.prompt == "line one,\nline two"  # A1111 strips each line
    assert info.negative_prompt == "bad,\nworse"
    assert info.params["Lora hashes"] == "a: 1a2b, b: 3c4d"
    assert info.params["Note"] == 'say "hi"\nthere'
    assert "Tiling" not in info.params  # a bare word is no pair for A1111's reader: skipped, with a note
    assert any("'Tiling'" in n for n in info.notes)
    assert info.cfg_scale == 7.5 and info.clip_skip == 2 and (info.width, info.height) == (640, 768)
    assert unsupported_fields(info) == ["Note"]  # Lora hashes are applied since in-place LoRA (4820959)
    again = format_infotext(info)
    assert 'Lora hashes: "a: 1a2b, b: 3c4d"' in again
    assert parse_infotext(again) == info


def test_prompt_only_text() -> None:
    info = parse_infotext("just a prompt, with commas", require_params=False)
    assert info.prompt == "just a prompt, with commas" and info.params == {}
    with pytest.raises(BlockmergeError, match="parameters"):
        parse_infotext("just a prompt, with commas")
    # "word, word, word" has no Key: value pairs, so it is a prompt, as in A1111
    assert parse_infotext("a, b, c", require_params=False).prompt == "a, b, c"


def test_crlf_and_no_negative() -> None:
    info = parse_infotext("a cat\r\nSteps: 5, Sampler: Euler, CFG scale: 3, Seed: 7, Size: 64x64\r\n")
    assert info.prompt == "a cat" and info.negative_prompt == "" and info.steps == 5
    assert format_infotext(info) == "a cat\nSteps: 5, Sampler: Euler, CFG scale: 3, Seed: 7, Size: 64x64"


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("Steps: many, Sampler: Euler, CFG scale: 7, Seed: 1", "Steps"),
        ("Steps: 0, Sampler: Euler, CFG scale: 7, Seed: 1", "Steps"),
        ("Steps: 20, Sampler: Euler, CFG scale: high, Seed: 1", "CFG scale"),
        ("Steps: 20, Sampler: Euler, CFG scale: 7, Seed: x1", "Seed"),
        ("Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 510x512", "Size"),
        ("Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512", "Size"),
        ("Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Clip skip: 0", "Clip skip"),
    ],
)
def test_bad_fields_name_the_field(line: str, field: str) -> None:
    with pytest.raises(BlockmergeError, match=f"img.png: {field}:"):
        parse_infotext("prompt\n" + line, source="img.png")


def test_build_matches_a1111_layout() -> None:
    info = Infotext.build(
        "a cat", "blurry", steps=40, sampler="Euler a", cfg_scale=7.0, seed=1, width=512, height=512,
        model_hash="a9263745", model="sd-v1-5-pruned", clip_skip=1, extra={"Version": "blockmerge 0.1.0"},
    )
    assert format_infotext(info) == (
        "a cat\nNegative prompt: blurry\nSteps: 40, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, "
        "Model hash: a9263745, Model: sd-v1-5-pruned, Version: blockmerge 0.1.0"
    )
    assert unsupported_fields(info) == []
    with pytest.raises(BlockmergeError, match="Size"):
        Infotext.build("x", steps=1, sampler="Euler", cfg_scale=1, seed=0, width=500, height=512)


def test_unknown_sampler_and_schedule_are_unsupported() -> None:
    info = parse_infotext(
        "p\nSteps: 20, Sampler: Fancy a, Schedule type: Wobbly, CFG scale: 7, Seed: 1"
    )
    assert unsupported_fields(info) == ["Sampler", "Schedule type"]


def test_png_roundtrip(tmp_path: Path) -> None:
    text = ARTICLE.replace("anime girl", "アニメの少女 ✨")  # non-Latin-1 forces an iTXt chunk
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, pnginfo=png_info(text))
    assert read_png_infotext(path) == text
    with Image.open(path) as im:
        assert im.info[PNG_TEXT_KEY] == text
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert read_png_infotext(plain) is None
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(BlockmergeError, match="bad.png"):
        read_png_infotext(bad)


# --- property: format then parse gives back the same fields --------------------------------------

_PRINTABLE = st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="\r\x85")


_line = st.text(_PRINTABLE, max_size=30).map(str.strip).filter(lambda s: not s.startswith("Negative prompt:"))
_prompt = st.lists(_line, max_size=3).map("\n".join)
_key = st.text(string.ascii_letters + string.digits + " -/_", min_size=2, max_size=15).filter(
    lambda k: k[0].isalnum() and k.strip() == k and k not in {"Steps", "CFG scale", "Seed", "Size", "Clip skip"}
)
_value = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"), max_size=25)


@st.composite
def _infotexts(draw: st.DrawFn) -> Infotext:
    prompt = draw(_prompt).strip()
    negative = draw(_prompt).strip()
    params = {
        "Steps": str(draw(st.integers(1, 150))),
        "Sampler": draw(st.sampled_from(["Euler a", "DPM++ 2M Karras", "DDIM"])),
        "CFG scale": json.dumps(draw(st.floats(0, 30, allow_nan=False))),
        "Seed": str(draw(st.integers(-1, 2**32))),
        "Size": f"{8 * draw(st.integers(1, 256))}x{8 * draw(st.integers(1, 256))}",
    }
    for key, value in draw(st.dictionaries(_key, _value, max_size=4)).items():
        params[key] = value
    return Infotext(prompt, negative, params)


@settings(max_examples=200, deadline=None)
@given(info=_infotexts())
def test_format_then_parse_roundtrip(info: Infotext) -> None:
    text = format_infotext(info)
    back = parse_infotext(text)
    assert back.prompt == info.prompt
    assert back.negative_prompt == info.negative_prompt
    assert back.params == info.params
    assert list(back.params) == list(info.params)
    assert format_infotext(back) == text


# --- property tests: the parser never fails with anything but BlockmergeError; writes read back ---

import re as _re  # noqa: E402

from blockmerge.generation.generate import GenerationParams  # noqa: E402
from blockmerge.generation.infotext import normalize_prompt  # noqa: E402

_A1111_PARAM = _re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _a1111_reader(x: str) -> tuple[str, str, dict[str, str]]:
    """A1111 1.10's parse_generation_parameters (prompt, negative prompt, raw fields), restated here
    as the independent reader a written infotext must satisfy."""
    prompt, negative, done = "", "", False
    *lines, last = x.strip().split("\n")
    if len(_A1111_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done = True
            line = line[16:].strip()
        if done:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res = {}
    for k, v in _A1111_PARAM.findall(last):
        if not v:
            continue
        if v[0] == '"' and v[-1] == '"':
            with contextlib.suppress(ValueError):
                v = json.loads(v)
        res[k] = v
    return prompt, negative, res


_any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)
_paramish = st.lists(st.one_of(
    st.sampled_from(["Steps", "Sampler", "CFG scale", "Seed", "Size", "RNG", "ENSD", "Eta", "Pad conds", "Version",
                     "Schedule type", "Emphasis", "First pass size", "Hires upscale", "x", "Steps ", "Clip skip"]),
    st.text(max_size=8)).flatmap(lambda k: st.tuples(st.just(k), st.one_of(st.text(max_size=12), st.integers().map(str),
                                                                           st.sampled_from(["0x0", "64x64", '""', "v1.5.0"])))),
    max_size=8).map(lambda kv: ", ".join(f"{k}: {v}" for k, v in kv))


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(_any_text, st.tuples(_any_text, _paramish).map("\n".join)))
def test_no_input_crashes_the_reader(text: str) -> None:
    for require in (True, False):
        try:
            info = parse_infotext(text, source="t.txt", require_params=require)
        except BlockmergeError as e:
            assert str(e).startswith("t.txt")
            continue
        with contextlib.suppress(BlockmergeError):
            GenerationParams.from_infotext(info)


_lines = st.lists(st.text(_PRINTABLE, max_size=25), max_size=4).map("\n".join)


@settings(max_examples=300, deadline=None)
@given(prompt=_lines, negative=_lines, extra=st.dictionaries(_key, _value, max_size=4))
def test_written_infotext_reads_back_in_a1111s_reader(prompt: str, negative: str, extra: dict) -> None:
    params = {"Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "1", "Size": "64x64", **extra}
    info = Infotext(prompt, negative, params)
    try:
        text = format_infotext(info)
    except BlockmergeError as e:  # refused only for what A1111's reader cannot give back
        assert "Negative prompt:" in str(e)
        assert any(line.strip().startswith("Negative prompt:") for line in (prompt + "\n" + negative).split("\n"))
        return
    p, n, res = _a1111_reader(text)
    assert p == normalize_prompt(prompt)
    assert n == normalize_prompt(negative)
    assert res == params
    back = parse_infotext(text)
    assert (back.prompt, back.negative_prompt, back.params) == (p, n, res)


def test_a1111_reading_rules() -> None:
    text = ('p\nNegative prompt:\nnext line\nSteps : 20, Sampler: Euler, CFG scale: 7, Seed: 1, X: 2, '
            'Note: "", Empty: , stray, Size: 64x64')
    info = parse_infotext(text)
    assert info.negative_prompt == "next line"  # a negative prompt may start on the next line
    assert "Steps " in info.params and "Steps" not in info.params  # A1111 reads the key with its space
    assert "X" not in info.params  # one-letter keys are no keys for A1111
    assert info.params["Note"] == ""  # an empty quoted value
    assert "Empty" not in info.params and any("Empty" in n for n in info.notes)
    assert any("stray" in n for n in info.notes)
    p = GenerationParams.from_infotext(info)
    assert p.steps == 20 and any("'Steps '" in n for n in p.ignored)  # never a silent default
    short = parse_infotext("p\nSteps: 5, Sampler: Euler", require_params=False)
    assert short.params == {} and short.prompt == "p\nSteps: 5, Sampler: Euler"
    assert any("only 2" in n for n in short.notes)


def test_version_gates_and_hires() -> None:
    old = parse_infotext("a [b:c:0.5]\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 512x512, "
                         "Version: v1.5.1")
    p = GenerationParams.from_infotext(old)
    assert p.old_prompt_editing and p.pad_conds_v0 and p.downcast_alphas
    new = GenerationParams.from_infotext(parse_infotext(
        "a\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 512x512, Version: v1.10.1"))
    assert not (new.old_prompt_editing or new.pad_conds_v0 or new.downcast_alphas)
    mid = GenerationParams.from_infotext(parse_infotext(
        "a\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Version: v1.7.0-224-gabc"))
    assert mid.downcast_alphas
    fp = GenerationParams.from_infotext(parse_infotext(
        "a\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 1024x768, First pass size: 0x0"))
    assert (fp.width, fp.height) == (640, 448) and any("hires" in n for n in fp.ignored)
    hr = GenerationParams.from_infotext(parse_infotext(
        "a\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Hires upscale: 2, Hires steps: 10, "
        "Denoising strength: 0.5"))
    assert (hr.width, hr.height) == (512, 512) and any("first pass" in n for n in hr.ignored)
    gpu = GenerationParams.from_infotext(parse_infotext("a\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1"))
    assert gpu.rng == "GPU"  # no RNG field: A1111's default


@pytest.mark.parametrize("fields,size", [
    # A1111's restore_old_hires_fix_params: Size defaults to 512x512; a 0 on either side is automatic
    ("First pass size: 256x256", (256, 256)),
    ("First pass size: 0x512", (512, 512)),
    ("Size: 1024x768, First pass size: 0x0", (640, 448)),
    ("Size: 1024x768, First pass size: 512x0", (640, 448)),
    ("Size: 768x768, First pass size: 384x384", (384, 384)),
])
def test_first_pass_size_as_a1111_restores_it(fields, size) -> None:
    p = GenerationParams.from_infotext(parse_infotext(f"a\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, {fields}"))
    assert (p.width, p.height) == size
    assert any("hires fix not applied" in n for n in p.ignored)  # never a silent default


@pytest.mark.parametrize("value", ["250x256", "-8x64", "axb"])
def test_first_pass_size_malformed_names_the_field(value) -> None:
    with pytest.raises(BlockmergeError, match="First pass size"):
        GenerationParams.from_infotext(parse_infotext(f"a\nSteps: 20, Sampler: Euler, CFG scale: 7, First pass size: {value}"))


def test_unwritable_prompt_is_refused_before_sampling() -> None:
    with pytest.raises(BlockmergeError, match="Negative prompt"):
        GenerationParams(prompt="a cat\nNegative prompt: dog").checked()
