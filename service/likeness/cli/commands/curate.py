"""`likeness curate GALLERY --spec SPEC --k 25 --out DIR`: the curated set and curation.json."""

from __future__ import annotations

import argparse
import json


def _curate(args: argparse.Namespace) -> int:
    from likeness.cli.output import emit, progress_bar, warn
    from likeness.cli.commands.executor_options import executor_config_from_args, executor_from_args
    from likeness.curate.decide import curate_config_from_dict, curate_with_profile
    from likeness.errors import InvalidInput
    from likeness.spec import load_spec

    executor_config_from_args(args)  # a bad option combination fails before any model loads
    spec = load_spec(args.spec) if args.spec else None
    overrides = {}
    if args.config:
        try:
            overrides = json.loads(args.config)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"--config: not valid JSON ({exc}); e.g. --config '{{\"min_det_score\": 0.7}}'") from exc
        if not isinstance(overrides, dict):
            raise InvalidInput("--config: must be a JSON object of CurateConfig fields")
    if args.k is not None:
        overrides["k"] = args.k
    if args.rear_policy:
        overrides["rear_policy"] = args.rear_policy
    if args.no_spread:
        overrides["spread_over_cells"] = False
    cfg = curate_config_from_dict(overrides)
    from likeness.cli.commands.profile_choice import resolve_cli_profile

    # Resolved here, aloud: curate_with_profile would choose the same profile without a word.
    profile = resolve_cli_profile(args.profile, spec.profile if spec is not None else "",
                                  uses="face pack" if args.no_clip else "clip")
    executor = executor_from_args(args)
    bar = progress_bar()
    try:
        result = curate_with_profile(args.gallery, spec, args.out, cfg, profile=profile,
                                     use_clip=not args.no_clip, progress=bar, executor=executor)
    finally:
        bar.close()
    emit({
        "out": result.out_dir,
        "curation": f"{result.out_dir}/curation.json",
        "selected": list(result.selected),
        "summary": result.summary,
        "set_scores": {k: result.set_scores[k] for k in ("selected", "pool", "random_k", "uplift")},
        "clusters": result.clusters,
        "warnings": list(result.warnings),
    })
    short = result.summary.get("short_of_k")
    if short:
        # Not an error (the set is one person, only smaller): said on stderr, also with -q.
        warn(f"likeness curate: note: {short['message']}")
    if result.warnings:
        # The curated set is written (for inspection), but it is not one consistent character: say why, exit 2.
        for w in result.warnings:
            warn(f"likeness curate: warning: {w}")
        return 2
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from likeness.cli.commands.executor_options import add_executor_options

    p = sub.add_parser("curate", help="keep the K images that look like one person on one background")
    p.add_argument("gallery", help="gallery folder (manifest.jsonl) or any folder of images")
    p.add_argument("--spec", default="", help="character spec TOML (background text, grid, token); optional")
    p.add_argument("--out", required=True, help="output folder: <id>.png of the kept images + curation.json")
    p.add_argument("--k", type=int, default=None, help="images to keep (default 25)")
    p.add_argument("--profile", default="", help="model profile (default: the spec's, else the best available)")
    p.add_argument("--no-clip", action="store_true", help="skip CLIP (no CLIP background term; rear shots rejected)")
    p.add_argument("--rear-policy", choices=["clip", "off"], default=None, help="rear-angle shots without a face")
    p.add_argument("--no-spread", action="store_true", help="pick the top K without spreading over grid cells")
    p.add_argument("--config", default="", help="JSON object of CurateConfig overrides")
    add_executor_options(p)
    p.set_defaults(func=_curate)
