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

from service.build import BuildContext, StageFn
from service.errors import FailedPrecondition
from service.files import atomic_save

EMBEDDING_FILES = {
    # format -> file name under embeddings/ (the documented layout)
    "a1111-pt": "{token}.pt",
    "safetensors": "{token}.safetensors",
    "diffusers": "learned_embeds.safetensors",
}


def _profile(ctx: BuildContext) -> Any:
    from service.runtime import resolve_profile

    return resolve_profile(ctx.spec.profile)


def _faces(ctx: BuildContext) -> Any:
    if ctx.models is not None:
        return ctx.models.faces(_profile(ctx))
    from service.backends.faces import load_face_analyzer

    return load_face_analyzer(_profile(ctx))


def _clip(ctx: BuildContext) -> Any:
    if ctx.models is not None:
        return ctx.models.clip(_profile(ctx))
    from service.backends.clip import load_clip

    return load_clip(_profile(ctx))


def _pipe(ctx: BuildContext) -> Any:
    from service.backends.diffusion import load_pipeline

    prof = _profile(ctx)
    if ctx.models is not None:
        return ctx.models.get("pipe", prof.name, lambda: load_pipeline(prof))
    return load_pipeline(prof)


def _best_embedding_path(ctx: BuildContext, round_: int) -> Path:
    return ctx.round_dir(round_) / "train" / "best_embedding.safetensors"


# ------------------------------------------------------------------- stages
def stage_generate(ctx: BuildContext, round_: int) -> dict[str, Any]:
    """Round 0: the gallery from the spec, or the imported folder. Later rounds: with the trained token."""
    gallery = ctx.round_dir(round_) / "gallery"
    if round_ == 0 and ctx.options.import_gallery:
        from service.importer import import_gallery

        res = import_gallery(ctx.options.import_gallery, gallery, progress=ctx.progress, cancel=ctx.cancel)
        return {"gallery": str(gallery.relative_to(ctx.root)), "source": "import", "summary": _summary(res)}
    from service.generate import generate_gallery

    kwargs: dict[str, Any] = {}
    if round_ > 0:
        # Refinement: the same grid with the token standing in for the traits (The Chosen One's loop).
        kwargs["embedding"] = _load_best(ctx, round_ - 1)
    res = generate_gallery(ctx.spec, gallery, pipe=_pipe(ctx), profile=_profile(ctx), progress=ctx.progress,
                           cancel=ctx.cancel, **kwargs)
    return {"gallery": str(gallery.relative_to(ctx.root)), "source": "generate", "summary": _summary(res)}


def stage_curate(ctx: BuildContext, round_: int) -> dict[str, Any]:
    from service.curate import CurateConfig, curate

    rd = ctx.round_dir(round_)
    res = curate(rd / "gallery", ctx.spec, rd / "curated", CurateConfig(k=ctx.options.k), faces=_faces(ctx),
                 clip=_clip(ctx), progress=ctx.progress, cancel=ctx.cancel)
    selected = res.set_scores.get("selected", {})
    return {"selected": list(res.selected),
            "scores": {k: float(v) for k, v in selected.items() if isinstance(v, (int, float)) and v is not None}}


def stage_caption(ctx: BuildContext, round_: int) -> dict[str, Any]:
    from service.caption import caption_dataset

    res = caption_dataset(ctx.round_dir(round_) / "curated", ctx.spec, clip=_clip(ctx), progress=ctx.progress)
    return {"captions": len(res.captions)}


def stage_train(ctx: BuildContext, round_: int) -> dict[str, Any]:
    from service.embeddings import save_embedding
    from service.train import TrainConfig, train_embedding

    rd = ctx.round_dir(round_)
    overrides: dict[str, Any] = {}
    if ctx.options.training_steps:
        overrides["steps"] = ctx.options.training_steps
    if ctx.options.checkpoint_every:
        overrides["checkpoint_every"] = ctx.options.checkpoint_every
    if ctx.options.train_resolution:
        overrides["resolution"] = ctx.options.train_resolution
    res = train_embedding(rd / "curated", ctx.spec, rd / "train", TrainConfig(**overrides), pipe=_pipe(ctx),
                          profile=_profile(ctx), progress=ctx.progress, cancel=ctx.cancel)
    emb = res.embedding if hasattr(res, "embedding") else res
    save_embedding(emb, _best_embedding_path(ctx, round_), "safetensors")
    scores = getattr(res, "scores", {}) or {}
    return {"step": int(emb.step), "scores": {k: float(v) for k, v in dict(scores).items()
                                              if isinstance(v, (int, float))}}


def _load_best(ctx: BuildContext, round_: int) -> Any:
    from service.embeddings import load_embedding

    path = _best_embedding_path(ctx, round_)
    if not path.is_file():
        raise FailedPrecondition(f"round {round_} has no trained embedding at {path}; its train stage did not finish")
    return load_embedding(path, token=ctx.spec.token)


def stage_export(ctx: BuildContext, round_: int) -> dict[str, Any]:
    """The best round's embedding in every format other tools load (embeddings/)."""
    from service.embeddings import save_embedding

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
    from service.evaluate import EvalConfig, evaluate

    overrides: dict[str, Any] = {}
    if ctx.options.eval_scenes:
        overrides["scenes"] = tuple(ctx.options.eval_scenes)
    if ctx.options.eval_steps:
        overrides["steps"] = ctx.options.eval_steps
    rd = ctx.round_dir(round_)
    res = evaluate(rd, ctx.spec, _load_best(ctx, round_), EvalConfig(**overrides), pipe=_pipe(ctx),
                   faces=_faces(ctx), clip=_clip(ctx), progress=ctx.progress, cancel=ctx.cancel)
    summary = res.get("summary", {}) if isinstance(res, dict) else getattr(res, "summary", {})
    return {"scores": {k: float(v) for k, v in dict(summary).items() if isinstance(v, (int, float)) and v is not None}}


def stage_report(ctx: BuildContext, round_: int) -> dict[str, Any]:
    from service.report import write_report

    rd = ctx.round_dir(round_)
    if round_ > 0:
        # The report reads one folder in the documented layout: give the round its spec.
        shutil.copyfile(ctx.root / "spec.json", rd / "spec.json")
    paths = write_report(rd)
    files = {}
    for kind, path in paths.items():
        target = ctx.root / "report" / Path(path).name
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
