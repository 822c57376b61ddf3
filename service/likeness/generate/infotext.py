"""A1111 "infotext": the generation parameters text stored in every image.

A1111 writes it into a PNG ``parameters`` text chunk (JPEG/WebP: EXIF
UserComment) and reads it back in PNG Info; ComfyUI, InvokeAI, civitai and
most galleries read the same layout::

    <prompt, may span lines>
    Negative prompt: <negative prompt, may span lines>
    Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly

The last line holds ``key: value`` pairs; values containing ``,``, ``:`` or a
newline are JSON-quoted (A1111's ``quote``). Newer A1111 versions write the
Karras schedule separately (``Sampler: DPM++ 2M, Schedule type: Karras``);
:func:`parse_infotext` folds that back into our sampler names.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from likeness.errors import InvalidInput

_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
# Longest parameters text we parse. A1111's own prompts stay far below (its UI caps a prompt at
# a few thousand characters; the workflow's 106-token negative prompt is ~600): 64 KiB leaves
# room for long LoRA/ADetailer blocks while a file stuffed with megabytes of text (seen: 5 MB in
# one PNG chunk) is not parsed at all. Callers report such a file instead of reading its text.
MAX_INFOTEXT_CHARS = 64 * 1024
# Seeds as other tools write them: A1111 draws 0..2**32-1, ComfyUI 0..2**64-1 (torch accepts both).
_SEED_LIMIT = 2**64 - 1
# Steps and sizes beyond these are not settings any tool writes (A1111's sliders stop at 150
# steps and 2048 px; a PNG side is at most 2**31-1): a larger number is a damaged or hostile file.
_STEPS_LIMIT = 100_000
_SIDE_LIMIT = 2**31 - 1
_NEGATIVE = "Negative prompt:"

# Keys this module maps to fields; everything else stays in ``extra`` in order.
_KNOWN = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Face restoration", "Size", "Model hash", "Model")


@dataclass(frozen=True)
class InfoText:
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 0
    # A1111 sampler name as in spec.SamplerName ("DPM++ 2M Karras"); "" when unknown.
    sampler: str = ""
    cfg_scale: float = 0.0
    # -1 when the text has no seed.
    seed: int = -1
    width: int = 0
    height: int = 0
    # Checkpoint name (file stem) and A1111's short sha256; "" when unknown.
    model: str = ""
    model_hash: str = ""
    # Other "key: value" pairs (Clip skip, Version, Denoising strength, ...), in order.
    extra: dict[str, str] = field(default_factory=dict)
    # A1111's "Face restoration: CodeFormer" (the restorer that ran, likeness.backends.restore); "" = none.
    # Last, so positional construction of the fields above stays as it was.
    face_restoration: str = ""


def quote(value: str) -> str:
    """A1111's quoting: JSON-quote a value that holds a comma, colon or newline."""
    value = str(value)
    if "," not in value and "\n" not in value and ":" not in value and not value.startswith('"'):
        return value
    return json.dumps(value, ensure_ascii=False)


def unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return str(json.loads(value))
        except ValueError:
            return value
    return value


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def format_infotext(info: InfoText) -> str:
    """The A1111 parameters text of ``info`` (omits empty/unknown fields like A1111)."""
    params: list[tuple[str, str]] = []
    if info.steps:
        params.append(("Steps", str(info.steps)))
    if info.sampler:
        params.append(("Sampler", info.sampler))
    if info.cfg_scale or info.steps:
        params.append(("CFG scale", _number(info.cfg_scale)))
    if info.seed >= 0:
        params.append(("Seed", str(info.seed)))
    if info.face_restoration:  # where A1111's create_infotext puts it: after Seed, before Size
        params.append(("Face restoration", info.face_restoration))
    if info.width and info.height:
        params.append(("Size", f"{info.width}x{info.height}"))
    if info.model_hash:
        params.append(("Model hash", info.model_hash))
    if info.model:
        params.append(("Model", info.model))
    params.extend(info.extra.items())
    lines = [info.prompt]
    if info.negative_prompt:
        lines.append(f"{_NEGATIVE} {info.negative_prompt}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in params))
    return "\n".join(lines)


# A1111 >= 1.9's samplers whose "Automatic" schedule is Karras (its per-sampler default option).
_AUTOMATIC_KARRAS = frozenset({"DPM++ 2M", "DPM++ SDE", "DPM++ 2S a"})


def _fold_schedule(sampler: str, schedule: str) -> str:
    # A1111 >= 1.9 splits "DPM++ 2M Karras" into sampler + "Schedule type: Karras" (or "Automatic",
    # which is Karras for the samplers above).
    karras = schedule.lower() == "karras" or (schedule.lower() == "automatic" and sampler in _AUTOMATIC_KARRAS)
    if karras and not sampler.endswith("Karras"):
        return f"{sampler} Karras"
    return sampler


def _is_word(ch: str) -> bool:
    # The regex class \w on str: letters, digits (any script) and "_".
    return ch.isalnum() or ch == "_"


def param_pairs(line: str) -> list[tuple[str, str]]:
    """The ``(key, raw value)`` pairs A1111 finds in a parameters line, in linear time.

    A1111 (``modules/infotext_utils.py``) runs ``re.findall`` with
    ``\\s*(\\w[\\w \\-/]+):\\s*("(?:\\\\.|[^\\\\"])+"|[^,]*)(?:,|$)``. That pattern
    backtracks over the whole rest of the line at every position where no
    pair starts, so a long line without ``key:`` pairs takes quadratic time
    (2.1 s for 16,000 characters). This scanner returns the same pairs (a
    property test compares them on random lines) from three right-to-left
    tables: where each run of key characters ends, the next non-space, the
    next comma and the closing quote of a quoted value.
    """
    n = len(line)
    run_end = [n] * (n + 1)  # end of the run of key characters [\w \-/] starting at i
    non_space = [n] * (n + 1)  # first non-whitespace index >= i
    comma = [n] * (n + 1)  # first "," index >= i
    close = [-1] * (n + 2)  # closing '"' of a quoted body that starts at i, honouring \ escapes; -1: none
    for i in range(n - 1, -1, -1):
        ch = line[i]
        run_end[i] = run_end[i + 1] if (_is_word(ch) or ch in " -/") else i
        non_space[i] = non_space[i + 1] if ch.isspace() else i
        comma[i] = i if ch == "," else comma[i + 1]
        if ch == '"':
            close[i] = i
        elif ch == "\\":
            # "\\." takes the backslash and the next character (any but a newline).
            close[i] = close[i + 2] if i + 1 < n and line[i + 1] != "\n" else -1
        else:
            close[i] = close[i + 1]
    pairs: list[tuple[str, str]] = []
    pos = 0
    while pos < n:
        start = non_space[pos]
        end = run_end[start] if start < n and _is_word(line[start]) else start
        if end - start < 2 or end >= n or line[end] != ":":
            pos += 1  # no pair starts here; findall moves on by one character
            continue
        value = non_space[end + 1]
        quote_end = close[value + 1] if value + 1 < n and line[value] == '"' and line[value + 1] != '"' else -1
        if quote_end != -1 and (quote_end + 1 == n or line[quote_end + 1] == ","):
            pairs.append((line[start:end], line[value:quote_end + 1]))
            pos = quote_end + 2
        else:
            stop = comma[value]
            pairs.append((line[start:end], line[value:stop]))
            pos = stop + 1
    return pairs


def _param_number(params: dict[str, str], key: str, limit: float) -> float | None:
    """The number of ``key`` (at most ``limit``); None when absent, negative or not a number.

    A value that is a number but not a usable one (``inf``, ``nan``, ``1e400``,
    a 30-digit seed) means the file is damaged or made to break readers:
    InvalidInput, so an import skips that one image with the reason.
    """
    raw = params.get(key, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except (ValueError, OverflowError):
        return None  # text where a number belongs ("Seed: random"): not stated, as before
    if math.isfinite(value) and value < 0:
        return None  # "Seed: -1" is how some tools say "random": not stated
    if not math.isfinite(value) or value > limit:
        raise InvalidInput(
            f"infotext {key}: {raw[:40]!r} is not a usable value (a finite number 0..{limit:g} is); "
            "the image's generation parameters are damaged; re-export it or remove its parameters text"
        )
    return value


def parse_infotext(text: str) -> InfoText:
    """Parse an A1111 parameters text; tolerant of missing lines and unknown keys.

    Follows A1111's ``parse_generation_parameters``: the last line is the
    parameters line only if it has at least 3 ``key: value`` pairs, otherwise
    it is part of the prompt. Runs in time linear in the text. Raises
    InvalidInput for a text over :data:`MAX_INFOTEXT_CHARS` and for a number
    no tool writes (``Steps: inf``, ``Seed: nan``, a 400-digit integer).
    """
    text = (text or "").replace("\r\n", "\n").strip("\n")
    if len(text) > MAX_INFOTEXT_CHARS:
        raise InvalidInput(
            f"infotext: {len(text):,} characters is over the {MAX_INFOTEXT_CHARS:,}-character limit "
            "(A1111 writes a few thousand); the parameters text is damaged or not A1111's"
        )
    lines = text.split("\n")
    params: dict[str, str] = {}
    if lines:
        found = param_pairs(lines[-1].strip())
        if len(found) >= 3:
            params = {k.strip(): unquote(v.strip()) for k, v in found}
            lines = lines[:-1]
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        if not in_negative and line.strip().startswith(_NEGATIVE):
            in_negative = True
            line = line.strip()[len(_NEGATIVE):]
            if line.startswith(" "):
                line = line[1:]
        (negative_lines if in_negative else prompt_lines).append(line)

    def _int(key: str, default: int, limit: int) -> int:
        raw = params.get(key, "").strip()
        if raw.isascii() and raw.isdigit():  # exact, also for seeds beyond float precision
            digits = raw.lstrip("0") or "0"
            # Length first: int() of a 5,000-digit string is itself refused (and slow).
            if len(digits) > 20 or int(digits) > limit:
                raise InvalidInput(
                    f"infotext {key}: {raw[:40]!r} is larger than any tool writes (at most {limit}); "
                    "the image's generation parameters are damaged; re-export it or remove its parameters text"
                )
            return int(digits)
        value = _param_number(params, key, limit)
        return default if value is None else int(value)

    steps = _int("Steps", 0, _STEPS_LIMIT)
    seed = _int("Seed", -1, _SEED_LIMIT)
    # CFG above 100 is not a setting (A1111's slider stops at 30); finite is the real requirement.
    cfg = _param_number(params, "CFG scale", 1e6) or 0.0
    width = height = 0
    m = _SIZE_RE.match(params.get("Size", "").strip())
    if m:
        if len(m.group(1)) > 10 or len(m.group(2)) > 10 or max(int(m.group(1)), int(m.group(2))) > _SIDE_LIMIT:
            raise InvalidInput(f"infotext Size: {params['Size'][:40]!r} is larger than any image can be; "
                               "the image's generation parameters are damaged")
        width, height = int(m.group(1)), int(m.group(2))
    extra = {k: v for k, v in params.items() if k not in _KNOWN}
    sampler = _fold_schedule(params.get("Sampler", ""), params.get("Schedule type", ""))
    if params.get("Schedule type") and sampler == params.get("Sampler", ""):
        extra = {"Schedule type": params["Schedule type"], **extra}
    return InfoText(
        prompt="\n".join(prompt_lines).strip(),
        negative_prompt="\n".join(negative_lines).strip(),
        steps=steps,
        sampler=sampler,
        cfg_scale=cfg,
        seed=seed,
        width=width,
        height=height,
        model=params.get("Model", ""),
        model_hash=params.get("Model hash", ""),
        face_restoration=params.get("Face restoration", "").strip(),
        extra=extra,
    )


# ---------------------------------------------------------------- TI hashes and RNG

# A1111's short hash of an embedding: the first 12 hex digits of the sha256 of the file's bytes
# (the same as civitai's AutoV2), as it writes them in "TI hashes".
TI_HASH_LEN = 12
_TI_HASH_RE = re.compile(r"^[0-9a-f]{%d}$" % TI_HASH_LEN)
# A1111's noise sources as its infotext names them; no "RNG:" field means "GPU" (its default).
RNG_SOURCES = ("GPU", "CPU", "NV")


def ti_hash(path: str | Any) -> str:
    """A1111's ``TI hashes`` value of an embedding file: sha256 of its bytes, first 12 hex digits."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:TI_HASH_LEN]


def format_ti_hashes(hashes: dict[str, str]) -> str:
    """The ``TI hashes`` value for ``{trigger word: short hash}``: ``"a: 0123456789ab, b: ..."``.

    As A1111 does, ``:`` and ``,`` are dropped from names (they would break the list) and
    :func:`format_infotext` JSON-quotes the value (it holds colons).
    """
    parts = []
    for name, short in hashes.items():
        clean = str(name).replace(":", "").replace(",", "").strip()
        if not clean or not _TI_HASH_RE.match(short):
            raise InvalidInput(f"TI hashes: {name!r}: {short!r} is not a trigger word with a 12-digit lowercase "
                               "hex sha256 prefix (ti_hash() of the embedding file)")
        parts.append(f"{clean}: {short}")
    return ", ".join(parts)


def parse_ti_hashes(value: str) -> dict[str, str]:
    """``{trigger word: short hash}`` from a ``TI hashes`` value (already unquoted).

    A1111 writes ``name: hash`` pairs joined by ``, ``. An entry without a colon or whose hash is
    not hex is kept with the text it has (lowercased), so an importer can say what it could not
    resolve; an empty value gives ``{}``.
    """
    out: dict[str, str] = {}
    for entry in str(value or "").split(","):
        name, sep, short = entry.strip().rpartition(":")
        if not sep:
            name, short = short, ""
        name = name.strip()
        if name:
            out[name] = short.strip().lower()
    return out


def rng_source(info: InfoText) -> str:
    """The noise source an image was drawn with: ``"GPU"`` (A1111's default, no field), ``"CPU"`` or ``"NV"``.

    A value A1111 does not write is InvalidInput naming the three it does.
    """
    raw = info.extra.get("RNG", "").strip()
    if not raw:
        return "GPU"
    if raw.upper() not in RNG_SOURCES:
        raise InvalidInput(f"infotext RNG: {raw[:40]!r} is not a noise source A1111 writes "
                           f"(one of {', '.join(RNG_SOURCES)}; no field means GPU)")
    return raw.upper()


# ---------------------------------------------------------------- images


def png_bytes(image: Any, parameters: str | None) -> bytes:
    """Encode a PIL image as PNG with the A1111 ``parameters`` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    meta = None
    if parameters:
        meta = PngInfo()
        meta.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta, compress_level=4)
    return buf.getvalue()


def _decode_user_comment(raw: Any) -> str:
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, (bytes, bytearray)):
        return ""
    raw = bytes(raw)
    head, body = raw[:8], raw[8:]
    if head == b"UNICODE\x00":
        # A1111 (piexif) writes UTF-16 big-endian; some tools little-endian.
        for enc in ("utf-16-be", "utf-16-le"):
            try:
                text = body.decode(enc)
            except UnicodeDecodeError:
                continue
            if text and all(ch.isprintable() or ch in "\n\r\t" for ch in text[:200]):
                return text
        return ""
    if head in (b"ASCII\x00\x00\x00", b"\x00" * 8):
        return body.decode("latin-1").rstrip("\x00")
    return raw.decode("utf-8", errors="ignore").rstrip("\x00")


# Spaces but not newlines around "Steps:": "\s*" after "(^|\n)" rescanned every following blank
# line at every line start (quadratic on a text of newlines).
_SETTINGS_LINE = re.compile(r"^[^\S\n]*Steps:[^\S\n]*\d", re.MULTILINE)


def looks_like_parameters(text: str) -> bool:
    """True when ``text`` carries A1111's settings line (``Steps: N, Sampler: ...``)."""
    return bool(text) and bool(_SETTINGS_LINE.search(text))


def read_parameters(data: bytes) -> str:
    """The A1111 parameters text of an encoded image (PNG chunk or EXIF UserComment), or "".

    Reads metadata only, never the pixels, so it is safe on any file; a file
    PIL cannot open gives "".
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            text = getattr(img, "text", None) or {}
            if text.get("parameters"):
                return str(text["parameters"])
            info = img.info or {}
            if isinstance(info.get("parameters"), str):
                return info["parameters"]
            exif = img.getexif()
            comment = exif.get_ifd(0x8769).get(0x9286) if exif else None
            text = _decode_user_comment(comment) if comment else ""
            # Cameras and agencies write copyright lines there too ("(c)Glenn Francis ...");
            # only text with A1111's settings line is generation parameters.
            return text if looks_like_parameters(text) else ""
    except Exception:  # noqa: BLE001 - metadata of a broken file is simply absent
        return ""
