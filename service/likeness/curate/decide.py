"""Stage 2, curation: from an oversampled gallery to the K images that look like one person.

Pipeline (every rule and threshold is in docs/curation.md):

1. Decode each image once (``likeness.images``: WebP-named-.jpg, CMYK, bombs
   are reported as ``undecodable``, never a crash); reduce to ``max_side``.
2. Faces for every image, batched (``FaceAnalyzer.analyze``); CLIP image
   embeddings, batched, when a CLIP model is given.
3. Per-image face checks (several faces, detection score, size for the zoom
   level, blur) — ``likeness.curate.checks``. Steps 1-3 run per shard of
   ``batch_size`` images in ``likeness.curate.analysis``, in this process or
   on an executor's workers (``likeness.executor``, e.g. Ray actors).
4. The passes (``likeness.curate.passes.PASSES``, one signature, each
   rejecting with a code and a reason): identity clustering over the main
   faces that passed (average linkage at the calibrated set threshold,
   largest-then-most-cohesive cluster; a face is the character when its
   cosine to that cluster's centroid reaches the calibrated membership
   threshold and it is not part of another multi-face group —
   ``likeness.curate.selection``), with a warning when no identity holds a
   clear majority;
5. Background score (CLIP text contrast + CIELAB border consistency) and
   off-background outliers — ``likeness.curate.background``; off-prompt hair
   and wardrobe (colour histograms above and below the face against the
   character's consensus) — ``likeness.curate.appearance``.
6. Near-duplicates among the rest (similar faces that are the same picture:
   keypoints agree with one similarity transform and the aligned faces agree
   pixel for pixel); one per group stays. Images without a face: kept as rear
   views only by a real CLIP model at a calibrated threshold.
7. Selection of K over the zoom x angle grid; set scores of the selection,
   the whole pool and a fixed-seed random K (``likeness.scores.set_scores``).
8. ``<out>/<id>.png`` for the selected images, ``<out>/face_embeddings.safetensors``
   (their main faces' embeddings, keyed by PNG sha256, for training's and
   evaluation's centroid: ``likeness.identity.curated_centroid``) and
   ``<out>/curation.json``, all written atomically.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from likeness import layout
from likeness.backends.protocols import ClipModel, FaceAnalyzer
from likeness import scores
from likeness.config import to_dict
from likeness.curate.analysis import CurationWorker, CurationWorkerFactory, LazyShards, ShardAnalysis
from likeness.curate.checks import (
    KEPT_CODES,
    REASON_CODES,
    CurateConfig,
    curate_config_from_dict,
    validate_config,
)
from likeness.errors import InvalidInput, NotFound
from likeness.identity import write_face_embeddings
from likeness.files import atomic_write_bytes, atomic_write_json, ensure_dir, read_json, safe_join
from likeness.images import list_images, load_image
from likeness.generate.manifest import GalleryImage, read_manifest
from likeness.progress import CancelToken, ProgressFn, report
from likeness.curate.passes import PASSES, PassContext, _Item
from likeness.curate.selection import random_subset
from likeness.spec import CharacterSpec

__all__ = [
    "CurateConfig", "CurationResult", "ImageDecision", "REASON_CODES", "curate", "curate_with_profile",
    "curate_config_from_dict", "gallery_rows", "read_curation", "CURATION_NAME",
]

CURATION_NAME = layout.CURATION_FILE
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ImageDecision:
    """What curation decided about one image, and why."""

    id: str
    # Path relative to the gallery folder.
    file: str
    # "kept" (in the curated set) or "rejected".
    decision: str
    # Stable machine-readable reason (one of REASON_CODES).
    reason_code: str
    # The same in a sentence a person understands.
    reason: str
    zoom: str = ""
    angle: str = ""
    zoom_index: int = -1
    angle_index: int = -1
    # Identity cluster of the main face (-1: none).
    cluster: int = -1
    # Kept image this one duplicates (near_duplicate only).
    duplicate_of: str = ""
    # identity (cosine to centroid), background, quality, prompt_adherence, utility, clip_identity.
    scores: dict[str, float | None] = field(default_factory=dict)
    # Raw measurements: faces, detection score, face size, sharpness, format...
    measures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CurationResult:
    """The curated set, every decision, and the set scores with their baselines."""

    out_dir: str
    # Ids of the kept images, in selection order (files: <out_dir>/<id>.png).
    selected: tuple[str, ...]
    images: tuple[ImageDecision, ...]
    # "selected", "pool", "random_k": likeness.scores.SetScores dicts; "uplift": selected - baselines.
    set_scores: dict[str, Any]
    clusters: dict[str, Any]
    config: dict[str, Any]
    # Counts per reason_code, timings, backends, identity threshold.
    summary: dict[str, Any]
    # Why this gallery may not be one consistent character (empty: no warning); the CLI exits non-zero on any.
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def decision(self, image_id: str) -> ImageDecision:
        for d in self.images:
            if d.id == image_id:
                return d
        raise NotFound(f"no image {image_id!r} in this curation")


# --- gallery rows ---------------------------------------------------------------

def _safe_id(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:100] or "image"
    base = base if base[0].isalnum() else f"i{base}"
    out, n = base, 1
    while out in taken:
        n += 1
        out = f"{base}-{n}"
    taken.add(out)
    return out


def gallery_rows(gallery_dir: str | os.PathLike[str]) -> list[GalleryImage]:
    """The gallery's manifest rows, or rows built on the fly for a plain folder of images.

    A plain folder gets ids from relative paths (``sub/a.jpg`` -> ``sub_a.jpg``)
    and unknown zoom/angle. Ids are made file-name safe in both cases.
    """
    root = Path(gallery_dir)
    if not root.is_dir():
        raise NotFound(f"gallery {root} is not a folder; pass a gallery folder or any folder of images")
    rows = read_manifest(root)
    taken: set[str] = set()
    if rows:
        out = []
        for r in sorted(rows, key=lambda r: r.id):
            safe = _safe_id(r.id, taken)
            out.append(r if safe == r.id else GalleryImage(**{**to_dict(r), "id": safe}))
        return out
    files = list_images(root)
    if not files:
        raise InvalidInput(f"{root} holds no images (.png/.jpg/.webp/...) and no manifest.jsonl")
    return [
        GalleryImage(id=_safe_id(p.relative_to(root).as_posix().rsplit(".", 1)[0], taken),
                     file=p.relative_to(root).as_posix(), source="imported")
        for p in files
    ]


# --- the stage ------------------------------------------------------------------

def _analyse(root: Path, items: list[_Item], cfg: CurateConfig, executor: Any, factory: Any,
             progress: ProgressFn | None, cancel: CancelToken | None) -> dict[str, Any]:
    """Per-image analysis (``likeness.curate.analysis``) in shards of ``cfg.batch_size`` on ``executor``.

    Returns the models' identity (face backend, recognition sha256, CLIP name)
    as the workers reported it. A shard's result lands once: a re-run shard
    (its worker died) overwrites the same items with the same values.
    """
    shards = LazyShards(root, [(i, it.row) for i, it in enumerate(items)], cfg)
    state: dict[str, Any] = {"done": 0, "landed": set(), "models": {}}
    total = len(items)

    def on_result(i: int, res: ShardAnalysis) -> None:
        for a in res.images:
            it = items[a.index]
            it.code, it.reason, it.faces = a.code, a.reason, list(a.faces)
            it.thumb, it.border, it.clip, it.regions = a.thumb, a.border, a.clip, a.regions
            it.measures.update(a.measures)
        state["models"] = {"face_backend": res.face_backend, "recognition_sha256": res.recognition_sha256,
                           "clip_backend": res.clip_backend}
        if i not in state["landed"]:
            state["landed"].add(i)
            state["done"] += shards.size(i)
        report(progress, "curate", min(state["done"], total), total, "faces")

    if len(shards):
        executor.map_shards(factory, shards, on_result, cancel)
    return state["models"]


def _identity_scale(threshold: float, cal: Any) -> scores.IdentityScale:
    try:
        return scores.IdentityScale(threshold, cal.different_mean, cal.same_mean)
    except ValueError:
        return scores.DEFAULT_SCALE


def curate(
    gallery_dir: str | os.PathLike[str],
    spec: CharacterSpec | None,
    out_dir: str | os.PathLike[str],
    config: CurateConfig | None = None,
    *,
    faces: FaceAnalyzer | None = None,
    clip: ClipModel | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    executor: Any = None,
    worker_factory: Callable[[], Any] | None = None,
) -> CurationResult:
    """Decide every image of ``gallery_dir``, keep K, write ``out_dir``; see the module doc.

    ``faces``: a ``likeness.backends.faces.FaceAnalyzer``; ``clip``: a
    ``ClipModel`` or None (then no CLIP background term, rear shots are
    rejected with that reason, no prompt adherence). ``spec`` gives the
    background text, the grid size and the token; None for a plain folder.

    ``executor`` (``likeness.executor.make_executor``) runs the per-image
    analysis in shards on workers that ``worker_factory`` builds (each loads
    its own models; ``faces`` may then be None); ``clip`` is still needed
    here for the text side. Without an executor the analysis runs in this
    process with ``faces`` and ``clip``. Either way the decisions are the same.
    """
    from likeness.curate.calibration import calibration_for
    from likeness.executor import LocalExecutor

    cfg = validate_config(config or CurateConfig())
    if executor is not None and worker_factory is None and not isinstance(executor, LocalExecutor):
        raise InvalidInput("curate on a remote executor needs worker_factory=CurationWorkerFactory(profile, use_clip) "
                           "so each worker loads its own models; or use curate_with_profile(..., executor=...)")
    if worker_factory is None and faces is None:
        raise InvalidInput("curate needs faces= (a FaceAnalyzer) or worker_factory= (a CurationWorkerFactory)")
    if worker_factory is not None and getattr(worker_factory, "use_clip", clip is not None) != (clip is not None):
        raise InvalidInput("worker_factory.use_clip must match whether clip= is given (the text side runs here)")
    t0 = time.perf_counter()
    root = Path(gallery_dir)
    out = Path(out_dir)
    if out.resolve() == root.resolve():
        raise InvalidInput(f"--out {out} must differ from the gallery folder")
    # Before minutes of face analysis: an --out that cannot be a folder fails now, clearly.
    ensure_dir(out, "--out folder")
    items = [_Item(r) for r in gallery_rows(root)]
    report(progress, "curate", 0, len(items), "start")
    if worker_factory is None:
        local = CurationWorker(faces, clip)
        worker_factory = lambda: local  # noqa: E731 - the local executor calls it once
    models = _analyse(root, items, cfg, executor or LocalExecutor(), worker_factory, progress, cancel)
    t_analyse = time.perf_counter() - t0
    if not models:  # no image reached a worker
        models = {"face_backend": getattr(faces, "name", type(faces).__name__) if faces is not None
                  else getattr(worker_factory, "face_backend", "unknown"),
                  "recognition_sha256": getattr(faces, "recognition_sha256", None),
                  "clip_backend": getattr(clip, "name", None) if clip is not None else None}

    cal = calibration_for(models["recognition_sha256"])
    threshold = cfg.identity_threshold if cfg.identity_threshold is not None else cal.threshold
    scale = _identity_scale(threshold, cal)
    # Membership is its own calibrated rule (docs/curation.md); an explicit identity_threshold sets all three.
    cluster_t = cfg.identity_threshold if cfg.identity_threshold is not None else cal.cluster_t
    member_t = cfg.identity_threshold if cfg.identity_threshold is not None else cal.member_t

    ctx = PassContext(cfg=cfg, spec=spec, clip=clip, threshold=float(threshold), scale=scale,
                      cluster_threshold=float(cluster_t), member_threshold=float(member_t))
    for step in PASSES:
        step(items, ctx)
        if cancel is not None:
            cancel.check()
    clusters, chosen = ctx.clusters, ctx.chosen
    _prompt_adherence(items, clip, spec)
    set_block = _set_scores(items, chosen, spec, cfg, scale)
    if cancel is not None:
        cancel.check()
    decisions = tuple(_decision(it) for it in items)
    counts = {code: sum(d.reason_code == code for d in decisions) for code in REASON_CODES}
    short = short_of_k(counts, len(chosen), cfg.k)
    result = CurationResult(
        out_dir=str(out), selected=tuple(items[i].row.id for i in chosen), images=decisions, set_scores=set_block,
        clusters={**clusters.summary(), "threshold": round(float(threshold), 4),
                  "cluster_threshold": round(float(cluster_t), 4), "member_threshold": round(float(member_t), 4),
                  "calibrated": bool(cal.calibrated), "membership_calibrated": cal.member_threshold is not None},
        config=to_dict(cfg),
        warnings=tuple(ctx.warnings),
        summary={"n_images": len(items), "n_selected": len(chosen), "reason_counts": {k: v for k, v in counts.items() if v},
                 # Images whose measured zoom or yaw disagrees with their prompt label (measures.label_disagrees).
                 "label_disagreements": sum(1 for it in items if it.measures.get("label_disagrees")),
                 # Fewer than K kept: how many, and why the rest were refused (None when K is filled).
                 "short_of_k": short,
                 # The character's images' median distance to their hair/wardrobe consensus: above
                 # CurateConfig.drift_consensus_max there is no consensus and that drift rule rejected nothing.
                 "drift_consensus": dict(ctx.drift_consensus),
                 "face_backend": models["face_backend"], "clip_backend": models["clip_backend"],
                 "spec": spec.name if spec is not None else None,
                 "seconds_analyse": round(t_analyse, 3), "seconds_total": round(time.perf_counter() - t0, 3)},
    )
    _write(root, out, items, chosen, result, models["recognition_sha256"])
    report(progress, "curate", len(items), len(items), "done", selected=len(chosen))
    return result


def short_of_k(counts: dict[str, int], kept: int, k: int) -> dict[str, Any] | None:
    """``{"kept", "k", "missing", "message"}`` when fewer than ``k`` images were kept, else None.

    Curation never fills K with a face that failed identity, quality or the one-face rule
    (docs/curation.md), so a short set is reported, not hidden: the message names the most
    frequent rejections and what to do (a larger gallery, or a smaller K).
    """
    if kept >= k:
        return None
    refused = sorted(((n, c) for c, n in counts.items() if n and c not in KEPT_CODES and c != "not_selected"),
                     key=lambda t: (-t[0], t[1]))
    why = ", ".join(f"{n} {c}" for n, c in refused[:4]) or "no image"
    smaller = f", or ask for a smaller K (--k {kept})" if kept else ""
    return {"kept": kept, "k": k, "missing": k - kept, "message": (
        f"kept {kept} of K={k}: {k - kept} short, since no other image passed every check "
        f"(rejected: {why}; curation.json gives each image's reason). Generate more images of the "
        f"character{smaller}.")}


class _CachedClip:
    """A ClipModel view whose image embeddings are the ones already computed (no second pass)."""

    def __init__(self, clip: ClipModel, embeddings: list[np.ndarray]) -> None:
        self._clip, self._embs = clip, embeddings

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._clip.embed_texts(texts)

    def embed_images(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        return np.stack([self._embs[int(i)] for i in images])


def _prompt_adherence(items: list[_Item], clip: ClipModel, spec: CharacterSpec | None) -> None:
    """CLIP-T (scores.clip_t) of every image with a prompt, from the cached image embeddings."""
    idx = [i for i, it in enumerate(items) if it.clip is not None and it.row.prompt]
    if clip is None or not idx:
        return
    embs = [items[i].clip for i in idx]
    vals = scores.clip_t(_CachedClip(clip, embs), list(range(len(idx))), [items[i].row.prompt for i in idx],
                         token=spec.token if spec is not None else None)
    for i, v in zip(idx, vals):
        items[i].scores["prompt_adherence"] = round(float(v), 4)


def _set_scores(items: list[_Item], chosen: list[int], spec: CharacterSpec | None, cfg: CurateConfig,
                scale: scores.IdentityScale) -> dict[str, Any]:
    """scores.set_scores of the selection, the whole decodable pool, and a fixed-seed random K."""
    pool = [i for i, it in enumerate(items) if it.border is not None]
    known = any(items[i].row.zoom_index >= 0 for i in pool)
    # Coverage counts measured cells (passes.framing_pass); the grid's size is the labels' grid.
    total_cells = len(spec.zooms) * len(spec.angles) if spec is not None else len({
        (items[i].row.zoom_index, items[i].row.angle_index) for i in pool}) or 1

    def score(idx: Sequence[int]) -> dict[str, Any]:
        # A set's background consistency is the set's own (border colours against the set's median,
        # scores.background_consistency), the definition `likeness score` applies to any folder: the
        # same set gets the same number from either command. The per-image background score used to
        # decide (CLIP + pixels against the identity images) stays in each image's scores.
        borders = [items[i].border for i in idx]
        own_bg = (scores.background_consistency(np.stack(borders)).tolist()
                  if idx and all(b is not None for b in borders) else [items[i].scores.get("background") for i in idx])
        return scores.set_scores(
            [items[i].embedding for i in idx],
            background=own_bg,
            quality=[float(items[i].measures.get("quality", 0.0)) if items[i].faces else 0.0 for i in idx],
            cells=[items[i].cell for i in idx] if known else None,
            total_cells=total_cells, scale=scale,
        ).to_dict()

    rand = [pool[j] for j in random_subset(len(pool), max(1, len(chosen) or cfg.k), cfg.seed)]
    out = {"selected": score(chosen), "pool": score(pool), "random_k": score(rand),
           "random_k_seed": cfg.seed, "random_k_ids": [items[i].row.id for i in rand], "total_cells": total_cells}
    out["uplift"] = {
        base: {k: round(out["selected"][k] - out[base][k], 4) for k in
               ("overall", "identity_consistency", "background_consistency", "quality", "identity_mean_pairwise")
               if isinstance(out["selected"].get(k), (int, float)) and isinstance(out[base].get(k), (int, float))}
        for base in ("pool", "random_k")
    }
    return out


def _decision(it: _Item) -> ImageDecision:
    code = it.code or "no_face"
    r = it.row
    return ImageDecision(
        id=r.id, file=r.file, decision="kept" if code in KEPT_CODES else "rejected", reason_code=code,
        reason=it.reason, zoom=r.zoom, angle=r.angle, zoom_index=r.zoom_index, angle_index=r.angle_index,
        cluster=it.cluster, duplicate_of=it.duplicate_of,
        scores={k: v for k, v in it.scores.items()},
        measures={k: (round(v, 5) if isinstance(v, float) else v) for k, v in it.measures.items()},
    )


def _write(root: Path, out: Path, items: list[_Item], chosen: list[int], result: CurationResult,
           recognition_sha256: str | None = None) -> None:
    """Selected images as PNG (re-read at full resolution: K files, not the pool), their main faces'
    embeddings (layout.FACE_EMBEDDINGS_FILE, keyed by each PNG's sha256) and curation.json."""
    out.mkdir(parents=True, exist_ok=True)
    old = out / CURATION_NAME
    if old.is_file():
        # A re-run with another K or config: drop images no longer selected.
        try:
            stale = set(read_json(old).get("selected", [])) - set(result.selected)
        except (ValueError, OSError, AttributeError):
            stale = set()
        for sid in stale:
            p = out / f"{sid}.png"
            if p.is_file():
                p.unlink()
    rows = []
    for i in chosen:
        img, _ = load_image(safe_join(root, items[i].row.file))
        # Encoded in memory so the digest is of the very bytes written (no second read).
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)
        data = buf.getvalue()
        name = f"{items[i].row.id}.png"
        atomic_write_bytes(safe_join(out, name), data)
        if items[i].embedding is not None:  # no face (a kept rear view): no row, a reader analyses it
            rows.append((name, hashlib.sha256(data).hexdigest(), items[i].embedding))
    # Before curation.json: a kill in between leaves rows whose digests no longer match, never wrong ones.
    write_face_embeddings(out / layout.FACE_EMBEDDINGS_FILE, rows, recognition_sha256)
    doc = {"schema_version": SCHEMA_VERSION, "gallery": str(root.resolve()), **result.to_dict()}
    atomic_write_json(out / CURATION_NAME, doc)


