"""A1111's extra networks in prompts (``<lora:NAME:TE:UNET:DYN>``, LoRA Block Weight's ``lbw=``) and
its prompt comments, read as A1111 1.10 reads them.

- ``<name:arg:arg...>`` (A1111's ``re_extra_net``) is removed from the positive prompt before the
  text is encoded, whatever the network; ``lora`` (and its alias ``lyco``) is applied, any other
  network is a warning. The negative prompt is not parsed (A1111 tokenizes it as it is).
- LoRA arguments as ``extra_networks_lora.activate`` reads them: positional TE multiplier (default
  1), U-Net multiplier (default: the TE one), ``dyn``; named ``te=``, ``unet=``, ``dyn=``; LoRA Block
  Weight's ``lbw=`` (a preset name or 12/17/20/26/61 values; ``w=`` is its older spelling).
- ``#`` comments (A1111's ``strip_comments``, on by default since 1.8): from ``#`` to the end of the
  line is dropped from both prompts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import BlockmergeError

__all__ = ["ExtraNetwork", "LoraCall", "parse_extra_networks", "strip_comments", "strip_extra_networks"]

_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")


def strip_comments(text: str) -> str:
    """A1111's ``strip_comments``: a whole-line ``#`` comment, then the rest of a line after ``#``."""
    if "#" not in text:
        return text
    text = re.sub(r"(^|\n)#[^\n]*(\n|$)", "\n", text)
    return re.sub(r"#[^\n]*(\n|$)", "\n", text)


@dataclass(frozen=True)
class ExtraNetwork:
    """One ``<kind:item:item...>`` of a prompt, its items split as A1111 splits them."""

    kind: str
    items: tuple[str, ...]
    text: str

    @property
    def positional(self) -> list[str]:
        return [i for i in self.items if len(i.split("=", 2)) != 2]

    @property
    def named(self) -> dict[str, str]:
        out = {}
        for i in self.items:
            parts = i.split("=", 2)
            if len(parts) == 2:
                out[parts[0]] = parts[1]
        return out


@dataclass(frozen=True)
class LoraCall:
    """A ``<lora:...>`` as A1111's LoRA extension (and LoRA Block Weight) read it."""

    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None
    lbw: str | None = None
    text: str = ""
    ignored: tuple[str, ...] = field(default=(), compare=False)


def _float(v: str, what: str, text: str) -> float:
    from ..merge.weights import parse_number

    return parse_number(v, f"prompt: {text}: {what}")


def _lora_call(net: ExtraNetwork) -> LoraCall:
    pos, named = net.positional, net.named
    if not pos or not pos[0].strip():
        raise BlockmergeError(f"prompt: {net.text}: no LoRA name")
    te = _float(pos[1], "TE multiplier", net.text) if len(pos) > 1 else 1.0
    te = _float(named["te"], "te", net.text) if "te" in named else te
    unet = _float(pos[2], "U-Net multiplier", net.text) if len(pos) > 2 else te
    unet = _float(named["unet"], "unet", net.text) if "unet" in named else unet
    dyn_text = named.get("dyn", pos[3] if len(pos) > 3 else None)
    dyn = None
    if dyn_text is not None:
        try:
            dyn = int(dyn_text)
        except ValueError:
            raise BlockmergeError(f"prompt: {net.text}: dyn {dyn_text!r} is not a whole number") from None
        if dyn < 1:
            raise BlockmergeError(f"prompt: {net.text}: dyn must be at least 1")
    lbw = named.get("lbw", named.get("w"))
    ignored = tuple(k for k in named if k not in ("te", "unet", "dyn", "lbw", "w"))
    return LoraCall(pos[0], te, unet, dyn, lbw, net.text, ignored)


def parse_extra_networks(prompt: str) -> tuple[str, list[ExtraNetwork]]:
    """The prompt without its ``<kind:...>`` tags (as A1111 encodes it), and the tags in order."""
    found: list[ExtraNetwork] = []

    def take(m: re.Match[str]) -> str:
        found.append(ExtraNetwork(m.group(1), tuple(m.group(2).split(":")), m.group(0)))
        return ""

    return _EXTRA_NET.sub(take, prompt), found


def strip_extra_networks(prompt: str) -> str:
    return parse_extra_networks(prompt)[0]


def lora_calls(prompt: str) -> tuple[list[LoraCall], list[str]]:
    """The ``<lora:...>`` / ``<lyco:...>`` calls of a prompt and warnings about the other tags."""
    _, nets = parse_extra_networks(prompt)
    calls: list[LoraCall] = []
    notes: list[str] = []
    for n in nets:
        if n.kind in ("lora", "lyco"):
            c = _lora_call(n)
            calls.append(c)
            if c.ignored:
                notes.append(f"prompt: {n.text}: {', '.join(c.ignored)} not applied (LoRA Block Weight's step "
                             "and elemental options are not supported)")
        else:
            notes.append(f"prompt: {n.text}: extra network {n.kind!r} is not applied (blockmerge applies LoRAs); "
                         "removed from the prompt as A1111 removes it")
    return calls, notes
