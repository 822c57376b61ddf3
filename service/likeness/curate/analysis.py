"""Per-image analysis of curation, in shards that any executor can run.

The driver (``likeness.curate.decide``) reads each shard's files as bytes — only when
the executor asks for that shard, so memory stays bounded by the shard size
times the workers in flight — and a worker decodes them once, then runs the
face analyzer, the CLIP image encoder, the face checks, the border colours,
the hair/wardrobe colours around the face and the grey thumbnail for
near-duplicates. A worker is built once per process (or Ray actor) by :class:`CurationWorkerFactory`, which loads the
models from a profile; results are plain picklable values
(:class:`ImageAnalysis`), so they travel back from other nodes, and the
driver alone decides and writes (``likeness.executor``).

The local path (no executor) runs the very same code in this process with
the caller's already loaded models, so a shard gives the same numbers
wherever it runs (up to float rounding between thread counts).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence as SequenceABC
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from likeness.backends.protocols import ClipModel, FaceAnalyzer
from likeness.curate.appearance import region_colours
from likeness.curate.background import _BORDER_SIDE
from likeness.curate.checks import CurateConfig, check_faces
from likeness.errors import InvalidInput
from likeness.files import safe_join
from likeness.images import load_image_bytes
from likeness.scores import _srgb_to_lab

# Border band width, as a share of the side: scores.lab_border_stats' default (what
# background.border_features measures).
_BAND = 0.08

# Smallest image side worth analysing: the detector cannot find a face below it.
MIN_SIDE = 32
# Grey thumbnail side kept per image for near-duplicate keypoints.
THUMB_SIDE = 512
# First face-detection input side per manifest zoom word (the face analyzer's ``det_sides``;
# absent: the profile's face_det_size, 640). Measured on the 400-image LFW bench pool
# (scripts/bench_curate.py, 80 images per zoom, 64 with a face) against detection at 640:
# extreme closeups at 320 find the same 64 faces with cosine >= 0.980 to the 640 embedding and
# need no padded retry (at 640, 16 of 64 did: 2.9x the time); closeups to medium shots at 512
# (the images' own size: 0.64x the pixels of 640) give cosine >= 0.93 (p5 0.955-0.967), the
# spread detection at any other size shows, while 256-384 there swapped the main face for a
# background face in 1-2 images. Full-body faces (24-40 px) stay at 640, where they are
# upsampled (at 512: cosine min 0.894).
ZOOM_DET_SIDE = {"extreme closeup": 320, "medium closeup": 512, "closeup": 512, "medium shot": 512}


@dataclass(frozen=True)
class AnalysisInput:
    """One image to analyse, as the driver hands it to a worker."""

    # Position in the driver's image list (results are matched back by it).
    index: int
    # The file's path as the driver sees it: names the image in messages and
    # gives the extension the decoded format is compared with.
    name: str
    # Manifest zoom word and index (the face-size floor depends on them).
    zoom: str = ""
    zoom_index: int = -1
    # The file's bytes, read by the driver (None when it could not be read).
    data: bytes | None = field(default=None, repr=False)
    # Why the driver could not read it (then the image is "undecodable").
    error: str = ""


@dataclass(frozen=True)
class AnalysisShard:
    """A batch of images plus the settings the per-image checks need."""

    config: CurateConfig
    items: tuple[AnalysisInput, ...]


@dataclass(frozen=True)
class ImageAnalysis:
    """What a worker measured on one image (plain values: it crosses processes)."""

    index: int
    # "" when the image passed decoding and the face checks, else a reason code.
    code: str = ""
    reason: str = ""
    # FaceRecords, largest first (empty: no face or not decoded).
    faces: tuple[Any, ...] = ()
    # Grey thumbnail (longest side <= THUMB_SIDE) for near-duplicate keypoints.
    thumb: np.ndarray | None = field(default=None, repr=False)
    # 12-d CIELAB border colours (None: not decoded).
    border: np.ndarray | None = field(default=None, repr=False)
    # L2-normalised CLIP image embedding (None without CLIP).
    clip: np.ndarray | None = field(default=None, repr=False)
    # Colour histograms of the hair and wardrobe regions around the main face
    # (likeness.curate.appearance.region_colours; a region is None when not in the frame).
    regions: dict[str, Any] = field(default_factory=dict, repr=False)
    # format, mode, size, extension mismatch, and the face checks' numbers.
    measures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardAnalysis:
    """A shard's results plus which models produced them (the driver's calibration key)."""

    images: tuple[ImageAnalysis, ...]
    face_backend: str
    # sha256 of the recognition model: keys the calibrated identity threshold.
    recognition_sha256: str | None
    clip_backend: str | None


def read_input(root: Path, index: int, file: str, zoom: str = "", zoom_index: int = -1) -> AnalysisInput:
    """The driver side: resolve ``file`` under ``root`` and read its bytes (errors become ``error``)."""
    try:
        path = safe_join(root, file)
    except InvalidInput as exc:
        return AnalysisInput(index, file, zoom, zoom_index, None, str(exc))
    try:
        data = path.read_bytes()
    except OSError as exc:
        # The same words likeness.images.load_image uses for an unreadable file.
        return AnalysisInput(index, str(path), zoom, zoom_index, None, f"{path}: cannot be read ({exc.strerror or exc})")
    return AnalysisInput(index, str(path), zoom, zoom_index, data)


class LazyShards(SequenceABC):
    """Shards of :class:`AnalysisShard` whose files are read when a shard is taken.

    Executors take ``shards[i]`` (Ray, at submission) or iterate (local), so
    only the shards in flight hold image bytes, never the whole pool.
    """

    def __init__(self, root: Path, rows: Sequence[tuple[int, Any]], config: CurateConfig) -> None:
        # rows: (driver index, GalleryImage) of the images to analyse, in order.
        self._root, self._config = root, config
        step = config.batch_size
        self._chunks = [tuple(rows[i:i + step]) for i in range(0, len(rows), step)]

    def __len__(self) -> int:
        return len(self._chunks)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        chunk = self._chunks[i]
        return AnalysisShard(self._config, tuple(
            read_input(self._root, n, row.file, row.zoom, row.zoom_index) for n, row in chunk))

    def size(self, i: int) -> int:
        """Images in shard ``i`` (for progress)."""
        return len(self._chunks[i])


def _decode(item: AnalysisInput, max_side: int) -> tuple[Any, dict[str, Any], str, str]:
    """(image or None, measures, code, reason): decode once, reduce to ``max_side``."""
    from PIL import Image

    if item.data is None:
        return None, {}, "undecodable", f"cannot be used: {item.error}"
    try:
        img, info = load_image_bytes(item.data, item.name)
    except InvalidInput as exc:
        return None, {}, "undecodable", f"cannot be used: {exc}"
    measures = dict(format=info.format, mode=info.mode, width=info.width, height=info.height,
                    extension_mismatch=info.extension_mismatch)
    if min(img.size) < MIN_SIDE:
        return None, measures, "image_too_small", f"{img.size[0]}x{img.size[1]} is too small to hold a face"
    if max(img.size) > max_side:
        s = max_side / max(img.size)
        img = img.resize((max(1, round(img.size[0] * s)), max(1, round(img.size[1] * s))), Image.BILINEAR)
    return img, measures, "", ""


def border_bands(image: np.ndarray) -> np.ndarray:
    """:func:`likeness.curate.background.border_features`, converting only the border bands to CIELAB.

    Same downsized copy, same bands, same per-pixel conversion: the same numbers
    (tested for equality), for ~a third of the pixels' colour conversion.
    """
    from PIL import Image

    h, w = image.shape[:2]
    scale = _BORDER_SIDE / max(1, min(h, w))
    if scale < 1.0:
        image = np.asarray(Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                         Image.BILINEAR))
    h, w = image.shape[:2]
    bh, bw = max(1, int(round(h * _BAND))), max(1, int(round(w * _BAND)))
    sides = [image[:bh], image[h - bh:], image[:, :bw], image[:, w - bw:]]
    return np.concatenate([_srgb_to_lab(s[..., :3]).reshape(-1, 3).mean(axis=0) for s in sides]).astype(np.float32)


def _prepare(item: AnalysisInput, max_side: int) -> tuple[Any, np.ndarray | None, dict[str, Any], str, str]:
    """One image decoded: (image or None, its RGB array, measures, code, reason)."""
    img, measures, code, reason = _decode(item, max_side)
    return img, (None if img is None else np.asarray(img)), measures, code, reason


def _thumb(img: Any) -> np.ndarray:
    from PIL import Image

    s = min(1.0, THUMB_SIDE / max(img.size))
    grey = img.convert("L")
    if s < 1.0:
        grey = grey.resize((max(1, round(img.size[0] * s)), max(1, round(img.size[1] * s))), Image.BILINEAR)
    return np.asarray(grey)


def _workers(faces: FaceAnalyzer) -> int:
    """Images in flight for the per-image work: as many as the face analyzer runs at once."""
    return max(1, int(getattr(faces, "workers", 1) or 1))


def _in_flight(n: int, fn: Any, items: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]`` on ``n`` threads (decoding, resizing and numpy release the GIL)."""
    if n <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    return list(_pool(n).map(fn, items))


