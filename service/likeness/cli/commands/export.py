"""`likeness export EMBEDDING --format a1111-pt|safetensors|diffusers --out FILE`."""

from __future__ import annotations

import argparse
from typing import Any

from likeness.cli.output import emit


def _export(args: argparse.Namespace) -> int:
    from likeness.embeddings import load_embedding, save_embedding

    emb = load_embedding(args.embedding, token=args.token)
    path = save_embedding(emb, args.out, args.format)
    out: dict[str, Any] = {
        "file": str(path), "format": args.format, "token": emb.token, "family": emb.family,
        "n_vectors": emb.n_vectors, "dims": emb.dims(), "step": emb.step,
    }
    emit(out)
    return 0


def register(sub: Any) -> None:
    e = sub.add_parser("export", help="write an embedding as A1111 .pt, A1111/ComfyUI .safetensors or diffusers")
    e.add_argument("embedding", help="embedding file in any supported format (.pt / .safetensors)")
    e.add_argument("--format", required=True, choices=("a1111-pt", "safetensors", "diffusers"))
    e.add_argument("--out", required=True, help="output folder (the file is <token>.pt / <token>.safetensors, the name A1111 and ComfyUI "
                   "use as the trigger word) or a file named so")
    e.add_argument("--token", help="trigger word (default: the one the file's tool uses: its file name for A1111/ComfyUI "
                   "files, the key for diffusers files)")
    e.set_defaults(func=_export)
