"""Hair and wardrobe colour: the regions above and below the face, against the gallery's consensus.

The artist's first manual pass removes images whose hair or clothes drifted from the prompt
(red curly hair turned blonde, the green jumper turned into a white shirt) before looking at
faces. This module measures the two regions per image, in face-box units so one rule fits every
zoom level:

- **hair**: the band above the face box (from half a face height above it to just inside its top
  edge), a little wider than the face;
- **wardrobe**: below the chin, skipping the neck (from 0.3 to 1.4 face heights under the box),
  twice the face's width.

Each region's colours are the CIELAB histograms (L, a and b marginals) of its pixels that do not look like the
backdrop (farther than ``_BACKDROP_DE`` from the mean colour of the top border band and of the side
bands above the face, where only backdrop shows at every zoom): the backdrop is
checked by the background pass, and at full body it fills most of a region. A region with too few
pixels in the frame (an extreme closeup shows no wardrobe; a face at the top edge no hair) is not
measured, and an image without a measurement is never rejected by it.

The rule (:func:`colour_outliers`): the consensus is the per-bin median histogram over the
character's images, each image's distance is the Hellinger distance to it, and an image is off when its distance is
both ``z`` robust deviations (1.4826 x MAD of the character's distances) above their median and
at least ``min_delta`` (thresholds in ``CurateConfig``, with the numbers they were measured on).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Regions in face-box units: (x0, y0, x1, y1) with (0, 0) the box's top left and (1, 1) its bottom right.
REGIONS: dict[str, tuple[float, float, float, float]] = {
    "hair": (-0.35, -0.5, 1.35, 0.7),
    "wardrobe": (-0.5, 1.3, 1.5, 2.4),
}
# Left out of a region: the face box itself (skin is not hair), in the same units.
_EXCLUDE: dict[str, tuple[float, float, float, float]] = {"hair": (0.0, 0.05, 1.0, 1.0)}
# A region is measured when at least this share of it lies in the frame, with >= _MIN_PIXELS pixels
# (a 30 px full-body face still gives a 39x16 px hair band).
_MIN_INSIDE = 0.4
_MIN_PIXELS = 48
# Pixels within this delta-E of a border band's mean colour are backdrop, not hair or clothes
# (2.3 is a just-noticeable difference; a grey studio backdrop's own gradient stays within ~10).
_BACKDROP_DE = 12.0
# If fewer than this share of a region's pixels are left after removing the backdrop, the whole
# region is used (dark hair on a dark backdrop is still hair).
_MIN_FOREGROUND = 0.15
_BAND = 0.08  # border band width, as scores.lab_border_stats
# Histogram bins per CIELAB channel and their ranges (L 0-100; a, b -60..60 hold every hair and
# fabric colour; the ends collect the rest). 12 bins = ~8 delta-E each, near the spread of one
# colour under studio light, so one hair colour falls in 1-3 bins of each channel.
_BINS = 12
_RANGES = ((0.0, 100.0), (-60.0, 60.0), (-60.0, 60.0))


def _lab(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(rgb[..., :3], np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def region_box(face_box: Sequence[float], region: str, width: int, height: int) -> tuple[int, int, int, int, float]:
    """Pixel box (x0, y0, x1, y1) of ``region`` for a face box in pixels, clipped to the frame, and its inside share."""
    fx0, fy0, fx1, fy1 = (float(v) for v in face_box)
    fw, fh = max(fx1 - fx0, 1.0), max(fy1 - fy0, 1.0)
    rx0, ry0, rx1, ry1 = REGIONS[region]
    x0, x1 = fx0 + rx0 * fw, fx0 + rx1 * fw
    y0, y1 = fy0 + ry0 * fh, fy0 + ry1 * fh
    full = (x1 - x0) * (y1 - y0)
    cx0, cy0 = max(0, int(round(x0))), max(0, int(round(y0)))
    cx1, cy1 = min(width, int(round(x1))), min(height, int(round(y1)))
    inside = max(0, cx1 - cx0) * max(0, cy1 - cy0) / full if full > 0 else 0.0
    return cx0, cy0, cx1, cy1, float(inside)


def region_colours(image: np.ndarray, face_box: Sequence[float]) -> dict[str, list[float] | None]:
    """Colour histograms of the hair and wardrobe regions of one RGB image; None where not visible.

    ``face_box``: the main face's box in pixels of ``image``. Each histogram is the CIELAB
    marginals (L, a, b: ``_BINS`` bins each over ``_RANGES``), each normalised to sum 1, concatenated:
    a mixture (long brown hair over a white shirt) stays a mixture, where a mean or median colour
    would be a colour nobody wears.
    """
    h, w = image.shape[:2]
    bh, bw = max(1, int(round(h * _BAND))), max(1, int(round(w * _BAND)))
    # Backdrop colours: the top band and the side bands above the face's centre. Not the bottom band
    # nor the sides lower down: from a medium shot on, the clothes and arms reach them.
    # (CIELAB is per pixel: only the bands and the regions are converted, not the whole frame.)
    mid = max(bh, int(round((float(face_box[1]) + float(face_box[3])) / 2)))
    bands = np.stack([_lab(image[:bh]).reshape(-1, 3).mean(0), _lab(image[:mid, :bw]).reshape(-1, 3).mean(0),
                      _lab(image[:mid, w - bw:]).reshape(-1, 3).mean(0)])
    out: dict[str, list[float] | None] = {}
    for name in REGIONS:
        x0, y0, x1, y1, inside = region_box(face_box, name, w, h)
        keep = np.ones((max(0, y1 - y0), max(0, x1 - x0)), bool)
        if name in _EXCLUDE:
            fx0, fy0, fx1, fy1 = (float(v) for v in face_box)
            fw, fh = fx1 - fx0, fy1 - fy0
            ex0, ey0, ex1, ey1 = _EXCLUDE[name]
            keep[max(0, int(fy0 + ey0 * fh) - y0):max(0, int(fy0 + ey1 * fh) - y0),
                 max(0, int(fx0 + ex0 * fw) - x0):max(0, int(fx0 + ex1 * fw) - x0)] = False
        if inside < _MIN_INSIDE or int(keep.sum()) < _MIN_PIXELS:
            out[name] = None
            continue
        px = _lab(image[y0:y1, x0:x1])[keep]
        # delta-E to the nearest backdrop colour, one band at a time over whole columns (the same sums
        # in the same order as a norm over a (pixels, bands, 3) array, without its small-axis reductions).
        cols = [np.ascontiguousarray(px[:, c]) for c in range(3)]
        d2 = None
        for band in bands:
            dk = (cols[0] - band[0]) ** 2 + (cols[1] - band[1]) ** 2 + (cols[2] - band[2]) ** 2
            d2 = dk if d2 is None else np.minimum(d2, dk)
        de = np.sqrt(d2)
        fg = px[de > _BACKDROP_DE]
        use = fg if fg.shape[0] >= max(_MIN_PIXELS // 2, _MIN_FOREGROUND * px.shape[0]) else px
        hists = []
        for c, (lo, hi) in enumerate(_RANGES):
            hist, _ = np.histogram(np.clip(use[:, c], lo, hi), bins=_BINS, range=(lo, hi))
            hists.append(hist / max(1, hist.sum()))
        out[name] = [round(float(v), 4) for v in np.concatenate(hists)]
    return out


def hellinger(p: np.ndarray, q: np.ndarray) -> float:
    """Hellinger distance of two concatenated marginal histograms (mean over the 3 channels), in [0, 1]."""
    p = np.asarray(p, np.float64).reshape(3, -1)
    q = np.asarray(q, np.float64).reshape(3, -1)
    bc = np.sum(np.sqrt(np.clip(p, 0, None) * np.clip(q, 0, None)), axis=1)
    return float(np.mean(np.sqrt(np.clip(1.0 - bc, 0.0, 1.0))))


def colour_distances(colours: Sequence[Sequence[float] | None], reference: Sequence[int]) -> tuple[np.ndarray, list[float] | None]:
    """Hellinger distance of every measured histogram to the consensus (per-bin median over the measured ``reference`` rows).

    Returns (distances with NaN where unmeasured, the consensus histogram or None when no reference row is measured).
    """
    ref = [colours[i] for i in reference if colours[i] is not None]
    d = np.full(len(colours), np.nan)
    if not ref:
        return d, None
    med = np.median(np.asarray(ref, np.float64), axis=0).reshape(3, -1)
    med = (med / np.maximum(med.sum(axis=1, keepdims=True), 1e-12)).reshape(-1)
    for n, c in enumerate(colours):
        if c is not None:
            d[n] = hellinger(np.asarray(c), med)
    return d, [round(float(v), 4) for v in med]


def colour_outliers(distances: np.ndarray, reference: Sequence[int], *, z: float, min_delta: float,
                    min_reference: int = 5, max_consensus: float | None = None) -> tuple[np.ndarray, float]:
    """Boolean mask of off-colour rows, and the distance limit used (inf: the rule could not run).

    Off when the distance exceeds ``median + z * 1.4826 * MAD`` of the reference rows' distances
    and ``min_delta``. No consensus, nothing off: fewer than ``min_reference`` measured reference
    rows, or their median distance to the consensus above ``max_consensus`` (the character's own
    images do not agree on these colours, so none of them drifted from anything).
    """
    d = np.asarray(distances, np.float64)
    ref = d[np.asarray(list(reference), np.int64)] if len(reference) else d[:0]
    ref = ref[~np.isnan(ref)]
    if ref.size < min_reference or z <= 0:
        return np.zeros(d.shape, bool), float("inf")
    med = float(np.median(ref))
    if max_consensus is not None and med > max_consensus:
        return np.zeros(d.shape, bool), float("inf")
    mad = 1.4826 * float(np.median(np.abs(ref - med)))
    limit = max(med + z * mad, min_delta)
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(d, nan=-1.0) > limit, limit
