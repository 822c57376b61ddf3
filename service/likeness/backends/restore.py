"""A1111's "Restore faces": CodeFormer or GFPGAN on every face, pasted back before the image is saved.

The way A1111 (>= 1.8) and ComfyUI do it now:

- **Weights** load through ``spandrel``, which detects the architecture from the
  file's keys. GFPGAN (and RestoreFormer) live in ``spandrel`` itself; CodeFormer
  lives in ``spandrel_extra_arches`` (the same MIT package A1111 installs for it).
  We load with a registry of the face architectures only, so a file that is some
  other model (an ESRGAN upscaler renamed ``codeformer.pth``) is refused by name
  instead of being run as a face model. Files are looked for where A1111 keeps them
  (``models/Codeformer/``, ``models/GFPGAN/``) and where ComfyUI does
  (``models/facerestore_models/``); nothing is downloaded, a missing file is a
  :class:`ModelMissing` naming the file and the folder to put it in.
- **Faces** come from the project's insightface analyzer
  (:func:`likeness.backends.faces.load_face_analyzer`: SCRFD boxes and 5 landmarks,
  with its retry for faces that fill the frame). Each face is aligned to the FFHQ
  512x512 five-point template that GFPGAN and CodeFormer were trained on (insightface's
  ``face_align`` only carries ArcFace's 112-px template, which crops much tighter), by
  the same partial-affine (similarity) fit facexlib uses.
- **Paste-back**: the restored 512x512 crop is warped back with the inverse affine and
  blended through a feathered mask: the crop's footprint eroded inward by ~5% of the
  face's size and blurred over the same width, so the blend fades to nothing before
  the crop's edge and every pixel outside it is left exactly as it was.
- **Settings** as A1111 names them: the model (``CodeFormer`` / ``GFPGAN``), CodeFormer's
  weight ``w`` (fidelity: 0 = strongest restoration, 1 = closest to the input; A1111's
  default 0.5) and the visibility of A1111's Extras tab (the restored image blended over
  the original; txt2img's "Restore faces" is visibility 1).

Deterministic: GFPGAN's StyleGAN decoder is run with its stored noise buffers
(``randomize_noise=False``) instead of fresh global-RNG noise per call, so one image
restores to the same pixels every time (CodeFormer has no noise).

torch, cv2, spandrel and insightface are imported when a restorer is loaded, not
when this module is imported.
"""

from __future__ import annotations

import logging
import pickle
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence, get_args

from likeness.errors import FailedPrecondition, InvalidInput, ModelMissing
from likeness.profiles import models_dir

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from likeness.backends.protocols import FaceAnalyzer, FaceRecord
    from likeness.spec import SamplingConfig

log = logging.getLogger(__name__)

RestoreModel = Literal["CodeFormer", "GFPGAN"]
RESTORE_MODELS: tuple[str, ...] = get_args(RestoreModel)

# A1111's defaults: CodeFormer weight 0.5 (its "code_former_weight" setting), visibility 1 (txt2img
# pastes the restored face at full strength).
DEFAULT_CODEFORMER_WEIGHT = 0.5
DEFAULT_VISIBILITY = 1.0

# Where each tool keeps the weights, relative to models/: A1111's folders first, then ComfyUI's.
WEIGHT_FOLDERS: dict[str, tuple[str, ...]] = {
    "CodeFormer": ("Codeformer", "facerestore_models"),
    "GFPGAN": ("GFPGAN", "facerestore_models"),
}
# The file each tool ships (named in the ModelMissing message).
WEIGHT_FILE: dict[str, str] = {"CodeFormer": "codeformer-v0.1.0.pth", "GFPGAN": "GFPGANv1.4.pth"}
_WEIGHT_SUFFIXES = (".pth", ".safetensors", ".ckpt", ".pt")

