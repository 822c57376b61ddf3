"""The stage functions a build runs, each ``(ctx, round) -> result dict``.

Each one calls a stage module (generate/import, curate, caption, train,
embeddings, evaluate, report) with the build's folders and models, and
returns a small JSON-able summary that the store keeps as the stage's state.
Every stage is idempotent: run twice, it reuses what is on disk (generation
skips images already in the manifest, training resumes from its last
checkpoint, curation/caption/export/report rewrite their outputs atomically).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from likeness import layout
from likeness.build.context import BuildContext, StageFn
from likeness.errors import FailedPrecondition
from likeness.files import atomic_save
from likeness.profiles import resolve_profile

EMBEDDING_FILES = {
    # format -> file name under embeddings/ (the documented layout). Every file is named after the
    # token (A1111 and ComfyUI take the trigger word from it); the diffusers one has its own folder.
    "a1111-pt": "{token}.pt",
    "safetensors": "{token}.safetensors",
    "diffusers": "diffusers/{token}.safetensors",
}


def _profile(ctx: BuildContext) -> Any:
    return resolve_profile(None, ctx.spec.profile)


def _device(ctx: BuildContext, profile: Any) -> str | None:
    """The build's worker's device for the loaders (``cuda:N``; None = the profile's rule)."""
    from likeness.build.worker import loader_device

    return loader_device(profile, ctx.device)


def _faces(ctx: BuildContext) -> Any:
    prof = _profile(ctx)
    if ctx.models is not None:
        return ctx.models.faces(prof, _device(ctx, prof))
    from likeness.backends.faces import load_face_analyzer

    return load_face_analyzer(prof, device=_device(ctx, prof))


def _clip(ctx: BuildContext) -> Any:
    prof = _profile(ctx)
    if ctx.models is not None:
        return ctx.models.clip(prof, _device(ctx, prof))
    from likeness.backends.clip import load_clip

    return load_clip(prof, device=_device(ctx, prof))


def _pipe(ctx: BuildContext) -> Any:
    """The build's one pipeline: loaded on first use, then shared by generate, train and evaluate.

    Sharing is safe because each stage leaves the pipeline in a state the next one
    expects. Only the token's own tokenizer entries and text-encoder rows ever
    change: training adds them (``train_data.add_placeholder_tokens``, which
    re-initialises rows it finds from an earlier round) and leaves the best vectors
    in them; evaluation and a refinement round's generation load the embedding they
    use with ``embeddings.load_into_pipeline``, which replaces whatever rows the
    token had. Prompts without the token (round 0's gallery, the evaluation
    baseline) never read those rows. The sampler is set again before each use
    (training's noise scheduler is its own copy). Loading once saves one or two
    pipeline loads per round (seconds each for SD 1.5 / SDXL checkpoints).
    """
    from likeness.backends.diffusion import load_pipeline, set_sampler

    if ctx.pipe is None:
        # One worker per GPU: loaded straight onto the worker's device (was: GPU 0, then moved).
        prof = _profile(ctx)
        ctx.pipe = load_pipeline(prof, sampler=ctx.spec.sampling.sampler, device=_device(ctx, prof))
    set_sampler(ctx.pipe, ctx.spec.sampling.sampler)
    return ctx.pipe


def _refinement_spec(ctx: BuildContext, round_: int) -> Any:
    """The spec of a refinement round: the token stands in for the traits; fresh seeds."""
    spec = ctx.spec
    template = spec.template
    if "{traits}" in template:
        template = template.replace("{traits}", "{token} {class_word}")
    elif "{token}" not in template:
        template = "{token} {class_word}, " + template
    seed = spec.sampling.seed
    if seed >= 0:
        seed = (seed + round_ * 1_000_003) % (2**32 - 1 - spec.grid_size)
    return spec.with_overrides(template=template, seed=seed)


def _best_embedding_path(ctx: BuildContext, round_: int) -> Path:
    return ctx.round_dir(round_) / layout.TRAIN_DIR / layout.BEST_EMBEDDING


# ------------------------------------------------------------------- stages
def stage_generate(ctx: BuildContext, round_: int) -> dict[str, Any]:
    """Round 0: the gallery from the spec, or the imported folder. Later rounds: with the trained token."""
    from likeness.generate.gallery import generate_gallery, result_dict

    gallery = ctx.round_dir(round_) / layout.GALLERY_DIR
    if round_ == 0 and ctx.options.import_gallery:
        from likeness.generate.importer import import_gallery

        res = import_gallery(ctx.options.import_gallery, gallery, ctx.spec, progress=ctx.progress, cancel=ctx.cancel,
                             roots=ctx.options.import_roots or None)
        return {"gallery": str(gallery.relative_to(ctx.root)), "source": "import", "summary": _summary(res)}
    spec, embedding, ti_hashes = ctx.spec, None, None
    if round_ > 0:
        # The Chosen One's loop: the same grid, with the trained token in place of the description.
        spec = _refinement_spec(ctx, round_)
        embedding = _load_best(ctx, round_ - 1)
        from likeness.generate.infotext import ti_hash

        ti_hashes = {embedding.token: ti_hash(_best_embedding_path(ctx, round_ - 1))}
    # With an executor (Ray) each worker loads its own pipeline (and the embedding); otherwise
    # the build's shared one is used.
    pipe = None if ctx.executor is not None else _pipe(ctx)
    res = generate_gallery(spec, gallery, _profile(ctx), pipe=pipe, progress=ctx.progress, cancel=ctx.cancel,
                           executor=ctx.executor, embedding=embedding, ti_hashes=ti_hashes)
    return {"gallery": str(gallery.relative_to(ctx.root)), "source": "generate", "summary": _summary(result_dict(res))}


def stage_curate(ctx: BuildContext, round_: int) -> dict[str, Any]:
    from likeness.curate.decide import CurateConfig, curate

    rd = ctx.round_dir(round_)
    clip = _clip(ctx)
    if ctx.executor is not None:
        # Face analysis and CLIP image embeddings run in shards on the executor's workers.
        from likeness.curate.analysis import CurationWorkerFactory

        res = curate(rd / layout.GALLERY_DIR, ctx.spec, rd / layout.CURATED_DIR, CurateConfig(k=ctx.options.k), clip=clip,
                     progress=ctx.progress, cancel=ctx.cancel, executor=ctx.executor,
                     worker_factory=CurationWorkerFactory(_profile(ctx), use_clip=clip is not None))
    else:
        res = curate(rd / layout.GALLERY_DIR, ctx.spec, rd / layout.CURATED_DIR, CurateConfig(k=ctx.options.k), faces=_faces(ctx),
                     clip=clip, progress=ctx.progress, cancel=ctx.cancel)
    if res.warnings and round_ == 0:
        # Stop before training on a gallery that is not one consistent character (issue 11). A
        # refinement round that warns is not an error: it records the warnings and the refine
        # decision treats it as a round that found no identity (round 0's embedding stays).
        from likeness.errors import FailedPrecondition

        raise FailedPrecondition("curation: " + "; ".join(res.warnings)
                                 + f" (see {rd / layout.CURATED_DIR / layout.CURATION_FILE})")
    selected = res.set_scores.get("selected", {})
    return {"selected": list(res.selected), "warnings": list(res.warnings),
            "short_of_k": res.summary.get("short_of_k"),
            "scores": {k: float(v) for k, v in selected.items() if isinstance(v, (int, float)) and v is not None}}


def stage_caption(ctx: BuildContext, round_: int) -> dict[str, Any]:
    from likeness.caption import caption_dataset

    res = caption_dataset(ctx.round_dir(round_) / layout.CURATED_DIR, ctx.spec, clip=_clip(ctx), progress=ctx.progress)
    return {"captions": len(res.captions)}


def stage_train(ctx: BuildContext, round_: int) -> dict[str, Any]:
    """Textual inversion on the captioned set; resumes from the last checkpoint in train/."""
    import dataclasses

    from likeness.embeddings import save_embedding
    from likeness.train.trainer import TrainConfig, train_embedding

    rd = ctx.round_dir(round_)
    o = ctx.options
    cfg = TrainConfig()
    changes: dict[str, Any] = {}
    if o.training_steps:
        changes["steps"] = o.training_steps
        changes["checkpoint_every"] = min(cfg.checkpoint_every, o.training_steps)
    if o.checkpoint_every:
        changes["checkpoint_every"] = o.checkpoint_every
    if o.train_resolution:
        changes["resolution"] = o.train_resolution
    val: dict[str, Any] = {}
    if o.eval_steps:
        val["steps"] = min(o.eval_steps, 150)
    if o.eval_scenes:
        val["scenes"] = tuple(o.eval_scenes)
    if val:
        changes["validation"] = dataclasses.replace(cfg.validation, **val)
    cfg = dataclasses.replace(cfg, **changes)
    profile = _profile(ctx)
    validator = None
    if cfg.validation.enabled:
        # The build's already-loaded face pack and CLIP model, not a second copy per round.
        from likeness.train.data import read_dataset
        from likeness.identity import curated_centroid
        from likeness.train.checkpoint_scoring import ScoringValidator

        faces = _faces(ctx)
        # Curation's stored embeddings of these PNGs (issue 14): only changed or unknown files are analysed.
        centroid, _ = curated_centroid(faces, rd / layout.CURATED_DIR,
                                       [i.path for i in read_dataset(rd / layout.CURATED_DIR)])
        validator = ScoringValidator(ctx.spec, cfg.validation, faces=faces, clip=_clip(ctx), centroid=centroid,
                                     size=cfg.resolution or (1024 if profile.family == "sdxl" else 512),
                                     image_dir=rd / layout.TRAIN_DIR / "validation")
    res = train_embedding(rd / layout.CURATED_DIR, ctx.spec, rd / layout.TRAIN_DIR, cfg, pipe=_pipe(ctx), profile=profile,
                          progress=ctx.progress, cancel=ctx.cancel, validator=validator)
    # Internal (read back with the spec's token), so not named after the token.
    save_embedding(res.best, _best_embedding_path(ctx, round_), "safetensors", any_name=True)
    return {"step": int(res.best_step), "last_step": int(res.last_step), "resumed_from": int(res.resumed_from),
            "reason": res.best_reason}


def _load_best(ctx: BuildContext, round_: int) -> Any:
    from likeness.embeddings import load_embedding

    path = _best_embedding_path(ctx, round_)
    if not path.is_file():
        raise FailedPrecondition(f"round {round_} has no trained embedding at {path}; its train stage did not finish")
    return load_embedding(path, token=ctx.spec.token)


def stage_export(ctx: BuildContext, round_: int) -> dict[str, Any]:
    """The best round's embedding in every format other tools load (embeddings/)."""
    from likeness.embeddings import save_embedding

    emb = _load_best(ctx, round_)
    files = {}
    for fmt, pattern in EMBEDDING_FILES.items():
        if fmt == "a1111-pt" and emb.family != "sd15":
            continue  # A1111 has no SDXL .pt format
        rel = f"embeddings/{pattern.format(token=ctx.spec.token)}"
        save_embedding(emb, ctx.root / rel, fmt)
        files[fmt] = rel
    return {"files": files, "round": round_, "step": int(emb.step)}


def stage_evaluate(ctx: BuildContext, round_: int) -> dict[str, Any]:
    """The token in new scenes beside the no-embedding baseline (eval/)."""
    from likeness.evaluate import EvalConfig, evaluate

    overrides: dict[str, Any] = {}
    if ctx.options.eval_scenes:
        overrides["scenes"] = tuple(ctx.options.eval_scenes)
    if ctx.options.eval_steps:
        overrides["steps"] = ctx.options.eval_steps
    # Earlier rounds' eval folders: the baseline arm (no embedding in its key) is copied, not re-rendered.
    earlier = [ctx.round_dir(r) / layout.EVAL_DIR for r in range(round_)]
    res = evaluate(ctx.round_dir(round_), ctx.spec, _load_best(ctx, round_), EvalConfig(**overrides),
                   pipe=_pipe(ctx), faces=_faces(ctx), clip=_clip(ctx), reuse_dirs=earlier,
                   progress=ctx.progress, cancel=ctx.cancel)
    return {"scores": dict(res.scores)}


def stage_report(ctx: BuildContext, round_: int) -> dict[str, Any]:
    from likeness.report.document import write_report

    rd = ctx.round_dir(round_)
    if round_ > 0:
        # The report reads one folder in the documented layout: give the round its spec.
        atomic_save(rd / layout.SPEC_FILE, lambda tmp: shutil.copyfile(ctx.root / layout.SPEC_FILE, tmp))
    paths = write_report(rd)
    files = {}
    for kind, path in paths.items():
        target = ctx.root / layout.REPORT_DIR / Path(path).name
        if Path(path).resolve() != target.resolve():
            atomic_save(target, lambda tmp, src=path: shutil.copyfile(src, tmp))
        files[kind] = str(target.relative_to(ctx.root))
    return {"files": files}


def _summary(res: Any) -> dict[str, Any]:
    if isinstance(res, dict):
        return {k: v for k, v in res.items() if isinstance(v, (int, float, str))}
    d = getattr(res, "__dict__", {})
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str))}


STAGE_FUNCTIONS: dict[str, StageFn] = {
    "generate": stage_generate,
    "curate": stage_curate,
    "caption": stage_caption,
    "train": stage_train,
    "export": stage_export,
    "evaluate": stage_evaluate,
    "report": stage_report,
}
