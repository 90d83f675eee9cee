"""The offline CLIP tokenizer gives the same ids as OpenAI's reference tokenizer.

The reference is ``clip/simple_tokenizer.py`` from the ``openai-clip`` sdist, imported straight from
the extracted archive (it is not a dependency). Point ``BLOCKMERGE_OPENAI_CLIP_SDIST`` at
``openai-clip-1.0.1.tar.gz`` (``pip download openai-clip==1.0.1 --no-deps --no-binary :all:``);
without it those comparisons skip, and the golden ids below (taken from the reference) still run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tarfile
import unicodedata
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockmerge.errors import BlockmergeError
from blockmerge.generation.tokenizer import (
    OPENCLIP_PAD_TOKEN,
    VOCAB_SIZE,
    clean_text,
    clip_vocab_and_merges,
    load_clip_tokenizer,
)

_SDIST_CANDIDATES = [os.environ.get("BLOCKMERGE_OPENAI_CLIP_SDIST", ""), "/tmp/oc/openai-clip-1.0.1.tar.gz"]
_VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

# Ids computed with openai-clip 1.0.1's SimpleTokenizer.encode (content only, no BOS/EOS).
GOLDEN = {
    "A Photo of a CAT": [320, 1125, 539, 320, 2368],
    "masterpiece, (best quality:1.2), [blurry]": [12066, 267, 263, 949, 3027, 281, 272, 269, 273, 2361, 314, 21977, 316],
    "Tom &amp; Jerry": [2435, 261, 9164],
    "cafÃ© crÃ¨me": [15304, 1075, 12138, 614],
    "café crème": [15304, 1075, 12138, 614],
    "🐱🔥 emoji": [35710, 3016, 16327],
    "ISO 12800, f/1.8": [12263, 272, 273, 279, 271, 271, 267, 325, 270, 272, 269, 279],
    "Москва 東京": [38018, 13506, 23669, 27152, 39813, 27080, 48338, 21078, 361],
    "it's we're": [585, 568, 649, 982],
    "<lora:foo:0.8>": [283, 2179, 320, 281, 23435, 281, 271, 269, 279, 285],
}

CASES = [
    *GOLDEN,
    "",
    "   leading and trailing   ",
    "multi\nline\tprompt\r\nwith   odd    spacing",
    "UPPER lower MiXeD CamelCaseWord",
    "punctuation!!! ??? ... --- ;;; :: \"quoted\" 'single' `tick` ~tilde~ @at #hash $5 %50 ^ * + = | \\ /",
    "A1111 syntax: (word), ((word)), (word:1.3), [word], \\(escaped\\), BREAK, AND",
    "html: &lt;tag&gt; &quot;q&quot; &#39;apos&#39; &amp;amp; double &nbsp;space",
    "mojibake: â€œsmart quotesâ€\x9d and Ã¼ber and naÃ¯ve",
    "unicode: naïve Ångström Straße ﬁ ligature ½ ² Ⅻ café",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ and ｶﾀｶﾅ",
    "emoji: 👩‍👩‍👧‍👦 👍🏽 🇯🇵 ❤️ ✨",
    "numbers: 0 1 12 123 3.14159 1e-5 -42 1,000,000 2024-01-01 16:9 8k 4K uhd",
    "scripts: 日本語のテキスト 中文文本 한국어 텍스트 العربية עברית ελληνικά हिन्दी ไทย",
    "contractions: I'm you'll they'd she's don't we've THEY'RE",
    "special literal <|endoftext|> in text",
    "long: " + ", ".join(f"detail {i} of a very intricate highly detailed masterpiece" for i in range(40)),
    # where the tokenizers pipeline (NFC, Rust lower-casing, a case-sensitive pattern) cut otherwise:
    "\u00cd\x85",  # ftfy makes U+0345 of it, which the case-insensitive pattern drops
    "a\u0345b \u03b1\u0345 x\u0345",
    "it'\u017f here'\u017fs '\u017ft'",  # long s: "'s" case-insensitively
    "e&#769; a&#x301;b o&#776;",  # decomposed by the unescaping, not recomposed by CLIP
    "K \u212a \u0130stanbul \u1e9e \u03a3\u03a3 \u1f88",
    "a\x85b\u00a0c\u2028d\u180ee\u200bf",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """openai-clip's SimpleTokenizer, loaded from the sdist with the sdist's own vocabulary file."""
    sdist = next((Path(p) for p in _SDIST_CANDIDATES if p and Path(p).is_file()), None)
    if sdist is None:
        pytest.skip("openai-clip sdist not found; set BLOCKMERGE_OPENAI_CLIP_SDIST")
    root = tmp_path_factory.mktemp("openai_clip")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(("simple_tokenizer.py", ".txt.gz"))]
        tar.extractall(root, members=members, filter="data")
    module_path = next(root.rglob("simple_tokenizer.py"))
    spec = importlib.util.spec_from_file_location("_openai_clip_simple_tokenizer", module_path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    bpe = next(root.rglob("bpe_simple_vocab_16e6.txt.gz"))
    return module.SimpleTokenizer(str(bpe))


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def reference_transformers(reference):
    """transformers' Python ``CLIPTokenizer`` (transformers 4.x), which A1111 tokenizes CLIP ViT-L with:
    its ``_tokenize`` is ``whitespace_clean(ftfy.fix_text(text)).lower()`` and then SimpleTokenizer's
    pattern and BPE, i.e. SimpleTokenizer with ftfy alone as the cleaning (no html.unescape)."""
    import ftfy

    module = sys.modules[type(reference).__module__]

    class Transformers:
        def encode(self, text: str) -> list[int]:
            real = module.basic_clean
            module.basic_clean = ftfy.fix_text
            try:
                return reference.encode(text)
            finally:
                module.basic_clean = real

    return Transformers()


@pytest.fixture(scope="module")
def tokenizer_a1111_clip_l():
    return load_clip_tokenizer(unescape_html=False)


# ftfy unescapes entities itself unless the text holds "<": there the two cleanings part ways
HTML_CASES = ["<b> &amp; c", "a <lora:x:1> &lt;3 &amp;amp;", "&amp; R&amp;B", "x < y &gt; z", "<&#769;e>"]


def _content_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text).input_ids
    assert ids[0] == 49406 and ids[-1] == 49407, "BOS/EOS must wrap the content"
    return ids[1:-1]


def test_shipped_vocabulary_is_the_openai_file() -> None:
    data = resources.files("blockmerge").joinpath("data", "clip", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    assert hashlib.sha256(data).hexdigest() == _VOCAB_SHA256


def test_vocab_layout() -> None:
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == VOCAB_SIZE == 49408
    assert len(merges) == 48894
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["".join(merges[0])] == 512  # first merge follows the 2 x 256 byte tokens
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))


@pytest.mark.parametrize("text", list(GOLDEN))
def test_golden_ids(tokenizer, text: str) -> None:
    assert _content_ids(tokenizer, text) == GOLDEN[text]


@pytest.mark.parametrize("text", CASES)
def test_matches_reference(tokenizer, reference, text: str) -> None:
    assert _content_ids(tokenizer, text) == reference.encode(text)


def _assigned_char(c: str) -> bool:
    # Unassigned code points are excluded: regex (reference) and the Rust tokenizers regex engine
    # may know different Unicode versions, and no prompt holds characters no font can draw.
    return unicodedata.category(c) not in ("Cn", "Cs", "Co")


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.characters().filter(_assigned_char), max_size=40))
def test_matches_reference_on_arbitrary_text(tokenizer, reference, text: str) -> None:
    assert _content_ids(tokenizer, text) == reference.encode(text)


# Characters where CLIP's own cutting and a naive reimplementation part ways: combining marks,
# characters whose case folding is a letter, HTML entity parts, apostrophes, odd spaces.
_TRICKY = ("\u0345\u017f\u212a\u0130\u1e9e\u03a3\u03c2\u1f88\u0301\u0308\u0307'&#;x0123456789abeiks "
           "\x85\u00a0\u2028\u180e\u200b\u00cd\u00c3\u00a9\ufb01\u2167")


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(_TRICKY + "<>"), max_size=24))
def test_matches_reference_where_cutting_is_tricky(tokenizer, reference, text: str) -> None:
    assert _content_ids(tokenizer, text) == reference.encode(text)


@pytest.mark.parametrize("text", CASES + HTML_CASES)
def test_clip_l_as_a1111_matches_transformers_tokenizer(tokenizer_a1111_clip_l, reference_transformers, text):
    assert _content_ids(tokenizer_a1111_clip_l, text) == reference_transformers.encode(text)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(_TRICKY + "<>;amplt"), max_size=24))
def test_clip_l_as_a1111_matches_transformers_on_tricky_text(tokenizer_a1111_clip_l, reference_transformers,
                                                             text: str) -> None:
    assert _content_ids(tokenizer_a1111_clip_l, text) == reference_transformers.encode(text)


def test_the_two_cleanings_differ_only_where_ftfy_leaves_entities(tokenizer, tokenizer_a1111_clip_l) -> None:
    """The flags matter: with "<" in the text, OpenAI's (and open_clip's) cleaning unescapes and
    transformers' does not; without it, ftfy unescapes for both."""
    assert _content_ids(tokenizer, "<b> &amp; c") != _content_ids(tokenizer_a1111_clip_l, "<b> &amp; c")
    assert clean_text("<b> &amp; c") == "<b> & c" and clean_text("<b> &amp; c", unescape_html=False) == "<b> &amp; c"
    assert _content_ids(tokenizer, "R&amp;B") == _content_ids(tokenizer_a1111_clip_l, "R&amp;B")


