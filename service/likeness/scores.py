"""Consistency scores: the one definition, used by curation, training, evaluation and reports.

Pure numpy (PIL only lazily, for resizing face crops). Every formula is in the
docstring of the function that computes it and in ``docs/scores.md``.

Conventions: an embedding is an L2-normalised identity vector of an image's
*main* (largest) face; ``None`` stands for an image where no face was found.
Cosines are in [-1, 1]; every ``*_score`` is in [0, 1], higher is better.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from likeness.backends.protocols import ClipModel

# Calibrated cosine threshold of the CPU pack (MobileFaceNet-128d) on LFW View-1's
# training split (realdata lfw_view1_devtrain/pairsDevTrain.txt, 1,084 same + 1,091
# different pairs): accuracy 0.989 in-sample, 0.988 5-fold CV, and 0.993 on the
# independent deepface pairs at the same threshold (0.4558, fitted on those 300 easy
# pairs alone, gave 0.965 on held-out LFW). See calibration_table.json and docs/scores.md.
# Same person iff cosine(main faces) >= threshold.
IDENTITY_THRESHOLD = 0.3133
# Typical cosines of the CPU pack on those pairs (means of the two classes):
# the anchors of identity_score's map to [0, 1].
SAME_PERSON_COSINE = 0.6444
DIFFERENT_PERSON_COSINE = 0.0147

# Weights of the overall score (sum 1). Identity dominates: it is the point
# of the character; background and quality next; coverage keeps variety.
OVERALL_WEIGHTS: Mapping[str, float] = {"identity": 0.5, "background": 0.2, "quality": 0.15, "coverage": 0.15}

# Expected face-box area / image area per zoom level (the grid's names), for
# 512x512-ish frames. Outside the range the size score decays in log2 space.
ZOOM_FACE_AREA: Mapping[str, tuple[float, float]] = {
    "extreme closeup": (0.20, 1.00),
    "closeup": (0.07, 0.40),
    "medium closeup": (0.03, 0.20),
    "medium shot": (0.008, 0.08),
    "full body": (0.0008, 0.025),
}
# Laplacian variance (0-255 grey, 112x112 crop) at which sharpness is 0.5.
SHARPNESS_HALF = 100.0
# CIE76 delta-E at which a border's background score is 1/e (~0.37); 2.3 is a
# just-noticeable difference, 20+ a different backdrop.
BACKGROUND_DELTA_E = 20.0


@dataclass(frozen=True)
class IdentityScale:
    """Maps a cosine to [0, 1]: 0 at a typical different-person cosine, 0.5 at the threshold, 1 at a typical same-person one."""

    # Calibrated decision threshold (pair cosine).
    threshold: float = IDENTITY_THRESHOLD
    # Mean different-person pair cosine of the pack.
    different: float = DIFFERENT_PERSON_COSINE
    # Mean same-person pair cosine of the pack.
    same: float = SAME_PERSON_COSINE

    def __post_init__(self) -> None:
        if not self.different < self.threshold < self.same:
            raise ValueError(f"IdentityScale needs different < threshold < same, got {self}")


DEFAULT_SCALE = IdentityScale()


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-12)


def _stack(embeddings: Sequence[np.ndarray | None] | np.ndarray) -> tuple[np.ndarray, int]:
    """(F, D) unit vectors of the images that have a face, and the image count."""
    if isinstance(embeddings, np.ndarray):
        arr = np.atleast_2d(np.asarray(embeddings, np.float64))
        return (_unit(arr) if arr.size else arr.reshape(0, 0)), arr.shape[0]
    rows = [np.asarray(e, np.float64).ravel() for e in embeddings if e is not None]
    if not rows:
        return np.zeros((0, 0)), len(embeddings)
    return _unit(np.stack(rows)), len(embeddings)


def identity_centroid(embeddings: np.ndarray) -> np.ndarray:
    """Normalised mean of unit embeddings: ``c = sum(e_i) / ||sum(e_i)||`` (rows re-normalised first)."""
    arr, _ = _stack(embeddings)
    if arr.shape[0] == 0:
        raise ValueError("identity_centroid needs at least one face embedding")
    return _unit(arr.mean(axis=0)).astype(np.float32)


def identity_similarities(embeddings: np.ndarray, centroid: np.ndarray) -> np.ndarray:
    """Cosine of each embedding to the centroid: ``s_i = <e_i/||e_i||, c/||c||>``."""
    arr = _unit(np.atleast_2d(np.asarray(embeddings, np.float64)))
    return (arr @ _unit(np.asarray(centroid, np.float64).ravel())).astype(np.float32)


def pairwise_cosines(embeddings: np.ndarray) -> np.ndarray:
    """Upper-triangle cosines of all pairs (i < j), as a flat array."""
    arr, _ = _stack(embeddings)
    if arr.shape[0] < 2:
        return np.zeros(0, np.float32)
    sims = arr @ arr.T
    iu = np.triu_indices(arr.shape[0], k=1)
    return sims[iu].astype(np.float32)


def identity_score(cosine: float | np.ndarray, scale: IdentityScale = DEFAULT_SCALE) -> float | np.ndarray:
    """Cosine -> [0, 1], piecewise linear through (different, 0), (threshold, 0.5), (same, 1), clipped.

    Anchored on the calibrated threshold so 0.5 means "exactly at the
    same-person decision boundary", whatever the face pack.
    """
    x = np.asarray(cosine, np.float64)
    lo = 0.5 * (x - scale.different) / (scale.threshold - scale.different)
    hi = 0.5 + 0.5 * (x - scale.threshold) / (scale.same - scale.threshold)
    out = np.clip(np.where(x < scale.threshold, lo, hi), 0.0, 1.0)
    return float(out) if out.ndim == 0 else out


def same_person(cosine: float, threshold: float = IDENTITY_THRESHOLD) -> bool:
    """The verification decision: ``cosine >= threshold``."""
    return bool(cosine >= threshold)


# --- quality ---------------------------------------------------------------

def sharpness(gray_crop: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of a grey crop (0-255 scale), mapped to [0, 1).

    ``v = var(4*I[y,x] - I[y-1,x] - I[y+1,x] - I[y,x-1] - I[y,x+1])`` over the
    interior, ``sharpness = v / (v + SHARPNESS_HALF)``. Compare crops of one
    size: use :func:`face_gray_crop` (112x112) so zoom levels are comparable.
    """
    g = np.asarray(gray_crop, np.float64)
    if g.ndim == 3:
        g = g @ np.array([0.299, 0.587, 0.114])[: g.shape[2]] if g.shape[2] == 3 else g.mean(axis=2)
    if g.ndim != 2 or g.shape[0] < 3 or g.shape[1] < 3:
        return 0.0
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    v = float(lap.var())
    return v / (v + SHARPNESS_HALF)


