"""A1111 "PNG Info" text (infotext): parse it, write it, read/write it in PNG files.

The format, as A1111's ``processing.create_infotext`` writes it and ``infotext_utils`` reads it::

    <prompt, possibly several lines>
    Negative prompt: <negative prompt, possibly several lines>
    Steps: 40, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: a9263745

The last line holds ``Key: value`` pairs separated by ", "; a value containing ``,``, ``:`` or a
newline is written as a JSON string (``"a, b: c"``, with JSON escapes). Users paste these texts to
reproduce an image, so blockmerge reads them the way A1111 does and writes them byte for byte the
way A1111 would. A1111's own parser is a regex that silently skips what it cannot read; this one
keeps every key in order and reports malformed values of the fields blockmerge acts on.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from blockmerge.errors import BlockmergeError

if TYPE_CHECKING:
    from PIL.PngImagePlugin import PngInfo

__all__ = [
    "HONOURED_KEYS",
    "INFORMATIONAL_KEYS",
    "KNOWN_UNSUPPORTED",
    "PNG_TEXT_KEY",
    "Infotext",
    "format_infotext",
    "parse_infotext",
    "png_info",
    "read_png_infotext",
    "unsupported_fields",
]

#: The PNG text chunk A1111 stores the infotext in.
PNG_TEXT_KEY = "parameters"
_NEGATIVE = "Negative prompt:"

# One "Key: value" pair, as A1111's re_param but anchored and allowing an empty quoted string.
_PAIR = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
# A bare key (A1111 writes ``k`` alone when a value equals its key, e.g. some extension flags).
_FLAG = re.compile(r"\s*(\w[\w \-/]*?)\s*(?:,|$)")
_KEY = re.compile(r"\w[\w \-/]*")
_SIZE = re.compile(r"^(\d+)x(\d+)$")

#: Keys whose effect blockmerge reproduces when generating from an infotext.
HONOURED_KEYS: frozenset[str] = frozenset(
    {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Clip skip"}
)
#: Keys that describe the run but do not change pixels blockmerge would make (no warning needed).
INFORMATIONAL_KEYS: frozenset[str] = frozenset(
    {"Model hash", "Model", "Version", "Module", "Batch size", "Batch pos", "Eta", "Eta DDIM"}
)
#: Keys A1111 writes for features blockmerge does not implement, and why they matter.
KNOWN_UNSUPPORTED: Mapping[str, str] = {
    "Face restoration": "faces were repaired by CodeFormer/GFPGAN after sampling",
    "Hires upscale": "a second hires-fix pass upscaled and re-denoised the image",
    "Hires upscaler": "a second hires-fix pass upscaled and re-denoised the image",
    "Hires steps": "a second hires-fix pass upscaled and re-denoised the image",
    "Hires resize": "a second hires-fix pass upscaled and re-denoised the image",
    "Denoising strength": "img2img / hires fix started from another image",
    "Variation seed": "noise was mixed with a second seed",
    "Variation seed strength": "noise was mixed with a second seed",
    "Seed resize from": "noise was generated at another size",
    "ENSD": "A1111's eta noise seed delta shifts the ancestral noise",
    "VAE": "a separate VAE file was used",
    "VAE hash": "a separate VAE file was used",
    "Lora hashes": "LoRA networks were applied",
    "TI hashes": "textual-inversion embeddings were used",
    "Hypernet": "a hypernetwork was applied",
    "Tiling": "seamless tiling was on",
    "Token merging ratio": "ToMe changed the U-Net computation",
    "NGMS": "negative guidance minimum sigma skipped steps",
    "RNG": "A1111's noise source differs from torch's CPU generator",
    "Emphasis": "a non-default prompt emphasis mode was used",
}


def _err(source: str, key: str, message: str) -> BlockmergeError:
    return BlockmergeError(f"{source}: {key}: {message}")


def _parse_int(source: str, key: str, value: str, minimum: int | None = None) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise _err(source, key, f"expected a whole number, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise _err(source, key, f"must be at least {minimum}, got {number}")
    return number


def _parse_float(source: str, key: str, value: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise _err(source, key, f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise _err(source, key, f"expected a finite number, got {value!r}")
    return number


def _parse_size(source: str, value: str) -> tuple[int, int]:
    m = _SIZE.match(value.strip())
    if m is None:
        raise _err(source, "Size", f"expected WIDTHxHEIGHT such as 512x512, got {value!r}")
    width, height = int(m.group(1)), int(m.group(2))
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise _err(source, "Size", f"width and height must be positive multiples of 8, got {value!r}")
    return width, height


def _format_number(value: float) -> str:
    # A1111 writes 7.0 as "7" in old infotexts and Python's repr otherwise; the shortest exact
    # form keeps CFG 7 -> "7" and 7.5 -> "7.5" and round-trips through float().
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


@dataclass
class Infotext:
    """An A1111 infotext: prompts plus the parameter line's ``Key: value`` pairs, in order.

    Values are kept as the strings A1111 wrote (``params["Size"] == "512x512"``) so that formatting
    gives the same text back; the properties give typed views of the fields blockmerge uses.
    """

    prompt: str = ""
    negative_prompt: str = ""
    params: dict[str, str] = field(default_factory=dict)
    source: str = "infotext"

    def _get(self, key: str) -> str | None:
        return self.params.get(key)

    @property
    def steps(self) -> int | None:
        v = self._get("Steps")
        return None if v is None else _parse_int(self.source, "Steps", v, minimum=1)

    @property
    def sampler(self) -> str | None:
        return self._get("Sampler")

    @property
    def schedule_type(self) -> str | None:
        return self._get("Schedule type")

    @property
    def cfg_scale(self) -> float | None:
        v = self._get("CFG scale")
        return None if v is None else _parse_float(self.source, "CFG scale", v)

    @property
    def seed(self) -> int | None:
        v = self._get("Seed")
        return None if v is None else _parse_int(self.source, "Seed", v)

    @property
    def size(self) -> tuple[int, int] | None:
        v = self._get("Size")
        return None if v is None else _parse_size(self.source, v)

    @property
    def width(self) -> int | None:
        size = self.size
        return None if size is None else size[0]

    @property
    def height(self) -> int | None:
        size = self.size
        return None if size is None else size[1]

    @property
    def clip_skip(self) -> int:
        """A1111 omits ``Clip skip`` when it is 1 (the default), so a missing key means 1."""
        v = self._get("Clip skip")
        return 1 if v is None else _parse_int(self.source, "Clip skip", v, minimum=1)

    @property
    def model_hash(self) -> str | None:
        return self._get("Model hash")

    @property
    def model(self) -> str | None:
        return self._get("Model")

    def validate(self) -> Infotext:
        """Check every field blockmerge interprets; raises :class:`BlockmergeError` naming the field."""
        _ = (self.steps, self.cfg_scale, self.seed, self.size, self.clip_skip)
        for key in self.params:
            if not _KEY.fullmatch(key):
                raise _err(self.source, key, "keys must be letters, digits, spaces, '-', '/' or '_'")
        return self

    @classmethod
    def build(
        cls,
        prompt: str,
        negative_prompt: str = "",
        *,
        steps: int,
        sampler: str,
        cfg_scale: float,
        seed: int,
        width: int,
        height: int,
        schedule_type: str | None = None,
        model_hash: str | None = None,
        model: str | None = None,
        clip_skip: int = 1,
        extra: Mapping[str, object] | None = None,
    ) -> Infotext:
        """An infotext for an image blockmerge made, with keys in A1111's order.

        A1111 writes Steps, Sampler, Schedule type, CFG scale, Seed, Size, Model hash, Model, ...,
        Clip skip (only when not 1); ``extra`` keys follow (for example ``Version``).
        """
        params: dict[str, str] = {"Steps": str(steps), "Sampler": sampler}
        if schedule_type is not None:
            params["Schedule type"] = schedule_type
        params["CFG scale"] = _format_number(cfg_scale)
        params["Seed"] = str(seed)
        params["Size"] = f"{width}x{height}"
        if model_hash is not None:
            params["Model hash"] = model_hash
        if model is not None:
            params["Model"] = model
        if clip_skip != 1:
            params["Clip skip"] = str(clip_skip)
        for key, value in (extra or {}).items():
            params[key] = _format_number(value) if isinstance(value, float) else str(value)
        return cls(prompt, negative_prompt, params).validate()


def _parse_param_line(line: str) -> tuple[dict[str, str], int] | None:
    """(pairs, number of ``Key: value`` pairs) of a parameter line; None if it is not all pairs."""
    params: dict[str, str] = {}
    n_pairs = 0
    pos, end = 0, len(line)
    while pos < end:
        if not line[pos:].strip():
            break
        m = _PAIR.match(line, pos)
        if m is not None and m.end() > pos:
            key, value = m.group(1).strip(), m.group(2)
            if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
                with contextlib.suppress(ValueError):  # A1111 keeps such values as written
                    value = json.loads(value)
            params[key] = value
            n_pairs += 1
            pos = m.end()
            continue
        f = _FLAG.match(line, pos)
        if f is None or f.end() == pos:
            return None
        params[f.group(1)] = f.group(1)
        pos = f.end()
    return params, n_pairs


def _is_param_line(parsed: tuple[dict[str, str], int] | None) -> bool:
    # A1111 takes the last line as parameters when its regex finds 3+ "Key: value" pairs; a line
    # that starts with Steps (A1111 always writes it first) counts too, so short lines round-trip.
    if parsed is None:
        return False
    params, n_pairs = parsed
    return n_pairs >= 3 or (n_pairs >= 1 and next(iter(params)) == "Steps")


def parse_infotext(text: str, source: str = "infotext", require_params: bool = True) -> Infotext:
    """Parse A1111 infotext; ``source`` names the text (a file name) in error messages.

    Raises :class:`BlockmergeError` when ``require_params`` and there is no parameter line, or when
    a field blockmerge interprets (Steps, CFG scale, Seed, Size, Clip skip) is malformed.
    """
    *lines, last = text.replace("\r\n", "\n").strip().split("\n")
    parsed = _parse_param_line(last)
    if parsed is not None and _is_param_line(parsed):
        params = parsed[0]
    else:
        if require_params:
            raise _err(
                source, "parameters", "no parameter line ('Steps: 20, Sampler: Euler a, ...') at the end"
            )
        lines.append(last)
        params = {}
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for raw in lines:
        line = raw.strip()
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE) :].strip()
        (negative if in_negative else prompt).append(line)
    return Infotext("\n".join(prompt), "\n".join(negative), params, source).validate()


def _quote(value: str) -> str:
    # A1111's infotext_utils.quote, plus quoting of values the parser would otherwise change
    # (leading/trailing spaces, surrounding quotes) so that format -> parse is lossless.
    if any(c in value for c in ",:\n") or value != value.strip() or value.startswith('"'):
        return json.dumps(value, ensure_ascii=False)
    return value


def format_infotext(info: Infotext) -> str:
    """Write ``info`` exactly as A1111 writes infotext (the PNG ``parameters`` chunk)."""
    info.validate()
    parts = [key if key == value else f"{key}: {_quote(value)}" for key, value in info.params.items()]
    negative = f"\n{_NEGATIVE} {info.negative_prompt}" if info.negative_prompt else ""
    return f"{info.prompt}{negative}\n{', '.join(parts)}".strip()


def png_info(text: str) -> PngInfo:
    """A ``PngInfo`` carrying ``text`` in A1111's ``parameters`` chunk, for ``Image.save(pnginfo=...)``.

    Pillow writes tEXt for Latin-1 text and switches to iTXt (UTF-8) otherwise, as A1111 does.
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_TEXT_KEY, text)
    return info


def read_png_infotext(path: str | Path) -> str | None:
    """The infotext stored in an image (PNG ``parameters`` chunk), or None when it has none."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # text chunks after the image data are only read with the pixels
            value = image.info.get(PNG_TEXT_KEY)
    except (OSError, UnidentifiedImageError) as exc:
        raise BlockmergeError(f"{path}: cannot read image ({exc})") from exc
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None


def unsupported_fields(info: Infotext) -> list[str]:
    """Keys of ``info`` whose effect blockmerge will not reproduce, in infotext order (warn about them).

    Everything that is neither honoured nor purely informational is reported, so unknown extension
    keys are flagged too. ``Sampler`` / ``Schedule type`` are reported when blockmerge has no
    equivalent; ``Size`` when it is malformed.
    """
    from blockmerge.generation.samplers import SAMPLERS, SCHEDULE_TYPES  # name tables only, no diffusers
    out: list[str] = []
    for key, value in info.params.items():
        if key == "Sampler":
            if value.strip() not in SAMPLERS:
                out.append(key)
        elif key == "Schedule type":
            if value.strip() not in SCHEDULE_TYPES:
                out.append(key)
        elif key not in HONOURED_KEYS and key not in INFORMATIONAL_KEYS:
            out.append(key)
    return out
