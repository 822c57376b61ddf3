"""Measured framing and pose: the zoom level the face's size shows, and the yaw its landmarks show.

Stable Diffusion often ignores the framing and angle words of a prompt ("rear angle" gives a face,
"full body" a closeup), and the workflow re-labels zooms by what is visible before captioning. So
curation measures both per image and reports where the prompt's label and the picture disagree:

- **zoom**: the face box's share of the frame, against the expected range of each of the five zoom
  words (``likeness.scores.ZOOM_FACE_AREA``, the one table face-size quality uses). The measured
  zoom is the word whose range's geometric centre is nearest in log space, so the boundaries sit at
  the geometric means of neighbouring centres (:data:`ZOOM_BOUNDARIES`). A label disagrees when the
  face lies outside its own word's range.
- **yaw**: from the 5 landmarks, the nose tip's offset from the eyes' midpoint along the eye line,
  in half inter-eye distances, ``r``. With a mean face whose eye centres are 165 units either side
  of the nose and 135 behind its tip (the 3D model commonly used for head pose with OpenCV's
  solvePnP: eye corners at +-105/+-225, depth 135), turning by ``yaw`` moves the nose
  ``135 sin(yaw)`` and shrinks the half eye distance to ``165 cos(yaw)``, so
  ``yaw = atan(r * 165 / 135)``. Positive: the face turned towards the image's right. An estimate
  (no angle-labelled photos exist here to calibrate it); a mirrored image measures the opposite
  yaw (tested).
"""

from __future__ import annotations

import math
from typing import Sequence

from likeness import scores

# Zoom words from the widest face (extreme closeup) to the smallest (full body).
ZOOMS_BY_FACE_SIZE: tuple[str, ...] = tuple(sorted(scores.ZOOM_FACE_AREA, key=lambda z: -scores.ZOOM_FACE_AREA[z][0]))


def _centre(zoom: str) -> float:
    lo, hi = scores.ZOOM_FACE_AREA[zoom]
    return math.sqrt(lo * hi)


# Face-area share at which the measured zoom changes from one word to the next (widest first):
# extreme closeup | 0.273 | closeup | 0.114 | medium closeup | 0.044 | medium shot | 0.011 | full body.
ZOOM_BOUNDARIES: tuple[float, ...] = tuple(
    math.sqrt(_centre(a) * _centre(b)) for a, b in zip(ZOOMS_BY_FACE_SIZE, ZOOMS_BY_FACE_SIZE[1:]))

# Mean-face geometry of the yaw estimate (see the module doc).
_EYE_HALF_SPAN = 165.0
_NOSE_DEPTH = 135.0


def measured_zoom(face_area: float) -> str:
    """The zoom word a face of ``face_area`` (box area / image area) shows."""
    for zoom, boundary in zip(ZOOMS_BY_FACE_SIZE, ZOOM_BOUNDARIES):
        if face_area >= boundary:
            return zoom
    return ZOOMS_BY_FACE_SIZE[-1]


def yaw_degrees(landmarks: Sequence[Sequence[float]]) -> float | None:
    """Estimated yaw (degrees, positive = turned towards the image's right) from the 5 landmarks; None if degenerate."""
    if len(landmarks) < 3:
        return None
    (lx, ly), (rx, ry), (nx, ny) = (tuple(map(float, p)) for p in landmarks[:3])
    vx, vy = rx - lx, ry - ly
    span = math.hypot(vx, vy)
    if span < 1e-6:
        return None
    ux, uy = vx / span, vy / span
    r = ((nx - (lx + rx) / 2) * ux + (ny - (ly + ry) / 2) * uy) / (span / 2)
    return math.degrees(math.atan(r * _EYE_HALF_SPAN / _NOSE_DEPTH))


def label_disagreements(zoom_label: str, face_area: float, angle_label: str, yaw: float | None, *,
                        rear_words: Sequence[str], yaw_front_max: float, yaw_side_min: float) -> list[str]:
    """Sentences saying where the prompt's zoom/angle label and the measured face disagree (empty: they agree)."""
    out = []
    zoom = measured_zoom(face_area)
    if zoom_label in scores.ZOOM_FACE_AREA and zoom != zoom_label:
        lo, hi = scores.ZOOM_FACE_AREA[zoom_label]
        if not lo <= face_area <= hi:
            out.append(f"the prompt asked for {zoom_label!r} but the face fills {face_area:.1%} of the frame "
                       f"(expected {lo:.1%}-{hi:.0%}): it looks like {zoom!r}")
    a = angle_label.lower()
    if a and yaw is not None:
        if any(w in a for w in rear_words):
            out.append(f"the prompt asked for {angle_label!r} but the face is visible (yaw {yaw:+.0f} degrees)")
        elif "side" in a and abs(yaw) < yaw_side_min:
            out.append(f"the prompt asked for {angle_label!r} but the face looks frontal (yaw {yaw:+.0f} degrees, "
                       f"a side view turns at least {yaw_side_min:.0f})")
        elif "front" in a and abs(yaw) > yaw_front_max:
            out.append(f"the prompt asked for {angle_label!r} but the face is turned {abs(yaw):.0f} degrees "
                       f"(a front shot turns at most {yaw_front_max:.0f})")
    return out
