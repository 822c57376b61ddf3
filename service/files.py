"""Atomic file writes and safe paths.

Artifacts are written to a temporary name in the same folder and renamed, so
a reader (or a restarted build) never sees a half-written file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from service.errors import InvalidInput

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary sibling and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save(path: str | os.PathLike[str], save: Any) -> Path:
    """Call ``save(tmp_path)`` (e.g. ``torch.save``/``Image.save``), then rename.

    The temporary name keeps the real suffix so format-sniffing savers work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def check_name(name: str, what: str = "name") -> str:
    """A user-given name that will become a file or folder name.

    Letters, digits, ``.``, ``_`` and ``-``; starts with a letter or digit; at
    most 128 characters. Rejects ``..``, slashes and anything else that could
    escape a folder.
    """
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise InvalidInput(
            f"{what} {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no slashes, no '..')"
        )
    return name


def safe_join(root: str | os.PathLike[str], *parts: str) -> Path:
    """Join ``parts`` under ``root`` and refuse any result outside ``root``."""
    root_p = Path(root).resolve()
    target = root_p.joinpath(*parts).resolve()
    if target != root_p and root_p not in target.parents:
        raise InvalidInput(f"path {'/'.join(parts)!r} escapes {root_p}; use a path inside it")
    return target


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
