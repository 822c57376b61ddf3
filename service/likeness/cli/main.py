"""``likeness`` command line: one subcommand module per stage under ``likeness.cli.commands``.

Each module in ``COMMAND_MODULES`` has ``register(subparsers)``, which adds its
parsers with ``set_defaults(func=handler)``; heavy imports (torch, diffusers,
insightface) happen inside handlers, so ``likeness --help`` is fast.
Machine-readable results go to stdout as JSON; progress and messages to stderr.
Every command takes ``-q`` (:func:`likeness.cli.output.add_quiet_option`, added to
each subcommand here, so a new command cannot lack it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
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
from likeness import __version__
from likeness.cli.output import add_quiet_option, set_quiet, warn
from likeness.errors import LikenessError

# Each command module is light at import time (heavy imports live in its handlers).
COMMAND_MODULES = (info, generate, faces, prompt, caption, export, curate, serve, build, train, report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="likeness", description="Consistent Stable Diffusion characters.")
    parser.add_argument("--version", action="version", version=f"likeness {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    for p in iter_parsers(parser):
        add_quiet_option(p)
    return parser


def iter_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every (nested) subcommand parser under it, each once (aliases share one)."""
    out, seen, todo = [], set(), [parser]
    while todo:
        p = todo.pop(0)
        if id(p) in seen:
            continue
        seen.add(id(p))
        out.append(p)
        for action in p._actions:  # noqa: SLF001 - argparse keeps subparsers only here
            if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
                todo.extend(action.choices.values())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = bool(getattr(args, "quiet", False))
    set_quiet(quiet)
    if quiet:
        # Libraries' INFO lines (model loading, the server's log) are progress too.
        logging.getLogger().setLevel(logging.WARNING)
    try:
        result = args.func(args)
    except LikenessError as exc:
        warn(f"error: {exc}")
        return exc.exit_code
    except OSError as exc:
        # Disk full, permission denied, a vanished file: the user's environment to fix, not a bug.
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        warn(f"error: {exc.strerror or exc}{where}")
        return 1
    except KeyboardInterrupt:
        warn("interrupted: finished work is kept; run the same command again to resume")
        return 130
    except Exception as exc:  # noqa: BLE001 - only a server's answer is handled here; the rest re-raises
        status = _server_error(exc)
        if status is None:
            raise
        warn(f"error: {status[0]}: {status[1]}")
        return status[2]
    return int(result or 0)


def _server_error(exc: BaseException) -> tuple[str, str, int] | None:
    """(STATUS, message, exit code) of a gRPC error from a server (``--server``), else None.

    The exit code is the one the same error has embedded (``InvalidInput`` 2, ``NotFound`` 3, ...:
    the inverse of serve/status.py's table); a server that cannot be reached is 1.
    """
    grpc = sys.modules.get("grpc")  # only commands that talked to a server loaded it
    if grpc is None or not isinstance(exc, grpc.RpcError) or not hasattr(exc, "code"):
        return None
    from likeness.serve.status import STATUS_CODES

    code = exc.code()
    exit_codes = {status: cls.exit_code for cls, status in STATUS_CODES.items()}
    message = exc.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        message += " (is `likeness serve` running at that address, and is it the right port?)"
    return code.name, message, exit_codes.get(code, 1)
