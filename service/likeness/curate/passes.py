"""Curation after the per-image analysis: a list of passes with one signature.

``pass(items, ctx) -> None``; a pass rejects an item with ``ctx.reject(item, code,
reason)`` (the first rejecting pass wins, the way datatrove's filters record why a
document was dropped) and leaves what later passes need on ``ctx``. ``PASSES`` is
the order :func:`likeness.curate.decide.curate` runs them in; docs/curation.md
states each rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from likeness import scores
from likeness.backends.protocols import ClipModel
from likeness.curate.appearance import colour_distances, colour_outliers
from likeness.curate.background import background_outliers, background_scores, clip_background_probability
from likeness.curate.checks import DRIFT_CODES, REASON_CODES, CurateConfig, is_rear_angle, near_duplicate_pairs
from likeness.curate.framing import label_disagreements
from likeness.curate.selection import Candidate, cluster_identities, identity_verdicts, select_k
from likeness.generate.manifest import GalleryImage
from likeness.spec import CharacterSpec

__all__ = ["PASSES", "Pass", "PassContext", "consistency_warnings", "MAJORITY_SHARE"]


@dataclass
class _Item:
    """One gallery image as the passes see it (code "" = not decided yet)."""

    row: GalleryImage
    code: str = ""
    reason: str = ""
    faces: list[Any] = field(default_factory=list)
    thumb: np.ndarray | None = None
    border: np.ndarray | None = None
    clip: np.ndarray | None = None
    regions: dict[str, Any] = field(default_factory=dict)
    measures: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float | None] = field(default_factory=dict)
    cluster: int = -1
    duplicate_of: str = ""
    # Drift rule code -> its sentence, for every drift rule the image failed (not only the first):
    # a drifted image kept to fill K says everything that drifted.
    drift: dict[str, str] = field(default_factory=dict)
    # (zoom index, angle index) in the grid, the zoom as measured where it maps to a grid word (framing_pass).
    cell: tuple[int, int] = (-1, -1)

    @property
    def embedding(self) -> np.ndarray | None:
        return self.faces[0].embedding if self.faces else None




@dataclass
class PassContext:
    """What the passes share: the config and models, and what earlier passes found."""

    cfg: CurateConfig
    spec: CharacterSpec | None
    clip: ClipModel | None
    # Pairwise same-person threshold (verification), the average-linkage cut, and the membership threshold
    # (a face against the character's centroid): see likeness.curate.calibration.Calibration.
    threshold: float
    scale: scores.IdentityScale
    cluster_threshold: float = 0.0
    member_threshold: float = 0.0
    clusters: Any = None
    # Indices of items with a face that are the character (after identity_pass).
    members: list[int] = field(default_factory=list)
    # Indices of decodable items (with border features), their background scores, the reference rows in them.
    usable: list[int] = field(default_factory=list)
    bg: np.ndarray | None = None
    ref: list[int] = field(default_factory=list)
    # Indices of rear-angle shots without a face still in the running.
    rear: list[int] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Median distance of the character's images to their hair / wardrobe consensus (the drift passes).
    drift_consensus: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def reject(it: _Item, code: str, reason: str) -> bool:
        """Reject ``it`` with ``code``/``reason`` unless an earlier pass decided it; True if this pass did."""
        if it.code:
            return False
        if code not in REASON_CODES:
            raise ValueError(f"unknown reason code {code!r}")  # a programming error, not user input
        it.code, it.reason = code, reason
        return True

    @staticmethod
    def alive(items: Sequence[_Item]) -> list[_Item]:
        """Items no pass has decided yet."""
        return [it for it in items if not it.code]

    @staticmethod
    def drifted(it: _Item, code: str, reason: str) -> None:
        """Record a drift rule's verdict: rejects when nothing decided ``it`` yet, and always notes the drift
        of an image that so far only drift rules rejected (the fill from drift needs every drift named)."""
        if it.code and it.code not in DRIFT_CODES:
            return
        it.drift[code] = reason
        PassContext.reject(it, code, reason)

    @staticmethod
    def soft(it: _Item) -> bool:
        """Undecided, or rejected by drift rules only (still a candidate to fill K from)."""
        return not it.code or it.code in DRIFT_CODES


Pass = Callable[[list[_Item], PassContext], None]


def identity_pass(items: list[_Item], ctx: PassContext) -> None:
    """Cluster the faces that passed every face check; reject faces that are not the character."""
    passed = [it for it in items if it.faces and not it.code]
    emb = np.stack([it.embedding for it in passed]) if passed else np.zeros((0, 1), np.float32)
    cluster_t = ctx.cluster_threshold or ctx.threshold
    member_t = ctx.member_threshold or ctx.threshold
    ctx.clusters = clusters = cluster_identities(emb, cluster_t)
    for it, label, (cos, why) in zip(passed, clusters.labels, identity_verdicts(emb, clusters, member_t)):
        it.cluster = int(label)
        if why:
            yaw = it.measures.get("yaw")
            if yaw is not None and abs(float(yaw)) >= ctx.cfg.profile_yaw and cos < member_t:
                # CurateConfig.profile_yaw: the measured pose, so a user knows to check a side view by eye.
                it.measures["profile_unverified"] = True
                why += (f"; but the face is turned {abs(float(yaw)):.0f} degrees, and side views are where face "
                        f"recognition is least sure (the CPU face pack on LFW: 6 of 15 faces turned 50+ degrees fall "
                        f"below the threshold against their own identity): check it by eye, or curate with a face "
                        f"pack trained for pose")
            ctx.reject(it, "identity_outlier", why)
    if clusters.centroid is not None:
        for it in items:
            if it.faces:
                it.scores["identity"] = round(float(scores.identity_similarities(it.embedding[None],
                                                                                 clusters.centroid)[0]), 4)
    ctx.members = [i for i, it in enumerate(items) if it.faces and not it.code]
    ctx.warnings.extend(consistency_warnings(len(passed), len(ctx.members), ctx.cfg))


def consistency_warnings(n_faces: int, n_identity: int, cfg: CurateConfig) -> list[str]:
    """Warnings when no identity holds a clear majority of the faces that passed the face checks.

    Why a majority: a gallery generated for one character should be mostly that
    character; when the largest identity cluster holds less than half of the
    faces (issue 11: a pool of 50 different people kept 1 of K=25 and reported
    identity 1.00), the "character" is whichever stranger happened to win, and
    training on it is wrong. One face is never an identity.
    """
    if n_faces == 0:
        return ["no face passed the face checks: there is no character to keep"]
    out = []
    share = n_identity / n_faces
    if n_identity < 2:
        out.append(f"no consistent identity: the largest identity cluster holds {n_identity} face of {n_faces}; "
                   f"one face is not a character (generate more images of one person)")
    elif share < MAJORITY_SHARE:
        out.append(f"no identity holds a clear majority: the largest cluster holds {n_identity} of {n_faces} faces "
                   f"({share:.0%} < {MAJORITY_SHARE:.0%}); the gallery is not one consistent character")
    return out


# Why 0.5: a clear majority is more than any other identity could hold; below half
# the chosen "identity" is not what most of the gallery shows (issue 11's 50-people pool: 1/50).
MAJORITY_SHARE = 0.5


def background_score_pass(items: list[_Item], ctx: PassContext) -> None:
    """Background score (CLIP text contrast with a spec + border colours vs the identity images)."""
    usable = ctx.usable = [i for i, it in enumerate(items) if it.border is not None]
    border = np.stack([items[i].border for i in usable]) if usable else np.zeros((0, 12), np.float32)
    clip_prob = None
    if ctx.clip is not None and ctx.spec is not None and usable:
        clip_prob = clip_background_probability(np.stack([items[i].clip for i in usable]), ctx.clip,
                                                ctx.spec.background, ctx.cfg.background_alternatives)
    pos = {i: n for n, i in enumerate(usable)}
    ctx.ref = [pos[i] for i in ctx.members]
    ctx.bg = bg = background_scores(border, clip_prob, ctx.ref)
    for n, i in enumerate(usable):
        items[i].scores["background"] = round(float(bg[n]), 4)
        if clip_prob is not None:
            items[i].scores["background_clip"] = round(float(clip_prob[n]), 4)


def rear_pass(items: list[_Item], ctx: PassContext) -> None:
    """Images without a face: kept as the character seen from behind only on evidence.

    Evidence is a real CLIP model's image similarity to the character's images at a
    threshold the user calibrated (``rear_clip_threshold``). A random-weights CLIP
    (``cpu-tiny``) scores every image 0.93-0.97 against any other, a coffee cup
    included (issue 11), so with it, or without any CLIP, no rear view can be verified
    and the image is ``no_face`` with that said.
    """
    cfg = ctx.cfg
    real_clip = ctx.clip is not None and not getattr(ctx.clip, "random_weights", False)
    ident_clip = None
    if real_clip and ctx.members:
        ident_clip = np.mean([items[i].clip for i in ctx.members], axis=0)
        ident_clip /= max(float(np.linalg.norm(ident_clip)), 1e-12)
    for it in items:
        if it.code or it.faces or it.border is None:
            continue
        if not is_rear_angle(cfg, it.row.angle):
            ctx.reject(it, "no_face", "no face found, and the image is not labelled a rear-angle shot")
        elif cfg.rear_policy == "off":
            ctx.reject(it, "rear_rejected", "rear-angle shot without a face; the rear policy is off")
        elif not real_clip:
            which = "no CLIP model was given" if ctx.clip is None else (
                f"{getattr(ctx.clip, 'name', 'the CLIP model')} has random weights and measures nothing")
            ctx.reject(it, "no_face", (
                f"no face found; a rear view can't be verified without a real CLIP model ({which}), "
                "so nothing shows this is the character seen from behind"))
        elif ident_clip is None:
            ctx.reject(it, "rear_rejected", "rear-angle shot without a face; no identity images to compare it with")
        else:
            sim = float(it.clip @ ident_clip / max(float(np.linalg.norm(it.clip)), 1e-12))
            it.scores["clip_identity"] = round(sim, 4)
            if cfg.rear_clip_threshold is None:
                ctx.reject(it, "rear_rejected", (
                    f"rear-angle shot without a face (CLIP similarity {sim:.2f} to the character's images); no "
                    "threshold is calibrated for this CLIP model, so a rear view can't be verified: measure one on "
                    "labelled rear views and set curate.rear_clip_threshold"))
            elif sim < cfg.rear_clip_threshold:
                ctx.reject(it, "rear_rejected", (
                    f"rear-angle shot without a face; CLIP similarity {sim:.2f} to the character's images is below "
                    f"{cfg.rear_clip_threshold:.2f}"))
    ctx.rear = [i for i, it in enumerate(items) if not it.code and not it.faces and it.border is not None]


def background_outlier_pass(items: list[_Item], ctx: PassContext) -> None:
    """Reject images whose background is unlike the character's set."""
    cfg, bg, ref = ctx.cfg, ctx.bg, ctx.ref
    if bg is None:
        return
    off = background_outliers(bg, ref, z=cfg.background_outlier_z, floor=cfg.background_min_score,
                              min_drop=cfg.background_min_drop)
    for n, i in enumerate(ctx.usable):
        if off[n]:
            ctx.drifted(items[i], "off_background", (
                f"background is unlike the character's set: score {bg[n]:.2f} (median of the identity images "
                f"{float(np.median(bg[ref])) if ref else float('nan'):.2f})"))


