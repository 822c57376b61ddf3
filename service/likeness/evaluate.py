"""Stage 5: the trained token in new scenes, scored beside a no-embedding baseline.

For each scene (cooking in a kitchen, tending a garden, conducting a choir by
default) and each seed, two images are made with the same sampler settings:

- **token**: ``photo of 3m1ly woman, cooking in a kitchen`` with the embedding loaded;
- **baseline**: the same scene and seed prompted with the spec's full
  description (``photo of a woman, 25 year old Scottish woman, red curly hair,
  ...``) and no embedding: what a user gets without training.

Both are scored with :mod:`likeness.scores` only: identity similarity = cosine
of the image's main face to the centroid of the curated set's faces, and
CLIP-T against one neutral scene text (``photo of a woman, cooking in a
kitchen``) shared by both arms, so the two CLIP-T numbers measure the same
thing. Writes ``eval/images/*.png`` and ``eval/evaluation.json``.

Resumable per image: a file named by the hash of everything that decides its
pixels (prompt, seed, settings, embedding vectors) is reused when present.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from likeness import layout
from likeness.identity import curated_centroid, folder_centroid, main_embeddings
from likeness.backends.protocols import ClipModel, FaceAnalyzer, Pipeline
from likeness.config import check_seed, from_dict, to_dict
from likeness.errors import FailedPrecondition, InvalidInput
from likeness.files import atomic_save, atomic_write_json
from likeness.progress import CancelToken, ProgressFn, report
from likeness.spec import CharacterSpec

DEFAULT_SCENES = ("cooking in a kitchen", "tending a garden", "conducting a choir")
EVALUATION_VERSION = 1


@dataclass(frozen=True)
class EvalConfig:
    # New scenes the curated set never showed: does the identity survive them?
    scenes: tuple[str, ...] = DEFAULT_SCENES
    # One image per seed per scene per arm; the same seeds for both arms so they differ only by prompt.
    seeds: tuple[int, ...] = (1234, 5678)
    # Sampler steps / CFG / size; 0 = the spec's sampling settings (the gallery's).
    steps: int = 0
    cfg_scale: float = 0.0
    width: int = 0
    height: int = 0
    # The token's prompt: the token replaces the description (that is what it was trained for).
    token_template: str = "photo of {token} {class_word}, {scene}"
    # The baseline's prompt: the spec's full description in words, no embedding.
    baseline_template: str = "photo of a {class_word}, {traits}, {scene}"
    # The text CLIP-T compares both arms with: the scene alone, identical for both arms.
    scene_text_template: str = "photo of a {class_word}, {scene}"
    # Images per denoising call; small keeps CPU memory flat, larger is faster on a GPU.
    batch_size: int = 4


def eval_config(data: dict[str, Any] | None = None) -> EvalConfig:
    """A validated EvalConfig from a dict (unknown keys fail)."""
    cfg = from_dict(EvalConfig, dict(data or {}), "evaluate")
    _check(cfg)
    return cfg


def _check(cfg: EvalConfig) -> None:
    if not cfg.scenes or any(not s.strip() or len(s) > 300 for s in cfg.scenes):
        raise InvalidInput("evaluate.scenes: give 1-64 scenes of 1-300 characters, e.g. [\"cooking in a kitchen\"]")
    if len(cfg.scenes) > 64 or len(set(cfg.scenes)) != len(cfg.scenes):
        raise InvalidInput("evaluate.scenes: at most 64 distinct scenes")
    if not cfg.seeds or len(cfg.seeds) > 64:
        raise InvalidInput("evaluate.seeds: give 1-64 seeds, e.g. [1, 2, 3]")
    for s in cfg.seeds:
        check_seed(s, "evaluate.seeds", random_ok=False)
    if not 0 <= cfg.steps <= 500 or not 0 <= cfg.cfg_scale <= 50 or not 1 <= cfg.batch_size <= 64:
        raise InvalidInput("evaluate: steps must be 0-500, cfg_scale 0-50, batch_size 1-64 (0 = the spec's value)")
    for dim in (cfg.width, cfg.height):
        if dim and (dim % 8 or not 64 <= dim <= 4096):
            raise InvalidInput(f"evaluate: width/height {dim} must be 0 (spec's) or a multiple of 8 from 64 to 4096")
    for name in ("token_template", "baseline_template", "scene_text_template"):
        try:
            getattr(cfg, name).format(token="t", class_word="c", traits="x", wardrobe="w", scene="s", background="b")
        except (KeyError, IndexError, ValueError) as exc:
            raise InvalidInput(f"evaluate.{name}: unknown placeholder {exc}; use {{token}} {{class_word}} "
                               "{traits} {wardrobe} {scene} {background}") from None


@dataclass(frozen=True)
class EvalImage:
    # "token" (with the embedding) or "baseline" (full description, no embedding).
    arm: str
    scene: str
    scene_index: int
    seed: int
    prompt: str
    negative_prompt: str
    # The text CLIP-T was measured against (shared by both arms).
    scene_text: str
    # Path relative to the eval folder, e.g. "images/token-s0-1234-ab12cd34.png".
    file: str
    face_found: bool
    # Cosine of the main face to the curated centroid; None without a face.
    identity: float | None
    clip_t: float | None


@dataclass(frozen=True)
class EvaluationResult:
    images: tuple[EvalImage, ...]
    # {"token": {...}, "baseline": {...}, "identity_gain": .., "clip_t_gain": ..}
    summary: dict[str, Any]
    path: Path
    # Images copied from reuse_dirs instead of rendered.
    reused: int = 0

    @property
    def scores(self) -> dict[str, float]:
        """Flat headline numbers (for the build runner's stage result and WatchBuild events)."""
        t, b = self.summary["token"], self.summary["baseline"]
        out = {"eval_identity_token": t["identity_mean"], "eval_identity_baseline": b["identity_mean"],
               "eval_clip_t_token": t["clip_t_mean"], "eval_clip_t_baseline": b["clip_t_mean"],
               "eval_face_rate_token": t["face_rate"], "eval_identity_gain": self.summary["identity_gain"]}
        return {k: float(v) for k, v in out.items() if v is not None}


def _fields(spec: CharacterSpec, scene: str) -> dict[str, str]:
    return {"token": spec.token, "class_word": spec.class_word, "traits": ", ".join(spec.traits),
            "wardrobe": spec.wardrobe, "background": spec.background, "scene": scene}


def _tidy(text: str) -> str:
    # Empty fields (no traits) leave ", ," behind.
    return ", ".join(p.strip() for p in text.split(",") if p.strip())


def _vectors_digest(embedding: Any) -> str:
    h = hashlib.sha256(str(getattr(embedding, "step", "")).encode())
    for key in sorted(embedding.vectors):
        h.update(key.encode())
        h.update(embedding.vectors[key].detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


def _plan(spec: CharacterSpec, cfg: EvalConfig) -> list[dict[str, Any]]:
    rows = []
    for si, scene in enumerate(cfg.scenes):
        f = _fields(spec, scene)
        text = _tidy(cfg.scene_text_template.format(**f))
        for arm, template in (("baseline", cfg.baseline_template), ("token", cfg.token_template)):
            for seed in cfg.seeds:
                rows.append({"arm": arm, "scene": scene, "scene_index": si, "seed": int(seed),
                             "prompt": _tidy(template.format(**f)), "negative_prompt": spec.negative_prompt,
                             "scene_text": text})
    return rows


def _arm_summary(rows: list[EvalImage], embs: list[Any]) -> dict[str, Any]:
    from likeness.scores import set_scores

    idents = [r.identity for r in rows if r.identity is not None]
    clips = [r.clip_t for r in rows if r.clip_t is not None]
    st = set_scores(embs) if rows else None
    return {
        "n_images": len(rows),
        "face_rate": round(sum(r.face_found for r in rows) / len(rows), 4) if rows else 0.0,
        "identity_mean": round(sum(idents) / len(idents), 4) if idents else None,
        "identity_min": round(min(idents), 4) if idents else None,
        "clip_t_mean": round(sum(clips) / len(clips), 4) if clips else None,
        # Consistency of the arm's images with each other (scores.set_scores).
        "set": st.to_dict() if st is not None else None,
    }


def evaluate(
    build_dir: str | Path,
    spec: CharacterSpec,
    embedding: Any,
    config: EvalConfig | None = None,
    *,
    pipe: Pipeline,
    faces: FaceAnalyzer,
    clip: ClipModel,
    reference_images: Sequence[str | Path] | None = None,
    out_dir: str | Path | None = None,
    reuse_dirs: Sequence[str | Path] = (),
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    **overrides: Any,
) -> EvaluationResult:
    """Generate the evaluation scenes with and without the token and score them.

    ``build_dir``: the build folder; the identity reference is ``curated/*.png``
    unless ``reference_images`` is given; output goes to ``<build_dir>/eval``
    unless ``out_dir`` is given. ``embedding`` is a TrainedEmbedding (loaded
    into ``pipe`` here). ``overrides`` replace EvalConfig fields
    (``scenes=``, ``seeds=``, ``steps=`` ...). ``reuse_dirs``: earlier evaluation folders (a build's
    earlier rounds): an image whose file name (= its key) is already there is copied, not rendered;
    in practice the baseline arm, whose key has no embedding digest.
    """
    from likeness.backends.diffusion import denoise, schedule_steps
    from likeness.embeddings import load_into_pipeline
    from likeness.prompts import encode_prompts
    from likeness.scores import clip_t, identity_similarities

    cfg = dataclasses.replace(config or EvalConfig(), **{k: tuple(v) if isinstance(v, list) else v
                                                         for k, v in overrides.items()})
    _check(cfg)
    build_dir = Path(build_dir)
    out = Path(out_dir) if out_dir is not None else build_dir / layout.EVAL_DIR
    if embedding.token != spec.token:
        raise InvalidInput(f"the embedding is for token {embedding.token!r} but the spec's token is {spec.token!r}")
    refs = [Path(p) for p in reference_images] if reference_images is not None else sorted(
        (build_dir / layout.CURATED_DIR).glob("*.png"))
    if not refs:
        raise FailedPrecondition(f"no curated images in {build_dir / 'curated'} to compare identities with; "
                                 "run curation first or pass reference_images")
    steps = cfg.steps or spec.sampling.steps
    guidance = cfg.cfg_scale or spec.sampling.cfg_scale
    width, height = cfg.width or spec.sampling.width, cfg.height or spec.sampling.height
    sampling = dataclasses.replace(spec.sampling, steps=steps, cfg_scale=guidance, width=width, height=height)
    # The curated folder's own PNGs take curation's stored embeddings; caller-given references are analysed.
    centroid, n_ref = (folder_centroid(faces, refs) if reference_images is not None
                       else curated_centroid(faces, build_dir / layout.CURATED_DIR, refs))
    load_into_pipeline(pipe, embedding)
    digest = _vectors_digest(embedding)
    plan = _plan(spec, cfg)
    # Every sampling setting that changes an image (sampler, rng, pad_conds, restore ...) is in its key;
    # seed is per row, batch_size is not (an image's noise and conditioning do not depend on its batch).
    image_settings = {k: v for k, v in to_dict(sampling).items() if k not in ("seed", "batch_size")}
    for row in plan:
        key = json.dumps([row["prompt"], row["negative_prompt"], row["seed"], image_settings,
                          digest if row["arm"] == "token" else "", str(getattr(pipe, "name_or_path", ""))])
        row["file"] = (f"images/{row['arm']}-s{row['scene_index']}-{row['seed']}-"
                       f"{hashlib.sha256(key.encode()).hexdigest()[:10]}.png")
    todo = [r for r in plan if not (out / r["file"]).is_file()]
    reused = 0
    for r in list(todo):
        for d in reuse_dirs:
            src = Path(d) / r["file"]
            if src.is_file() and src.resolve() != (out / r["file"]).resolve():
                atomic_save(out / r["file"], lambda tmp, src=src: shutil.copyfile(src, tmp))
                todo.remove(r)
                reused += 1
                break
    done = len(plan) - len(todo)
    report(progress, "evaluate", done, len(plan), "generating evaluation scenes")
    # Prompts of one call are padded to the same number of 75-token chunks: group by that count so
    # an image's conditioning does not depend on which other images share its batch.
    from likeness.prompts import tokenize_prompt

    groups: dict[int, list[dict[str, Any]]] = {}
    for r in todo:
        n = max(len(tokenize_prompt(pipe.tokenizer, t).chunks) for t in (r["prompt"], r["negative_prompt"]))
        groups.setdefault(n, []).append(r)
    for rows in groups.values():
        for i in range(0, len(rows), cfg.batch_size):
            if cancel is not None:
                cancel.check()
            batch = rows[i:i + cfg.batch_size]
            # The gallery's render path: per-image seeded noise (and SDE noise), per-step cancel.
            embeds = encode_prompts(pipe, [r["prompt"] for r in batch], [r["negative_prompt"] for r in batch],
                                    steps=schedule_steps(sampling), pad_conds=sampling.pad_conds)
            imgs = denoise(pipe, embeds, [r["seed"] for r in batch], sampling, cancel=cancel)
            for r, img in zip(batch, imgs):
                atomic_save(out / r["file"], img.save)
            done += len(batch)
            report(progress, "evaluate", done, len(plan), "generating evaluation scenes")
    wanted = {Path(r["file"]).name for r in plan}
    for stale in (out / "images").glob("*.png"):
        if stale.name not in wanted:  # images of an earlier embedding or setting
            stale.unlink()

    from PIL import Image

    pil = []
    for r in plan:
        with Image.open(out / r["file"]) as im:
            pil.append(im.convert("RGB"))
    embs = main_embeddings(faces, pil)
    # CLIP-T against the shared scene text (no token in it: nothing to strip).
    clips = clip_t(clip, pil, [r["scene_text"] for r in plan])
    images = []
    for r, emb, ct in zip(plan, embs, clips):
        ident = None
        if emb is not None and centroid is not None:
            ident = round(float(identity_similarities(emb[None], centroid)[0]), 4)
        images.append(EvalImage(arm=r["arm"], scene=r["scene"], scene_index=r["scene_index"], seed=r["seed"],
                                prompt=r["prompt"], negative_prompt=r["negative_prompt"], scene_text=r["scene_text"],
                                file=r["file"], face_found=emb is not None, identity=ident, clip_t=round(float(ct), 4)))
    summary: dict[str, Any] = {}
    for arm in ("token", "baseline"):
        idx = [i for i, im in enumerate(images) if im.arm == arm]
        summary[arm] = _arm_summary([images[i] for i in idx], [embs[i] for i in idx])
    t, b = summary["token"], summary["baseline"]
    summary["identity_gain"] = (round(t["identity_mean"] - b["identity_mean"], 4)
                                if t["identity_mean"] is not None and b["identity_mean"] is not None else None)
    summary["clip_t_gain"] = (round(t["clip_t_mean"] - b["clip_t_mean"], 4)
                              if t["clip_t_mean"] is not None and b["clip_t_mean"] is not None else None)
    doc = {
        "version": EVALUATION_VERSION,
        "token": spec.token,
        "scenes": list(cfg.scenes),
        "settings": {"config": to_dict(cfg), "steps": steps, "cfg_scale": guidance, "width": width, "height": height,
                     "sampler": spec.sampling.sampler, "embedding_step": int(getattr(embedding, "step", 0)),
                     "reference": {"n_images": len(refs), "n_faces": n_ref},
                     "faces": str(getattr(faces, "name", "")), "clip": str(getattr(clip, "name", ""))},
        "images": [to_dict(im) for im in images],
        "summary": summary,
    }
    path = atomic_write_json(out / layout.EVALUATION_FILE, doc)
    report(progress, "evaluate", len(plan), len(plan), "evaluation scored",
           **{k: v for k, v in (("identity_token", t["identity_mean"]), ("clip_t_token", t["clip_t_mean"])) if v is not None})
    return EvaluationResult(tuple(images), summary, path, reused)


def read_evaluation(eval_dir: str | Path) -> dict[str, Any]:
    """evaluation.json of an eval folder (FailedPrecondition when evaluation has not run)."""
    path = Path(eval_dir) / layout.EVALUATION_FILE
    if not path.is_file():
        raise FailedPrecondition(f"{path} does not exist; the evaluation stage has not run for this build")
    return json.loads(path.read_text(encoding="utf-8"))
