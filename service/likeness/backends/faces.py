"""Face detection + identity embeddings through insightface's own model zoo.

One backend today (``insightface``), chosen by name from :data:`FACE_BACKENDS`
like every backend. The pack folder comes from the profile (``face_pack``):
production uses ``buffalo_l`` (SCRFD-10G + ArcFace R50, 512-d) on the
onnxruntime CUDA provider when it is available; tests and CPU runs use the
small real pack in ``../shared/realdata/models`` (SCRFD-500M + MobileFaceNet,
128-d). Only the ``detection`` and ``recognition`` modules are loaded.

Speed: insightface has no batched detector, so detection runs per image; the
aligned 112x112 crops of *all* faces of *all* images are then embedded in
batches (``ArcFaceONNX.get_feat``), chunked to the batch size the ONNX graph
accepts (1 for the CPU MobileFaceNet export, dynamic for buffalo_l). On the
CPU each onnxruntime session has one thread and ``workers`` images are in
flight at once (threads: onnxruntime, OpenCV and numpy release the GIL): for
models this small, two single-threaded runs side by side beat one run on two
threads. A caller that knows how large the faces are (curation knows each
image's zoom) passes ``det_sides``: detection then runs on a smaller copy, and
falls back to the full size when that shrank the image and found nothing,
then to a padded copy (for faces too large for the detector's anchors).

Nothing is downloaded: insightface's ``FaceAnalysis(name=...)`` downloads when
``name`` is not an existing folder, so the pack folder is checked first
(:meth:`Profile.require`) and a missing pack is a :class:`ModelMissing`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime
from insightface.app import FaceAnalysis
from insightface.utils import face_align

from likeness.backends.protocols import FaceAnalyzer, FaceRecord
from likeness.errors import InvalidInput, ModelMissing
from likeness.profiles import Profile

log = logging.getLogger(__name__)

# Recognition batches for graphs with a dynamic batch axis: large enough to
# fill a GPU, small enough for a 2-core CPU's cache.
_RECOGNITION_BATCH = 64
# Detection input sides a caller may ask for (``det_sides``). insightface 2.1 builds one
# static-shape onnxruntime session per input size (~0.2 s each, and memory), so sides are
# rounded up to one of these few buckets instead of following every image's own size.
DET_SIDES = (256, 320, 384, 448, 512, 640)
# When every detection of an image (its first size, det_size, the padded copy) finds no face but one
# of them scored a candidate of at least NEAR_MISS_SCORE (below det_thresh), detection runs once more
# at RESCUE_SIDE: a face the detector nearly sees may be found at another scale, and a no_face for
# such an image is a bug (issue 11). Measured (SCRFD-500M, CPU pack): of 108 faceless images
# (../shared/realdata/generated, realdata/faces, the speed bench's 80 rear shots), 19 have such a
# near miss. The retry at 448 finds a face in 2 of them: realdata/generated/cutoff_ext's anime girl
# in org_271493.png (0.474 at 640, 0.66 at 448) and a cloud in comfyui's fennec_girl_flowers (0.51;
# her drawn face is missed at every size). That image was no_face; beside the character's faces the
# cloud now fails identity instead (cosine 0.17 next to consistory's set 01), a rejection either way.
# None of the 80 rear shots gains a face; the 11 of them with a near miss pay one more 448 pass
# (~20 ms each).
NEAR_MISS_SCORE = 0.3
RESCUE_SIDE = 448


def _check_image(img: np.ndarray, i: int) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        shape = getattr(img, "shape", None)
        dtype = getattr(img, "dtype", type(img).__name__)
        raise InvalidInput(
            f"image {i}: expected an RGB uint8 HxWx3 array, got shape {shape} dtype {dtype}; "
            "decode files with likeness.images.load_image and pass np.asarray(image)"
        )
    if img.shape[0] < 8 or img.shape[1] < 8:
        raise InvalidInput(f"image {i}: {img.shape[1]}x{img.shape[0]} is too small to hold a face")
    return img


@lru_cache(maxsize=8)
def file_sha256(path: str) -> str:
    """sha256 of a model file (keys the calibration table)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def onnx_providers(device: str = "auto") -> list[str]:
    """onnxruntime providers: CUDA (+CPU fallback) when available and wanted, else CPU.

    ``device`` is a profile's (cuda/cpu/auto) or a worker's own GPU, "cuda:N".
    """
    available = onnxruntime.get_available_providers()
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device.startswith("cuda"):
        # Face analysis is cheap (~0.07 s/photo on CPU); a CUDA profile keeps
        # working when only the CPU onnxruntime wheel is installed.
        log.warning("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu); faces run on the CPU")
    return ["CPUExecutionProvider"]


