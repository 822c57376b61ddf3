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
import re
from dataclasses import dataclass, field
from typing import Any

# A1111's own pattern for one "key: value" pair of the parameters line.
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"

# Keys this module maps to fields; everything else stays in ``extra`` in order.
_KNOWN = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model")


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


def _fold_schedule(sampler: str, schedule: str) -> str:
    # A1111 >= 1.9 splits "DPM++ 2M Karras" into sampler + "Schedule type: Karras".
    if schedule and schedule.lower() == "karras" and not sampler.endswith("Karras"):
        return f"{sampler} Karras"
    return sampler


def parse_infotext(text: str) -> InfoText:
    """Parse an A1111 parameters text; tolerant of missing lines and unknown keys.

    Follows A1111's ``parse_generation_parameters``: the last line is the
    parameters line only if it has at least 3 ``key: value`` pairs, otherwise
    it is part of the prompt.
    """
    text = (text or "").replace("\r\n", "\n").strip("\n")
    lines = text.split("\n")
    params: dict[str, str] = {}
    if lines:
        found = _PARAM_RE.findall(lines[-1].strip())
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

    def _int(key: str, default: int) -> int:
        try:
            return int(float(params[key]))
        except (KeyError, ValueError):
            return default

    try:
        cfg = float(params.get("CFG scale", "0") or 0)
    except ValueError:
        cfg = 0.0
    width = height = 0
    m = _SIZE_RE.match(params.get("Size", "").strip())
    if m:
        width, height = int(m.group(1)), int(m.group(2))
    extra = {k: v for k, v in params.items() if k not in _KNOWN}
    sampler = _fold_schedule(params.get("Sampler", ""), params.get("Schedule type", ""))
    if params.get("Schedule type") and sampler == params.get("Sampler", ""):
        extra = {"Schedule type": params["Schedule type"], **extra}
    return InfoText(
        prompt="\n".join(prompt_lines).strip(),
        negative_prompt="\n".join(negative_lines).strip(),
        steps=_int("Steps", 0),
        sampler=sampler,
        cfg_scale=cfg,
        seed=_int("Seed", -1),
        width=width,
        height=height,
        model=params.get("Model", ""),
        model_hash=params.get("Model hash", ""),
        extra=extra,
    )


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


_SETTINGS_LINE = re.compile(r"(^|\n)\s*Steps:\s*\d+", re.MULTILINE)


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
