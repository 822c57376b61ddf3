"""Curation settings, reason codes, and the per-image checks (faces, blur, near-duplicates).

Each check returns a stable machine-readable ``reason_code`` and a sentence a
person understands. The order of the checks is the order of REASON_CODES
below: the first failing check names the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from likeness import scores
from likeness.config import bounded, check_bounds, from_dict
from likeness.errors import InvalidInput

# Every reason an image can get, in the order checks run. Stable: the caption,
# train and report stages and users' scripts match on these strings.
REASON_CODES: tuple[str, ...] = (
    "undecodable",          # the file is not a readable image (corrupt, bomb, unknown format)
    "image_too_small",      # decodable, but too few pixels to hold a face
    "no_face",              # no face found, and not a rear-angle shot
    "rear_kept",            # rear-angle shot without a face, kept: CLIP says it matches the identity's images
    "rear_rejected",        # rear-angle shot without a face, CLIP similarity too low (or the policy is off)
    "several_faces",        # a second face comparable in size to the main one
    "low_detection_score",  # the detector is unsure it is a face
    "face_too_small",       # the face is too small for the image's zoom level
    "blurry",               # the face is not sharp
    "identity_outlier",     # the face is not the character (far from the identity centroid)
    "off_background",       # the background is unlike the spec/the set
    "near_duplicate",       # a re-encoding, crop or mirror of a kept image
    "not_selected",         # passed every check; K images were chosen before it
    "selected",             # kept in the curated set
)
KEPT_CODES = frozenset({"selected", "rear_kept"})

# Minimum face-box area / image area per zoom word: half the lower end of the
# expected range in scores.ZOOM_FACE_AREA (a face 2x smaller than the smallest
# plausible face at that zoom means the image ignored its framing).
DEFAULT_MIN_FACE_AREA: dict[str, float] = {z: lo / 2.0 for z, (lo, _hi) in scores.ZOOM_FACE_AREA.items()}

# Contrasting scenes for the CLIP background check: common drifts of SD
# portraits away from a studio backdrop.
DEFAULT_BACKGROUND_ALTERNATIVES: tuple[str, ...] = (
    "a busy city street",
    "a forest",
    "a room interior with furniture",
    "a beach by the sea",
    "a colorful patterned background",
    "a dark night scene",
)


@dataclass(frozen=True)
class CurateConfig:
    # How many images the curated set holds: ~25 is what a textual inversion needs; at most 1000
    # (a request may not hold a device for the curation of a whole photo library).
    k: int = bounded(25, 1, 1000)
    # SCRFD confidence below which a face is doubtful (generated faces with
    # "Restore faces" score 0.8+; press photos >= 0.74 on the CPU pack).
    min_det_score: float = 0.6
    # Minimum face area / image area per zoom word or zoom index ("0".."4");
    # a face much smaller than its framing asks for is a failed image.
    min_face_area: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIN_FACE_AREA))
    # Used when the zoom is unknown (plain folders) or not in the table: any
    # plausible framing passes, down to a full-body face.
    min_face_area_fallback: float = 0.0004
    # Below ~32 px the 112 px aligned crop is upsampled mush: identity is noise.
    min_face_px: float = 32.0
    # "Several comparable faces": a second confident face (next two fields)
    # whose area is at least this fraction of the main face. Background faces
    # in real photos are <10% of the main one; couples and groups are 60-100%.
    several_faces_ratio: float = 0.5
    # A second face is confident when its detector score reaches this, or
    # comes within several_faces_det_margin of the main face's. Size alone
    # cannot tell a bystander from a partner: on the real photos two blurred,
    # frame-cut bystanders are 49% and 61% of the main face (one right at the
    # 50% edge), but the detector gives them 0.54 and 0.61, 0.20+ below the
    # main face, while every second person of a couple or group scores >= 0.74
    # and within 0.03 of the main face (or above it).
    several_faces_min_det: float = 0.7
    several_faces_det_margin: float = 0.1
    # scores.sharpness of the 112x112 grey face crop (Laplacian variance v ->
    # v/(v+100)); 0.15 is v ~ 18, visibly smeared.
    min_sharpness: float = 0.15
    # Same-person cosine threshold; None = the calibrated one of likeness.scores.
    identity_threshold: float | None = None
    # Near-duplicate = faces this similar AND the same source picture (below).
    near_dup_face_cosine: float = 0.75
    # RANSAC-consistent ORB matches (mirror-aware) that prove two images come
    # from one picture (re-encode, resize, crop, mirror); different photos of
    # one person give < 35 on the real photos, copies 75-480.
    near_dup_min_matches: int = 50
    # Pairs checked per image: its most similar faces only (keeps it O(n)).
    near_dup_neighbours: int = 8
    # Rear-angle shots without a face: "clip" keeps one when CLIP image cosine
    # to the identity's images is high enough; "off" rejects them all.
    rear_policy: Literal["clip", "off"] = "clip"
    # CLIP image cosine to the identity images' mean embedding to keep a rear shot.
    rear_clip_threshold: float = 0.8
    # Words in the angle name that mark a rear-angle shot.
    rear_angle_words: tuple[str, ...] = ("rear", "back", "behind")
    # Off-background when the background score is this many robust deviations
    # below the identity images' median (0 = relative rule off).
    background_outlier_z: float = 3.0
    # ...and at least this far below the median (a tight set is not nitpicked).
    background_min_drop: float = 0.15
    # Absolute floor of the background score (0 = off: CLIP probabilities
    # differ between CLIP models, so an absolute bar is opt-in).
    background_min_score: float = 0.0
    # Contrasting scenes for the CLIP background probability.
    background_alternatives: tuple[str, ...] = DEFAULT_BACKGROUND_ALTERNATIVES
    # Selection utility weights: identity first, then background, then quality.
    weight_identity: float = 1.0
    weight_background: float = 0.5
    weight_quality: float = 0.5
    # Fill every zoom x angle cell once before any cell gets a second image.
    spread_over_cells: bool = True
    # Seed of the random-K baseline (fixed: the uplift is reproducible).
    seed: int = 0
    # Images decoded and analysed per batch (memory vs batching benefit).
    batch_size: int = 32
    # Longest side images are reduced to after decoding: the detector works
    # at 640, and a 4k photo would cost memory for nothing.
    max_side: int = 1024


def validate_config(cfg: CurateConfig) -> CurateConfig:
    """Range checks with a fix in the message; returns ``cfg``."""
    def bad(name: str, why: str) -> None:
        raise InvalidInput(f"curate.{name}: {getattr(cfg, name)!r} {why}")

    check_bounds(cfg, "curate")
    for name in ("min_det_score", "several_faces_ratio", "several_faces_min_det", "several_faces_det_margin",
                 "min_sharpness", "min_face_area_fallback", "background_min_score", "background_min_drop"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            bad(name, "must be between 0 and 1")
    if cfg.several_faces_ratio <= 0:
        bad("several_faces_ratio", "must be above 0 (0.5 is the default)")
    for zoom, v in cfg.min_face_area.items():
        if not 0.0 <= v <= 1.0:
            raise InvalidInput(f"curate.min_face_area.{zoom}: {v} must be an area fraction between 0 and 1")
    if cfg.identity_threshold is not None and not -1.0 < cfg.identity_threshold < 1.0:
        bad("identity_threshold", "must be a cosine in (-1, 1), or unset for the calibrated value")
    for name in ("near_dup_face_cosine", "rear_clip_threshold"):
        if not -1.0 <= getattr(cfg, name) <= 1.01:
            bad(name, "must be a cosine between -1 and 1 (above 1 disables it)")
    for name in ("near_dup_min_matches", "near_dup_neighbours", "batch_size"):
        if getattr(cfg, name) < 1:
            bad(name, "must be at least 1")
    if cfg.min_face_px < 0 or cfg.background_outlier_z < 0:
        bad("min_face_px" if cfg.min_face_px < 0 else "background_outlier_z", "must not be negative")
    if cfg.max_side < 256:
        bad("max_side", "must be at least 256 (the detector needs the pixels)")
    if min(cfg.weight_identity, cfg.weight_background, cfg.weight_quality) < 0:
        raise InvalidInput("curate.weight_*: weights must not be negative")
    return cfg


def curate_config_from_dict(data: Mapping[str, Any] | None) -> CurateConfig:
    """Build and validate a config from a plain dict (TOML/JSON/CLI); unknown keys fail."""
    return validate_config(from_dict(CurateConfig, dict(data or {}), "curate"))


def min_face_area_for(cfg: CurateConfig, zoom: str, zoom_index: int) -> float:
    """The face-area floor of one image: by zoom word, then zoom index, then the fallback."""
    if zoom and zoom in cfg.min_face_area:
        return cfg.min_face_area[zoom]
    if zoom_index >= 0 and str(zoom_index) in cfg.min_face_area:
        return cfg.min_face_area[str(zoom_index)]
    return cfg.min_face_area_fallback


def is_rear_angle(cfg: CurateConfig, angle: str) -> bool:
    """Whether the manifest's angle names a rear-angle shot (faces are not expected)."""
    a = angle.lower()
    return bool(a) and any(w in a for w in cfg.rear_angle_words)


