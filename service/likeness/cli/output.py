"""How every command speaks: one JSON document (or JSON lines) on stdout, messages on stderr.

``-q``/``--quiet`` (every command has it: :func:`add_quiet_option`, added by
``likeness.cli.main.build_parser`` to each subcommand) silences what is for
watching -- progress bars and :func:`say` -- and keeps the result on stdout and
:func:`warn` (warnings, errors) on stderr, so a script sees why it failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# Set once per command by likeness.cli.main from -q; module state because say() is called
# from deep inside handlers (and passed to library code as a callback).
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Turn quiet mode on or off (``likeness.cli.main`` does, from ``-q``)."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    """True when ``-q`` was given: no progress, no informational messages."""
    return _quiet


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    """The one ``-q``/``--quiet`` option, on ``parser`` (the top level and every subcommand).

    ``default=SUPPRESS``: a subcommand's parser does not overwrite a ``likeness -q CMD`` given
    before the command with its own default; read it with ``getattr(args, "quiet", False)``.
    """
    if "-q" in parser._option_string_actions:  # noqa: SLF001 - argparse has no public lookup
        return
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or messages on stderr (the JSON result and errors stay)")


def emit(obj: Any) -> None:
    """Print a JSON result on stdout (one document, for tools and nightly jobs)."""
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def emit_line(obj: Any) -> None:
    """Print one JSON line (for streams such as `faces compare --pairs`)."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def say(message: str) -> None:
    """Print a message for people on stderr (progress, what was written where); silent with ``-q``."""
    if not _quiet:
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """Print a warning or an error on stderr, also with ``-q`` (a script must see why it failed)."""
    print(message, file=sys.stderr, flush=True)


def progress_bar(disable: bool = False) -> Any:
    """The CLI's progress display (tqdm bars on stderr), off with ``-q`` (or ``disable``, e.g. --no-progress)."""
    from likeness.progress import TqdmProgress

    return TqdmProgress(disable=disable or _quiet)
