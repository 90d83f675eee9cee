"""A1111 prompt semantics: attention weights, 75-token chunks, emphasis, clip skip, prompt editing,
alternation and ``AND``.

An infotext is only reproducible if its prompt means what it meant in A1111 1.10:

* ``(word)`` multiplies attention by 1.1, ``(word:1.3)`` by 1.3, ``[word]`` divides by 1.1, and
  neighbouring runs of equal weight are merged -- all of them, as ``prompt_parser.parse_prompt_attention``
  does (two ``(x:-1)`` runs become one text, which tokenizes differently).
* Prompts longer than 75 tokens are split into 77-token chunks encoded separately and concatenated
  (moving the words after a late comma into the next chunk); ``BREAK`` starts a new chunk.
* Emphasis ``Original`` scales the encoder output by the weights and restores the mean over the
  whole batch of texts encoded together; ``No norm`` skips the restore; ``Ignore`` parses the
  brackets but applies no weights; ``None`` takes the prompt literally.
* ``[from:to:when]`` (``when`` a step number, or a fraction of the steps when it has a dot),
  ``[to:when]``, ``[from::when]`` and ``[a|b|c]`` (one alternative per model call) make the prompt
  a schedule; A1111 encodes all of its texts in one batch. Schedules count model calls: second-order
  samplers count two per step (``total_steps``).
* ``AND`` splits a prompt into sub-prompts combined with weights (``a cat :1.2 AND a dog``).
* SDXL encodes the same chunks with both text encoders (penultimate layers, no final norm; A1111
  ignores clip skip there), concatenates them, and takes the pooled embedding from the first chunk
  of the second encoder; an empty negative prompt is all zeros.

The schedule grammar is A1111's (``lark``, same rules and parser, so ambiguous prompts resolve the
same way); the rest follows ``prompt_parser`` and ``sd_hijack_clip``. Textual-inversion embeddings
are not supported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from blockmerge.errors import BlockmergeError

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTokenizer

__all__ = [
    "BREAK",
    "CHUNK_TOKENS",
    "COMMA_BACKTRACK",
    "EMPHASIS_MODES",
    "EncoderSide",
    "PromptChunk",
    "encode_prompt_a1111",
    "encode_texts",
    "parse_prompt_attention",
    "prompt_schedules",
    "split_and",
    "tokenize_prompt_a1111",
]

#: The run ``parse_prompt_attention`` emits for the ``BREAK`` keyword (A1111 uses the same pair).
BREAK: tuple[str, float] = ("BREAK", -1.0)
#: Prompt tokens per chunk; each chunk is wrapped in BOS/EOS to the encoder's 77 positions.
CHUNK_TOKENS = 75
#: A1111's ``comma_padding_backtrack`` default.
COMMA_BACKTRACK = 20
#: A1111's emphasis modes (``Original`` is the default).
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")

_ROUND = 1.1
_SQUARE = 1 / 1.1

# Same alternatives, in the same order, as A1111's re_attention: escapes, brackets, a ":weight)"
# closer, plain text, and a lone ':'.
_ATTENTION = re.compile(
    r"""
    \\[()\[\]\\]        # escaped bracket or backslash: literal
  | \\                  # lone backslash: dropped
  | [(\[]               # openers
  | :\s*([+-]?[.\d]+)\s*\)   # (text:1.3) closer
  | [)\]]               # closers
  | [^\\()\[\]:]+       # plain text
  | :                   # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split an A1111 prompt into (text, weight) runs; ``BREAK`` becomes ``("BREAK", -1)``.

    Unbalanced openers apply to the rest of the prompt; brackets around ``BREAK`` scale its marker
    too (then it is plain text, as in A1111); neighbouring runs of equal weight are merged.
    """
    runs: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(runs))
        elif piece == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:  # "(a:1.2.3)": A1111's float() fails too; say where, not a traceback
                raise BlockmergeError(f"prompt: attention weight {weight!r} in {piece.strip()!r} is not a number") from None
            scale_from(round_open.pop(), factor)
        elif piece == ")" and round_open:
            scale_from(round_open.pop(), _ROUND)
        elif piece == "]" and square_open:
            scale_from(square_open.pop(), _SQUARE)
        else:
            for i, part in enumerate(_BREAK_SPLIT.split(piece)):
                if i:
                    runs.append(list(BREAK))
                runs.append([part, 1.0])
    for start in round_open:
        scale_from(start, _ROUND)
    for start in square_open:
        scale_from(start, _SQUARE)
    if not runs:
        runs = [["", 1.0]]
    i = 0
    while i + 1 < len(runs):
        if runs[i][1] == runs[i + 1][1]:
            runs[i][0] += runs[i + 1][0]
            runs.pop(i + 1)
        else:
            i += 1
    return [(t, float(w)) for t, w in runs]


# --- prompt editing and alternation ---------------------------------------------------------------

# A1111's schedule grammar (prompt_parser.schedule_parser), restated: the same rules give the same
# parses under lark's Earley parser, including for ambiguous and unbalanced prompts.
_SCHEDULE_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


@lru_cache(maxsize=1)
def _schedule_parser() -> Any:
    import lark

    return lark.Lark(_SCHEDULE_GRAMMAR)


def prompt_schedules(prompt: str, steps: int, use_old_scheduling: bool = False) -> list[tuple[int, str]]:
    """The prompt's texts over ``steps`` model calls: [(last call it applies to, text), ...].

    ``[a:b:5]`` switches after call 5, ``[a:b:0.25]`` after a quarter of ``steps``; with
    ``use_old_scheduling`` (A1111 before 1.6, ``Old prompt editing timelines``) any value below 1 is
    a fraction. ``[a|b]`` alternates every call. A prompt the grammar rejects is one plain text.
    """
    import lark

    try:
        tree = _schedule_parser().parse(prompt)
    except lark.exceptions.LarkError:
        return [(steps, prompt)]

    points = {steps}

    class Collect(lark.Visitor):
        def scheduled(self, t: Any) -> None:
            s = t.children[-2]
            v = float(s)
            if use_old_scheduling:
                v = v * steps if v < 1 else v
            elif "." in s:
                v = v * steps
            t.children[-2] = min(steps, int(v))
            if t.children[-2] >= 1:
                points.add(t.children[-2])

        def alternate(self, t: Any) -> None:
            points.update(range(1, steps + 1))

    Collect().visit(tree)

    def text_at(step: int) -> str:
        class At(lark.Transformer):
            def scheduled(self, args: list[Any]) -> Any:
                before, after, _, when, _ = args
                yield (before or ()) if step <= when else after

            def alternate(self, args: list[Any]) -> Any:
                options = [a if a else "" for a in args]
                yield options[(step - 1) % len(options)]

            def start(self, args: list[Any]) -> str:
                def flatten(x: Any) -> Any:
                    if isinstance(x, str):
                        yield x
                    else:
                        for g in x:
                            yield from flatten(g)

                return "".join(flatten(args))

            def plain(self, args: list[Any]) -> Any:
                yield args[0].value

            def __default__(self, data: Any, children: list[Any], meta: Any) -> Any:
                yield from children

        return At().transform(tree)

    return [(t, text_at(t)) for t in sorted(points)]


_AND = re.compile(r"\bAND\b")
_AND_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """A1111's composable prompt: ``a :1.2 AND b`` -> [("a", 1.2), ("b", 1.0)] (equal texts once)."""
    out: list[tuple[str, float]] = []
    for sub in _AND.split(prompt):
        m = _AND_WEIGHT.search(sub)
        text, weight = m.groups() if m is not None else (sub, None)
        out.append((text, float(weight) if weight is not None else 1.0))
    return out