def _off_colour_pass(region: str, code: str, what: str, z: float, min_distance: float,
                     items: list[_Item], ctx: PassContext) -> None:
    """Reject faces whose ``region`` colours are far from the character's consensus (likeness.curate.appearance)."""
    ref_items = [i for i in ctx.members if not items[i].code]
    idx = [i for i, it in enumerate(items) if it.faces]
    colours = [items[i].regions.get(region) for i in idx]
    pos = {i: n for n, i in enumerate(idx)}
    ref = [pos[i] for i in ref_items]
    dist, _consensus = colour_distances(colours, ref)
    off, limit = colour_outliers(dist, ref, z=z, min_delta=min_distance, max_consensus=ctx.cfg.drift_consensus_max)
    ref_d = dist[np.asarray(ref, np.int64)] if ref else dist[:0]
    ref_d = ref_d[~np.isnan(ref_d)]
    med = float(np.median(ref_d)) if ref_d.size else float("nan")
    if ref_d.size:
        ctx.drift_consensus[region] = round(med, 4)
    for n, i in enumerate(idx):
        if not np.isnan(dist[n]):
            items[i].scores[f"{region}_distance"] = round(float(dist[n]), 4)
        if off[n]:
            ctx.drifted(items[i], code, (
                f"{what} has other colours than in the character's images: colour distance {dist[n]:.2f} from "
                f"their consensus (limit {limit:.2f}; the character's images are typically {med:.2f}), so the "
                f"prompt's {region} was not followed"))