@lru_cache(maxsize=4)
def _pool(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="curate")


def _det_sides(faces: FaceAnalyzer, zooms: Sequence[str]) -> dict[str, Any]:
    """``det_sides=`` for an analyzer that takes it (per-zoom detection size), else nothing."""
    try:
        takes = "det_sides" in inspect.signature(faces.analyze).parameters
    except (TypeError, ValueError):
        takes = False
    return {"det_sides": [ZOOM_DET_SIDE.get(z) for z in zooms]} if takes else {}


def analyse_shard(shard: AnalysisShard, faces: FaceAnalyzer, clip: ClipModel | None) -> list[ImageAnalysis]:
    """Decode once, then faces (batched), CLIP (batched), border colours, thumbnails, face checks."""
    cfg = shard.config
    n = _workers(faces)
    out: dict[int, ImageAnalysis] = {}
    decoded = []
    for item, (img, arr, measures, code, reason) in zip(
            shard.items, _in_flight(n, lambda it: _prepare(it, cfg.max_side), shard.items)):
        if img is None:
            out[item.index] = ImageAnalysis(item.index, code, reason, measures=measures)
        else:
            decoded.append((item, img, arr, measures))
    arrays = [arr for _, _, arr, _ in decoded]
    found = faces.analyze(arrays, **_det_sides(faces, [it.zoom for it, *_ in decoded])) if arrays else []
    embs = clip.embed_images([img for _, img, _, _ in decoded], batch_size=cfg.batch_size) if (clip is not None and decoded) else None

    def finish(k: int) -> ImageAnalysis:
        (item, img, arr, measures), recs = decoded[k], found[k]
        code = reason = ""
        if recs:
            chk = check_faces(cfg, recs, arr, item.zoom, item.zoom_index)
            measures.update(chk.measures)
            if chk.reason_code:
                code, reason = chk.reason_code, chk.reason
        return ImageAnalysis(
            item.index, code, reason, faces=tuple(recs), thumb=_thumb(img), border=border_bands(arr),
            clip=np.asarray(embs[k], np.float32) if embs is not None else None, measures=measures,
            regions=region_colours(arr, recs[0].bbox) if recs else {})

    for a in _in_flight(n, finish, range(len(decoded))):
        out[a.index] = a
    return [out[item.index] for item in shard.items]


