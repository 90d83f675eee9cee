"""The CLIP tokenizer, built offline from the BPE vocabulary blockmerge ships.

Every Stable Diffusion text encoder (SD1 CLIP ViT-L/14, SD2 OpenCLIP ViT-H, both SDXL encoders)
uses the same 49408-token CLIP BPE vocabulary. Instead of downloading ``tokenizer/`` folders from
the Hugging Face hub we ship OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (MIT, from the
``openai-clip`` PyPI sdist; see ``data/clip/LICENSE.txt``) and derive ``vocab``/``merges`` for
``transformers.CLIPTokenizer`` in memory, exactly the way OpenAI's ``SimpleTokenizer`` derives
them, so the ids match the tokenizer the models were trained with.

The only thing the models differ in is the padding token: SD1 and SDXL's first encoder pad with
``<|endoftext|>`` (id 49407), SD2 and SDXL's OpenCLIP encoder pad with ``!`` (id 0).
"""

from __future__ import annotations

import gzip
import html
from functools import lru_cache
from importlib import resources
from typing import Any

import ftfy
import regex
from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

from blockmerge.errors import BlockmergeError

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "OPENCLIP_PAD_TOKEN",
    "VOCAB_SIZE",
    "CleanCLIPTokenizer",
    "clean_text",
    "clip_vocab_and_merges",
    "clip_words",
    "load_clip_tokenizer",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
