"""Decode images from files or bytes safely: any folder, any tool's output.

Sniffs the real format (WebP named .jpg is fine), refuses decompression bombs,
converts grayscale/RGBA/CMYK/16-bit to RGB, and applies EXIF orientation.
Every failure is an :class:`InvalidInput` with a reason a person understands,
so callers report and skip the file instead of crashing.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from likeness.errors import InvalidInput

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

# 50 megapixels: a 7000x7000 photo passes, a decompression bomb does not.
MAX_PIXELS = 50_000_000
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass(frozen=True)
class ImageInfo:
    # Format found in the bytes ("PNG", "JPEG", "WEBP"), whatever the extension says.
    format: str
    # Original mode before conversion to RGB ("L", "RGBA", "CMYK", "I;16", ...).
    mode: str
    width: int
    height: int
    # True when the file extension disagrees with the bytes (WebP named .jpg).
    extension_mismatch: bool
    # PNG text chunks (A1111 writes "parameters"); empty for other formats.
    text: dict[str, str]


_EXT_FORMATS = {
    ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
    ".tif": "TIFF", ".tiff": "TIFF", ".gif": "GIF",
}


def _open(data: bytes, name: str, max_pixels: int) -> tuple["Image", ImageInfo]:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise InvalidInput(f"{name}: empty file; re-export the image")
    Image.MAX_IMAGE_PIXELS = None  # we check the size ourselves, before decoding
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise InvalidInput(f"{name}: not a readable image (unknown or corrupt format); re-export it as PNG or JPEG") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on garbage
        raise InvalidInput(f"{name}: cannot be decoded ({exc}); re-export it as PNG or JPEG") from exc
    w, h = img.size
    if w * h > max_pixels:
        raise InvalidInput(
            f"{name}: {w}x{h} is {w * h / 1e6:.0f} megapixels, over the {max_pixels / 1e6:.0f} MP limit "
            "(possible decompression bomb); downscale it first"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            fmt, mode = img.format or "", img.mode
            text = {str(k): str(v) for k, v in getattr(img, "text", {}).items()} if fmt == "PNG" else {}
            img = ImageOps.exif_transpose(img)
            if mode == "RGBA" or mode == "LA" or (mode == "P" and "transparency" in img.info):
                # Composite transparency onto white, as image viewers show it.
                rgba = img.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(bg, rgba).convert("RGB")
            elif mode.startswith("I;16") or mode == "I":
                import numpy as np

                arr = np.asarray(img, dtype=np.float32)
                arr = (arr / max(float(arr.max()), 1.0) * 255.0).clip(0, 255).astype("uint8")
                img = Image.fromarray(arr).convert("RGB")
            else:
                img = img.convert("RGB")
    except InvalidInput:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
        raise InvalidInput(f"{name}: image data is truncated or corrupt ({exc}); re-export it") from exc
    return img, ImageInfo(fmt, mode, w, h, False, text)


def load_image_bytes(data: bytes, name: str = "image", max_pixels: int = MAX_PIXELS) -> tuple["Image", ImageInfo]:
    """Decode ``data`` to an RGB ``PIL.Image`` plus :class:`ImageInfo`.

    ``name`` labels errors; when it has an image suffix (``photo.jpg``),
    ``extension_mismatch`` says whether the bytes are of another format.
    """
    img, info = _open(data, name, max_pixels)
    expected = _EXT_FORMATS.get(Path(name).suffix.lower())
    mismatch = bool(expected and info.format and expected != info.format)
    return img, ImageInfo(info.format, info.mode, info.width, info.height, mismatch, info.text)


def load_image(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> tuple["Image", ImageInfo]:
    """Decode the file at ``path`` to an RGB ``PIL.Image`` plus :class:`ImageInfo`."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{p}: cannot be read ({exc.strerror or exc})") from exc
    return load_image_bytes(data, str(p), max_pixels)


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image-like files in ``folder`` (recursively), sorted, hidden files skipped."""
    root = Path(folder)
    if not root.is_dir():
        raise InvalidInput(f"{root} is not a folder of images")
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
