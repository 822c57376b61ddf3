"""Main faces of a set of images and their identity centroid: one helper for every caller.

Evaluation (the curated set as reference), checkpoint scoring (the training faces), the
service (``ScoreConsistency`` references) and ``likeness score`` all need "the main face's
embedding per image, and the normalised mean of those"; they get it here, with the same
main-face rule (the largest face, :func:`likeness.backends.faces.main_face`'s convention)
and the same centroid (:func:`likeness.scores.identity_centroid`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from likeness.errors import InvalidInput

if TYPE_CHECKING:
    import numpy as np

    from likeness.backends.protocols import FaceAnalyzer, FaceRecord

# Images decoded and analysed at once: bounds memory for folders of 4k photos.
CHUNK = 16


def main_embeddings(faces: FaceAnalyzer, images: Sequence[Any]) -> list[np.ndarray | None]:
    """The main (largest) face's embedding per image (PIL images or RGB arrays), None where none was found."""
    import numpy as np

    arrays = [im if isinstance(im, np.ndarray) else np.asarray(im.convert("RGB")) for im in images]
    if not arrays:
        return []
    return [np.asarray(recs[0].embedding, np.float32) if recs else None for recs in faces.analyze(arrays)]


def analyze_paths(faces: FaceAnalyzer, paths: Sequence[Path]) -> dict[Path, list[FaceRecord] | str]:
    """Every face of each image file (largest first), or the reason it could not be read; in chunks."""
    import numpy as np

    from likeness.images import load_image

    out: dict[Path, list[FaceRecord] | str] = {}
    paths = list(dict.fromkeys(Path(p) for p in paths))
    for start in range(0, len(paths), CHUNK):
        ok, arrays = [], []
        for p in paths[start:start + CHUNK]:
            try:
                arrays.append(np.asarray(load_image(p)[0]))
                ok.append(p)
            except InvalidInput as exc:
                out[p] = str(exc)
        for p, found in zip(ok, faces.analyze(arrays) if arrays else []):
            out[p] = list(found)
    return out


def folder_centroid(faces: FaceAnalyzer, paths: Sequence[Path]) -> tuple[np.ndarray | None, int]:
    """Identity centroid of the main faces of ``paths`` (None when no face), and how many faces it averages.

    Unreadable files count as "no face": the caller decides whether too few faces is an error.
    """
    import numpy as np

    from likeness.scores import identity_centroid

    embs = [np.asarray(found[0].embedding, np.float32)
            for found in analyze_paths(faces, paths).values() if isinstance(found, list) and found]
    if not embs:
        return None, 0
    return identity_centroid(np.stack(embs)), len(embs)
