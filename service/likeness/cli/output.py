"""How every command speaks: one JSON document (or JSON lines) on stdout, messages on stderr."""

from __future__ import annotations

import json
import sys
from typing import Any

def emit(obj: Any) -> None:
    """Print a JSON result on stdout (one document, for tools and nightly jobs)."""
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def emit_line(obj: Any) -> None:
    """Print one JSON line (for streams such as `faces compare --pairs`)."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def say(message: str) -> None:
    """Print a message for people on stderr (progress, warnings, what was written where)."""
    print(message, file=sys.stderr, flush=True)
