"""Atomic writes: readable modes like open(), and clear errors for unusable output paths."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from service.errors import InvalidInput
from service.files import atomic_save, atomic_write_bytes, atomic_write_json, ensure_dir


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_get_the_mode_open_would_give(tmp_path: Path) -> None:
    # mkstemp makes 0600 files; A1111/ComfyUI or a web server running as another user
    # could not read our images, captions and embeddings.
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    expected = _mode(plain)
    a = atomic_write_bytes(tmp_path / "a.bin", b"1")
    b = atomic_write_json(tmp_path / "sub" / "b.json", {"k": 1})
    c = atomic_save(tmp_path / "c.png", lambda tmp: Path(tmp).write_bytes(b"png"))
    for p in (a, b, c):
        assert _mode(p) == expected, (p, oct(_mode(p)), oct(expected))
    assert not [p for p in tmp_path.rglob("*.tmp*")]


def test_output_paths_that_cannot_be_folders_are_invalid_input(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(InvalidInput, match="a file with that name is in the way"):
        ensure_dir(blocker)
    with pytest.raises(InvalidInput, match="cannot be created"):
        atomic_write_bytes(blocker / "x.bin", b"1")
    with pytest.raises(InvalidInput, match="cannot be created"):
        atomic_save(blocker / "deeper" / "x.pt", lambda tmp: None)
    with pytest.raises(InvalidInput, match="it is a folder"):
        atomic_write_bytes(tmp_path, b"1")
    assert blocker.read_text() == "x"