class InsightFaceAnalyzer:
    """insightface ``FaceAnalysis`` (detection + recognition) over one pack folder."""

    name = "insightface"

    def __init__(
        self,
        pack: str | Path,
        *,
        det_size: int = 640,
        det_thresh: float = 0.5,
        device: str = "auto",
        workers: int | None = None,
    ) -> None:
        pack = Path(pack)
        if not pack.is_dir():
            # Never let insightface treat a non-folder as a pack name to download.
            raise ModelMissing(
                f"face pack folder {pack} does not exist; put insightface's pack (buffalo_l: det_10g.onnx + "
                "w600k_r50.onnx, or the CPU pack det_500m.onnx + mobilefacenet_128d.onnx) there"
            )
        if not 0.0 < det_thresh < 1.0:
            raise InvalidInput(f"det_thresh {det_thresh} must be in (0, 1); 0.5 is insightface's default")
        if det_size < 32 or det_size % 32:
            raise InvalidInput(f"face_det_size {det_size} must be a positive multiple of 32 (e.g. 640)")
        self.providers = onnx_providers(device)
        try:
            self._app = FaceAnalysis(
                name=str(pack.resolve()),
                allowed_modules=["detection", "recognition"],
                providers=_on_gpu(self.providers, device),
            )
        except AssertionError as exc:  # insightface asserts when a task is absent
            raise ModelMissing(f"face pack {pack} has no face detection model (e.g. det_500m.onnx or det_10g.onnx)") from exc
        if "recognition" not in self._app.models:
            raise ModelMissing(
                f"face pack {pack} has no recognition model (e.g. mobilefacenet_128d.onnx or w600k_r50.onnx)"
            )
        ctx_id = _gpu_index(device) if self.providers[0] == "CUDAExecutionProvider" else -1
        self._app.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=(det_size, det_size))
        self._det = self._app.models["detection"]
        self.det_thresh = float(det_thresh)
        self._rec = self._app.models["recognition"]
        if workers is not None and not 1 <= int(workers) <= 64:
            raise InvalidInput(f"workers {workers} must be 1..64 (images analysed at once; default: 2 on a CPU)")
        on_cpu = self.providers[0] == "CPUExecutionProvider"
        # Images in flight at once; on a CPU one onnxruntime thread each (see the module doc).
        self.workers = int(workers) if workers is not None else (min(2, _cpus()) if on_cpu else 1)
        if on_cpu:
            _single_threaded(self._det)
            _single_threaded(self._rec)
        self.pack = pack.resolve()
        self.det_size = det_size
        self.embedding_dim = int(self._rec.output_shape[-1])
        batch_axis = self._rec.input_shape[0]
        self.recognition_batch = batch_axis if isinstance(batch_axis, int) and batch_axis > 0 else _RECOGNITION_BATCH

    @property
    def recognition_model(self) -> Path:
        """The recognition .onnx file (its sha256 keys the calibration table)."""
        return Path(self._rec.model_file)

    @cached_property
    def recognition_sha256(self) -> str:
        # Hashed once per analyzer: every ScoreConsistency call, curation and each centroid read it, and
        # buffalo_l's w600k_r50.onnx is 166 MB.
        return file_sha256(str(self.recognition_model))

    def embed_aligned(self, crops_bgr: Sequence[np.ndarray]) -> np.ndarray:
        """Aligned 112x112 BGR crops -> (N, D) L2-normalised float32, in batches."""
        if not crops_bgr:
            return np.zeros((0, self.embedding_dim), np.float32)
        step = self.recognition_batch
        outs = self._map(lambda start: np.asarray(self._rec.get_feat(list(crops_bgr[start:start + step])), np.float32),
                         range(0, len(crops_bgr), step))
        feats = np.concatenate(outs, axis=0).reshape(len(crops_bgr), -1)
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        return (feats / np.maximum(norms, 1e-12)).astype(np.float32)

    def analyze(self, images: Sequence[np.ndarray], det_sides: Sequence[int | None] | None = None
                ) -> list[list[FaceRecord]]:
        """RGB uint8 HxWx3 arrays -> every face per image, largest first.

        Detection per image (``workers`` at once), then batched recognition
        over every aligned crop (same numbers as one-by-one; tested).
        ``det_sides[i]`` (optional): run image ``i``'s first detection with
        its longer side at most this (rounded up to :data:`DET_SIDES`; None:
        ``det_size``); when that finds no face, detection runs again at
        ``det_size`` if the first size shrank the image, then on the padded copy.
        """
        if det_sides is not None and len(det_sides) != len(images):
            raise InvalidInput(f"det_sides has {len(det_sides)} entries for {len(images)} images; give one per image")
        images = [_check_image(img, i) for i, img in enumerate(images)]
        sides = [self._det_side(img, None if det_sides is None else det_sides[i]) for i, img in enumerate(images)]
        per_image = self._map(lambda i: self._detect_one(images[i], sides[i]), range(len(images)))
        found: list[tuple[int, np.ndarray, np.ndarray, float]] = []
        crops: list[np.ndarray] = []
        for i, (faces, image_crops) in enumerate(per_image):
            found.extend((i, box, kp, ratio) for box, kp, ratio in faces)
            crops.extend(image_crops)
        embeddings = self.embed_aligned(crops)
        result: list[list[FaceRecord]] = [[] for _ in images]
        for (i, box, kp, ratio), emb in zip(found, embeddings):
            result[i].append(FaceRecord(
                bbox=tuple(float(v) for v in box[:4]),  # type: ignore[arg-type]
                det_score=float(box[4]),
                landmarks=tuple((float(x), float(y)) for x, y in kp),
                area_ratio=float(min(max(ratio, 0.0), 1.0)),
                embedding=emb,
            ))
        return result

    def _map(self, fn: Callable, items: Sequence) -> list:
        """``[fn(x) for x in items]`` with ``workers`` in flight (in order)."""
        items = list(items)
        if self.workers <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        return list(_pool(self.workers).map(fn, items))

    def _det_side(self, img: np.ndarray, wanted: int | None) -> int:
        """The first detection's input side: ``det_size``, or ``wanted`` rounded up to a bucket when smaller."""
        if wanted is None:
            return self.det_size
        if int(wanted) < 32:
            raise InvalidInput(f"det_sides entry {wanted} must be >= 32 (or None for det_size {self.det_size})")
        side = next((b for b in DET_SIDES if b >= int(wanted)), self.det_size)
        return min(side, self.det_size)

    def _detect(self, bgr: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Faces at or above ``det_thresh`` at one input side, and the best score below it (0: none).

        One detector pass at the lower NEAR_MISS_SCORE, then filtered: greedy NMS keeps boxes in
        score order and a lower-scored box never suppresses a higher one, so the faces are exactly
        those of a pass at ``det_thresh`` (tested); the rest tells whether a face was nearly seen.
        """
        boxes, kps = self._det.detect(bgr, input_size=(side, side), max_num=0, metric="default",
                                      det_thresh=min(NEAR_MISS_SCORE, self.det_thresh))
        keep = boxes[:, 4] >= self.det_thresh
        near = float(boxes[~keep, 4].max()) if bool((~keep).any()) else 0.0
        return boxes[keep], (kps[keep] if kps is not None else kps), near

    def _detect_one(self, img: np.ndarray, side: int) -> tuple[list, list]:
        """One image: ([(box, landmarks, area share)], [aligned crops]), largest face first."""
        bgr = np.ascontiguousarray(img[:, :, ::-1])
        boxes, kps, near = self._detect(bgr, side)
        if boxes.shape[0] == 0 and side != self.det_size and side < max(img.shape[:2]):
            # A caller's smaller size found nothing: the face may be smaller than it said. Only when
            # that size shrank the image: at a side >= the image's own the detector already saw every
            # pixel, and upsampling to det_size adds only faces under ~10 px, below min_face_px (24).
            # Measured (SCRFD-500M): of 68 images of 512 px with no face at 512 (the bench pool's rear
            # and no-face shots, ../shared/realdata/generated and faces/), 640 found a face in 0; the
            # padded retry below found 1. Skipping it saves 45 of 117 ms per faceless 512-px image.
            boxes, kps, near2 = self._detect(bgr, self.det_size)
            near = max(near, near2)
        if boxes.shape[0] == 0:
            # A face filling most of the frame (an extreme closeup) is too large for the
            # detector's anchors at this size: at det_size 640 SCRFD-500M found 0 of 12 faces
            # wider than 57% of the frame, and 12 of 12 up to 78% on a copy padded to twice the
            # size (issue 11). Retry once on such a copy; boxes and landmarks map back by the
            # offset, and the face is aligned from the padded copy (no black wedges).
            padded, (dy, dx) = _pad_twice(bgr)
            boxes, kps, near2 = self._detect(padded, self.det_size)
            near = max(near, near2)
            if boxes.shape[0] == 0 and near >= NEAR_MISS_SCORE and RESCUE_SIDE not in (side, self.det_size):
                # A face nearly seen: once more at another scale (NEAR_MISS_SCORE, RESCUE_SIDE).
                boxes, kps, _ = self._detect(bgr, RESCUE_SIDE)
                if boxes.shape[0]:
                    return self._faces(img, bgr, boxes, kps, kps)
            if boxes.shape[0] == 0:
                return [], []
            boxes = boxes.copy()
            boxes[:, [0, 2]] -= dx
            boxes[:, [1, 3]] -= dy
            h, w = img.shape[:2]
            boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w)
            boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h)
            src, kps = padded, kps.copy()
            kps_src = kps.copy()
            kps[:, :, 0] -= dx
            kps[:, :, 1] -= dy
        else:
            src, kps_src = bgr, kps
        return self._faces(img, src, boxes, kps, kps_src)

    def _faces(self, img: np.ndarray, src: np.ndarray, boxes: np.ndarray, kps: np.ndarray,
               kps_src: np.ndarray) -> tuple[list, list]:
        """Detections of ``img`` (landmarks ``kps``; ``kps_src`` in ``src``, the array aligned from), largest first."""
        size = int(self._rec.input_size[0])
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        image_area = float(img.shape[0] * img.shape[1])
        faces, crops = [], []
        for j in np.argsort(-areas, kind="stable"):
            with warnings.catch_warnings():
                # insightface calls a scikit-image API deprecated in 0.26; harmless.
                warnings.simplefilter("ignore", FutureWarning)
                crops.append(face_align.norm_crop(src, landmark=kps_src[j], image_size=size))
            faces.append((boxes[j], kps[j], float(areas[j]) / image_area))
        return faces, crops


def _pad_twice(bgr: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """The image centred on a canvas twice its size, filled with its mean border colour; (canvas, (dy, dx))."""
    h, w = bgr.shape[:2]
    border = np.concatenate([bgr[0], bgr[-1], bgr[:, 0], bgr[:, -1]]).mean(axis=0)
    canvas = np.empty((2 * h, 2 * w, 3), np.uint8)
    canvas[:] = border.astype(np.uint8)
    dy, dx = h // 2, w // 2
    canvas[dy:dy + h, dx:dx + w] = bgr
    return canvas, (dy, dx)


def _cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


@lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    """One shared thread pool per size (threads are cheap to keep, costly to start per call)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="faces")


