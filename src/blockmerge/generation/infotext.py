"""A1111 "PNG Info" text (infotext): read it as A1111 reads it, write it so A1111 reads back the same.

The format, as A1111's ``processing.create_infotext`` writes it::

    <prompt, possibly several lines>
    Negative prompt: <negative prompt, possibly several lines>
    Steps: 40, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: a9263745

Reading follows ``infotext_utils.parse_generation_parameters`` (A1111 1.10) rule for rule: the last
line is the parameter line only when its ``Key: value`` regex finds at least three pairs (else it is
prompt text); keys are two or more word characters (``Key : value`` gives the key ``"Key "``); a
value that is a JSON string is unquoted; lines are stripped; everything from the first line starting
``Negative prompt:`` on is the negative prompt. Where A1111 silently skips text (a stray word, a
one-letter key, an empty value), blockmerge skips it too but says so (:attr:`Infotext.notes`).

Writing quotes like A1111 (``,``, ``:`` or a newline -> JSON string) and also values A1111's reader
would otherwise change (outer spaces, a leading quote, empty values). A prompt A1111's reader cannot
get back (a line starting ``Negative prompt:``) is refused; outer spaces of lines, which the reader
strips and the tokenizer ignores, are normalised (:func:`normalize_prompt`).
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
from blockmerge.io.text import split_lines

if TYPE_CHECKING:
    from PIL.PngImagePlugin import PngInfo

__all__ = [
    "HONOURED_KEYS",
    "INFORMATIONAL_KEYS",
    "KNOWN_UNSUPPORTED",
    "PNG_TEXT_KEY",
    "Infotext",
    "format_infotext",
    "normalize_prompt",
    "parse_infotext",
    "png_info",
    "read_png_infotext",
    "unsupported_fields",
]

#: The PNG text chunk A1111 stores the infotext in.
PNG_TEXT_KEY = "parameters"
_NEGATIVE = "Negative prompt:"

# A1111's re_param, verbatim in meaning: key of 2+ characters, then a JSON string or anything up to ','.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY = re.compile(r"\w[\w \-/]*[\w\-/]")
_SIZE = re.compile(r"^(\d+)x(\d+)$")

#: Keys whose effect blockmerge reproduces when generating from an infotext.
HONOURED_KEYS: frozenset[str] = frozenset({
    "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Clip skip", "RNG", "ENSD",
    "Eta noise seed delta", "Eta", "Eta DDIM", "Sigma churn", "Sigma tmin", "Sigma tmax", "Sigma noise",
    "Schedule rho", "Schedule min sigma", "Schedule max sigma", "Discard penultimate sigma",
    "Beta schedule alpha", "Beta schedule beta", "SGM noise multiplier", "Pad conds", "Pad conds v0",
    "Emphasis", "Old prompt editing timelines", "Downcast alphas_cumprod", "Noise Schedule", "First pass size",
    "Batch size", "Batch pos", "Lora hashes",
})
#: Keys that describe the run but do not change the pixels (no warning needed).
INFORMATIONAL_KEYS: frozenset[str] = frozenset({
    "Model hash", "Model", "Version", "Module", "Blockmerge variant", "User",
})
#: Keys A1111 writes for features blockmerge does not implement, and what they did.
KNOWN_UNSUPPORTED: Mapping[str, str] = {
    "Face restoration": "faces were repaired by CodeFormer/GFPGAN after sampling",
    "Hires upscale": "a second hires-fix pass upscaled and re-denoised the image",
    "Hires resize": "a second hires-fix pass upscaled and re-denoised the image",
    "Hires upscaler": "a second hires-fix pass upscaled and re-denoised the image",
    "Hires steps": "a second hires-fix pass upscaled and re-denoised the image",
    "Hires sampler": "a second hires-fix pass upscaled and re-denoised the image",
    "Hires schedule type": "a second hires-fix pass upscaled and re-denoised the image",
    "Hires prompt": "a second hires-fix pass upscaled and re-denoised the image",
    "Hires negative prompt": "a second hires-fix pass upscaled and re-denoised the image",
    "Hires CFG Scale": "a second hires-fix pass upscaled and re-denoised the image",
    "Hires checkpoint": "a second hires-fix pass upscaled and re-denoised the image",
    "Denoising strength": "img2img / hires fix started from another image",
    "Variation seed": "noise was mixed with a second seed",
    "Variation seed strength": "noise was mixed with a second seed",
    "Seed resize from": "noise was generated at another size",
    "VAE": "a separate VAE file was used",
    "VAE hash": "a separate VAE file was used",
    "TI hashes": "textual-inversion embeddings were used",
    "Hypernet": "a hypernetwork was applied",
    "Tiling": "seamless tiling was on",
    "Token merging ratio": "ToMe changed the U-Net computation",
    "NGMS": "negative guidance minimum sigma skipped steps",
    "Skip Early CFG": "the first steps ran without guidance",
    "Refiner": "a second model took over part of the sampling",
    "Refiner switch at": "a second model took over part of the sampling",
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


def _parse_bool(source: str, key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise _err(source, key, f"expected True or False, got {value!r}")


def _parse_size(source: str, key: str, value: str) -> tuple[int, int]:
    m = _SIZE.match(value.strip())
    if m is None:
        raise _err(source, key, f"expected WIDTHxHEIGHT such as 512x512, got {value!r}")
    return int(m.group(1)), int(m.group(2))


def _format_number(value: float) -> str:
    # A1111 writes 7.0 as "7" (UI integers) and Python's repr otherwise; the shortest exact form
    # keeps CFG 7 -> "7" and 7.5 -> "7.5" and round-trips through float().
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def normalize_prompt(text: str) -> str:
    """The prompt as A1111's reader gives it back: lines stripped, leading blank lines dropped."""
    out = ""
    for line in split_lines(text):
        line = line.strip()
        out += ("" if out == "" else "\n") + line
    return out


