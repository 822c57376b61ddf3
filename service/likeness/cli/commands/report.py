"""`likeness report BUILD` and `likeness nightly CHARACTERS_DIR`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from likeness import layout
from likeness.cli.output import emit, progress_bar, say, warn

DEFAULT_DATA = os.environ.get("LIKENESS_DATA", "data")  # same default as `likeness build` and `serve`


def resolve_build_dir(build: str, data: str) -> Path:
    """A build folder given as a path, or as a build id under ``<data>/builds/``."""
    from likeness.errors import NotFound
    from likeness.files import check_name

    p = Path(build)
    if p.is_dir():
        return p
    candidate = Path(data) / "builds" / check_name(build, "build id")
    if candidate.is_dir():
        return candidate
    raise NotFound(f"build {build!r} is neither a folder nor a build in {Path(data) / 'builds'}; "
                   "pass the build folder or --data with the service's data folder")


def _report(args: argparse.Namespace) -> int:
    import json

    from likeness.files import atomic_write_json, atomic_write_text
    from likeness.report.document import build_report, render_html

    build_dir = resolve_build_dir(args.build, args.data)
    report = build_report(build_dir)
    if args.format == "json":
        if args.out == "-":
            emit(report)
            return 0
        out = Path(args.out) if args.out else build_dir / layout.REPORT_DIR / layout.REPORT_JSON
        atomic_write_json(out, report)
    else:
        out = Path(args.out) if args.out else build_dir / layout.REPORT_DIR / layout.REPORT_HTML
        atomic_write_text(out, render_html(report, build_dir))
    say(f"wrote {out}")
    emit({"build": report["build"]["id"], "format": args.format, "path": str(out),
          "stages_missing": [s["name"] for s in report["stages"] if not s["ran"]],
          "scores": json.loads(json.dumps(report["summary"]["scores"]))})
    return 0


def _nightly(args: argparse.Namespace) -> int:
    from likeness.nightly import NightlyConfig, nightly_exit_code, run_nightly, service_builder

    config = NightlyConfig(margin=args.margin, night=args.night or "",
                           **({"k": args.k} if args.k is not None else {}),
                           images_per_cell=args.images_per_cell, training_steps=args.training_steps,
                           profile=args.profile)
    builder = service_builder(args.server, token=args.token or os.environ.get("LIKENESS_TOKEN", "")) \
        if args.server else None
    bars = progress_bar()
    try:
        result = run_nightly(args.characters_dir, data_dir=args.data, config=config, build_fn=builder, log=say,
                             progress=bars)
    finally:
        bars.close()
    emit(result.to_dict())
    code = nightly_exit_code(result)
    if code:
        warn(f"nightly: {len(result.failures)} failed build(s), {len(result.regressions)} regression(s) "
            f"beyond margin {config.margin}; see {result.summary_html}")
    return code


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write the JSON or HTML report of a build")
    p.add_argument("build", help="build folder, or build id under --data/builds")
    p.add_argument("--format", choices=["html", "json"], default="html")
    p.add_argument("--out", default="", help="output file ('-' with json: stdout); default <build>/report/report.<format>")
    p.add_argument("--data", default=DEFAULT_DATA, help="data folder of the service (env LIKENESS_DATA)")
    p.set_defaults(func=_report)

    p = sub.add_parser("nightly", help="build every character spec in a folder and compare with the last night")
    p.add_argument("characters_dir", help="folder of character spec .toml files")
    p.add_argument("--data", default=DEFAULT_DATA, help="data folder: store, builds, nightly summaries, lock")
    p.add_argument("--server", default="", help="build through a running service at HOST:PORT instead of embedded")
    p.add_argument("--token", default="", help="service token (or env LIKENESS_TOKEN)")
    p.add_argument("--margin", type=float, default=0.05,
                   help="a score falling by more than this vs the previous successful build is a regression")
    p.add_argument("--night", default="", help="night key YYYY-MM-DD (default: today, local time)")
    p.add_argument("--k", type=int, default=None, help="images curation keeps (default: the build's, 25)")
    p.add_argument("--images-per-cell", type=int, default=0, help="0 = each spec's per_cell")
    p.add_argument("--training-steps", type=int, default=0, help="0 = the training stage's default")
    p.add_argument("--profile", default="", help="model profile (default: each spec's, else the best available)")
    p.set_defaults(func=_nightly)