#: Padding token of the OpenCLIP text encoders (SD2, SDXL's second encoder): "!" has id 0.
OPENCLIP_PAD_TOKEN = "!"
VOCAB_SIZE = 49408
_N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894: what SimpleTokenizer reads from the file
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP's reversible byte -> printable-character table. It defines the order of the
    # first 256 vocabulary entries, so it has to be reproduced exactly; tokenizers' ByteLevel
    # pre-tokenizer uses the same table at run time but does not expose it.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The CLIP vocabulary (token -> id, 49408 entries) and BPE merges (48894 pairs, by rank).

    Built from the shipped ``bpe_simple_vocab_16e6.txt.gz`` in the same order as OpenAI's
    ``SimpleTokenizer``: 256 byte characters, the same with ``</w>``, one token per merge, then
    ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407). Cached: it takes ~0.1 s.
    """
    source = resources.files("blockmerge").joinpath("data", "clip", _BPE_FILE)
    try:
        raw = gzip.decompress(source.read_bytes()).decode("utf-8")
    except (OSError, EOFError) as exc:
        raise BlockmergeError(f"{_BPE_FILE}: cannot read the shipped CLIP vocabulary ({exc})") from exc
    lines = raw.split("\n")[1 : _N_MERGES + 1]  # line 0 is a "#version" header
    merges = tuple(tuple(line.split()) for line in lines)
    if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
        raise BlockmergeError(f"{_BPE_FILE}: expected {_N_MERGES} BPE merges, the file is damaged")
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise BlockmergeError(f"{_BPE_FILE}: built {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges  # type: ignore[return-value]


def clean_text(text: str, unescape_html: bool = True) -> str:
    """CLIP's own text cleaning: ftfy repair, HTML entities unescaped (twice), outer spaces stripped.

    ``transformers.CLIPTokenizer`` (the ``tokenizers``-backed class) only does NFC, whitespace
    collapsing and lower-casing, so without this step ``"a &amp; b"`` or mojibake such as
    ``"cafÃ©"`` would give other ids than the tokenizer CLIP was trained with.

    ``unescape_html=False`` is the cleaning of transformers' Python ``CLIPTokenizer`` (ftfy only),
    which A1111 tokenizes SD1's and SDXL's first text encoder with: there ``"&amp;"`` stays three
    words. Its OpenCLIP encoders (SD2, SDXL's second) go through open_clip's ``SimpleTokenizer``,
    which unescapes as OpenAI's does.
    """
    text = ftfy.fix_text(text)
    if unescape_html:
        text = html.unescape(html.unescape(text))
    return text.strip()


#: SimpleTokenizer's word pattern, matched case-insensitively as SimpleTokenizer (and transformers'
#: Python CLIPTokenizer) match it; ``regex``, not ``re``, for ``\p{L}``/``\p{N}``.
_CLIP_WORDS = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_SPACES = regex.compile(r"\s+")


def clip_words(text: str, unescape_html: bool = True) -> str:
    """The pieces OpenAI's ``SimpleTokenizer`` cuts ``text`` into before BPE, joined by single spaces:
    :func:`clean_text`, whitespace runs collapsed, lower-cased (Python's ``str.lower``), then its
    word pattern found case-insensitively. Each piece becomes BPE word(s) ending in ``</w>``.

    Why here and not in the ``tokenizers`` pipeline: that one (NFC, whitespace runs, Rust lower-casing,
    then the same pattern matched case-sensitively) cuts some text differently. U+0345 (combining
    ypogegrammeni, which ftfy makes of the mojibake "Í" + U+0085) case-folds to a letter, so the
    case-insensitive pattern drops it and the case-sensitive one kept it; "'ſ" (long s) is one
    piece case-insensitively and two otherwise; NFC after the HTML unescaping composed "e&#769;"
    into one letter. The ids then differed from CLIP's own for those prompts.
    """
    text = _SPACES.sub(" ", clean_text(text, unescape_html)).strip().lower()
    return " ".join(_CLIP_WORDS.findall(text))


def _clean_batch(text: Any, unescape_html: bool) -> Any:
    if isinstance(text, str):
        return clip_words(text, unescape_html)
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        return [clip_words(t, unescape_html) for t in text]
    return text  # pre-tokenised input or pairs: the caller chose the pieces, leave them alone


class CleanCLIPTokenizer(CLIPTokenizer):
    """``CLIPTokenizer`` that cuts its input into CLIP's words first (:func:`clip_words`), then
    only splits on the spaces between them and applies BPE (no normalizer of its own, and the
    byte-level step without its GPT-2 pattern, which would cut "'ſ" again).

    Every encoding entry point (``__call__``, ``encode``, ``tokenize``, batches) goes through
    ``_encode_plus``, so that is the one place the cutting is hooked in.
    """

    def __init__(self, *args: Any, unescape_html: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unescape_html = unescape_html  # see clean_text
        backend = self.backend_tokenizer
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(" ", behavior="removed"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])

    def _encode_plus(self, text: Any, text_pair: Any = None, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("is_split_into_words", False):
            text = _clean_batch(text, self.unescape_html)
            if text_pair is not None:
                text_pair = _clean_batch(text_pair, self.unescape_html)
        return super()._encode_plus(text, text_pair, *args, **kwargs)


def load_clip_tokenizer(max_length: int = 77, pad_token: str = EOS_TOKEN, unescape_html: bool = True) -> CLIPTokenizer:
    """Build the CLIP tokenizer offline, with ``model_max_length = max_length``.

    ``unescape_html``: whether HTML entities in the text are unescaped first (see :func:`clean_text`:
    A1111 does for OpenCLIP encoders, not for CLIP ViT-L).

    ``pad_token`` is ``"<|endoftext|>"`` for SD1 and SDXL's first text encoder and ``"!"``
    (:data:`OPENCLIP_PAD_TOKEN`) for SD2 and SDXL's second one. A fresh object is returned on every
    call (tokenizers carry mutable padding/truncation state); the vocabulary itself is cached.
    """
    if max_length < 2:
        raise BlockmergeError(f"max_length: must be at least 2 (BOS + EOS), got {max_length}")
    vocab, merges = clip_vocab_and_merges()
    if pad_token not in vocab:
        raise BlockmergeError(f"pad_token: {pad_token!r} is not a single CLIP vocabulary token")
    return CleanCLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=max_length,
        unescape_html=unescape_html,
    )