@dataclass
class Infotext:
    """An A1111 infotext: prompts plus the parameter line's ``Key: value`` pairs, in order.

    Values are kept as the strings A1111 wrote (``params["Size"] == "512x512"``) so that formatting
    gives the same text back; the properties give typed views. ``notes`` lists what the reader
    skipped (as A1111 does) so a caller can warn.
    """

    prompt: str = ""
    negative_prompt: str = ""
    params: dict[str, str] = field(default_factory=dict)
    source: str = "infotext"
    notes: list[str] = field(default_factory=list, compare=False)

    def _get(self, key: str) -> str | None:
        return self.params.get(key)

    def int_field(self, key: str, minimum: int | None = None) -> int | None:
        v = self._get(key)
        return None if v is None else _parse_int(self.source, key, v, minimum)

    def float_field(self, key: str) -> float | None:
        v = self._get(key)
        return None if v is None else _parse_float(self.source, key, v)

    def bool_field(self, key: str) -> bool | None:
        v = self._get(key)
        return None if v is None else _parse_bool(self.source, key, v)

    @property
    def steps(self) -> int | None:
        return self.int_field("Steps", minimum=1)

    @property
    def sampler(self) -> str | None:
        return self._get("Sampler")

    @property
    def schedule_type(self) -> str | None:
        return self._get("Schedule type")

    @property
    def cfg_scale(self) -> float | None:
        return self.float_field("CFG scale")

    @property
    def seed(self) -> int | None:
        return self.int_field("Seed")

    @property
    def size(self) -> tuple[int, int] | None:
        v = self._get("Size")
        if v is None:
            return None
        width, height = _parse_size(self.source, "Size", v)
        if width <= 0 or height <= 0 or width % 8 or height % 8:
            raise _err(self.source, "Size", f"width and height must be positive multiples of 8, got {v!r}")
        return width, height

    @property
    def first_pass_size(self) -> tuple[int, int] | None:
        v = self._get("First pass size")
        if v is None:
            return None
        width, height = _parse_size(self.source, "First pass size", v)
        if width < 0 or height < 0 or width % 8 or height % 8:  # 0 is A1111's "automatic" side
            raise _err(self.source, "First pass size", f"sides must be 0 or multiples of 8, got {v!r}")
        return width, height

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
        v = self.int_field("Clip skip", minimum=1)
        return 1 if v is None else v

    @property
    def model_hash(self) -> str | None:
        return self._get("Model hash")

    @property
    def model(self) -> str | None:
        return self._get("Model")

    def validate(self) -> Infotext:
        """Check the fields blockmerge interprets; raises :class:`BlockmergeError` naming the field."""
        _ = (self.steps, self.cfg_scale, self.seed, self.size, self.clip_skip)
        return self

    def check_keys(self) -> Infotext:
        """Every key must be one A1111's reader reads back as itself."""
        for key in self.params:
            if not _KEY.fullmatch(key):
                raise _err(self.source, key, "keys must be 2+ letters, digits, spaces, '-', '/' or '_', "
                                             "starting with a letter or digit and not ending in a space")
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
        batch: tuple[int, int] | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> Infotext:
        """An infotext for an image blockmerge made, with keys in A1111's order.

        A1111 writes Steps, Sampler, Schedule type, CFG scale, Seed, Size, Model hash, Model, Batch
        size and Batch pos (``batch``, only for batches of 2 or more), ..., Clip skip (only when not
        1); ``extra`` keys follow (ENSD, RNG, Pad conds, ..., Version).
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
        if batch is not None and batch[0] > 1:
            params["Batch size"], params["Batch pos"] = str(batch[0]), str(batch[1])
        if clip_skip != 1:
            params["Clip skip"] = str(clip_skip)
        for key, value in (extra or {}).items():
            if value is None:
                continue
            params[key] = _format_number(value) if isinstance(value, float) else str(value)
        return cls(prompt, negative_prompt, params).validate().check_keys()


def parse_infotext(text: str, source: str = "infotext", require_params: bool = True) -> Infotext:
    """Parse A1111 infotext the way A1111 1.10 does; ``source`` names the text in messages.

    Raises :class:`BlockmergeError` when ``require_params`` and there is no parameter line, or when
    a field blockmerge interprets (Steps, CFG scale, Seed, Size, Clip skip) is malformed.
    """
    *lines, last = split_lines(text.strip())
    matches = list(_PARAM.finditer(last))
    notes: list[str] = []
    if len(matches) < 3:
        if matches and not require_params:
            notes.append(f"the last line has only {len(matches)} 'Key: value' pair(s); A1111 reads it as prompt "
                         "text (a parameter line needs 3), so it is not applied")
        if require_params:
            raise _err(source, "parameters",
                       "no parameter line ('Steps: 20, Sampler: Euler a, CFG scale: 7, ...') at the end")
        lines.append(last)
        matches = []
    prompt, negative = "", ""
    done_with_prompt = False
    for raw in lines:
        line = raw.strip()
        if line.startswith(_NEGATIVE):
            done_with_prompt = True
            line = line[len(_NEGATIVE):].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    params: dict[str, str] = {}
    pos = 0
    for m in matches:
        gap = last[pos:m.start()].strip(" ,")
        if gap:
            notes.append(f"text {gap!r} in the parameter line is not a 'Key: value' pair and was skipped")
        pos = m.end()
        key, value = m.group(1), m.group(2)
        if not value:  # A1111's reader fails on an empty value and drops the key
            notes.append(f"field {key!r} has an empty value and was skipped")
            continue
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            with contextlib.suppress(ValueError):  # A1111 keeps such values as written
                value = json.loads(value)
        params[key] = value
    gap = last[pos:].strip(" ,") if matches else ""
    if gap:
        notes.append(f"text {gap!r} in the parameter line is not a 'Key: value' pair and was skipped")
    for key in params:
        if key != key.strip():
            notes.append(f"field {key!r} has a space before its ':' so A1111 reads it as another key")
    return Infotext(prompt, negative, params, source, notes).validate()


def _quote(value: str) -> str:
    # A1111's infotext_utils.quote, plus quoting of values its reader would change (outer spaces,
    # a leading quote, an empty value), so that A1111 reads back exactly what was written.
    if any(c in value for c in ",:\n") or value != value.strip() or value.startswith('"') or value == "":
        return json.dumps(value, ensure_ascii=False)
    return value


def _check_prompt(text: str, what: str, source: str) -> None:
    for line in split_lines(text):
        if line.strip().startswith(_NEGATIVE):
            raise BlockmergeError(
                f"{source}: the {what} has a line starting with {_NEGATIVE!r}; A1111's PNG Info would read it "
                "as the start of the negative prompt, so this infotext cannot be written faithfully"
            )


def check_prompt_writable(text: str, what: str = "prompt", source: str = "--prompt") -> None:
    """Refuse a prompt whose infotext A1111 would read back as other fields (checked before sampling)."""
    _check_prompt(text, what, source)


def format_infotext(info: Infotext) -> str:
    """Write ``info`` as A1111 writes infotext (the PNG ``parameters`` chunk), in a form A1111's
    reader gives back field for field (prompts as :func:`normalize_prompt` gives them)."""
    info.validate().check_keys()
    _check_prompt(info.prompt, "prompt", info.source)
    _check_prompt(info.negative_prompt, "negative prompt", info.source)
    prompt, negative = normalize_prompt(info.prompt), normalize_prompt(info.negative_prompt)
    parts = [f"{key}: {_quote(value)}" for key, value in info.params.items()]
    if len(parts) < 3:
        raise BlockmergeError(f"{info.source}: an infotext needs at least 3 parameters (A1111 reads fewer as prompt)")
    neg = f"\n{_NEGATIVE} {negative}" if negative else ""
    return f"{prompt}{neg}\n{', '.join(parts)}".strip()


def png_info(text: str) -> PngInfo:
    """A ``PngInfo`` carrying ``text`` in A1111's ``parameters`` chunk, for ``Image.save(pnginfo=...)``.

    Pillow writes tEXt for Latin-1 text and switches to iTXt (UTF-8) otherwise, as A1111 does.
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_TEXT_KEY, text)
    return info


