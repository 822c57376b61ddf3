"""`likeness caption DATASET --spec SPEC` and `likeness export EMBEDDING --format ... --out FILE`."""

from __future__ import annotations

import argparse
from typing import Any

from service.cli import emit, say


def _caption(args: argparse.Namespace) -> int:
    from service.caption import caption_dataset, load_vocabulary
    from service.spec import load_spec

    spec = load_spec(args.spec)
    vocabulary = load_vocabulary(args.vocabulary) if args.vocabulary else None
    clip = None
    if not args.no_clip:
        from service.backends.clip import load_clip
        from service.profiles import best_profile, load_profile

        name = args.profile or spec.profile
        profile = load_profile(name) if name else best_profile()[0]
        clip = load_clip(profile)  # ModelMissing says how to get it; --no-clip captions from metadata only
    result = caption_dataset(args.dataset, spec, clip=clip, vocabulary=vocabulary)
    say(f"wrote {len(result.files)} captions beside the images in {result.dataset_dir}")
    emit(result.to_dict())
    return 0


def _export(args: argparse.Namespace) -> int:
    from service.embeddings import load_embedding, save_embedding

    emb = load_embedding(args.embedding, token=args.token)
    path = save_embedding(emb, args.out, args.format)
    out: dict[str, Any] = {
        "file": str(path), "format": args.format, "token": emb.token, "family": emb.family,
        "n_vectors": emb.n_vectors, "dims": emb.dims(), "step": emb.step,
    }
    emit(out)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("caption", help="write A1111/kohya .txt captions that keep the face out")
    p.add_argument("dataset", help="curated folder (curation.json + <id>.png) or any folder of images")
    p.add_argument("--spec", required=True, help="character spec TOML (its traits never appear in captions)")
    p.add_argument("--vocabulary", help="TOML with clothing = [...] and background = [...] for CLIP tags")
    p.add_argument("--profile", help="model profile whose CLIP tags the images (default: spec's, else best)")
    p.add_argument("--no-clip", action="store_true", help="caption from metadata and the spec only")
    p.set_defaults(func=_caption)

    e = sub.add_parser("export", help="write an embedding as A1111 .pt, A1111/ComfyUI .safetensors or diffusers")
    e.add_argument("embedding", help="embedding file in any supported format (.pt / .safetensors)")
    e.add_argument("--format", required=True, choices=("a1111-pt", "safetensors", "diffusers"))
    e.add_argument("--out", required=True, help="output file (or folder: <token>.pt / learned_embeds.safetensors)")
    e.add_argument("--token", help="trigger word to store (default: the one in the file, else its name)")
    e.set_defaults(func=_export)