class CurationWorker:
    """Analyses shards with one loaded face analyzer (and CLIP model): an executor worker."""

    def __init__(self, faces: FaceAnalyzer, clip: ClipModel | None) -> None:
        self.faces, self.clip = faces, clip

    def run(self, shard: AnalysisShard) -> ShardAnalysis:
        return ShardAnalysis(
            images=tuple(analyse_shard(shard, self.faces, self.clip)),
            face_backend=getattr(self.faces, "name", type(self.faces).__name__),
            recognition_sha256=getattr(self.faces, "recognition_sha256", None),
            clip_backend=getattr(self.clip, "name", None) if self.clip is not None else None,
        )


@dataclass(frozen=True)
class CurationWorkerFactory:
    """Picklable factory for :mod:`likeness.executor`: loads the face pack (and CLIP) once per worker.

    Every worker loads its own copy from ``profile``'s paths, so on a cluster
    ``models/`` (and the face pack) must exist at the same path on every node.
    """

    profile: Any
    # False: no CLIP image embeddings (no CLIP background term, rear shots rejected).
    use_clip: bool = True
    face_backend: str = "insightface"
    clip_backend: str = "open_clip"

    def __call__(self) -> CurationWorker:
        from likeness.backends.faces import load_face_analyzer

        faces = load_face_analyzer(self.profile, backend=self.face_backend)
        clip = None
        if self.use_clip:
            from likeness.backends.clip import load_clip

            clip = load_clip(self.profile, backend=self.clip_backend)
        return CurationWorker(faces, clip)