def read_png_infotext(path: str | Path) -> str | None:
    """The infotext stored in an image (PNG ``parameters`` chunk), or None when it has none.

    A compressed text chunk that inflates past Pillow's limit (1 MB, its decompression-bomb guard)
    is an error naming the file, as is an image too large to open.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # text chunks after the image data are only read with the pixels
            value = image.info.get(PNG_TEXT_KEY)
    except Image.DecompressionBombError as exc:
        raise BlockmergeError(f"{path}: image too large to read safely ({exc})") from None
    except ValueError as exc:  # Pillow: "Decompressed Data Too Large" for an oversized zTXt/iTXt chunk
        raise BlockmergeError(f"{path}: a PNG text chunk inflates past Pillow's limit ({exc})") from None
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise BlockmergeError(f"{path}: cannot read image ({exc})") from None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None


def unsupported_fields(info: Infotext) -> list[str]:
    """Keys of ``info`` whose effect blockmerge will not reproduce, in infotext order (warn about them).

    Everything that is neither honoured nor purely informational is reported, so unknown extension
    keys (and keys A1111 itself reads as something else, such as ``"Steps "``) are flagged too.
    ``Sampler`` / ``Schedule type`` are reported when blockmerge has no equivalent.
    """
    from blockmerge.generation.samplers import SCHEDULE_TYPES, resolve_sampler

    out: list[str] = []
    for key, value in info.params.items():
        if key == "Sampler":
            try:
                resolve_sampler(value)
            except BlockmergeError:
                out.append(key)
        elif key == "Schedule type":
            if value.strip() not in SCHEDULE_TYPES and value.strip() not in _schedule_names():
                out.append(key)
        elif key not in HONOURED_KEYS and key not in INFORMATIONAL_KEYS:
            out.append(key)
    return out


def _schedule_names() -> frozenset[str]:
    from blockmerge.generation.schedules import SCHEDULERS

    return frozenset(k for s in SCHEDULERS for k in (s.name, *s.aliases))
