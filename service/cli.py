"""``likeness`` command line: one subcommand module per stage under service/commands.

Each module in ``COMMAND_MODULES`` has ``register(subparsers)``, which adds its
parsers with ``set_defaults(func=handler)``; heavy imports (torch, diffusers,
insightface) happen inside handlers, so ``likeness --help`` is fast.
Machine-readable results go to stdout as JSON; progress and messages to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any, Sequence

from service.errors import LikenessError

COMMAND_MODULES = (
    "service.commands.info",
    "service.commands.generate",
    "service.commands.faces",
    "service.commands.prompt",
    "service.commands.caption",
    "service.commands.curate",
    "service.commands.serve",
    "service.commands.build",
    "service.commands.train",
    "service.commands.report",
)


def emit(obj: Any) -> None:
    """Print a JSON result on stdout (one document, for tools and nightly jobs)."""
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def emit_line(obj: Any) -> None:
    """Print one JSON line (for streams such as `faces compare --pairs`)."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="likeness", description="Consistent Stable Diffusion characters.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except LikenessError as exc:
        say(f"error: {exc}")
        return exc.exit_code
    except OSError as exc:
        # Disk full, permission denied, a vanished file: the user's environment to fix, not a bug.
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        say(f"error: {exc.strerror or exc}{where}")
        return 1
    except KeyboardInterrupt:
        say("interrupted: finished work is kept; run the same command again to resume")
        return 130
    return int(result or 0)
