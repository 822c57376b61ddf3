"""`likeness profiles` and `likeness spec check`: what a user checks first."""

from __future__ import annotations

import argparse

from likeness.cli.output import emit


def _profiles(args: argparse.Namespace) -> int:
    from likeness.errors import LikenessError
    from likeness.profiles import best_profile, load_profile, profile_names

    rows = []
    for name in profile_names():
        try:
            prof = load_profile(name)
        except LikenessError as exc:  # one broken file must not hide the other profiles
            rows.append({"name": name, "ready": False, "missing": [], "error": str(exc)})
            continue
        missing = []
        for what in ("base_model", "face_pack", "clip"):
            try:
                prof.require(what)  # type: ignore[arg-type]
            except LikenessError as exc:
                missing.append(str(exc))
        rows.append({"name": name, "family": prof.family, "device": prof.device,
                     "description": prof.description, "ready": not missing, "missing": missing})
    best, why = best_profile()
    emit({"profiles": rows, "best": best.name, "why": why})
    return 0


def _spec_check(args: argparse.Namespace) -> int:
    from likeness.cli.commands.prompt import load_profile_tokenizer
    from likeness.spec import check_token_is_new, load_spec

    spec = load_spec(args.spec)
    # The token must be new to the profile's tokenizer (SD 1.x and SDXL share the CLIP BPE).
    profile = args.profile or spec.profile or "cpu-tiny"
    tokenizer, source = load_profile_tokenizer(profile)
    check_token_is_new(spec.token, tokenizer)
    pieces = tokenizer.tokenize(spec.token)
    emit({"ok": True, "spec": spec.to_dict(), "images": spec.grid_size,
          "token": {"text": spec.token, "tokenizer": source, "pieces_before_training": pieces}})
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profiles", help="list model profiles and whether their weights are present")
    p.set_defaults(func=_profiles)
    p = sub.add_parser("spec", help="validate a character spec")
    p.add_argument("action", choices=["check"])
    p.add_argument("spec")
    p.add_argument("--profile", default=None, help="check the token against this profile's tokenizer (default: the spec's, else cpu-tiny)")
    p.set_defaults(func=_spec_check)
