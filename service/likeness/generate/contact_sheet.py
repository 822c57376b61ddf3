"""A labelled contact sheet of a gallery, like A1111's X/Y/Z grid: zoom columns x angle rows.

Reused by the report (``marks`` tags kept/rejected images), so it takes plain
manifest rows and a gallery folder and knows nothing about generation.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from likeness.errors import InvalidInput
from likeness.files import atomic_save
from likeness.generate.manifest import GalleryImage

# Border colours of marked thumbnails; any other mark gets _OTHER_MARK.
MARK_COLOURS = {
    "kept": (46, 160, 67),
    "rejected": (207, 34, 46),
    "off-prompt": (191, 135, 0),
    "quality": (191, 135, 0),
    "identity": (130, 80, 223),
}
_OTHER_MARK = (110, 118, 129)
_BG = (255, 255, 255)
_GRID = (208, 215, 222)
_TEXT = (31, 35, 40)
UNKNOWN = "(unassigned)"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow without FreeType sizing
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for w in words:
        trial = f"{line} {w}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = w
    if line:
        lines.append(line)
    return lines or [""]


def _axis(rows: Sequence[GalleryImage], name: str) -> list[str]:
    """Axis labels in grid order: by index, then by first appearance; unassigned last."""
    seen: dict[str, int] = {}
    for r in rows:
        label = getattr(r, name) or UNKNOWN
        idx = getattr(r, f"{name}_index")
        if label == UNKNOWN or idx < 0:
            label, idx = UNKNOWN, 10**9
        seen.setdefault(label, idx)
    order = sorted(seen.items(), key=lambda kv: (kv[1], list(seen).index(kv[0])))
    return [label for label, _ in order]


def _label(row: GalleryImage, name: str) -> str:
    label = getattr(row, name)
    return UNKNOWN if not label or getattr(row, f"{name}_index") < 0 else label


def contact_sheet(
    rows: Sequence[GalleryImage],
    gallery_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    marks: dict[str, str] | None = None,
    *,
    thumb: int = 160,
    max_per_cell: int = 1,
    title: str = "",
) -> Path:
    """Draw ``rows`` as a zoom x angle grid and write it atomically as PNG to ``out_path``.

    Each cell shows the cell's first ``max_per_cell`` images (by
    ``index_in_cell``) as a square mosaic of ``thumb`` pixels. ``marks`` maps
    image ids to a tag ("kept", "rejected", ...): a marked thumbnail gets a
    coloured border and the tag written on it. Images that cannot be read are
    drawn as grey placeholders, so a sheet is always produced.
    """
    from PIL import Image, ImageDraw, ImageOps

    from likeness.images import load_image

    if not rows:
        raise InvalidInput("contact sheet: no images to draw; generate or import a gallery first")
    if not 16 <= thumb <= 1024 or not 1 <= max_per_cell <= 256:
        raise InvalidInput("contact sheet: thumb must be 16-1024 px and max_per_cell 1-256")
    marks = marks or {}
    gallery = Path(gallery_dir)
    zooms, angles = _axis(rows, "zoom"), _axis(rows, "angle")
    cells: dict[tuple[str, str], list[GalleryImage]] = {}
    for r in sorted(rows, key=lambda r: (r.index_in_cell, r.id)):
        cells.setdefault((_label(r, "zoom"), _label(r, "angle")), []).append(r)

    font, small = _font(max(11, thumb // 11)), _font(max(9, thumb // 14))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = 6
    label_w = max(90, min(220, int(max(probe.textlength(a, font=font) for a in angles)) + 2 * pad))
    header_lines = max(len(_wrap(probe, z, font, thumb - 2 * pad)) for z in zooms)
    line_h = font.size + 4 if hasattr(font, "size") else 14
    title_h = line_h + 2 * pad if title else 0
    header_h = header_lines * line_h + 2 * pad
    width = label_w + len(zooms) * (thumb + pad) + pad
    height = title_h + header_h + len(angles) * (thumb + pad) + pad
    sheet = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), title, fill=_TEXT, font=font)
    for ci, zoom in enumerate(zooms):
        x = label_w + ci * (thumb + pad)
        for li, line in enumerate(_wrap(draw, zoom, font, thumb - 2 * pad)):
            tw = draw.textlength(line, font=font)
            draw.text((x + (thumb - tw) / 2, title_h + pad + li * line_h), line, fill=_TEXT, font=font)
    for ri, angle in enumerate(angles):
        y = title_h + header_h + ri * (thumb + pad)
        for li, line in enumerate(_wrap(draw, angle, font, label_w - 2 * pad)):
            draw.text((pad, y + thumb / 2 - line_h / 2 + li * line_h), line, fill=_TEXT, font=font)
        for ci, zoom in enumerate(zooms):
            x = label_w + ci * (thumb + pad)
            draw.rectangle([x - 1, y - 1, x + thumb, y + thumb], outline=_GRID)
            members = cells.get((zoom, angle), [])[:max_per_cell]
            if not members:
                continue
            n = math.ceil(math.sqrt(len(members)))
            size = thumb // n
            for k, row in enumerate(members):
                tx, ty = x + (k % n) * size, y + (k // n) * size
                try:
                    img, _ = load_image(gallery / row.file)
                    img = ImageOps.contain(img, (size, size))  # small images are scaled up too
                    sheet.paste(img, (tx + (size - img.width) // 2, ty + (size - img.height) // 2))
                except (InvalidInput, OSError):
                    draw.rectangle([tx, ty, tx + size - 1, ty + size - 1], fill=(200, 200, 200))
                    draw.text((tx + 3, ty + 3), "missing", fill=_TEXT, font=small)
                mark = marks.get(row.id)
                if mark:
                    colour = MARK_COLOURS.get(mark, _OTHER_MARK)
                    bw = max(2, size // 40)
                    draw.rectangle([tx, ty, tx + size - 1, ty + size - 1], outline=colour, width=bw)
                    tw = draw.textlength(mark, font=small)
                    box_h = (small.size if hasattr(small, "size") else 10) + 4
                    draw.rectangle([tx + bw, ty + size - bw - box_h, tx + bw + tw + 4, ty + size - bw - 1], fill=colour)
                    draw.text((tx + bw + 2, ty + size - bw - box_h + 1), mark, fill=(255, 255, 255), font=small)
    return atomic_save(out_path, lambda tmp: sheet.save(tmp, format="PNG"))