def read_curation(out_dir: str | os.PathLike[str]) -> CurationResult:
    """Load ``<out_dir>/curation.json`` back into a :class:`CurationResult` (for caption/train/report)."""
    path = Path(out_dir) / CURATION_NAME
    if not path.is_file():
        raise NotFound(f"{path} does not exist; run `likeness curate` first")
    try:
        doc = read_json(path)
    except ValueError as exc:
        raise InvalidInput(f"{path} is not valid JSON ({exc}); re-run `likeness curate`") from exc
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise InvalidInput(f"{path}: schema_version {doc.get('schema_version')!r} is not {SCHEMA_VERSION}; re-run curation")
    images = tuple(ImageDecision(**d) for d in doc["images"])
    return CurationResult(out_dir=str(Path(out_dir)), selected=tuple(doc["selected"]), images=images,
                          set_scores=doc["set_scores"], clusters=doc["clusters"], config=doc["config"],
                          summary=doc["summary"], warnings=tuple(doc.get("warnings", ())))


def curate_with_profile(
    gallery_dir: str | os.PathLike[str],
    spec: CharacterSpec | None,
    out_dir: str | os.PathLike[str],
    config: CurateConfig | None = None,
    *,
    profile: Any = None,
    use_clip: bool = True,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    executor: Any = None,
) -> CurationResult:
    """:func:`curate` with the face analyzer (and CLIP) a profile names; ModelMissing if absent.

    ``profile``: a Profile, a profile name, or None (the spec's profile, else the best one).
    ``executor``: run the per-image analysis on its workers, each loading the
    profile's models (:class:`CurationWorkerFactory`); only CLIP's text side
    is loaded here. None: everything in this process.
    """
    from likeness.backends.faces import load_face_analyzer
    from likeness.profiles import resolve_profile

    profile = resolve_profile(profile, spec.profile if spec is not None else "")
    clip = None
    if use_clip:
        from likeness.backends.clip import load_clip

        clip = load_clip(profile)
    if executor is not None:
        return curate(gallery_dir, spec, out_dir, config, clip=clip, progress=progress, cancel=cancel,
                      executor=executor, worker_factory=CurationWorkerFactory(profile, use_clip))
    faces = load_face_analyzer(profile)
    return curate(gallery_dir, spec, out_dir, config, faces=faces, clip=clip, progress=progress, cancel=cancel)