def test_pipelines_tokenize_each_encoder_as_a1111(tiny_sd1_paths, tiny_sd2_paths, tiny_sdxl_paths) -> None:
    """CLIP ViT-L (SD1, SDXL's first encoder) without HTML unescaping, the OpenCLIP encoders (SD2,
    SDXL's second) with it, as A1111 tokenizes them."""
    from blockmerge.generation.loader import load_pipeline

    seen = {}
    for arch, path in (("SD1", tiny_sd1_paths[0]), ("SD2", tiny_sd2_paths[0]), ("SDXL", tiny_sdxl_paths[0])):
        pipe = load_pipeline(path, device="cpu").pipeline
        toks = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
        seen[arch] = [(t.unescape_html, t.pad_token) for t in toks]
    assert seen == {"SD1": [(False, "<|endoftext|>")], "SD2": [(True, "!")],
                    "SDXL": [(False, "<|endoftext|>"), (True, "!")]}


def test_padding_and_truncation_sd1() -> None:
    tok = load_clip_tokenizer()
    enc = tok("a cat", padding="max_length", truncation=True)
    assert len(enc.input_ids) == 77
    assert enc.input_ids[:4] == [49406, 320, 2368, 49407]
    assert set(enc.input_ids[4:]) == {49407}
    long = tok("cat " * 200, padding="max_length", truncation=True).input_ids
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407


