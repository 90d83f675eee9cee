"""Line breaks in the text files users hand us are \\n, \\r\\n and \\r, and nothing else (issue 10).

``str.splitlines`` also breaks at \\x0b, \\x0c, \\x1c-\\x1e, \\x85, U+2028 and U+2029: a Merge Board
comment holding one became two lines, and every error after it named the wrong line. Each reader
that goes line by line is fed every such character inside a line, under every real line ending,
and must number its lines as an editor does.
"""

from __future__ import annotations

import pytest

from blockmerge.errors import BlockmergeError
from blockmerge.generation.infotext import parse_infotext
from blockmerge.io.text import split_lines
from blockmerge.merge.presets import PresetBook
from blockmerge.recipes import RecipeError, parse_mergeboard
from blockmerge.recipes.mecha import parse_mecha

NOT_BREAKS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
BREAKS = ["\n", "\r\n", "\r"]


def test_the_characters_are_the_ones_splitlines_breaks_at() -> None:
    assert all(len(f"a{c}b".splitlines()) == 2 for c in NOT_BREAKS + BREAKS)  # the trap, as Python has it


@pytest.mark.parametrize("nl", BREAKS, ids=repr)
@pytest.mark.parametrize("ch", NOT_BREAKS, ids=repr)
def test_split_lines_breaks_only_at_line_endings(ch: str, nl: str) -> None:
    assert split_lines(f"a{ch}b{nl}c{ch}{nl}{nl}d") == [f"a{ch}b", f"c{ch}", "", "d"]


@pytest.mark.parametrize("nl", BREAKS, ids=repr)
@pytest.mark.parametrize("ch", NOT_BREAKS, ids=repr)
def test_merge_board_numbers_lines_as_an_editor_does(ch: str, nl: str) -> None:
    text = nl.join([f"# head a{ch}b", f"x = A + B, 0.5 # note a{ch}b", "", f"__A__ # a{ch}b", "y = x + B"]) + nl
    with pytest.raises(RecipeError, match=r"board\.txt:5: "):
        parse_mergeboard(text, source="board.txt")
    data, notes = parse_mergeboard(nl.join([f"# a{ch}b", "x = A + B, 0.5", f"__A__ # n{ch}m"]), source="b")
    assert len(data["steps"]) == 1 and notes["A"] == f"n{ch}m"


@pytest.mark.parametrize("nl", BREAKS, ids=repr)
@pytest.mark.parametrize("ch", NOT_BREAKS, ids=repr)
def test_preset_files_number_lines_as_an_editor_does(ch: str, nl: str) -> None:
    book = PresetBook()
    text = nl.join([f"# comment a{ch}b", "GOOD\t" + ",".join(["0.5"] * 25), "BAD\tx,y"])
    with pytest.raises(BlockmergeError, match=r"p\.tsv:3: preset BAD"):
        book.add_text(text, "p.tsv")
    book.add_text(nl.join([f"# a{ch}b", "GOOD\t" + ",".join(["0.5"] * 25)]), "p.tsv")
    assert book.get("GOOD") is not None


@pytest.mark.parametrize("nl", BREAKS, ids=repr)
@pytest.mark.parametrize("ch", NOT_BREAKS, ids=repr)
def test_mecha_recipes_number_lines_as_an_editor_does(ch: str, nl: str) -> None:
    text = nl.join(["version 0.1.0", f"# a comment a{ch}b", "frobnicate &0"])
    with pytest.raises(RecipeError, match=r"r\.mecha: line 3: unknown command"):
        parse_mecha(text, "r.mecha")


@pytest.mark.parametrize("nl", BREAKS, ids=repr)
@pytest.mark.parametrize("ch", NOT_BREAKS, ids=repr)
def test_infotexts_keep_such_characters_inside_their_line(ch: str, nl: str) -> None:
    text = nl.join([f"a cat{ch}on a mat", f"Negative prompt: dog{ch}s", "Steps: 20, Sampler: Euler, CFG scale: 7, "
                    "Seed: 1, Size: 64x64"])
    info = parse_infotext(text)
    assert info.prompt == f"a cat{ch}on a mat" and info.negative_prompt == f"dog{ch}s"
    assert info.params["Steps"] == "20"


@pytest.mark.parametrize("nl", BREAKS, ids=repr)
def test_a_prompt_file_splits_at_dash_lines_whatever_the_line_ending(tmp_path, nl: str) -> None:
    import argparse

    from blockmerge.cli.sweep_cmds import _read_prompts

    f = tmp_path / "prompts.txt"
    f.write_bytes(nl.join(["a cat\u2028on a mat", "Steps: 5", "---", "a dog", "---", ""]).encode())
    prompts = _read_prompts(argparse.Namespace(prompt=None, prompt_file=[str(f)]))
    assert prompts == ["a cat\u2028on a mat\nSteps: 5", "a dog"]
