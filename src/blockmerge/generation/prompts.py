"""A1111 prompt semantics: attention weights, 75-token chunks, emphasis, clip skip.

An infotext is only reproducible if its prompt means what it meant in A1111: ``(word)`` multiplies
attention by 1.1, ``(word:1.3)`` by 1.3, ``[word]`` divides by 1.1; prompts longer than 75 tokens are
split into several 77-token chunks encoded separately and concatenated (A1111 moves the words after
the last comma of a full chunk into the next one when that comma is within 20 tokens of the end);
``BREAK`` starts a new chunk; weights scale the encoder's output and the chunk's mean is restored
("Original" emphasis); clip skip N takes the N-th hidden state from the end through the final layer
norm. diffusers' own prompt encoding does none of this, so the pipeline gets ``prompt_embeds`` from
here. The behaviour follows A1111's ``prompt_parser.parse_prompt_attention`` and
``sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords`` (textual-inversion embeddings not supported).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blockmerge.errors import BlockmergeError

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

__all__ = [
    "BREAK",
    "CHUNK_TOKENS",
    "COMMA_BACKTRACK",
    "EMPHASIS_MODES",
    "PromptChunk",
    "encode_prompt_a1111",
    "encode_prompt_pair_a1111",
    "parse_prompt_attention",
    "tokenize_prompt_a1111",
]

#: The marker ``parse_prompt_attention`` emits for the ``BREAK`` keyword (A1111 uses the same pair).
BREAK: tuple[str, float] = ("BREAK", -1.0)
#: Prompt tokens per chunk; each chunk is wrapped in BOS/EOS to the encoder's 77 positions.
CHUNK_TOKENS = 75
#: A1111's ``comma_padding_backtrack`` default.
COMMA_BACKTRACK = 20
#: A1111's emphasis modes: weights applied with the mean restored, applied as-is, or ignored.
EMPHASIS_MODES = ("Original", "No norm", "None")

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
    """Split an A1111 prompt into (text, weight) runs; ``BREAK`` becomes :data:`BREAK`.

    Unbalanced openers apply to the rest of the prompt (as in A1111); neighbouring runs of equal
    weight are merged, except BREAK markers, which stay separate.
    """
    runs: list[list] = []  # [text, weight] pairs mutated as brackets close
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])  # a lone backslash vanishes, as in A1111
        elif piece == "(":
            round_open.append(len(runs))
        elif piece == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            scale_from(round_open.pop(), float(weight))
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

    merged: list[list] = []
    for run in runs or [["", 1.0]]:
        if merged and merged[-1][1] == run[1] and run[1] != BREAK[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, float(w)) for t, w in merged]


@dataclass(frozen=True)
class PromptChunk:
    """One encoder call: 77 token ids (BOS, 75 prompt/padding tokens, EOS) and their weights."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]


