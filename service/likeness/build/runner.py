"""Run a whole build: generate (or import) -> curate -> caption -> train -> evaluate -> report.

Stage state lives in the store: a stage marked ``done`` is never run again, so
a restarted build resumes at the first unfinished stage. Inside a stage the
work is resumable too (generation per image via the gallery manifest,
training per checkpoint), so a kill loses at most one unit.

Optional refinement rounds (The Chosen One's loop, with face identity instead
of whole-image features): generate a fresh gallery with the trained token,
curate, caption, retrain; stop when identity consistency improves by less
than ``refinement_margin`` or after ``refinement_rounds`` rounds. The round
with the best consistency is exported, evaluated and reported.

This module is core: it never imports grpc. The gRPC servicer and the CLI
call :func:`run_build` (via the worker, or directly when embedded).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from likeness import layout
from likeness.build.context import BuildContext, StageFn
from likeness.build.options import BuildOptions, build_options, effective_spec
from likeness.build.refine import RefineDecision, refine_decision, refine_stage, round_consistency
from likeness.build.stages import STAGE_FUNCTIONS
from likeness.build.store import BuildRow, Store
from likeness.config import to_dict
from likeness.errors import Cancelled, FailedPrecondition, LikenessError
from likeness.files import atomic_write_json
from likeness.progress import CancelToken, ProgressEvent, ProgressFn
from likeness.spec import CharacterSpec, spec_from_dict

log = logging.getLogger(__name__)

# "refine" (rounds >= 1 only) records the stop rule's decision after a round.
ROUND_STAGES = ("generate", "curate", "caption", "train", "refine")
FINAL_STAGES = ("export", "evaluate", "report")
class _EventProgress:
    """ProgressFn writing throttled ``progress`` events and noticing cross-process cancels."""

    def __init__(self, ctx_ref: list[BuildContext], extra: ProgressFn | None, interval: float = 0.25) -> None:
        self._ctx = ctx_ref
        self._extra = extra
        self._interval = interval
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, ev: ProgressEvent) -> None:
        ctx = self._ctx[0]
        if self._extra is not None:
            self._extra(ev)
        now = time.monotonic()
        with self._lock:
            final = ev.total > 0 and ev.done >= ev.total
            if not final and now - self._last.get(ev.stage, 0.0) < self._interval:
                return
            self._last[ev.stage] = now
        ctx.store.add_event(ctx.build_id, "progress", stage=ev.stage, round_=ctx.round, done=ev.done,
                            total=ev.total, message=ev.message, metrics=dict(ev.metrics))
        _sync_cancel(ctx)


def _sync_cancel(ctx: BuildContext) -> None:
    """Fire the build's token when the store says a cancel was requested.

    The store is the one record of a cancel: one asked through another process (a CLI
    on the same data dir), or one that landed between a worker claiming the build and
    registering its token, reaches the build only this way. The stage sees the token at
    its next unit boundary (never mid-write).
    """
    if not ctx.cancel.cancelled and ctx.store.get_build(ctx.build_id).cancel_requested:
        ctx.cancel.cancel("cancelled on request")


def _run_stage(ctx: BuildContext, round_: int, stage: str, fn: StageFn) -> dict[str, Any]:
    key = f"r{round_}/{stage}"
    done = ctx.store.stage(ctx.build_id, round_, stage)
    if done is not None and done.state == "done":
        ctx.results[key] = done.result
        return done.result
    _sync_cancel(ctx)
    ctx.cancel.check()
    ctx.round = round_
    ctx.store.set_stage(ctx.build_id, round_, stage, "running",
                        message=f"{stage} started" + (f" (round {round_})" if round_ else "")
                        + (" - resuming" if done is not None else ""))
    result = fn(ctx, round_)
    ctx.results[key] = result
    scores = result.get("scores", {})
    message = result.get("message") or (
        f"{stage} done" + (f" (round {round_})" if round_ else "")
        + (": " + ", ".join(f"{k}={v:.3f}" for k, v in list(scores.items())[:4]) if scores else ""))
    ctx.store.set_stage(ctx.build_id, round_, stage, "done", result, message=message)
    return result


def prepare_build_dir(store: Store, row: BuildRow) -> tuple[Path, CharacterSpec, BuildOptions]:
    """The build's folder with its ``spec.json`` (effective spec and options); returns (root, spec, options).

    Written once, before any stage; also for a build cancelled before it started, so its
    report can say that no stage ran.
    """
    opts = build_options(row.options)
    spec = effective_spec(spec_from_dict(row.spec), opts)
    root = store.build_dir(row.id)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / layout.SPEC_FILE).exists():
        atomic_write_json(root / layout.SPEC_FILE, {"spec": spec.to_dict(), "options": to_dict(opts)})
    return root, spec, opts


def run_build(store: Store, build_id: str, *, device: str = "cpu", cancel: CancelToken | None = None,
              progress: ProgressFn | None = None, models: Any = None,
              stages: dict[str, StageFn] | None = None, executor: Any = None) -> dict[str, Any]:
    """Run (or resume) one build to a final state and return its result.

    ``stages`` replaces stage functions by name (used only to isolate plumbing in
    unit tests); the real ones are in :mod:`likeness.build.stages`.
    """
    cancel = cancel or CancelToken()
    row = store.get_build(build_id)
    if row.terminal:
        return row.result
    fns: dict[str, StageFn]
    if stages is None:
        fns = dict(STAGE_FUNCTIONS)
    else:
        fns = dict(stages)
    ctx_ref: list[BuildContext] = []
    try:
        root, spec, opts = prepare_build_dir(store, row)
        ctx = BuildContext(store, build_id, root, spec, opts, device, cancel, progress=lambda e: None, models=models,
                           executor=executor)
        ctx_ref.append(ctx)
        ctx.progress = _EventProgress(ctx_ref, progress)
        best_round, refinement = _run_rounds(ctx, fns)
        ctx.results["best_round"] = {"round": best_round}
        ctx.round = best_round
        for stage in FINAL_STAGES:
            _run_stage(ctx, best_round, stage, fns[stage])
        result = {
            "best_round": best_round,
            # One flat, higher-is-better dict a client reads without GetReport: the curated set's
            # scores (curated_*, as report.json's summary names them) and the evaluation's (eval_*).
            "scores": {**{f"curated_{k}": v for k, v in ctx.result(best_round, "curate").get("scores", {}).items()},
                       **ctx.result(best_round, "evaluate").get("scores", {})},
            "embeddings": ctx.result(best_round, "export").get("files", {}),
            "token": spec.token,
            "report": ctx.result(best_round, "report").get("files", {}),
            "refinement": refinement,
        }
        store.finish_build(build_id, "succeeded", result=result)
        return result
    except Cancelled as exc:
        if store.get_build(build_id).cancel_requested:
            store.finish_build(build_id, "cancelled", error=str(exc) or "cancelled on request")
        else:
            # Stopped by shutdown: stays "running" in the store and resumes on the next start.
            store.add_event(build_id, "log", message=f"stopped ({exc}); resumes when the server starts again")
        raise
    except LikenessError as exc:
        store.finish_build(build_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    except Exception as exc:
        log.exception("build %s failed", build_id)
        store.finish_build(build_id, "failed", error=f"internal error: {type(exc).__name__}: {exc}")
        raise
    finally:
        for ctx in ctx_ref:
            ctx.pipe = None  # free the build's pipeline (GPU memory) now, not at the next GC


def _run_rounds(ctx: BuildContext, fns: dict[str, StageFn]) -> tuple[int, dict[str, Any]]:
    """Round 0, then refinement rounds until :func:`refine_decision` stops; returns (best round, summary)."""
    opts = ctx.options
    consistencies: list[float | None] = []
    decision = RefineDecision(0, True, True, None, "no refinement rounds asked for")
    for round_ in range(opts.refinement_rounds + 1):
        for stage in ("generate", "curate"):
            _run_stage(ctx, round_, stage, fns[stage])
        consistencies.append(round_consistency(ctx, round_))
        if round_ == 0 and consistencies[0] is None:
            raise FailedPrecondition(
                "curation kept no image with a face: the gallery has no usable identity to train on; "
                "check the gallery (contact_sheet.png, curated/curation.json reasons) or import real photos")
        decision = refine_decision(consistencies, opts.refinement_margin, opts.refinement_rounds)
        if decision.train:
            for stage in ("caption", "train"):
                _run_stage(ctx, round_, stage, fns[stage])
        if round_ > 0:
            # Recorded as a stage so the decision (and its event) is made once, also across resumes.
            _run_stage(ctx, round_, "refine", refine_stage(decision, consistencies[round_]))
        if decision.stop:
            break
    summary = {"best_round": decision.best_round, "rounds_run": len(consistencies),
               "identity_consistency": consistencies, "stop_reason": decision.reason}
    return decision.best_round, summary


def start_build(store: Store, spec: CharacterSpec, options: dict[str, Any] | BuildOptions | None = None,
                character: str = "", running_on: str = "") -> str:
    """Validate and queue a build; returns its id at once.

    ``running_on``: an embedded run's device; the build is created already claimed by it
    (see :meth:`Store.create_build`), so no server worker on the same data dir can take it.
    """
    opts = options if isinstance(options, BuildOptions) else build_options(options)
    effective_spec(spec, opts)  # validate overrides now, not an hour later
    row = store.create_build(spec.to_dict(), to_dict(opts), character=character, running_on=running_on)
    return row.id