def face_gray_crop(image: np.ndarray, bbox: Sequence[float], size: int = 112, *, enlarge: bool = True) -> np.ndarray:
    """The face box of an RGB image as a ``size``x``size`` grey float array (for :func:`sharpness`).

    ``enlarge=False``: a face whose box is narrower than ``size`` on either side is squared at its
    own shorter side instead (only ever shrunk), so no interpolation blur is added to a small face.
    """
    from PIL import Image

    h, w = image.shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in bbox)
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return np.zeros((0, 0))
    if not enlarge:
        size = min(size, x2 - x1, y2 - y1)
    crop = Image.fromarray(np.ascontiguousarray(image[y1:y2, x1:x2])).convert("L")
    return np.asarray(crop.resize((size, size), Image.BILINEAR), np.float64)


def face_size_score(area_ratio: float, zoom: str | None = None) -> float:
    """1 inside the zoom's expected face-area range, ``max(0, 1 - |log2(ratio/bound)|/2)`` outside.

    So a face 2x too small/large scores 0.5, 4x scores 0. Unknown or no zoom:
    the union of all ranges is used (any plausible face size scores 1).
    """
    if area_ratio <= 0:
        return 0.0
    lo, hi = ZOOM_FACE_AREA.get(zoom or "", (min(r[0] for r in ZOOM_FACE_AREA.values()), 1.0))
    if lo <= area_ratio <= hi:
        return 1.0
    bound = lo if area_ratio < lo else hi
    return float(max(0.0, 1.0 - abs(np.log2(area_ratio / bound)) / 2.0))


def quality(det_score: float, area_ratio: float, sharp: float, zoom: str | None = None) -> float:
    """Per-image quality: geometric mean of detection score, face-size score and sharpness.

    ``quality = (det_score * face_size_score(area_ratio, zoom) * sharp) ** (1/3)``;
    any one failing (no face, wrong size, blur) pulls it to 0. No face -> 0.
    """
    parts = [min(max(float(det_score), 0.0), 1.0), face_size_score(area_ratio, zoom), min(max(float(sharp), 0.0), 1.0)]
    return float(np.prod(parts) ** (1.0 / 3.0))


# --- background ------------------------------------------------------------

def _srgb_linear(c: np.ndarray) -> np.ndarray:
    """sRGB values in [0, 1] -> linear light (the sRGB transfer function)."""
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