def off_hair_pass(items: list[_Item], ctx: PassContext) -> None:
    """Reject faces whose hair (the band above the face) drifted from the character's colours."""
    _off_colour_pass("hair", "off_hair", "the hair above the face", ctx.cfg.off_hair_z,
                     ctx.cfg.off_hair_min_distance, items, ctx)


def off_wardrobe_pass(items: list[_Item], ctx: PassContext) -> None:
    """Reject faces whose clothes (below the chin) drifted from the character's colours."""
    _off_colour_pass("wardrobe", "off_wardrobe", "the clothing below the face", ctx.cfg.off_wardrobe_z,
                     ctx.cfg.off_wardrobe_min_distance, items, ctx)


def utility_pass(items: list[_Item], ctx: PassContext) -> None:
    """Weighted identity/background/quality utility of every undecided item (rejects nothing)."""
    cfg = ctx.cfg
    wsum = cfg.weight_identity + cfg.weight_background + cfg.weight_quality or 1.0
    for it in items:
        if not ctx.soft(it):
            continue
        idn = (float(scores.identity_score(it.scores["identity"], ctx.scale)) if it.faces
               else float(it.scores.get("clip_identity") or 0.0))
        q = float(it.measures.get("quality", 0.0)) if it.faces else 0.0
        it.scores["quality"] = round(q, 4) if it.faces else None
        u = (cfg.weight_identity * idn + cfg.weight_background * float(it.scores.get("background") or 0.0)
             + cfg.weight_quality * q) / wsum
        it.scores["utility"] = round(u, 6)


