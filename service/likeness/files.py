"""Atomic file writes and safe paths.

Artifacts are written to a temporary name in the same folder and renamed, so
a reader (or a restarted build) never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

from likeness.errors import InvalidInput

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; an artifact must get the mode an ordinary open() gives it
# (0644 under the usual umask), or A1111/ComfyUI/a web server running as another user
# cannot read the images, captions and embeddings we hand them. Read once: os.umask is
# process-wide and setting it from worker threads would race.
_FILE_MODE = 0o666 & ~_current_umask()


def ensure_dir(path: str | os.PathLike[str], what: str = "folder") -> Path:
    """Create folder ``path`` (and parents) or raise InvalidInput saying why it cannot be.

    A file where the folder should be, or a folder we may not write to, is the
    caller's input to fix, not a crash.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InvalidInput(f"{what} {path} cannot be created: a file with that name is in the way; "
                           "choose another path") from None
    except NotADirectoryError:
        raise InvalidInput(f"{what} {path} cannot be created: part of the path is a file, not a folder; "
                           "choose another path") from None
    except PermissionError:
        raise InvalidInput(f"{what} {path} cannot be created: permission denied; choose a folder you can "
                           "write to") from None
    if not path.is_dir():
        raise InvalidInput(f"{what} {path} is not a folder; choose another path")
    return path


def _make_temp(path: Path, prefix: str, suffix: str) -> str:
    """An empty temporary sibling of ``path`` (its mode is set by atomic_save after writing)."""
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    except PermissionError:
        raise InvalidInput(f"cannot write {path}: permission denied in {path.parent}; choose a folder you can "
                           "write to") from None
    os.close(fd)
    return tmp


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary sibling and ``os.replace``."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_save(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` atomically (see :func:`atomic_save`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (see :func:`atomic_save`)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save(path: str | os.PathLike[str], save: Any) -> Path:
    """Call ``save(tmp_path)`` (e.g. ``torch.save``/``Image.save``), fsync, then rename.

    The temporary name keeps the real suffix so format-sniffing savers work.
    A kill at any moment leaves either the old file or the new one, never half.
    """
    path = Path(path)
    if path.is_dir():
        raise InvalidInput(f"cannot write {path}: it is a folder; give a file name")
    tmp = _make_temp(path, f".{path.stem}.", f".tmp{path.suffix}")
    try:
        save(tmp)
        # mkstemp makes 0600 files, and a saver may replace the file: set the mode here, once.
        os.chmod(tmp, _FILE_MODE)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
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
    """The JSON document at ``path`` (OSError / ValueError for the caller to explain)."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], what: str = "run") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (a ``.lock`` file) or fail at once.

    Two runs writing the same artifacts would interleave rows and images; the
    second one is refused with a message instead. The lock is the operating
    system's (``filelock``: flock on Linux and macOS, msvcrt on native Windows,
    where fcntl does not exist), so it dies with the process and a killed run
    never leaves a stale lock behind.
    """
    import filelock

    from likeness.errors import FailedPrecondition

    folder = ensure_dir(folder)
    # timeout=0: refuse at once instead of queueing behind the other run. No soft-lock fallback
    # where flock fails (some network filesystems): a lock file that outlives a killed process
    # would refuse every later run.
    lock = filelock.FileLock(folder / ".lock", timeout=0, fallback_to_soft=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise FailedPrecondition(
            f"another {what} is writing into {folder}; wait for it to finish or use another folder"
        ) from None
    try:
        yield folder
    finally:
        lock.release()
