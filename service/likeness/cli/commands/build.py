"""`likeness build SPEC` and `likeness builds list|show|cancel|watch`.

Embedded by default (the build runs in this process over ``--data``); with
``--server ADDR`` the same commands talk to a running `likeness serve`.
Progress bars go to stderr, the final JSON to stdout.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from likeness.cli.output import emit, progress_bar, say
from likeness.cli.commands.executor_options import add_executor_options

STATE_NAMES = {0: "unspecified", 1: "queued", 2: "running", 3: "succeeded", 4: "failed", 5: "cancelled"}


def _options(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("profile", "k", "images_per_cell", "training_steps", "refinement_rounds", "refinement_margin",
                 "train_resolution", "eval_steps", "checkpoint_every"):
        v = getattr(args, name, None)
        if v is not None:
            out[name] = v
    if args.seed is not None:
        out["base_seed"] = args.seed
    if args.import_gallery:
        out["import_gallery"] = os.path.abspath(args.import_gallery) if not args.server else args.import_gallery
    if args.eval_scene:
        out["eval_scenes"] = list(args.eval_scene)
    return out


def _client(args: argparse.Namespace) -> Any:
    from likeness.serve.auth import token_from_env
    from likeness.serve.client import LikenessClient

    return LikenessClient(args.server, token=token_from_env(args.token), tls_ca=args.tls_ca or "", timeout=120)


# `builds list`: the fields that tell builds apart; `builds show ID` has the rest.
_SUMMARY = ("id", "character", "state", "stage", "round", "error", "create_time", "finish_time", "scores")


def _build_dict_pb(b: Any) -> dict[str, Any]:
    """A build as JSON, one shape embedded and remote: the Build message's field names and types.

    (MessageToDict wrote int64 as strings: ``last_event`` "12"; and embedded output used the
    store's names, ``created_at``.)
    """
    from likeness.serve.servicer import options_to_dict, spec_to_dict

    return {
        "id": b.id, "character": b.character, "state": STATE_NAMES.get(b.state, str(b.state)),
        "stage": b.stage, "round": b.round, "error": b.error, "device": b.device,
        "create_time": b.create_time, "start_time": b.start_time, "finish_time": b.finish_time,
        "last_event": int(b.last_event), "scores": dict(b.scores),
        "stages": [{"round": s.round, "stage": s.stage, "state": s.state, "update_time": s.update_time}
                   for s in b.stages],
        "spec": spec_to_dict(b.spec), "options": options_to_dict(b.options),
    }


def _build_dict_row(store: Any, row: Any) -> dict[str, Any]:
    """An embedded build in the same shape as a server's (through the same message)."""
    from likeness.serve.servicer import build_to_pb

    return _build_dict_pb(build_to_pb(row, store.stages(row.id)))


def _emit_builds(builds: list[dict[str, Any]]) -> None:
    """`builds list`: a JSON array with one line per build (each was ~150 lines with spec and stages)."""
    import json
    import sys

    lines = [json.dumps({k: b[k] for k in _SUMMARY}, ensure_ascii=False) for b in builds]
    sys.stdout.write("[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n")
    sys.stdout.flush()


def _store(args: argparse.Namespace, build_id: str = "") -> Any:
    """The embedded store over --data, without creating a data folder just to look into it."""
    from pathlib import Path

    from likeness.build.store import DB_NAME, Store
    from likeness.errors import NotFound

    if not (Path(args.data) / DB_NAME).is_file():
        if build_id:
            raise NotFound(f"build {build_id!r} not found: {args.data} holds no builds (no {DB_NAME}); "
                           "pass --data DIR of a `likeness build`, or --server ADDR")
        return None
    return Store(args.data)


def _bars(disable: bool) -> Any:
    return progress_bar(disable)


def _follow_remote(client: Any, build_id: str, no_progress: bool, after: int = 0) -> Any:
    from likeness.progress import ProgressEvent

    bars = _bars(no_progress)
    try:
        for ev in client.watch_build(build_id, after_event=after):
            if ev.kind == "progress":
                bars(ProgressEvent(ev.stage, ev.done, ev.total, ev.message, dict(ev.scores)))
            elif ev.kind != "progress" and not no_progress:
                say(f"[{ev.number}] {ev.stage or 'build'}: {ev.message}")
    finally:
        bars.close()
    return client.get_build(build_id)


def _build(args: argparse.Namespace) -> int:
    from likeness.spec import load_spec

    from likeness.cli.commands.executor_options import executor_config_from_args, executor_from_args

    spec = load_spec(args.spec)
    options = _options(args)
    if args.server and executor_config_from_args(args).kind != "local":
        from likeness.errors import InvalidInput

        raise InvalidInput("--executor applies to embedded builds; a server's executor is set with "
                           "`likeness serve --executor ray ...`")
    if args.server:
        with _client(args) as c:
            b = c.start_build(spec=spec, options=options)
            say(f"build {b.id} queued on {args.server}")
            if args.detach:
                emit(_build_dict_pb(b))
                return 0
            final = _follow_remote(c, b.id, args.no_progress)
            emit(_build_dict_pb(final))
            return 0 if final.state == 3 else 1
    from likeness.build.runner import run_build, start_build
    from likeness.errors import AlreadyExists
    from likeness.build.store import Store

    if not args.resume:
        from likeness.build.options import build_options, effective_spec
        from likeness.preflight import check_build_request
        from likeness.cli.commands.profile_choice import resolve_cli_profile

        # Before any folder is made; the service's StartBuild refuses the same requests, same words.
        eff = effective_spec(spec, build_options(options))
        check_build_request(eff, resolve_cli_profile(None, eff.profile))
    store = _store(args, args.resume) if args.resume else Store(args.data)
    if args.resume:
        build_id = store.get_build(args.resume).id
        say(f"resuming build {build_id}")
    else:
        try:
            store.create_character(spec.name, spec.to_dict())
        except AlreadyExists:
            pass
        same = store.get_character(spec.name).spec == spec.to_dict()
        build_id = start_build(store, spec, options, character=spec.name if same else "", running_on="embedded")
        say(f"build {build_id} in {store.data_dir}")
    executor = executor_from_args(args)
    store.claim(build_id, "embedded")  # a resumed build that was still queued
    bars = _bars(args.no_progress)
    try:
        run_build(store, build_id, device="embedded", progress=bars, executor=executor)
    finally:
        bars.close()
    final = store.get_build(build_id)
    emit(_build_dict_row(store, final) | {"folder": str(store.build_dir(build_id))})
    return 0 if final.state == "succeeded" else 1


def _builds(args: argparse.Namespace) -> int:
    if args.server:
        with _client(args) as c:
            if args.action == "list":
                _emit_builds([_build_dict_pb(b) for b in c.list_builds(args.character or "", args.limit)])
            elif args.action == "show":
                emit(_build_dict_pb(c.get_build(_need_id(args))))
            elif args.action == "cancel":
                emit(_build_dict_pb(c.cancel_build(_need_id(args))))
            else:
                final = _follow_remote(c, _need_id(args), args.no_progress, args.after)
                emit(_build_dict_pb(final))
        return 0
    store = _store(args, "" if args.action == "list" else _need_id(args))
    if store is None:  # `builds list` where no build ever ran: nothing, and no ./data made
        _emit_builds([])
        return 0
    if args.action == "list":
        _emit_builds([_build_dict_row(store, r) for r in store.list_builds(args.character or "", args.limit or 100)])
    elif args.action == "show":
        emit(_build_dict_row(store, store.get_build(_need_id(args))))
    elif args.action == "cancel":
        emit(_build_dict_row(store, store.request_cancel(_need_id(args))))
    else:
        from likeness.config import to_dict

        for ev in store.watch(_need_id(args), args.after):
            say(f"[{ev.number}] {ev.kind} {ev.stage} {ev.done}/{ev.total} {ev.message}")
            if args.json_lines:
                from likeness.cli.output import emit_line

                emit_line(to_dict(ev))
    return 0


def _need_id(args: argparse.Namespace) -> str:
    from likeness.errors import InvalidInput

    if not args.build_id:
        raise InvalidInput(f"`likeness builds {args.action}` needs a build id; see `likeness builds list`")
    return args.build_id


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="host:port of a `likeness serve`; default: embedded over --data")
    p.add_argument("--data", default=os.environ.get("LIKENESS_DATA", "data"), help="data directory (embedded)")
    p.add_argument("--token", help="bearer token (default: $LIKENESS_TOKEN)")
    p.add_argument("--tls-ca", help="CA certificate (PEM) to verify a TLS server")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build a character: generate, curate, caption, train, evaluate, report")
    p.add_argument("spec", help="character spec TOML (see examples/emily.toml)")
    _common(p)
    p.add_argument("--profile", help="model profile (default: the spec's, else the best available)")
    p.add_argument("--k", type=int, help="images curation keeps (default 25)")
    p.add_argument("--images-per-cell", type=int, help="images per zoom x angle cell (default: the spec's)")
    p.add_argument("--training-steps", type=int, help="textual-inversion steps (default: training's)")
    p.add_argument("--checkpoint-every", type=int, help="training checkpoint interval")
    p.add_argument("--train-resolution", type=int, help="training resolution (default: the spec's size)")
    p.add_argument("--refinement-rounds", type=int, help="extra generate-curate-train rounds with the token")
    p.add_argument("--refinement-margin", type=float, help="stop refining below this identity gain (default 0.02)")
    p.add_argument("--import", dest="import_gallery", help="use this folder of images instead of generating")
    p.add_argument("--seed", type=int, help="base seed of the gallery (default: the spec's)")
    p.add_argument("--eval-scene", action="append", help="evaluation scene (repeatable)")
    p.add_argument("--eval-steps", type=int, help="sampler steps of evaluation images")
    p.add_argument("--resume", metavar="BUILD_ID", help="embedded: resume this interrupted build")
    p.add_argument("--detach", action="store_true", help="with --server: print the queued build and return")
    add_executor_options(p)
    p.set_defaults(func=_build)

    p = sub.add_parser("builds", help="list, show, cancel or watch builds")
    p.add_argument("action", choices=["list", "show", "cancel", "watch"])
    p.add_argument("build_id", nargs="?")
    _common(p)
    p.add_argument("--character", help="list: only this character's builds")
    p.add_argument("--limit", type=int, default=0, help="list: at most this many (default 100)")
    p.add_argument("--after", type=int, default=0, help="watch: events after this number")
    p.add_argument("--json-lines", action="store_true", help="watch (embedded): events as JSON lines on stdout")
    p.set_defaults(func=_builds)
