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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from service.config import from_dict, to_dict
from service.errors import Cancelled, InvalidInput, LikenessError
from service.files import atomic_write_json
from service.progress import CancelToken, ProgressEvent, ProgressFn
from service.spec import CharacterSpec, spec_from_dict
from service.store import Store

log = logging.getLogger(__name__)

ROUND_STAGES = ("generate", "curate", "caption", "train")
FINAL_STAGES = ("export", "evaluate", "report")
# Limits that keep one request from occupying a device for days.
MAX_K = 1000
MAX_TRAINING_STEPS = 100_000
MAX_ROUNDS = 10


@dataclass(frozen=True)
class BuildOptions:
    # models/<profile>.toml; empty = the spec's profile, else the best this machine has.
    profile: str = ""
    # Images per zoom x angle cell; 0 = the spec's per_cell (16 in the hand workflow).
    images_per_cell: int = 0
    # Images curation keeps: ~25 is what the hand workflow trains on.
    k: int = 25
    # Training steps; 0 = the training stage's default.
    training_steps: int = 0
    # Extra generate-curate-train rounds with the trained token (0 = one pass).
    refinement_rounds: int = 0
    # Stop refining when identity consistency improves by less than this.
    refinement_margin: float = 0.02
    # A folder of existing images to use instead of generation (server: under --import-root).
    import_gallery: str = ""
    # Base seed of the gallery; -1 = the spec's seed (or one drawn once and recorded).
    base_seed: int = -1
    # Evaluation scenes ("cooking", ...); empty = the evaluation stage's defaults.
    eval_scenes: tuple[str, ...] = ()
    # Training resolution; 0 = the spec's image size.
    train_resolution: int = 0
    # Sampler steps for evaluation images; 0 = the spec's steps.
    eval_steps: int = 0
    # Save a resumable training checkpoint every this many steps; 0 = training's default.
    checkpoint_every: int = 0


def build_options(data: dict[str, Any] | None = None) -> BuildOptions:
    """Validated options from a dict (CLI flags, protobuf, the store)."""
    opts = from_dict(BuildOptions, dict(data or {}), "options")
    checks = [
        (0 <= opts.images_per_cell <= 1000, "images_per_cell must be 0 (spec's) to 1000"),
        (1 <= opts.k <= MAX_K, f"k must be 1 to {MAX_K}"),
        (0 <= opts.training_steps <= MAX_TRAINING_STEPS, f"training_steps must be 0 (default) to {MAX_TRAINING_STEPS}"),
        (0 <= opts.refinement_rounds <= MAX_ROUNDS, f"refinement_rounds must be 0 to {MAX_ROUNDS}"),
        (0.0 <= opts.refinement_margin <= 1.0, "refinement_margin must be between 0 and 1"),
        (-1 <= opts.base_seed < 2**32, "base_seed must be -1 (spec's) or 0..4294967295"),
        (len(opts.eval_scenes) <= 64, "at most 64 eval_scenes"),
        (all(0 < len(s) <= 300 for s in opts.eval_scenes), "each eval scene must be 1-300 characters"),
        (opts.train_resolution == 0 or (opts.train_resolution % 8 == 0 and 64 <= opts.train_resolution <= 2048),
         "train_resolution must be 0 (spec's size) or a multiple of 8 from 64 to 2048"),
        (0 <= opts.eval_steps <= 500, "eval_steps must be 0 (spec's) to 500"),
        (0 <= opts.checkpoint_every <= MAX_TRAINING_STEPS, "checkpoint_every must be 0 (default) or more"),
    ]
    for ok, message in checks:
        if not ok:
            raise InvalidInput(f"options: {message}")
    return opts


def effective_spec(spec: CharacterSpec, opts: BuildOptions) -> CharacterSpec:
    """The spec with the build's overrides applied (per_cell, seed, profile)."""
    changes: dict[str, Any] = {}
    if opts.images_per_cell:
        changes["per_cell"] = opts.images_per_cell
    if opts.base_seed >= 0:
        changes["seed"] = opts.base_seed
    if opts.profile:
        changes["profile"] = opts.profile
    return spec.with_overrides(**changes) if changes else spec


@dataclass
class BuildContext:
    """What every stage function gets: where to write, what to build, how to report."""

    store: Store
    build_id: str
    root: Path
    spec: CharacterSpec
    options: BuildOptions
    device: str
    cancel: CancelToken
    progress: ProgressFn
    # Loaded models shared across stages and builds (see service.runtime.ModelCache).
    models: Any = None
    # Results of finished stages, keyed "r<round>/<stage>" (filled from the store on resume).
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    round: int = 0

    def round_dir(self, round_: int) -> Path:
        """Round 0 lives at the build root (the documented layout); refinements under rounds/<r>/."""
        return self.root if round_ == 0 else self.root / "rounds" / str(round_)

    def result(self, round_: int, stage: str) -> dict[str, Any]:
        return self.results.get(f"r{round_}/{stage}", {})


