"""Main faces of a set of images and their identity centroid: one helper for every caller.

Evaluation (the curated set as reference), checkpoint scoring (the training faces), the
service (``ScoreConsistency`` references) and ``likeness score`` all need "the main face's
embedding per image, and the normalised mean of those"; they get it here, with the same
main-face rule (the largest face, :func:`likeness.backends.faces.main_face`'s convention)
and the same centroid (:func:`likeness.scores.identity_centroid`). A build's curated folder keeps
curation's embeddings beside its PNGs (:func:`write_face_embeddings`); :func:`curated_centroid` reuses
them, so training and evaluation do not analyse the curated faces again.
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


# --- curation's embeddings, reused ------------------------------------------------
#
# Curation already computed every selected image's main-face embedding; training (the checkpoint
# validator's centroid) and evaluation (the reference centroid) used to detect and embed the same
# curated PNGs again. curation writes them once (layout.FACE_EMBEDDINGS_FILE) keyed by the sha256 of
# the PNG bytes it wrote, and by the recognition model's sha256; a row is used only while both still
# match, so an edited or replaced PNG, another face pack or a damaged file means "analyse", never an error.

FACE_EMBEDDINGS_SCHEMA = "1"


def write_face_embeddings(path: str | Path, rows: Sequence[tuple[str, str, Any]],
                          recognition_sha256: str | None) -> Path:
    """Write ``(png file name, sha256 of its bytes, main-face embedding)`` rows atomically (safetensors).

    One ``(N, D)`` float32 tensor ``embeddings``; names, PNG digests and the recognition model's sha256
    in the metadata. No rows: an empty file (so a stale file from an earlier run is replaced, not kept).
    """
    import json

    import numpy as np
    from safetensors.numpy import save

    from likeness.files import atomic_write_bytes

    embs = (np.stack([np.asarray(e, np.float32).reshape(-1) for _, _, e in rows]) if rows
            else np.zeros((0, 0), np.float32))
    meta = {"schema_version": FACE_EMBEDDINGS_SCHEMA, "recognition_sha256": recognition_sha256 or "",
            "names": json.dumps([n for n, _, _ in rows]), "png_sha256": json.dumps([h for _, h, _ in rows])}
    return atomic_write_bytes(path, save({"embeddings": np.ascontiguousarray(embs)}, metadata=meta))


def read_face_embeddings(path: str | Path, recognition_sha256: str | None) -> dict[str, tuple[str, np.ndarray]]:
    """``png file name -> (sha256 of the PNG, embedding)`` from :func:`write_face_embeddings`' file.

    Empty when the file is missing, unreadable or malformed, or was written with another recognition
    model (or either side's model is unknown): the caller then analyses, as before this file existed.
    """
    import json
    import logging

    import numpy as np

    log = logging.getLogger(__name__)
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            embs = np.asarray(fh.get_tensor("embeddings"), np.float32)
        names, digests = json.loads(meta["names"]), json.loads(meta["png_sha256"])
        stored_model = meta.get("recognition_sha256") or None
        if meta.get("schema_version") != FACE_EMBEDDINGS_SCHEMA:
            raise ValueError(f"schema_version {meta.get('schema_version')!r}")
        if not (isinstance(names, list) and isinstance(digests, list) and len(names) == len(digests) == len(embs)):
            raise ValueError("names, digests and embeddings disagree in length")
        if len(embs) and embs.ndim != 2:
            raise ValueError(f"embeddings of shape {embs.shape}")
    except Exception as exc:  # noqa: BLE001 - any damage means "analyse instead", never a failed stage
        log.warning("ignoring %s (%s: %s); analysing the faces instead", path, type(exc).__name__, exc)
        return {}
    if not recognition_sha256 or stored_model != recognition_sha256:
        log.info("ignoring %s: written with recognition model %s, analysing with %s", path,
                 stored_model, recognition_sha256)
        return {}
    return {str(n): (str(h), embs[i]) for i, (n, h) in enumerate(zip(names, digests))}


def curated_main_embeddings(faces: FaceAnalyzer, curated_dir: str | Path, paths: Sequence[Path]
                            ) -> tuple[dict[Path, np.ndarray | None], int]:
    """The main face's embedding per path (None: no face or unreadable), and how many came from curation.

    A path in ``curated_dir`` whose name has a row in its :data:`likeness.layout.FACE_EMBEDDINGS_FILE`
    with the sha256 of the bytes on disk takes the stored embedding; every other path is analysed
    (:func:`analyze_paths`).
    """
    import hashlib

    import numpy as np

    from likeness.layout import FACE_EMBEDDINGS_FILE

    root = Path(curated_dir)
    paths = list(dict.fromkeys(Path(p) for p in paths))
    stored = read_face_embeddings(root / FACE_EMBEDDINGS_FILE, getattr(faces, "recognition_sha256", None))
    out: dict[Path, np.ndarray | None] = {}
    if stored:
        try:
            here = root.resolve()
        except OSError:
            here = None
        for p in paths:
            row = stored.get(p.name)
            if row is None or here is None:
                continue
            try:
                if p.resolve().parent != here:
                    continue
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            except OSError:
                continue  # analyse_paths reports it as unreadable
            if digest == row[0]:
                out[p] = np.asarray(row[1], np.float32)
    reused = len(out)
    rest = [p for p in paths if p not in out]
    for p, found in analyze_paths(faces, rest).items():
        out[p] = np.asarray(found[0].embedding, np.float32) if isinstance(found, list) and found else None
    return {p: out[p] for p in paths}, reused


def curated_centroid(faces: FaceAnalyzer, curated_dir: str | Path, paths: Sequence[Path]
                     ) -> tuple[np.ndarray | None, int]:
    """:func:`folder_centroid` of ``paths`` in the curated folder, reusing curation's stored embeddings.

    Same result as ``folder_centroid(faces, paths)`` (the same embeddings, averaged the same way); only
    images whose stored row no longer matches the PNG on disk (or all, without the file) are analysed.
    How many were reused is logged (``likeness.identity``, INFO).
    """
    import logging

    import numpy as np

    from likeness.scores import identity_centroid

    embs, reused = curated_main_embeddings(faces, curated_dir, paths)
    found = [e for e in embs.values() if e is not None]
    logging.getLogger(__name__).info("identity centroid of %s: %d of %d images from curation's embeddings, "
                                     "%d analysed, %d faces", curated_dir, reused, len(embs), len(embs) - reused,
                                     len(found))
    if not found:
        return None, 0
    return identity_centroid(np.stack(found)), len(found)