# The transfer function of every uint8 value: a uint8 image is linearised by indexing, with the very
# numbers the formula gives (the power per pixel was ~60% of a conversion's time).
_SRGB_LINEAR_U8 = _srgb_linear(np.arange(256, dtype=np.float64) / 255.0)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 (..., 3) -> CIELAB (D65), the standard formulas."""
    rgb = np.asarray(rgb)
    lin = _SRGB_LINEAR_U8[rgb] if rgb.dtype == np.uint8 else _srgb_linear(np.asarray(rgb, np.float64) / 255.0)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_border_stats(image: np.ndarray, band: float = 0.08) -> np.ndarray:
    """Mean CIELAB colour of the top, bottom, left and right border bands: a 12-vector.

    The bands are ``band`` of the side (8%): where the background shows at
    every zoom level. Order: top L,a,b, bottom L,a,b, left L,a,b, right L,a,b.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"lab_border_stats needs an RGB HxWx3 array, got shape {img.shape}")
    h, w = img.shape[:2]
    bh, bw = max(1, int(round(h * band))), max(1, int(round(w * band)))
    lab = _srgb_to_lab(img[..., :3])
    sides = [lab[:bh], lab[h - bh:], lab[:, :bw], lab[:, w - bw:]]
    return np.concatenate([s.reshape(-1, 3).mean(axis=0) for s in sides]).astype(np.float32)


def background_consistency(features: np.ndarray) -> np.ndarray:
    """Per-image background score in [0, 1] from :func:`lab_border_stats` rows.

    ``dE_i`` = mean over the 4 sides of the CIE76 distance between image i's
    side colour and the set's per-side median colour;
    ``score_i = exp(-dE_i / BACKGROUND_DELTA_E)``. The median makes the
    reference robust to a few off-backdrop images.
    """
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[1] % 3:
        raise ValueError(f"background_consistency needs an (N, 3k) array of Lab rows, got shape {f.shape}")
    if f.shape[0] == 0:
        return np.zeros(0, np.float32)
    med = np.median(f, axis=0)
    d = (f - med).reshape(f.shape[0], -1, 3)
    de = np.linalg.norm(d, axis=2).mean(axis=1)
    return np.exp(-de / BACKGROUND_DELTA_E).astype(np.float32)


# --- grid coverage ---------------------------------------------------------

def grid_coverage(cells: Sequence[Any], total_cells: int) -> float:
    """Distinct grid cells present / ``min(total_cells, len(cells))``.

    Judges a set on how well it spreads *given its size*: 25 images over 25
    (zoom, angle) cells score 1.0 when every cell appears once; 3 images in 3
    different cells also score 1.0. Empty set -> 0.
    """
    if not cells or total_cells <= 0:
        return 0.0
    return min(1.0, len(set(cells)) / min(total_cells, len(cells)))


# --- prompt adherence ------------------------------------------------------

def strip_token(prompt: str, token: str) -> str:
    """The prompt without the identity token (and A1111 attention around it: ``(tok:1.2)``, ``[tok]``)."""
    if not token:
        return prompt
    t = re.escape(token)
    out = re.sub(rf"[\(\[]\s*{t}\s*(?::\s*[0-9.]+)?\s*[\)\]]", " ", prompt)
    out = re.sub(rf"(?<![\w]){t}(?![\w])", " ", out)
    out = re.sub(r"\s*,\s*(,\s*)+", ", ", out)
    out = re.sub(r"\s+,", ",", re.sub(r"\s+", " ", out))
    return out.strip(" ,")