StageFn = Callable[[BuildContext, int], dict[str, Any]]


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
        # A cancel asked through another process (CLI on the same data dir) shows up in the
        # store; the stage sees the token at its next unit boundary (never mid-write).
        if not ctx.cancel.cancelled and ctx.store.get_build(ctx.build_id).cancel_requested:
            ctx.cancel.cancel("cancelled on request")


def _run_stage(ctx: BuildContext, round_: int, stage: str, fn: StageFn) -> dict[str, Any]:
    key = f"r{round_}/{stage}"
    done = ctx.store.stage(ctx.build_id, round_, stage)
    if done is not None and done.state == "done":
        ctx.results[key] = done.result
        return done.result
    ctx.cancel.check()
    ctx.round = round_
    ctx.store.set_stage(ctx.build_id, round_, stage, "running",
                        message=f"{stage} started" + (f" (round {round_})" if round_ else "")
                        + (" - resuming" if done is not None else ""))
    result = fn(ctx, round_)
    ctx.results[key] = result
    scores = result.get("scores", {})
    ctx.store.set_stage(ctx.build_id, round_, stage, "done", result,
                        message=f"{stage} done" + (f" (round {round_})" if round_ else "")
                        + (": " + ", ".join(f"{k}={v:.3f}" for k, v in list(scores.items())[:4]) if scores else ""))
    return result


def _consistency(ctx: BuildContext, round_: int) -> float:
    scores = ctx.result(round_, "curate").get("scores", {})
    return float(scores.get("identity_consistency") or scores.get("identity_mean_to_centroid") or 0.0)


def run_build(store: Store, build_id: str, *, device: str = "cpu", cancel: CancelToken | None = None,
              progress: ProgressFn | None = None, models: Any = None,
              stages: dict[str, StageFn] | None = None) -> dict[str, Any]:
    """Run (or resume) one build to a final state and return its result.

    ``stages`` replaces stage functions by name (used only to isolate plumbing in
    unit tests); the real ones are in :mod:`service.build_stages`.
    """
    cancel = cancel or CancelToken()
    row = store.get_build(build_id)
    if row.terminal:
        return row.result
    fns: dict[str, StageFn]
    if stages is None:
        from service.build_stages import STAGE_FUNCTIONS

        fns = dict(STAGE_FUNCTIONS)
    else:
        fns = dict(stages)
    ctx_ref: list[BuildContext] = []
    try:
        opts = build_options(row.options)
        spec = effective_spec(spec_from_dict(row.spec), opts)
        root = store.build_dir(build_id)
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "spec.json").exists():
            atomic_write_json(root / "spec.json", {"spec": spec.to_dict(), "options": to_dict(opts)})
        ctx = BuildContext(store, build_id, root, spec, opts, device, cancel, progress=lambda e: None, models=models)
        ctx_ref.append(ctx)
        ctx.progress = _EventProgress(ctx_ref, progress)
        best_round = 0
        for round_ in range(opts.refinement_rounds + 1):
            for stage in ROUND_STAGES:
                _run_stage(ctx, round_, stage, fns[stage])
            if round_ == 0:
                continue
            gain = _consistency(ctx, round_) - _consistency(ctx, best_round)
            store.add_event(build_id, "log", stage="train", round_=round_,
                            message=f"round {round_}: identity consistency {_consistency(ctx, round_):.3f} "
                                    f"({gain:+.3f} vs round {best_round})", metrics={"gain": gain})
            if gain > 0:
                best_round = round_
            if gain < opts.refinement_margin:
                break
        ctx.results["best_round"] = {"round": best_round}
        ctx.round = best_round
        for stage in FINAL_STAGES:
            _run_stage(ctx, best_round, stage, fns[stage])
        result = {
            "best_round": best_round,
            "scores": ctx.result(best_round, "evaluate").get("scores", {}),
            "embeddings": ctx.result(best_round, "export").get("files", {}),
            "token": spec.token,
            "report": ctx.result(best_round, "report").get("files", {}),
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


def start_build(store: Store, spec: CharacterSpec, options: dict[str, Any] | BuildOptions | None = None,
                character: str = "") -> str:
    """Validate and queue a build; returns its id at once."""
    opts = options if isinstance(options, BuildOptions) else build_options(options)
    effective_spec(spec, opts)  # validate overrides now, not an hour later
    row = store.create_build(spec.to_dict(), to_dict(opts), character=character)
    return row.id