# The five FFHQ landmarks (left eye, right eye, nose tip, left and right mouth corner) in the
# 512x512 crops GFPGAN and CodeFormer were trained on: facexlib's template, the alignment these
# models expect (a different crop gives them faces at a scale they never saw).
FACE_SIZE = 512
FFHQ_TEMPLATE_512 = (
    (192.98138, 239.94708),
    (318.90277, 240.1936),
    (256.63416, 314.01935),
    (201.26117, 371.41043),
    (313.08905, 371.15118),
)
# A1111 (facexlib's eye_dist_threshold) skips faces whose eyes are under 5 px apart: there is
# nothing to restore in them and the 512-px crop would be a 100x upscale of a few pixels.
MIN_EYE_DISTANCE_PX = 5.0
# Feather width as a share of the face crop's side in the image: 5% (about 25 px for a
# 512-px face crop, 3 px for the ~60-px crop of a full-body shot's face). Below that the seam of
# the square crop shows on skin; far above it the restored face is washed into the original.
FEATHER_SHARE = 0.05
# Faces restored per model call: a 512x512 face is ~12 MB of activations per layer in CodeFormer;
# 8 fit a 24 GB GPU comfortably and keep one call per typical image on the CPU.
_BATCH = 8


@dataclass(frozen=True)
class RestoreSettings:
    """One run's face-restoration settings (A1111's names)."""

    # Which restorer: "CodeFormer" or "GFPGAN" (A1111's "Face restoration model").
    model: RestoreModel
    # Share of the restored face blended over the original, 0..1 (A1111 Extras' "visibility").
    visibility: float = DEFAULT_VISIBILITY
    # CodeFormer's fidelity weight w, 0..1 (A1111's "CodeFormer weight"); unused by GFPGAN.
    codeformer_weight: float = DEFAULT_CODEFORMER_WEIGHT

    def __post_init__(self) -> None:
        if self.model not in RESTORE_MODELS:
            raise InvalidInput(f"face restoration model {self.model!r} is not one of {', '.join(RESTORE_MODELS)}; "
                               'e.g. restore_faces = "CodeFormer" in the spec\'s [sampling]')
        for name in ("visibility", "codeformer_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise InvalidInput(f"face restoration {name} {value!r} must be a number from 0 to 1")


def settings_from_sampling(sampling: SamplingConfig) -> RestoreSettings | None:
    """The spec's ``[sampling]`` restoration settings, or None when restoration is off."""
    model = getattr(sampling, "restore_faces", "")
    if not model:
        return None
    return RestoreSettings(model, float(sampling.restore_visibility), float(sampling.codeformer_weight))


def infotext_fields(settings: RestoreSettings | None) -> dict[str, str]:
    """What A1111 writes for these settings, beyond ``Face restoration: <model>``.

    A1111's txt2img writes only ``Face restoration: CodeFormer`` (its weight is a global setting
    it does not record); its Extras tab writes ``CodeFormer visibility``, ``CodeFormer weight``
    and ``GFPGAN visibility``, rounded to 3 places. We write those Extras keys only when they are
    not A1111's defaults, so a default run's infotext is exactly txt2img's and a non-default one
    can still be reproduced.
    """
    if settings is None:
        return {}
    out: dict[str, str] = {}
    if settings.visibility != DEFAULT_VISIBILITY:
        out[f"{settings.model} visibility"] = _round3(settings.visibility)
    if settings.model == "CodeFormer" and settings.codeformer_weight != DEFAULT_CODEFORMER_WEIGHT:
        out["CodeFormer weight"] = _round3(settings.codeformer_weight)
    return out


def recorded_settings(model: str, extra: dict[str, str]) -> dict[str, Any]:
    """The restoration an imported image's infotext records, in the spec's names.

    ``{"model": "CodeFormer", "visibility": 1.0, "codeformer_weight": 0.5}``: a key A1111 did
    not write takes A1111's default (its txt2img writes only the model); a value that is not a
    number is kept as written. A model A1111 has but Likeness does not run (e.g. a plugin's) is
    recorded all the same.
    """
    out: dict[str, Any] = {"model": model}
    for name, key, default in (("visibility", f"{model} visibility", DEFAULT_VISIBILITY),
                               ("codeformer_weight", "CodeFormer weight", DEFAULT_CODEFORMER_WEIGHT)):
        if name == "codeformer_weight" and model != "CodeFormer":
            continue
        raw = str(extra.get(key, "")).strip()
        try:
            out[name] = float(raw) if raw else default
        except ValueError:
            out[name] = raw
    return out


def _round3(value: float) -> str:
    return repr(round(float(value), 3))


# ---------------------------------------------------------------- weights


def find_weights(model: str, folder: Path | None = None) -> Path:
    """The weights file of ``model`` under ``models/`` (A1111's or ComfyUI's folder); ModelMissing if none.

    A file counts when its name contains the model's name (any case) and ends in .pth,
    .safetensors, .ckpt or .pt, as A1111 filters its folders; of several, the last in name
    order is taken (``GFPGANv1.4.pth`` over ``GFPGANv1.3.pth``).
    """
    if model not in RESTORE_MODELS:
        raise InvalidInput(f"face restoration model {model!r} is not one of {', '.join(RESTORE_MODELS)}")
    root = Path(folder) if folder is not None else models_dir()
    looked = [root / sub for sub in WEIGHT_FOLDERS[model]]
    for sub in looked:
        if not sub.is_dir():
            continue
        found = sorted(p for p in sub.iterdir()
                       if p.is_file() and p.suffix.lower() in _WEIGHT_SUFFIXES and model.lower() in p.name.lower())
        if found:
            return found[-1]
    raise ModelMissing(
        f"{model} face restoration weights are missing: no {model} file in {' or '.join(map(str, looked))}. "
        f"Put {WEIGHT_FILE[model]} (the file A1111 keeps in models/{WEIGHT_FOLDERS[model][0]}/) at "
        f"{looked[0] / WEIGHT_FILE[model]}, or set restore_faces = \"\" in the spec's [sampling] to generate "
        "without face restoration. Nothing is downloaded at run time"
    )


def face_registry() -> Any:
    """A spandrel registry holding only the face restorers (GFPGAN, RestoreFormer, CodeFormer)."""
    with warnings.catch_warnings():
        # spandrel's architectures are compiled with torch.jit.script at import, which torch 2.14 deprecates.
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        from spandrel import MAIN_REGISTRY, ArchRegistry
        from spandrel_extra_arches import EXTRA_REGISTRY

    registry = ArchRegistry()
    registry.add(MAIN_REGISTRY["GFPGAN"], MAIN_REGISTRY["RestoreFormer"], EXTRA_REGISTRY["CodeFormer"])
    return registry


def load_restorer_net(path: str | Path, model: str, device: str | Any = "cpu") -> Any:
    """The spandrel model descriptor of a weights file, checked to be ``model``'s architecture.

    Raises ModelMissing when the file is absent, InvalidInput when it is not a face
    restorer or is another one than ``model`` (saying which it is).
    """
    registry = face_registry()  # first: it imports spandrel quietly
    from spandrel import ModelLoader, UnsupportedModelError

    path = Path(path)
    if not path.is_file():
        raise ModelMissing(f"{model} face restoration weights {path} do not exist; put {WEIGHT_FILE.get(model, 'the file')} there")
    try:
        desc = ModelLoader(device=device, registry=registry).load_from_file(path)
    except UnsupportedModelError:
        raise InvalidInput(
            f"{path} is not a face restoration model spandrel knows (GFPGAN, CodeFormer, RestoreFormer); "
            f"put the {model} weights ({WEIGHT_FILE.get(model, '')}) there instead"
        ) from None
    except (pickle.UnpicklingError, ValueError, RuntimeError, OSError, EOFError, KeyError) as exc:
        raise InvalidInput(f"{path} could not be read as model weights ({type(exc).__name__}: {exc}); "
                           f"the file is damaged or not {model}'s: replace it with {WEIGHT_FILE.get(model, 'the file')}") from None
    arch = desc.architecture.id
    if arch != model:
        raise InvalidInput(f"{path} holds a {arch} model, not {model}; move it to the {arch} folder "
                           f"or set restore_faces = \"{arch}\"" if arch in RESTORE_MODELS else
                           f"{path} holds a {arch} model, not {model}; use {WEIGHT_FILE.get(model, 'the right file')}")
    return desc.eval()


# ---------------------------------------------------------------- the restorer


class FaceRestorer:
    """Detect, align, restore and paste back every face of RGB images with one loaded model."""

    def __init__(self, net: Any, analyzer: FaceAnalyzer, model: str) -> None:
        import torch

        self.net = net  # spandrel ImageModelDescriptor
        self.analyzer = analyzer
        self.model = model
        self.device = torch.device(net.device)
        self.dtype = net.dtype

    # -------------------------------------------------- public

    def restore(self, images: Sequence[Image.Image], settings: RestoreSettings) -> list[Image.Image]:
        """Each image with its faces restored (same size and mode); images without a face come back unchanged.

        ``settings.visibility`` 0 returns the inputs themselves, untouched.
        """
        from PIL import Image as PILImage
        import numpy as np

        if settings.model != self.model:
            raise InvalidInput(f"this restorer runs {self.model}, not {settings.model}; load one for {settings.model}")
        if settings.visibility == 0.0 or not images:
            return list(images)
        arrays = [np.asarray(img.convert("RGB")) for img in images]
        found = self.analyzer.analyze(arrays)
        out: list[Image.Image] = []
        for img, arr, faces in zip(images, arrays, found):
            restored = self.restore_array(arr, faces, settings)
            if restored is arr:
                out.append(img)
                continue
            res = PILImage.fromarray(restored, "RGB")
            out.append(res.convert(img.mode) if img.mode != "RGB" else res)
        return out

    def restore_array(self, rgb: np.ndarray, faces: Sequence[FaceRecord], settings: RestoreSettings) -> np.ndarray:
        """``rgb`` (HxWx3 uint8) with ``faces`` restored and blended in; the same array when there is none to restore."""
        import numpy as np

        usable = [f for f in faces if _eye_distance(f) >= MIN_EYE_DISTANCE_PX]
        if not usable or settings.visibility == 0.0:
            return rgb
        affines = [align_affine(f.landmarks) for f in usable]
        crops = [warp_face(rgb, m) for m in affines]
        restored = self.run_net(crops, settings)
        out = rgb.astype(np.float32)
        for m, face in zip(affines, restored):
            paste_back(out, face, m, settings.visibility)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def run_net(self, crops: Sequence[np.ndarray], settings: RestoreSettings) -> list[np.ndarray]:
        """Aligned 512x512 RGB uint8 crops -> restored crops (same layout), in batches of 8."""
        import numpy as np
        import torch

        out: list[np.ndarray] = []
        for start in range(0, len(crops), _BATCH):
            batch = np.stack(crops[start:start + _BATCH]).astype(np.float32)
            # GFPGAN and CodeFormer take and give RGB in [-1, 1] (spandrel's __call__ assumes [0, 1]
            # and would clamp half the range away, so the module is called directly).
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().div_(127.5).sub_(1.0)
            x = x.to(device=self.device, dtype=self.dtype)
            with torch.inference_mode():
                y = self._forward(x, settings)
            y = torch.nan_to_num(y.float(), nan=0.0).clamp_(-1.0, 1.0).add_(1.0).mul_(127.5).round_()
            out.extend(y.permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy())
        return out

    def _forward(self, x: Any, settings: RestoreSettings) -> Any:
        module = self.net.model
        if self.model == "CodeFormer":
            return module(x, weight=float(settings.codeformer_weight))[0]
        # GFPGAN: no intermediate RGB outputs; the stored noise buffers, not global-RNG noise.
        return module(x, return_rgb=False, randomize_noise=False)[0]


def _eye_distance(face: FaceRecord) -> float:
    (lx, ly), (rx, ry) = face.landmarks[0], face.landmarks[1]
    return float(((rx - lx) ** 2 + (ry - ly) ** 2) ** 0.5)


def align_affine(landmarks: Sequence[Sequence[float]]) -> np.ndarray:
    """The 2x3 similarity transform taking a face's 5 landmarks onto the FFHQ 512 template."""
    import cv2
    import numpy as np

    src = np.asarray(landmarks, np.float32).reshape(5, 2)
    dst = np.asarray(FFHQ_TEMPLATE_512, np.float32)
    m, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
    if m is None or not np.all(np.isfinite(m)):
        # Degenerate landmarks (all on one point): a plain least-squares fit, never a crash.
        m, _ = cv2.estimateAffinePartial2D(src, dst, method=0)
    return np.asarray(m, np.float64)


def warp_face(rgb: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The 512x512 aligned crop; outside the image it mirrors the border (the model sees no black wedge)."""
    import cv2

    return cv2.warpAffine(rgb, affine, (FACE_SIZE, FACE_SIZE), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)


def feather_mask(affine: np.ndarray, height: int, width: int) -> np.ndarray:
    """HxW float32 in [0, 1]: the crop's footprint in the image, eroded and blurred over the feather width.

    Erosion and blur use the same width, so the mask is 0 on and outside the footprint's edge.
    """
    import cv2
    import numpy as np

    inverse = cv2.invertAffineTransform(affine)
    ones = np.ones((FACE_SIZE, FACE_SIZE), np.float32)
    footprint = cv2.warpAffine(ones, inverse, (width, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    # The crop's side in image pixels: 512 / the transform's scale.
    scale = float(np.sqrt(abs(np.linalg.det(affine[:, :2]))))
    feather = max(1, int(round(FEATHER_SHARE * FACE_SIZE / max(scale, 1e-6))))
    kernel = np.ones((2 * feather + 1, 2 * feather + 1), np.uint8)
    # The image's own edge is not the crop's edge (a closeup's crop reaches past the frame): the
    # border replicates, so only the footprint's edge inside the image is feathered.
    inner = cv2.erode((footprint >= 1.0 - 1e-3).astype(np.float32), kernel, borderType=cv2.BORDER_REPLICATE)
    soft = cv2.blur(inner, (2 * feather + 1, 2 * feather + 1), borderType=cv2.BORDER_REPLICATE)
    return np.clip(soft, 0.0, 1.0).astype(np.float32)


def paste_back(out: np.ndarray, face: np.ndarray, affine: np.ndarray, visibility: float) -> None:
    """Blend the restored crop ``face`` into ``out`` (HxWx3 float32, in place) through the feathered mask."""
    import cv2
    import numpy as np

    h, w = out.shape[:2]
    inverse = cv2.invertAffineTransform(affine)
    back = cv2.warpAffine(face.astype(np.float32), inverse, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    alpha = feather_mask(affine, h, w) * float(visibility)
    touched = alpha > 0
    if not touched.any():
        return
    a = alpha[touched][:, None]
    out[touched] = out[touched] * (1.0 - a) + back[touched] * a


# ---------------------------------------------------------------- loading and the generation hook


def load_face_restorer(model: str, profile: Any, *, device: str = "cpu", weights: str | Path | None = None,
                       analyzer: FaceAnalyzer | None = None) -> FaceRestorer:
    """A :class:`FaceRestorer` for ``model`` with ``profile``'s face pack (or ``analyzer``), on ``device``.

    ``weights`` defaults to :func:`find_weights` under ``models/``. Raises ModelMissing when the
    weights or the face pack are absent.
    """
    path = Path(weights) if weights is not None else find_weights(model)
    if analyzer is None:
        from likeness.backends.faces import load_face_analyzer

        analyzer = load_face_analyzer(profile, device=device)
    net = load_restorer_net(path, model, device=device)
    log.info("face restoration: %s from %s on %s", model, path, device)
    return FaceRestorer(net, analyzer, model)


_CACHE: dict[tuple[str, str, str, str], FaceRestorer] = {}
_CACHE_LOCK = threading.Lock()


def restorer_for_pipeline(pipe: Any, settings: RestoreSettings) -> FaceRestorer:
    """The restorer for a loaded pipeline's profile and device (loaded once per process and device)."""
    from likeness.backends.diffusion import pipeline_device
    from likeness.profiles import load_profile

    profile_name = getattr(pipe, "_likeness_profile", "")
    if not profile_name:
        raise FailedPrecondition("face restoration needs the pipeline's profile (its face pack); load the pipeline "
                                 "with likeness.backends.diffusion.load_pipeline")
    device = str(pipeline_device(pipe))
    path = find_weights(settings.model)
    key = (settings.model, str(path), profile_name, device)
    with _CACHE_LOCK:
        restorer = _CACHE.get(key)
        if restorer is None:
            restorer = load_face_restorer(settings.model, load_profile(profile_name), device=device, weights=path)
            _CACHE[key] = restorer
    return restorer


def restore_generated(pipe: Any, images: Sequence[Image.Image], sampling: SamplingConfig) -> list[Image.Image]:
    """The generation hook: ``images`` restored as ``sampling`` asks (unchanged when restoration is off)."""
    settings = settings_from_sampling(sampling)
    if settings is None:
        return list(images)
    return restorer_for_pipeline(pipe, settings).restore(images, settings)
