"""The gallery manifest: one JSON row per image, shared by every stage.

Generation and ``likeness import`` write it; curation, captioning and the
service read it. Stored as JSON Lines (``manifest.jsonl``): rows are appended
with fsync as images land, so a killed run keeps every finished row; a torn
last line (kill mid-write) is ignored on read and the image is redone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from likeness.config import from_dict, to_dict
from likeness.files import atomic_write_text

MANIFEST_NAME = "manifest.jsonl"


@dataclass(frozen=True)
class GalleryImage:
    # Stable id within the gallery, e.g. "z0-a3-0007" (zoom, angle, index in cell).
    id: str
    # Path relative to the gallery folder.
    file: str
    zoom: str = ""
    angle: str = ""
    zoom_index: int = -1
    angle_index: int = -1
    index_in_cell: int = -1
    # The real seed of this image (never -1), so any image can be re-made.
    seed: int = -1
    prompt: str = ""
    negative_prompt: str = ""
    width: int = 0
    height: int = 0
    steps: int = 0
    sampler: str = ""
    cfg_scale: float = 0.0
    model: str = ""
    # Seconds this image took (its share of the batch), for throughput reports.
    seconds: float = 0.0
    # "generated" by us, or "imported" from another tool's folder.
    source: str = "generated"


def manifest_path(gallery: str | os.PathLike[str]) -> Path:
    return Path(gallery) / MANIFEST_NAME


def read_manifest(gallery: str | os.PathLike[str]) -> list[GalleryImage]:
    """All complete rows; later rows with the same id replace earlier ones."""
    path = manifest_path(gallery)
    if not path.exists():
        return []
    rows: dict[str, GalleryImage] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break  # torn final line from a kill: that image is redone
            line = line.strip()
            if not line:
                continue
            try:
                row = from_dict(GalleryImage, json.loads(line), "manifest")
            except (ValueError, Exception):  # noqa: BLE001 - a corrupt row is skipped, not fatal
                continue
            rows[row.id] = row
    return list(rows.values())


def append_rows(gallery: str | os.PathLike[str], rows: Iterable[GalleryImage]) -> None:
    """Append rows durably (flush + fsync) after their images are on disk."""
    path = manifest_path(gallery)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(to_dict(r), ensure_ascii=False) + "\n" for r in rows)
    if not data:
        return
    with open(path, "a", encoding="utf-8") as fh:
        # A torn line left by a kill would glue onto the next row: start clean.
        if fh.tell() > 0:
            with open(path, "rb") as check:
                check.seek(-1, os.SEEK_END)
                if check.read(1) != b"\n":
                    fh.write("\n")
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_manifest(gallery: str | os.PathLike[str], rows: Iterable[GalleryImage]) -> Path:
    """Replace the manifest atomically (used by import and compaction)."""
    text = "".join(json.dumps(to_dict(r), ensure_ascii=False) + "\n" for r in rows)
    return atomic_write_text(manifest_path(gallery), text)
