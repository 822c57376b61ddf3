"""`likeness generate` and `likeness import`: stage 1, from a spec or from an existing folder."""

from __future__ import annotations

import argparse

from likeness.cli.output import emit, progress_bar, say


def _generate(args: argparse.Namespace) -> int:
    from likeness.cli.commands.executor_options import executor_from_args
    from likeness.config import to_dict
    from likeness.generate.gallery import generate_gallery
    from likeness.spec import load_spec

    spec = load_spec(args.spec)
    overrides = {k: v for k, v in (("seed", args.seed), ("steps", args.steps), ("width", args.width),
                                   ("height", args.height), ("cfg_scale", args.cfg), ("sampler", args.sampler))
                 if v is not None}
    if overrides:
        spec = spec.with_overrides(**overrides)
    from likeness.preflight import check_device
    from likeness.cli.commands.profile_choice import resolve_cli_profile

    # Refused before plan.json is written: a plan made for a profile that cannot run here made the
    # retry with --profile cpu-tiny (as the message suggests) fail as "planned with other settings".
    profile = resolve_cli_profile(args.profile, spec.profile)
    check_device(profile)
    executor = executor_from_args(args)
    bar = progress_bar()
    try:
        result = generate_gallery(
            spec,
            args.out,
            profile,
            per_cell=args.per_cell,
            zooms=args.zooms,
            angles=args.angles,
            batch_size=args.batch_size,
            progress=bar,
            compile_unet=args.compile,
            executor=executor,
        )
    finally:
        bar.close()
    say(f"{result.planned} images planned, {result.generated} made now ({result.images_per_second:.3g} images/s), "
        f"contact sheet: {result.contact_sheet}")
    emit(to_dict(result))
    return 0


def _import(args: argparse.Namespace) -> int:
    from likeness.config import to_dict
    from likeness.generate.importer import import_gallery
    from likeness.spec import load_spec

    spec = load_spec(args.spec) if args.spec else None
    bar = progress_bar()
    try:
        result = import_gallery(args.src, args.out, spec, progress=bar, embeddings_dir=args.embeddings)
    finally:
        bar.close()
    say(f"imported {result.imported} images, skipped {len(result.skipped)} (reasons in {result.report})")
    emit(to_dict(result))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from likeness.cli.commands.executor_options import add_executor_options

    p = sub.add_parser("generate", help="generate the zoom x angle gallery of a character spec (resumable)")
    p.add_argument("spec", help="character spec .toml")
    p.add_argument("--out", required=True, help="gallery folder; run again with the same folder to resume")
    p.add_argument("--profile", default=None, help="model profile from models/*.toml (default: the spec's, else the best available)")
    p.add_argument("--per-cell", type=int, default=None, help="images per zoom/angle cell (spec default 16)")
    p.add_argument("--zooms", nargs="+", default=None, metavar="ZOOM", help="zoom phrases replacing the spec's")
    p.add_argument("--angles", nargs="+", default=None, metavar="ANGLE", help="angle phrases replacing the spec's")
    p.add_argument("--batch-size", type=int, default=None, help="images per denoising batch (default: from free memory)")
    p.add_argument("--seed", type=int, default=None, help="base seed (default: the spec's; -1 draws one)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (spec default 30)")
    p.add_argument("--width", type=int, default=None, help="image width, multiple of 8 (spec default 512)")
    p.add_argument("--height", type=int, default=None, help="image height, multiple of 8 (spec default 512)")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (spec default 7)")
    p.add_argument("--sampler", default=None, help='A1111 sampler name, e.g. "Euler a" (spec default DPM++ 2M Karras)')
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA; slow first batch)")
    add_executor_options(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("import", help="make a gallery from an existing A1111/ComfyUI output folder")
    p.add_argument("src", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="gallery folder to write")
    p.add_argument("--spec", default=None, help="character spec whose zooms/angles to recognise in prompts")
    p.add_argument("--embeddings", default=None, metavar="DIR",
                   help="embeddings folder to resolve the images' 'TI hashes' against (sha256[:12] of each file)")
    p.set_defaults(func=_import)