def _keeps_first(it: _Item) -> tuple[bool, float, str]:
    """Which of a group of copies is kept: one that passed every rule, then the highest utility, then the id."""
    return bool(it.code), -it.scores["utility"], it.row.id


def near_duplicate_pass(items: list[_Item], ctx: PassContext) -> None:
    """Among the surviving faces, groups of copies (connected components, scipy) keep their best image."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    # Drifted images too: one that copies a kept image must not fill K. A group keeps an image that
    # passed every rule before a drifted one.
    alive = [i for i in ctx.members if ctx.soft(items[i])]
    pairs = near_duplicate_pairs(np.stack([items[i].embedding for i in alive]) if alive else np.zeros((0, 1)),
                                 [items[i].thumb for i in alive], ctx.cfg,
                                 face_boxes=[items[i].measures.get("face_box") for i in alive],
                                 prefer=[_keeps_first(items[i]) for i in alive])
    if not pairs:
        return
    a_idx = np.array([p.i for p in pairs], np.int64)
    b_idx = np.array([p.j for p in pairs], np.int64)
    _, comp = connected_components(coo_matrix((np.ones(len(pairs), np.int8), (a_idx, b_idx)),
                                              shape=(len(alive), len(alive))), directed=False)
    groups: dict[int, list[int]] = {}
    for n in range(len(alive)):
        groups.setdefault(int(comp[n]), []).append(n)
    evidence = {(p.i, p.j): p for p in pairs}
    for g in groups.values():
        if len(g) < 2:
            continue
        best = min(g, key=lambda n: _keeps_first(items[alive[n]]))
        for n in g:
            if n == best:
                continue
            it = items[alive[n]]
            pair = evidence.get((min(n, best), max(n, best)))
            how = f": {pair.evidence()}" if pair is not None else " (in the same group of copies)"
            why = (f"near-duplicate of kept image {items[alive[best]].row.id}, "
                   f"the same picture re-encoded, resized, cropped or mirrored{how}")
            it.duplicate_of = items[alive[best]].row.id
            if not ctx.reject(it, "near_duplicate", why):
                it.reason += f"; also a {why}"  # drifted and a copy: never a candidate to fill K


def framing_pass(items: list[_Item], ctx: PassContext) -> None:
    """Measured zoom and yaw against the prompt's labels (rejects nothing; likeness.curate.framing).

    Each image's grid cell takes the zoom its face shows when that zoom word is one of the
    gallery's (the workflow re-labels zooms by what is visible); the angle stays the label's.
    Disagreements go to ``measures["label_disagrees"]``.
    """
    cfg = ctx.cfg
    index = {z: n for n, z in enumerate(ctx.spec.zooms)} if ctx.spec is not None else {}
    index.update({it.row.zoom: it.row.zoom_index for it in items if it.row.zoom and it.row.zoom_index >= 0})
    for it in items:
        it.cell = (it.row.zoom_index, it.row.angle_index)
        if not it.faces:
            continue
        zoom = it.measures.get("zoom_measured")
        if it.row.zoom_index >= 0 and zoom in index:
            it.cell = (index[zoom], it.row.angle_index)
            it.measures["grid_zoom"] = zoom
        disagree = label_disagreements(it.row.zoom, float(it.faces[0].area_ratio), it.row.angle,
                                       it.measures.get("yaw"), rear_words=cfg.rear_angle_words,
                                       yaw_front_max=cfg.yaw_front_max, yaw_side_min=cfg.yaw_side_min)
        if disagree:
            it.measures["label_disagrees"] = disagree


def select_pass(items: list[_Item], ctx: PassContext) -> None:
    """Choose K over the zoom x angle grid; the rest that passed every check are ``not_selected``."""
    cfg = ctx.cfg
    cands = [i for i in ctx.members + ctx.rear if not items[i].code]
    chosen = ctx.chosen = select_k(
        [Candidate(i, items[i].row.id, items[i].cell if items[i].row.zoom_index >= 0 else None,
                   float(items[i].scores["utility"])) for i in cands],
        cfg.k, spread_over_cells=cfg.spread_over_cells)
    chosen_set = set(chosen)
    for rank, i in enumerate(chosen):
        it = items[i]
        if it.faces:
            it.code, it.reason = "selected", f"kept: passed every check (choice {rank + 1} of {len(chosen)})"
        else:
            it.code, it.reason = "rear_kept", (
                f"kept rear-angle shot: CLIP similarity {it.scores['clip_identity']:.2f} to the character's images "
                f"is at least the calibrated {cfg.rear_clip_threshold:.2f} (choice {rank + 1} of {len(chosen)})")
    for i in cands:
        if i not in chosen_set:
            ctx.reject(items[i], "not_selected", f"passed every check, but {len(chosen)} images with higher scores "
                                                 f"or in emptier grid cells were chosen")
    if cfg.fill_from_drift and len(chosen) < cfg.k:
        _fill_from_drift(items, ctx, len(chosen))


# What each drift rule says drifted, in the reason of an image kept to fill K and in measures["drifted"].
_DRIFT_WORDS = {"off_background": "background", "off_hair": "hair", "off_wardrobe": "clothes"}


def _fill_from_drift(items: list[_Item], ctx: PassContext, n_strict: int) -> None:
    """Fill K from faces only drift rules rejected (CurateConfig.fill_from_drift), best identity first."""
    cfg = ctx.cfg
    pool = [i for i in ctx.members if items[i].code in DRIFT_CODES and not items[i].duplicate_of]
    pool.sort(key=lambda i: (-float(items[i].scores.get("identity") or 0.0), items[i].row.id))
    fill = pool[:cfg.k - n_strict]
    for rank, i in enumerate(fill):
        it = items[i]
        what = [_DRIFT_WORDS[c] for c in DRIFT_CODES if c in it.drift]
        it.measures["drifted"] = what
        detail = "; ".join(it.drift[c] for c in DRIFT_CODES if c in it.drift)
        it.code, it.reason = "selected_drifted", (
            f"kept to fill K ({n_strict} of {cfg.k} passed every check): the same person and passed every "
            f"identity and quality check, but its {' and '.join(what)} drifted ({detail}); "
            f"choice {n_strict + rank + 1} of {n_strict + len(fill)}")
    ctx.chosen = ctx.chosen + fill


# The passes in order; a new rule is a new function here (docs/curation.md lists them).
PASSES: tuple[Pass, ...] = (identity_pass, background_score_pass, rear_pass, background_outlier_pass,
                            off_hair_pass, off_wardrobe_pass, utility_pass, near_duplicate_pass, framing_pass,
                            select_pass)