def _single_threaded(model) -> None:
    """Give an insightface model a CPU session with one intra-op thread (its outputs do not change)."""
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    # SCRFD derives its per-size sessions from this one's options (insightface 2.1).
    model.session = onnxruntime.InferenceSession(model.model_file, sess_options=opts,
                                                 providers=["CPUExecutionProvider"])


def _gpu_index(device: str) -> int:
    """N of "cuda:N"; 0 (the current GPU: a Ray actor's own) for "cuda"/"auto"."""
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0


def _on_gpu(providers: list[str], device: str) -> list:
    """The providers with the CUDA one pinned to the worker's GPU (onnxruntime's device_id), not GPU 0."""
    return [("CUDAExecutionProvider", {"device_id": _gpu_index(device)}) if p == "CUDAExecutionProvider" else p
            for p in providers]


def _insightface_from_profile(profile: Profile, device: str | None = None) -> InsightFaceAnalyzer:
    pack = profile.require("face_pack")
    return InsightFaceAnalyzer(pack, det_size=profile.face_det_size, device=device or profile.device)


# Registry: backend name -> factory(profile). Unknown names fail listing these.
FACE_BACKENDS: dict[str, Callable[..., FaceAnalyzer]] = {
    "insightface": _insightface_from_profile,
}


def load_face_analyzer(profile: Profile, *, backend: str = "insightface", device: str | None = None) -> FaceAnalyzer:
    """The face analyzer a profile names (on ``device``, e.g. "cuda:1", if given); ModelMissing if its pack is absent."""
    try:
        factory = FACE_BACKENDS[backend]
    except KeyError:
        raise InvalidInput(f"unknown face backend {backend!r}; choose one of {sorted(FACE_BACKENDS)}") from None
    return factory(profile, device=device) if device else factory(profile)


def main_face(faces: Sequence[FaceRecord]) -> FaceRecord | None:
    """The image's main face: the largest (the labelled person, by convention)."""
    return faces[0] if faces else None
