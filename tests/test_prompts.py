"""A1111 prompt semantics on the real CLIP tokenizer and a tiny random CLIPTextModel."""

from __future__ import annotations

import os

import pytest
import torch

from blockmerge.errors import BlockmergeError
from blockmerge.generation.prompts import (
    BREAK,
    EncoderSide,
    encode_prompt_a1111,
    encode_texts,
    parse_prompt_attention,
    prompt_schedules,
    split_and,
    tokenize_prompt_a1111,
)
from blockmerge.generation.tokenizer import OPENCLIP_PAD_TOKEN, load_clip_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BOS, EOS, COMMA, CAT, DOG = 49406, 49407, 267, 2368, 1929


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=1,
    )
    model = CLIPTextModel(config).eval()
    with torch.no_grad():  # a trained final LayerNorm has a non-zero bias, so outputs have a non-zero mean
        model.final_layer_norm.bias.normal_(0.2, 0.5)
        model.final_layer_norm.weight.normal_(1.0, 0.2)
    return model


def _plain(encoder, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return encoder(input_ids=torch.tensor([ids])).last_hidden_state


# --- parse_prompt_attention ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("((word))", [("word", 1.1 * 1.1)]),
        ("(word:1.3)", [("word", 1.3)]),
        ("(word: 0.5 )", [("word", 0.5)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", (1 / 1.1) * (1 / 1.1))]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        (r"\[x\)", [("[x)", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("a: b", [("a: b", 1.0)]),
        ("", [("", 1.0)]),
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
        ("BREAKFAST", [("BREAKFAST", 1.0)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
             (", sun, ", 1.1), ("sky", 1.1 * 1.1 * 1.1 * 1.1), (".", 1.1)],
        ),
    ],
)
def test_parse_prompt_attention(text: str, expected: list[tuple[str, float]]) -> None:
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_parse_exact_float_products() -> None:
    # A1111 multiplies in closing order; infotexts reproduce only if the floats are identical
    assert parse_prompt_attention("(((house:1.3)))")[0][1] == 1.5730000000000004


# --- chunking ------------------------------------------------------------------------------------


def test_empty_prompt_is_one_padding_chunk(tokenizer) -> None:
    (chunk,) = tokenize_prompt_a1111("", tokenizer)
    assert chunk.tokens == (BOS,) + (EOS,) * 76
    assert chunk.weights == (1.0,) * 77


def test_chunk_boundaries(tokenizer) -> None:
    assert len(tokenize_prompt_a1111("cat " * 75, tokenizer)) == 1
    two = tokenize_prompt_a1111("cat " * 76, tokenizer)
    assert len(two) == 2
    assert two[0].tokens == (BOS,) + (CAT,) * 75 + (EOS,)
    assert two[1].tokens[:3] == (BOS, CAT, EOS)
    assert len(tokenize_prompt_a1111("cat " * 151, tokenizer)) == 3
    assert all(len(c.tokens) == 77 == len(c.weights) for c in two)


def test_comma_backtrack_moves_last_phrase(tokenizer) -> None:
    chunks = tokenize_prompt_a1111("cat " * 70 + ", " + "dog " * 10, tokenizer)
    assert len(chunks) == 2
    assert chunks[0].tokens == (BOS,) + (CAT,) * 70 + (COMMA,) + (EOS,) * 5
    assert chunks[1].tokens[:12] == (BOS,) + (DOG,) * 10 + (EOS,)
    # comma more than 20 tokens before the end: the chunk is cut mid-phrase
    far = tokenize_prompt_a1111("cat " * 50 + ", " + "dog " * 30, tokenizer)
    assert far[0].tokens == (BOS,) + (CAT,) * 50 + (COMMA,) + (DOG,) * 24 + (EOS,)
    assert far[1].tokens[:8] == (BOS,) + (DOG,) * 6 + (EOS,)
    # backtracking switched off
    off = tokenize_prompt_a1111("cat " * 70 + ", " + "dog " * 10, tokenizer, comma_backtrack=0)
    assert off[0].tokens[71:77] == (COMMA,) + (DOG,) * 4 + (EOS,) and off[0].tokens[-1] == EOS


def test_break_starts_a_new_chunk(tokenizer) -> None:
    chunks = tokenize_prompt_a1111("a cat BREAK (dog)", tokenizer)
    assert len(chunks) == 2
    assert chunks[0].tokens[:4] == (BOS, 320, CAT, EOS)
    assert chunks[1].tokens[:3] == (BOS, DOG, EOS)
    assert chunks[1].weights[:3] == (1.0, 1.1, 1.0)


def test_weights_follow_tokens(tokenizer) -> None:
    (chunk,) = tokenize_prompt_a1111("a (cat:1.5), [dog]", tokenizer)
    assert chunk.tokens[:6] == (BOS, 320, CAT, COMMA, DOG, EOS)
    assert chunk.weights[:6] == (1.0, 1.0, 1.5, 1.0, pytest.approx(1 / 1.1), 1.0)
    (raw,) = tokenize_prompt_a1111("(cat:1.5)", tokenizer, emphasis="None")
    assert set(raw.weights) == {1.0} and raw.tokens[1] == 263  # "(" kept as text


# --- encoding ------------------------------------------------------------------------------------


def test_unit_weights_equal_plain_encoding(tokenizer, encoder) -> None:
    text = "a cat, sitting on a dog"
    z = encode_prompt_a1111(text, tokenizer, encoder)
    ids = tokenizer(text, padding="max_length", max_length=77).input_ids
    assert z.shape == (1, 77, 32)
    assert torch.equal(z, _plain(encoder, ids))


def test_long_prompt_chunks_encoded_separately(tokenizer, encoder) -> None:
    z = encode_prompt_a1111("cat " * 76, tokenizer, encoder)
    assert z.shape == (1, 154, 32)
    chunks = tokenize_prompt_a1111("cat " * 76, tokenizer)
    assert torch.equal(z[:, 77:], _plain(encoder, list(chunks[1].tokens)))


def test_weight_scales_one_position_and_restores_mean(tokenizer, encoder) -> None:
    plain = encode_prompt_a1111("a cat dog", tokenizer, encoder)
    weighted = encode_prompt_a1111("a (cat:1.5) dog", tokenizer, encoder)
    assert torch.allclose(weighted.mean(), plain.mean(), atol=1e-6)
    ratio = weighted / plain
    c = (plain.mean() / (plain * _mult(77, {2: 1.5})).mean()).item()
    assert c != pytest.approx(1.0)
    others = torch.cat([ratio[0, :2], ratio[0, 3:]])
    torch.testing.assert_close(others, torch.full_like(others, c), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ratio[0, 2], torch.full((32,), 1.5 * c), rtol=1e-4, atol=1e-4)
    no_norm = encode_prompt_a1111("a (cat:1.5) dog", tokenizer, encoder, emphasis="No norm")
    torch.testing.assert_close(no_norm, plain * _mult(77, {2: 1.5}))


def _mult(n: int, at: dict[int, float]) -> torch.Tensor:
    w = torch.ones(1, n, 1)
    for i, v in at.items():
        w[0, i] = v
    return w


def test_clip_skip_picks_layer(tokenizer, encoder) -> None:
    ids = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    with torch.no_grad():
        out = encoder(input_ids=torch.tensor([ids]), output_hidden_states=True)
        expected2 = encoder.final_layer_norm(out.hidden_states[-2])
        expected3 = encoder.final_layer_norm(out.hidden_states[-3])
    z1 = encode_prompt_a1111("a cat", tokenizer, encoder, clip_skip=1)
    z2 = encode_prompt_a1111("a cat", tokenizer, encoder, clip_skip=2)
    z3 = encode_prompt_a1111("a cat", tokenizer, encoder, clip_skip=3)
    torch.testing.assert_close(z1, out.last_hidden_state)
    torch.testing.assert_close(z2, expected2)
    torch.testing.assert_close(z3, expected3)
    assert not torch.allclose(z1, z2) and not torch.allclose(z2, z3)
    with pytest.raises(BlockmergeError, match="clip_skip"):
        encode_prompt_a1111("a cat", tokenizer, encoder, clip_skip=4)


def test_texts_of_a_schedule_share_chunk_count_and_mean(tokenizer, encoder) -> None:
    # A1111 encodes a prompt's schedule as one batch: shorter texts get empty chunks, and Original
    # emphasis restores the mean over the whole batch
    z, pooled = encode_texts(["cat " * 80, "a (cat:1.5)"], [EncoderSide(tokenizer, encoder)])
    assert z.shape == (2, 154, 32) and pooled is None
    assert torch.equal(z[1, 77:], encode_prompt_a1111("", tokenizer, encoder)[0])
    with torch.no_grad():
        plain0 = _plain(encoder, list(tokenize_prompt_a1111("cat " * 80, tokenizer)[0].tokens))
        plain1 = _plain(encoder, [BOS, 320, CAT] + [EOS] * 74)
    raw = torch.cat([plain0, plain1])
    w = torch.ones(2, 77, 1)
    w[1, 2] = 1.5
    expected = raw * w * (raw.mean() / (raw * w).mean())
    torch.testing.assert_close(z[:, :77], expected, rtol=1e-5, atol=1e-6)
    ignore, _ = encode_texts(["a (cat:1.5)"], [EncoderSide(tokenizer, encoder)], emphasis="Ignore")
    torch.testing.assert_close(ignore[0, :77], plain1[0])  # brackets parsed, weights not applied


def test_openclip_padding_after_first_eos(encoder) -> None:
    tok = load_clip_tokenizer(pad_token=OPENCLIP_PAD_TOKEN)
    z = encode_prompt_a1111("a cat", tok, encoder)
    ids = [BOS, 320, CAT, EOS] + [0] * 73
    assert torch.equal(z, _plain(encoder, ids))


def test_bad_emphasis(tokenizer) -> None:
    with pytest.raises(BlockmergeError, match="emphasis"):
        tokenize_prompt_a1111("a", tokenizer, emphasis="Loud")


# --- merging runs, prompt editing, alternation, AND ------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("(a:-1)(b:-1)", [("ab", -1.0)]),  # equal weights merge even at -1 (A1111's rule)
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("x (BREAK:-1) y", [("x ", 1.0), ("", -1.0), ("BREAK", 1.0), ("", -1.0), (" y", 1.0)]),
    ("(a)(b)[c]", [("ab", 1.1), ("c", 1 / 1.1)]),
])
def test_runs_merge_as_a1111(text, expected) -> None:
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_two_minus_one_runs_tokenize_as_one_text(tokenizer) -> None:
    (chunk,) = tokenize_prompt_a1111("(cat:-1)(dog:-1)", tokenizer)
    ids = tokenizer(["catdog"], add_special_tokens=False)["input_ids"][0]
    assert list(chunk.tokens[1:1 + len(ids)]) == ids and chunk.weights[1] == -1.0