def clip_t(clip: ClipModel, images: Sequence[Any], prompts: Sequence[str], token: str | None = None) -> np.ndarray:
    """CLIP-T per image: ``cos(clip_image(img_i), clip_text(prompt_i))``, raw cosine.

    ``token`` (the identity token) is removed from each prompt first, so the
    score measures the scene/pose/framing, not a word CLIP never saw.
    """
    if len(images) != len(prompts):
        raise ValueError(f"clip_t needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    if not images:
        return np.zeros(0, np.float32)
    texts = [strip_token(p, token) if token else p for p in prompts]
    uniq = list(dict.fromkeys(texts))
    t = np.asarray(clip.embed_texts(uniq), np.float64)
    idx = np.array([uniq.index(x) for x in texts])
    v = np.asarray(clip.embed_images(images), np.float64)
    return np.sum(_unit(v) * _unit(t[idx]), axis=1).astype(np.float32)


# --- per image and per set -------------------------------------------------

@dataclass(frozen=True)
class ImageScores:
    """Scores of one image within a set (None where not measured)."""

    # Cosine of the main face to the set's identity centroid; None = no face.
    identity: float | None
    # Background score in [0, 1] (border colour and/or CLIP, see background_consistency).
    background: float | None
    # Quality in [0, 1] (see quality()).
    quality: float | None
    # CLIP-T against the prompt without the identity token (raw cosine).
    prompt_adherence: float | None

    def to_dict(self) -> dict[str, float | None]:
        return {k: (None if v is None else round(float(v), 4)) for k, v in asdict(self).items()}


def image_scores(
    embedding: np.ndarray | None,
    centroid: np.ndarray | None,
    *,
    background: float | None = None,
    quality: float | None = None,
    prompt_adherence: float | None = None,
) -> ImageScores:
    """One image's scores; ``identity = cos(embedding, centroid)`` (None without a face or centroid)."""
    ident = None
    if embedding is not None and centroid is not None:
        ident = float(identity_similarities(np.asarray(embedding)[None], centroid)[0])
    f = lambda x: None if x is None else float(x)  # noqa: E731
    return ImageScores(ident, f(background), f(quality), f(prompt_adherence))


@dataclass(frozen=True)
class SetScores:
    """Scores of a set of images (a curated set, a pool, a baseline subset)."""

    n_images: int
    # Images whose main face was found (only these carry identity).
    n_faces: int
    # Mean / min cosine of faces to the normalised mean face (centroid).
    identity_mean_to_centroid: float | None
    identity_min_to_centroid: float | None
    # Mean cosine over all face pairs: comparable to the calibrated pair threshold.
    identity_mean_pairwise: float | None
    # identity_score(mean pairwise) * n_faces / n_images, in [0, 1].
    identity_consistency: float
    # Mean per-image background score in [0, 1]; None when not measured.
    background_consistency: float | None
    # Mean per-image quality in [0, 1]; None when not measured.
    quality: float | None
    # Distinct grid cells / min(total cells, n_images); None when cells unknown.
    grid_coverage: float | None
    # Weighted mean of the measured components, in [0, 1].
    overall: float
    # The weights actually used (renormalised over measured components).
    weights: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            out[k] = round(v, 4) if isinstance(v, float) else v
        out["weights"] = {k: round(v, 4) for k, v in self.weights.items()}
        return out


def _mean(x: Sequence[float | None] | np.ndarray | None) -> float | None:
    if x is None:
        return None
    vals = [float(v) for v in np.asarray(x, dtype=object).ravel() if v is not None and np.isfinite(float(v))]
    return float(np.mean(vals)) if vals else None


def set_scores(
    embeddings: Sequence[np.ndarray | None] | np.ndarray,
    *,
    background: Sequence[float | None] | np.ndarray | None = None,
    quality: Sequence[float | None] | np.ndarray | None = None,
    cells: Sequence[Any] | None = None,
    total_cells: int = 25,
    scale: IdentityScale = DEFAULT_SCALE,
    weights: Mapping[str, float] = OVERALL_WEIGHTS,
) -> SetScores:
    """Scores of one set. ``embeddings``: one main-face embedding per image (None = no face).

    - identity: centroid ``c`` = normalised mean face; mean and min of
      ``cos(e_i, c)``; mean pairwise cosine ``P`` over faces;
      ``identity_consistency = identity_score(P) * n_faces / n_images``
      (a faceless image counts as a failure); with fewer than two faces
      ``P`` is None and identity_consistency 0 (one face is no evidence).
    - background_consistency = mean of per-image background scores.
    - quality = mean of per-image qualities.
    - grid_coverage = :func:`grid_coverage` of ``cells`` (one per image).
    - overall = ``sum(w_k * x_k) / sum(w_k)`` over measured components
      (identity always; the others when given), in [0, 1].
    """
    faces, n_images = _stack(embeddings)
    n_faces = faces.shape[0]
    if cells is not None and len(cells) != n_images:
        raise ValueError(f"set_scores: {len(cells)} cells for {n_images} images")
    mean_c = min_c = pair = None
    ident = 0.0
    if n_faces:
        c = _unit(faces.mean(axis=0))
        sims = faces @ c
        mean_c, min_c = float(sims.mean()), float(sims.min())
        # Consistency needs at least two faces: one face is consistent with itself by definition, which
        # says nothing about a character (issue 11: a pool of 50 strangers kept 1 face and reported 1.00).
        if n_faces >= 2:
            pair = float(pairwise_cosines(faces).mean())
            ident = float(identity_score(pair, scale)) * n_faces / max(n_images, 1)
    comps: dict[str, float | None] = {
        "identity": ident,
        "background": _mean(background),
        "quality": _mean(quality),
        "coverage": grid_coverage(list(cells), total_cells) if cells is not None else None,
    }
    used = {k: float(weights.get(k, 0.0)) for k, v in comps.items() if v is not None and weights.get(k, 0.0) > 0}
    total = sum(used.values())
    used = {k: w / total for k, w in used.items()} if total > 0 else {}
    overall = float(np.clip(sum(w * float(comps[k]) for k, w in used.items()), 0.0, 1.0))  # type: ignore[arg-type]
    return SetScores(
        n_images=n_images, n_faces=n_faces,
        identity_mean_to_centroid=mean_c, identity_min_to_centroid=min_c, identity_mean_pairwise=pair,
        identity_consistency=ident, background_consistency=comps["background"], quality=comps["quality"],
        grid_coverage=comps["coverage"], overall=overall, weights=used,
    )