def test_padding_openclip() -> None:
    tok = load_clip_tokenizer(pad_token=OPENCLIP_PAD_TOKEN)
    ids = tok("a cat", padding="max_length", truncation=True).input_ids
    assert tok.pad_token_id == 0
    assert ids[:4] == [49406, 320, 2368, 49407] and set(ids[4:]) == {0}


def test_max_length_is_honoured() -> None:
    tok = load_clip_tokenizer(max_length=16)
    assert tok.model_max_length == 16
    assert len(tok("a b c d e f g h i j k l m n o p q r", padding="max_length", truncation=True).input_ids) == 16


def test_batch_and_tokenize_are_cleaned() -> None:
    tok = load_clip_tokenizer()
    batch = tok(["Tom &amp; Jerry", "cafÃ©"]).input_ids
    assert batch[0][1:-1] == GOLDEN["Tom &amp; Jerry"]
    assert batch[1][1:-1] == [15304]
    assert tok.tokenize("Tom &amp; Jerry") == ["tom</w>", "&</w>", "jerry</w>"]


def test_clean_text() -> None:
    assert clean_text("  a &amp;amp; b ") == "a & b"
    assert clean_text("cafÃ©") == "café"


def test_bad_arguments() -> None:
    with pytest.raises(BlockmergeError, match="pad_token"):
        load_clip_tokenizer(pad_token="<pad>")
    with pytest.raises(BlockmergeError, match="max_length"):
        load_clip_tokenizer(max_length=1)
