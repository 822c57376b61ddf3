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
from typing import Any, Callable, Sequence

from service.config import from_dict, to_dict
from service.errors import Cancelled, FailedPrecondition, InvalidInput, LikenessError
from service.files import atomic_write_json
from service.progress import CancelToken, ProgressEvent, ProgressFn
from service.spec import CharacterSpec, spec_from_dict
from service.store import BuildRow, Store

log = logging.getLogger(__name__)

# "refine" (rounds >= 1 only) records the stop rule's decision after a round.
ROUND_STAGES = ("generate", "curate", "caption", "train", "refine")
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
    # The build's one diffusion pipeline, loaded on first use and shared by generate, train and
    # evaluate (see service.build_stages.pipeline for why that is safe); dropped when the build ends.
    pipe: Any = None
    # service.executor executor for generation and curation shards (None = in this process).
    executor: Any = None

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


# ------------------------------------------------------------------ refinement
@dataclass(frozen=True)
class RefineDecision:
    """What the refinement loop does after a round's curation (see :func:`refine_decision`)."""

    # The round whose embedding is exported, evaluated and reported (so far).
    best_round: int
    # Stop refining after this round.
    stop: bool
    # The latest round is the new best, so its curated set must be captioned and trained.
    train: bool
    # Identity consistency gained over the best earlier round (None: the round found no identity).
    gain: float | None
    # One sentence for the build's events: what was measured and what happens next.
    reason: str


def refine_decision(consistency: Sequence[float | None], margin: float, max_rounds: int) -> RefineDecision:
    """The stop rule of the refinement loop, on identity consistencies alone.

    ``consistency[r]`` is round r's curated-set identity consistency (None when
    curation found no identity: no face passed its checks). Round 0 always
    counts. The latest round (``len - 1``) is compared with the best earlier
    round: it becomes the best if it is better at all; refining stops when it
    found no identity, gained less than ``margin``, or is round ``max_rounds``.
    Ties keep the earlier round (its embedding already exists).
    """
    if not consistency or consistency[0] is None:
        raise InvalidInput("refine_decision: round 0 needs an identity consistency")
    r = len(consistency) - 1
    if r == 0:
        stop = max_rounds <= 0
        return RefineDecision(0, stop, True, None,
                              "no refinement rounds asked for" if stop else "round 0 done; refining")
    earlier = [(c, -i) for i, c in enumerate(consistency[:r]) if c is not None]
    best_c, neg_best = max(earlier)
    prev_best = -neg_best
    c = consistency[r]
    if c is None:
        return RefineDecision(prev_best, True, False, None,
                              f"refining stopped at round {r}: its curation found no identity (no face passed "
                              f"the checks); keeping round {prev_best} (identity consistency {best_c:.3f})")
    gain = float(c) - float(best_c)
    best = r if gain > 0 else prev_best
    head = (f"round {r}: identity consistency {c:.3f}, {gain:+.3f} vs round {prev_best}")
    if gain <= 0 or gain < margin:
        reason = f"{head}, less than the margin {margin:.3f}: refining stopped; keeping round {best}"
        return RefineDecision(best, True, best == r, gain, reason)
    if r >= max_rounds:
        reason = f"{head}: reached the {max_rounds} refinement round(s) asked for; keeping round {best}"
        return RefineDecision(best, True, True, gain, reason)
    return RefineDecision(best, False, True, gain, f"{head} (margin {margin:.3f}): refining again")


def _consistency(ctx: BuildContext, round_: int) -> float | None:
    """Round ``round_``'s curated identity consistency; None when curation kept no face."""
    res = ctx.result(round_, "curate")
    scores = res.get("scores", {})
    if "selected" in res and (not res["selected"] or not scores.get("n_faces", 1)):
        return None
    return float(scores.get("identity_consistency") or 0.0)


def _refine_stage(decision: RefineDecision, consistency: float | None) -> StageFn:
    def refine(ctx: BuildContext, round_: int) -> dict[str, Any]:
        scores = {"best_round": float(decision.best_round)}
        if consistency is not None:
            scores["identity_consistency"] = consistency
        if decision.gain is not None:
            scores["gain"] = decision.gain
        return {"best_round": decision.best_round, "stop": decision.stop, "trained": decision.train,
                "gain": decision.gain, "reason": decision.reason, "message": decision.reason, "scores": scores}
    return refine


def prepare_build_dir(store: Store, row: BuildRow) -> tuple[Path, CharacterSpec, BuildOptions]:
    """The build's folder with its ``spec.json`` (effective spec and options); returns (root, spec, options).

    Written once, before any stage; also for a build cancelled before it started, so its
    report can say that no stage ran.
    """
    opts = build_options(row.options)
    spec = effective_spec(spec_from_dict(row.spec), opts)
    root = store.build_dir(row.id)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "spec.json").exists():
        atomic_write_json(root / "spec.json", {"spec": spec.to_dict(), "options": to_dict(opts)})
    return root, spec, opts


def run_build(store: Store, build_id: str, *, device: str = "cpu", cancel: CancelToken | None = None,
              progress: ProgressFn | None = None, models: Any = None,
              stages: dict[str, StageFn] | None = None, executor: Any = None) -> dict[str, Any]:
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
            "scores": ctx.result(best_round, "evaluate").get("scores", {}),
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
        consistencies.append(_consistency(ctx, round_))
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
            _run_stage(ctx, round_, "refine", _refine_stage(decision, consistencies[round_]))
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
