"""Background check of curation: CLIP against the spec's text, and pixel consistency.

Two signals feed one per-image background score in [0, 1]:

(a) **CLIP text contrast** — the image's CLIP embedding against the spec's
    background text and a few contrasting scenes; the score is the softmax
    probability of the spec's text (CLIP's logit scale, 100). A neutral grey
    studio backdrop drifting into "a room interior" loses probability.
(b) **Pixel consistency** — the border bands of every image (where the
    backdrop shows at every zoom level) in CIELAB, compared with the set's
    median (``likeness.scores.lab_border_stats`` / ``background_consistency``,
    the one definition).

Combined score = mean of the signals available. An image is *off-background*
when its score is an outlier low against the set (robust z-score from the
median and MAD) or below an absolute floor (off by default); see
docs/curation.md.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from likeness.backends.protocols import ClipModel
from likeness import scores

# CLIP's own logit scale (exp(4.6052) = 100) turns cosines into softmax logits.
CLIP_LOGIT_SCALE = 100.0
# Smallest side of the copy the border colours are measured on: colour means
# do not need more pixels, and Lab conversion of a 4k photo is slow.
_BORDER_SIDE = 192


def border_features(image: np.ndarray) -> np.ndarray:
    """12-d CIELAB border colours of one RGB image (downsized first for speed)."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = _BORDER_SIDE / max(1, min(h, w))
    if scale < 1.0:
        small = Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        image = np.asarray(small)
    return scores.lab_border_stats(image)


def clip_background_probability(
    image_embeddings: np.ndarray, clip: ClipModel, background: str, alternatives: Sequence[str]
) -> np.ndarray:
    """Softmax probability of ``background`` among ``[background, *alternatives]`` per image."""
    texts = [background, *[a for a in alternatives if a.strip().lower() != background.strip().lower()]]
    t = np.asarray(clip.embed_texts(texts), np.float64)
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    v = np.asarray(image_embeddings, np.float64)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    logits = CLIP_LOGIT_SCALE * (v @ t.T)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return (p[:, 0] / p.sum(axis=1)).astype(np.float32)


def background_scores(border: np.ndarray, clip_prob: np.ndarray | None, reference: np.ndarray) -> np.ndarray:
    """Per-image background score: mean of pixel consistency and (when given) CLIP probability.

    ``border``: (N, 12) border features of the images to score;
    ``reference``: indices of the rows that define "the set" for the median
    (the identity cluster's images), so off-identity photos cannot move it.
    """
    n = border.shape[0]
    if n == 0:
        return np.zeros(0, np.float32)
    ref = np.asarray(reference, np.int64)
    base = border[ref] if len(ref) else border
    # scores.background_consistency measures each row against the median of the
    # rows it is given; append one row at a time to the reference set's median.
    med = np.median(base, axis=0)
    pixel = np.array([scores.background_consistency(np.stack([med, row, med]))[1] for row in border], np.float32)
    if clip_prob is None:
        return pixel
    return ((pixel + np.asarray(clip_prob, np.float32)) / 2.0).astype(np.float32)


def background_outliers(values: np.ndarray, reference: np.ndarray, *, z: float, floor: float, min_drop: float) -> np.ndarray:
    """Boolean mask of off-background images.

    Off when ``score < floor`` or when the score is ``z`` robust deviations
    (1.4826 * MAD) below the reference median *and* at least ``min_drop``
    below it (so a set with almost no spread does not flag tiny differences).
    ``z <= 0`` turns the relative rule off.
    """
    v = np.asarray(values, np.float64)
    ref = v[np.asarray(reference, np.int64)] if len(reference) else v
    off = v < floor
    if z > 0 and ref.size >= 3:
        med = float(np.median(ref))
        mad = 1.4826 * float(np.median(np.abs(ref - med)))
        off |= (v < med - z * mad) & (v < med - min_drop)
    return off