@dataclass(frozen=True)
class FaceCheck:
    """The outcome of the face checks of one image."""

    # None when every check passed.
    reason_code: str | None
    reason: str
    # Numbers measured on the way (JSON-ready), reported in curation.json.
    measures: dict[str, float]


def check_faces(cfg: CurateConfig, faces: Sequence[Any], image: np.ndarray, zoom: str, zoom_index: int) -> FaceCheck:
    """Several faces, detection score, size for the zoom level, sharpness: first failure wins.

    ``faces``: the image's FaceRecords, largest first (non-empty).
    """
    main = faces[0]
    h, w = image.shape[:2]
    side = min(main.bbox[2] - main.bbox[0], main.bbox[3] - main.bbox[1])
    crop = scores.face_gray_crop(image, main.bbox)
    sharp = scores.sharpness(crop) if crop.size else 0.0
    zoom_key = zoom or None
    m: dict[str, float] = {
        "n_faces": float(len(faces)),
        "det_score": round(float(main.det_score), 4),
        "face_area": round(float(main.area_ratio), 5),
        "face_px": round(float(side), 1),
        "sharpness": round(float(sharp), 4),
        "quality": round(scores.quality(main.det_score, main.area_ratio, sharp, zoom_key if zoom_key in scores.ZOOM_FACE_AREA else None), 4),
    }
    # Only confident faces count as competitors (a poster face at 0.3 is noise, a
    # blurred bystander cut by the frame is detected far less surely than the main face).
    rival_det = max(0.5, min(cfg.several_faces_min_det, main.det_score - cfg.several_faces_det_margin))
    rivals = [f for f in faces[1:] if f.det_score >= rival_det]
    if rivals:
        ratio = max(f.area_ratio for f in rivals) / max(main.area_ratio, 1e-9)
        m["second_face_ratio"] = round(float(ratio), 4)
        if ratio >= cfg.several_faces_ratio:
            return FaceCheck("several_faces", (
                f"{len(rivals) + 1} faces: the second is {ratio:.0%} of the main face's size "
                f"(limit {cfg.several_faces_ratio:.0%}), so the image does not show one person"), m)
    if main.det_score < cfg.min_det_score:
        return FaceCheck("low_detection_score", (
            f"face detection score {main.det_score:.2f} is below {cfg.min_det_score:.2f}: "
            "the detector is unsure this is a clear face"), m)
    floor = min_face_area_for(cfg, zoom, zoom_index)
    if main.area_ratio < floor or side < cfg.min_face_px:
        where = f"for a {zoom!r} image" if zoom else "for any framing"
        return FaceCheck("face_too_small", (
            f"face is too small {where}: {main.area_ratio:.2%} of the image (minimum {floor:.2%}), "
            f"{side:.0f} px wide (minimum {cfg.min_face_px:.0f} px)"), m)
    if sharp < cfg.min_sharpness:
        return FaceCheck("blurry", (
            f"face is blurry: sharpness {sharp:.2f} is below {cfg.min_sharpness:.2f}"), m)
    return FaceCheck(None, "", m)