def tokenize_prompt_a1111(
    text: str,
    tokenizer: CLIPTokenizer,
    *,
    emphasis: str = "Original",
    comma_backtrack: int = COMMA_BACKTRACK,
) -> list[PromptChunk]:
    """The prompt's chunks exactly as A1111 builds them (at least one; ``""`` gives BOS + EOS padding).

    Padding inside a chunk is EOS, as in A1111; :func:`encode_prompt_a1111` swaps it for the
    tokenizer's pad token after the first EOS when they differ (SD2 / OpenCLIP pad with id 0).
    """
    if emphasis not in EMPHASIS_MODES:
        raise BlockmergeError(f"emphasis: expected one of {', '.join(EMPHASIS_MODES)}, got {emphasis!r}")
    parsed = parse_prompt_attention(text) if emphasis != "None" else [(text, 1.0)]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.convert_tokens_to_ids(",</w>")  # get_vocab() would copy 49408 entries per call
    if comma == tokenizer.unk_token_id:
        comma = None
    pieces = [t for t, w in parsed if (t, w) != BREAK]
    ids_of = iter(tokenizer(pieces, add_special_tokens=False, truncation=False)["input_ids"] if pieces else [])

    chunks: list[PromptChunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, last_comma
        fill = CHUNK_TOKENS - len(tokens)
        chunks.append(
            PromptChunk(
                tuple([bos, *tokens, *[eos] * fill, eos]),
                tuple([1.0, *weights, *[1.0] * fill, 1.0]),
            )
        )
        tokens, weights, last_comma = [], [], -1

    for piece, weight in parsed:
        if (piece, weight) == BREAK:
            close()
            continue
        for token in next(ids_of):
            if token == comma:
                last_comma = len(tokens)
            elif (
                comma_backtrack
                and len(tokens) == CHUNK_TOKENS
                and last_comma != -1
                and len(tokens) - last_comma <= comma_backtrack
            ):
                # the chunk is full mid-phrase: carry the words after its last comma over
                cut = last_comma + 1
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
    return PromptChunk(
        tuple([tokenizer.bos_token_id] + [tokenizer.eos_token_id] * (CHUNK_TOKENS + 1)),
        tuple([1.0] * (CHUNK_TOKENS + 2)),
    )


def _final_layer_norm(text_encoder: CLIPTextModel) -> torch.nn.Module:
    # transformers 5 flattened CLIPTextModel (no .text_model); CLIPTextModelWithProjection keeps it
    norm = getattr(text_encoder, "final_layer_norm", None)
    if norm is None:
        norm = text_encoder.text_model.final_layer_norm
    return norm


def encode_prompt_a1111(
    text: str,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    clip_skip: int = 1,
    *,
    min_chunks: int = 1,
    emphasis: str = "Original",
    comma_backtrack: int = COMMA_BACKTRACK,
) -> torch.Tensor:
    """Encode a prompt the way A1111 does: a ``[1, 77 * chunks, hidden]`` tensor for ``prompt_embeds``.

    ``clip_skip`` 1 is the encoder's last layer; N > 1 takes ``hidden_states[-N]`` through the final
    layer norm (A1111's "Clip skip" for SD1; SD2 checkpoints already end at the penultimate layer).
    ``min_chunks`` pads with empty chunks, which is how A1111 gives prompt and negative prompt the
    same length (see :func:`encode_prompt_pair_a1111`).
    """
    import torch

    n_layers = text_encoder.config.num_hidden_layers
    if not 1 <= clip_skip <= n_layers:
        raise BlockmergeError(f"clip_skip: must be between 1 and {n_layers}, got {clip_skip}")
    chunks = tokenize_prompt_a1111(text, tokenizer, emphasis=emphasis, comma_backtrack=comma_backtrack)
    chunks += [_empty_chunk(tokenizer)] * max(0, min_chunks - len(chunks))
    max_positions = text_encoder.config.max_position_embeddings
    if max_positions < CHUNK_TOKENS + 2:
        raise BlockmergeError(f"text_encoder: needs {CHUNK_TOKENS + 2} positions, has {max_positions}")

    device = text_encoder.device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    outputs = []
    with torch.no_grad():
        for chunk in chunks:
            ids = list(chunk.tokens)
            if pad is not None and pad != eos:  # SD2 / OpenCLIP: pad after the first EOS
                first_eos = ids.index(eos)
                ids[first_eos + 1 :] = [pad] * (len(ids) - first_eos - 1)
            input_ids = torch.tensor([ids], device=device)
            out = text_encoder(input_ids=input_ids, output_hidden_states=clip_skip > 1)
            if clip_skip > 1:
                z = _final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])
            else:
                z = out.last_hidden_state
            if emphasis != "None":
                w = torch.tensor(chunk.weights, dtype=z.dtype, device=z.device).reshape(1, -1, 1)
                if emphasis == "Original":
                    original_mean = z.mean()
                    z = z * w
                    z = z * (original_mean / z.mean())
                else:
                    z = z * w
            outputs.append(z)
    return torch.cat(outputs, dim=1)


def encode_prompt_pair_a1111(
    prompt: str,
    negative_prompt: str,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    clip_skip: int = 1,
    *,
    emphasis: str = "Original",
    comma_backtrack: int = COMMA_BACKTRACK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, negative_prompt_embeds), the shorter padded with empty chunks to equal length."""
    kwargs = {"emphasis": emphasis, "comma_backtrack": comma_backtrack}
    n_pos = len(tokenize_prompt_a1111(prompt, tokenizer, **kwargs))
    n_neg = len(tokenize_prompt_a1111(negative_prompt, tokenizer, **kwargs))
    n = max(n_pos, n_neg)
    cond = encode_prompt_a1111(prompt, tokenizer, text_encoder, clip_skip, min_chunks=n, **kwargs)
    uncond = encode_prompt_a1111(negative_prompt, tokenizer, text_encoder, clip_skip, min_chunks=n, **kwargs)
    return cond, uncond
