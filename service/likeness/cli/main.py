"""``likeness`` command line: one subcommand module per stage under ``likeness.cli.commands``.

Each module in ``COMMAND_MODULES`` has ``register(subparsers)``, which adds its
parsers with ``set_defaults(func=handler)``; heavy imports (torch, diffusers,
insightface) happen inside handlers, so ``likeness --help`` is fast.
Machine-readable results go to stdout as JSON; progress and messages to stderr.
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from likeness.cli.commands import (
    build,
    caption,
    curate,
    export,
    faces,
    generate,
    info,
    prompt,
    report,
    serve,
    train,
)
from likeness.cli.output import say
from likeness.errors import LikenessError

# Each command module is light at import time (heavy imports live in its handlers).
COMMAND_MODULES = (info, generate, faces, prompt, caption, export, curate, serve, build, train, report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="likeness", description="Consistent Stable Diffusion characters.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
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