# --- near-duplicates ----------------------------------------------------------

_ORB_SIDE = 512  # keypoints are found on a copy this long; enough for re-encodes and crops


def orb_features(image: np.ndarray) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """ORB keypoints+descriptors of an RGB or grey image and of its mirror (for mirrored copies)."""
    import cv2

    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    s = _ORB_SIDE / max(gray.shape)
    if s < 1.0:
        gray = cv2.resize(gray, (max(1, int(gray.shape[1] * s)), max(1, int(gray.shape[0] * s))), interpolation=cv2.INTER_AREA)
    orb = cv2.ORB_create(nfeatures=500)
    plain = orb.detectAndCompute(gray, None)
    mirror = orb.detectAndCompute(np.ascontiguousarray(gray[:, ::-1]), None)
    return plain, mirror


def _consistent_matches(a: tuple[Any, Any], b: tuple[Any, Any]) -> int:
    import cv2

    (ka, da), (kb, db) = a, b
    if da is None or db is None or len(ka) < 8 or len(kb) < 8:
        return 0
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(da, db, k=2)
    # Lowe's ratio test drops ambiguous matches (skin, hair, plain backdrops).
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.75 * p[1].distance]
    if len(good) < 8:
        return 0
    src = np.float32([ka[g.queryIdx].pt for g in good])
    dst = np.float32([kb[g.trainIdx].pt for g in good])
    # A similarity transform covers resize + crop; mirror is handled by features.
    _, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=5.0)
    return int(mask.sum()) if mask is not None else 0


