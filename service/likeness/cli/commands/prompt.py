"""`likeness prompt "TEXT"`: how a prompt is weighted and chunked, as JSON.

What an A1111 user checks when a prompt misbehaves: which words got which
attention weight, where the 75-token chunks break, and the token counter.
Only the tokenizer is loaded (no weights), so this is fast on any machine.
"""

from __future__ import annotations

import argparse
from typing import Any

from likeness.cli.output import emit


def load_profile_tokenizer(profile_name: str) -> tuple[Any, str]:
    """The CLIP tokenizer of a profile's base model, and where it came from (see likeness.preflight)."""
    from likeness.preflight import profile_tokenizer

    return profile_tokenizer(profile_name)


def _prompt(args: argparse.Namespace) -> int:
    from likeness.prompts import describe_prompt

    tokenizer, source = load_profile_tokenizer(args.profile)
    result: dict[str, Any] = {"profile": args.profile, "tokenizer": source}
    result["prompt"] = describe_prompt(tokenizer, args.text)
    if args.negative is not None:
        result["negative_prompt"] = describe_prompt(tokenizer, args.negative)
        # Generation pads the shorter of the two with empty chunks (as A1111 does).
        result["chunks_after_padding"] = max(
            result["prompt"]["chunk_count"], result["negative_prompt"]["chunk_count"]
        )
    emit(result)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prompt",
        help="show a prompt's A1111 attention weights, 75-token chunks and token count as JSON",
    )
    p.add_argument("text", help='the prompt, e.g. "a (red:1.2) hat, [blurry]"')
    p.add_argument("--profile", default="cpu-tiny", help="model profile whose tokenizer to use (default: cpu-tiny)")
    p.add_argument(
        "--negative",
        metavar="TEXT",
        default=None,
        help="also show this negative prompt and the chunk count both are padded to",
    )
    p.set_defaults(func=_prompt)
