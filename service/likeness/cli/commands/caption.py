"""`likeness caption DATASET --spec SPEC`: A1111/kohya caption sidecars."""

from __future__ import annotations

import argparse
from typing import Any

from likeness.cli.output import emit, say


def _caption(args: argparse.Namespace) -> int:
    from likeness.caption import caption_dataset, load_vocabulary
    from likeness.spec import load_spec

    spec = load_spec(args.spec)
    vocabulary = load_vocabulary(args.vocabulary) if args.vocabulary else None
    clip = None
    if not args.no_clip:
        from likeness.backends.clip import load_clip
        from likeness.cli.commands.profile_choice import resolve_cli_profile

        profile = resolve_cli_profile(args.profile, spec.profile, uses="clip")
        clip = load_clip(profile)  # ModelMissing says how to get it; --no-clip captions from metadata only
    result = caption_dataset(args.dataset, spec, clip=clip, vocabulary=vocabulary)
    say(f"wrote {len(result.files)} captions beside the images in {result.dataset_dir}")
    emit(result.to_dict())
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("caption", help="write A1111/kohya .txt captions that keep the face out")
    p.add_argument("dataset", help="curated folder (curation.json + <id>.png) or any folder of images")
    p.add_argument("--spec", required=True, help="character spec TOML (its traits never appear in captions)")
    p.add_argument("--vocabulary", help="TOML with clothing = [...] and background = [...] for CLIP tags")
    p.add_argument("--profile", help="model profile whose CLIP tags the images (default: spec's, else best)")
    p.add_argument("--no-clip", action="store_true", help="caption from metadata and the spec only")
    p.set_defaults(func=_caption)