@pytest.mark.parametrize(("prompt", "steps", "expected"), [
    ("a [b:c:5] d", 10, [(5, "a b d"), (10, "a c d")]),
    ("a [b:c:0.25] d", 20, [(5, "a b d"), (20, "a c d")]),  # a fraction of the steps
    ("a [b:3]", 10, [(3, "a "), (10, "a b")]),
    ("a [b::3]", 10, [(3, "a b"), (10, "a ")]),
    ("[cat|dog]", 4, [(1, "cat"), (2, "dog"), (3, "cat"), (4, "dog")]),
    ("[x|y|z] [a:b:2]", 3, [(1, "x a"), (2, "y a"), (3, "z b")]),
    ("[a:b:1.5]", 10, [(10, "a")]),  # 1.5 is a fraction: 15 steps, past the end
    ("[a:b:15]", 10, [(10, "a")]),
    ("[unbalanced", 10, [(10, "[unbalanced")]),
    ("plain text", 7, [(7, "plain text")]),
])
def test_prompt_schedules(prompt, steps, expected) -> None:
    assert prompt_schedules(prompt, steps) == expected


def test_old_prompt_editing_timelines() -> None:
    # before A1111 1.6 any value below 1 was a fraction, even without a dot
    assert prompt_schedules("[a:b:0.5]", 10, use_old_scheduling=True) == [(5, "a"), (10, "b")]
    assert prompt_schedules("[a:b:2]", 10, use_old_scheduling=True) == [(2, "a"), (10, "b")]


def test_split_and() -> None:
    assert split_and("a cat :1.2 AND a dog AND x:0.5") == [("a cat", 1.2), (" a dog", 1.0), (" x", 0.5)]
    assert split_and("BRANDED cat") == [("BRANDED cat", 1.0)]
    assert split_and("a:b") == [("a:b", 1.0)]


@pytest.mark.parametrize("text", ["(a:1.2.3)", "x, (b:..)", "((c:1.0.0))"])
def test_malformed_attention_weight_is_a_one_line_error(text: str) -> None:
    with pytest.raises(BlockmergeError, match="attention weight"):
        parse_prompt_attention(text)