def same_picture_matches(a: tuple[tuple[Any, Any], tuple[Any, Any]], b: tuple[tuple[Any, Any], tuple[Any, Any]]) -> int:
    """Geometrically consistent ORB matches between two images, the better of plain and mirrored."""
    return max(_consistent_matches(a[0], b[0]), _consistent_matches(a[0], b[1]))


def near_duplicate_pairs(
    embeddings: np.ndarray, images: Sequence[np.ndarray], cfg: CurateConfig
) -> list[tuple[int, int, float, int]]:
    """Pairs (i, j, face cosine, matches), i < j, that are near-duplicates.

    Candidates: each face's ``near_dup_neighbours`` most similar faces (faiss
    kNN) with cosine >= ``near_dup_face_cosine``; confirmed when the two
    pictures share >= ``near_dup_min_matches`` consistent ORB matches.
    """
    import faiss

    n = len(images)
    cache: dict[int, Any] = {}

    def feats(i: int) -> Any:
        # Lazily: only images with a similar face pay for keypoints.
        if i not in cache:
            cache[i] = orb_features(images[i])
        return cache[i]

    if n < 2:
        return []
    x = np.ascontiguousarray(embeddings, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, nbrs = index.search(x, min(n, cfg.near_dup_neighbours + 1))
    seen: set[tuple[int, int]] = set()
    out = []
    for i in range(n):
        for s, j in zip(sims[i], nbrs[i]):
            j = int(j)
            if j < 0 or j == i or s < cfg.near_dup_face_cosine:
                continue
            key = (min(i, j), max(i, j))
            if key in seen:
                continue
            seen.add(key)
            m = same_picture_matches(feats(key[0]), feats(key[1]))
            if m >= cfg.near_dup_min_matches:
                out.append((key[0], key[1], float(s), m))
    return sorted(out)