# --- tokens ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptChunk:
    """One encoder call: 77 token ids (BOS, 75 prompt/padding tokens, EOS) and their weights."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]


def _check_emphasis(emphasis: str) -> None:
    if emphasis not in EMPHASIS_MODES:
        raise BlockmergeError(f"emphasis: expected one of {', '.join(EMPHASIS_MODES)}, got {emphasis!r}")


def tokenize_prompt_a1111(
    text: str,
    tokenizer: CLIPTokenizer,
    *,
    emphasis: str = "Original",
    comma_backtrack: int = COMMA_BACKTRACK,
) -> list[PromptChunk]:
    """The prompt's chunks exactly as A1111 builds them (at least one; ``""`` gives BOS + EOS padding).

    Padding inside a chunk is EOS, as in A1111; the encoder swaps it for the tokenizer's pad token
    after the first EOS when they differ (SD2 / OpenCLIP pad with id 0).
    """
    _check_emphasis(emphasis)
    parsed = parse_prompt_attention(text) if emphasis != "None" else [(text, 1.0)]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.convert_tokens_to_ids(",</w>")  # get_vocab() would copy 49408 entries per call
    if comma == tokenizer.unk_token_id:
        comma = None
    ids_of = tokenizer([t for t, _ in parsed], add_special_tokens=False, truncation=False)["input_ids"]

    chunks: list[PromptChunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, last_comma
        fill = CHUNK_TOKENS - len(tokens)
        chunks.append(PromptChunk(tuple([bos, *tokens, *[eos] * fill, eos]),
                                  tuple([1.0, *weights, *[1.0] * fill, 1.0])))
        tokens, weights, last_comma = [], [], -1

    for (piece, weight), ids in zip(parsed, ids_of, strict=True):
        if piece == "BREAK" and weight == -1:
            close()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(tokens)
            elif (comma_backtrack and len(tokens) == CHUNK_TOKENS and last_comma != -1
                  and len(tokens) - last_comma <= comma_backtrack):
                cut = last_comma + 1  # the chunk is full mid-phrase: carry the words after its last comma
                carry_t, carry_w = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = carry_t, carry_w
            if len(tokens) == CHUNK_TOKENS:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close()
    return chunks


def _empty_chunk(tokenizer: CLIPTokenizer) -> PromptChunk:
    return PromptChunk(tuple([tokenizer.bos_token_id] + [tokenizer.eos_token_id] * (CHUNK_TOKENS + 1)),
                       tuple([1.0] * (CHUNK_TOKENS + 2)))


# --- encoders -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderSide:
    """One text encoder as A1111 runs it.

    ``layer``: ``"clip_skip"`` (SD1: last layer, or ``hidden_states[-clip_skip]`` through the final
    layer norm), ``"last"`` (SD2: the loaded encoder already ends at the penultimate layer, with the
    norm; A1111 ignores clip skip there) or ``"penultimate"`` (SDXL: ``hidden_states[-2]``, no norm).
    ``pooled``: also return the projected pooled output of the first chunk (SDXL's second encoder).
    """

    tokenizer: Any
    encoder: Any
    layer: str = "clip_skip"
    pooled: bool = False


def _final_layer_norm(text_encoder: Any) -> torch.nn.Module:
    # transformers 5 flattened CLIPTextModel (no .text_model); CLIPTextModelWithProjection keeps it
    norm = getattr(text_encoder, "final_layer_norm", None)
    if norm is None:
        norm = text_encoder.text_model.final_layer_norm
    return norm


def _run_encoder(side: EncoderSide, chunks: list[PromptChunk], clip_skip: int):
    import torch

    tok = side.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    rows = []
    for chunk in chunks:
        ids = list(chunk.tokens)
        if pad is not None and pad != eos:  # SD2 / OpenCLIP: pad after the first EOS
            first = ids.index(eos)
            ids[first + 1:] = [pad] * (len(ids) - first - 1)
        rows.append(ids)
    input_ids = torch.tensor(rows, device=side.encoder.device)
    need_hidden = side.layer == "penultimate" or (side.layer == "clip_skip" and clip_skip > 1)
    out = side.encoder(input_ids=input_ids, output_hidden_states=need_hidden)
    if side.layer == "penultimate":
        z = out.hidden_states[-2]
    elif side.layer == "clip_skip" and clip_skip > 1:
        z = _final_layer_norm(side.encoder)(out.hidden_states[-clip_skip])
    else:
        z = out.last_hidden_state
    pooled = out.text_embeds if side.pooled else None
    return z, pooled


def encode_texts(texts: list[str], sides: list[EncoderSide], *, clip_skip: int = 1, emphasis: str = "Original",
                 comma_backtrack: int = COMMA_BACKTRACK):
    """Encode ``texts`` together, as A1111 encodes one prompt schedule: ``(z, pooled)`` with
    ``z`` ``[len(texts), 77 * chunks, sum of hidden sizes]`` (shorter texts padded with empty
    chunks) and ``pooled`` ``[len(texts), P]`` or None. ``Original`` emphasis restores the mean over
    all of ``texts`` per chunk and encoder, as A1111's batch does."""
    import torch

    _check_emphasis(emphasis)
    if clip_skip < 1:
        raise BlockmergeError(f"clip_skip: must be >= 1, got {clip_skip}")
    per_side = []
    pooled_out = None
    with torch.no_grad():
        for side in sides:
            n_layers = side.encoder.config.num_hidden_layers
            if side.layer == "clip_skip" and clip_skip > n_layers:
                raise BlockmergeError(f"clip_skip: must be between 1 and {n_layers}, got {clip_skip}")
            if side.encoder.config.max_position_embeddings < CHUNK_TOKENS + 2:
                raise BlockmergeError(f"text_encoder: needs {CHUNK_TOKENS + 2} positions")
            chunked = [tokenize_prompt_a1111(t, side.tokenizer, emphasis=emphasis, comma_backtrack=comma_backtrack)
                       for t in texts]
            count = max(len(c) for c in chunked)
            zs = []
            for i in range(count):
                batch = [c[i] if i < len(c) else _empty_chunk(side.tokenizer) for c in chunked]
                z, pooled = _run_encoder(side, batch, clip_skip)
                if emphasis in ("Original", "No norm"):
                    w = torch.tensor([c.weights for c in batch], dtype=z.dtype, device=z.device)[..., None]
                    if emphasis == "Original":
                        original_mean = z.mean()
                        z = z * w.expand(z.shape)
                        z = z * (original_mean / z.mean())
                    else:
                        z = z * w.expand(z.shape)
                zs.append(z)
                if i == 0 and pooled is not None:
                    pooled_out = pooled
            per_side.append(torch.hstack(zs))
    return torch.cat(per_side, dim=-1), pooled_out


def encode_prompt_a1111(
    text: str,
    tokenizer: CLIPTokenizer,
    text_encoder: Any,
    clip_skip: int = 1,
    *,
    emphasis: str = "Original",
    comma_backtrack: int = COMMA_BACKTRACK,
) -> torch.Tensor:
    """One prompt through one SD1-style encoder: ``[1, 77 * chunks, hidden]`` (see :func:`encode_texts`)."""
    z, _ = encode_texts([text], [EncoderSide(tokenizer, text_encoder)], clip_skip=clip_skip, emphasis=emphasis,
                        comma_backtrack=comma_backtrack)
    return z
