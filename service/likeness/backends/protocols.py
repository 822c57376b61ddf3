"""The small protocols the core types against: a face analyzer, a CLIP model, a diffusion pipeline.

This module is light on purpose (standard library only at run time; no numpy, torch,
onnxruntime, insightface or open_clip), so every stage can name these types at import time while the heavy
backends (``faces``, ``clip``, ``diffusion``) load only when a model is used.
A test keeps it light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image


@dataclass(frozen=True)
class FaceRecord:
    """One detected face: where it is, how sure the detector is, who it is."""

    # x1, y1, x2, y2 in pixels of the analysed image.
    bbox: tuple[float, float, float, float]
    # SCRFD confidence in [0, 1]; 0.5 is the detection threshold.
    det_score: float
    # 5 points: left eye, right eye, nose tip, left and right mouth corners.
    landmarks: tuple[tuple[float, float], ...]
    # Face box area / image area: how big the face is in the frame (zoom check).
    area_ratio: float
    # float32, L2-normalised identity embedding (128-d CPU pack, 512-d buffalo_l).
    embedding: np.ndarray = field(compare=False, repr=False)

    def to_dict(self, with_embedding: bool = False) -> dict:
        """JSON-friendly view (the embedding only on request: it is long)."""
        out = {
            "bbox": [round(v, 2) for v in self.bbox],
            "det_score": round(self.det_score, 4),
            "landmarks": [[round(x, 2), round(y, 2)] for x, y in self.landmarks],
            "area_ratio": round(self.area_ratio, 5),
        }
        if with_embedding:
            out["embedding"] = [float(v) for v in self.embedding]
        return out


class FaceAnalyzer(Protocol):
    """Detect every face of each image and embed it."""

    name: str
    embedding_dim: int

    def analyze(self, images: Sequence[np.ndarray]) -> list[list[FaceRecord]]:
        """RGB uint8 HxWx3 arrays -> every face per image, largest first."""
        ...


class ClipModel(Protocol):
    """Image and text embeddings in one joint space."""

    name: str

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """(N, D) L2-normalised float32."""
        ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(M, D) L2-normalised float32."""
        ...


class Pipeline(Protocol):
    """The parts of a diffusers Stable Diffusion (1.x or XL) pipeline the stages use.

    Satisfied by ``StableDiffusionPipeline`` and ``StableDiffusionXLPipeline`` as
    :func:`likeness.backends.diffusion.load_pipeline` returns them; the attributes are
    torch modules, typed loosely here so that this module never imports torch.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any

    @property
    def device(self) -> Any:
        """The torch device the UNet lives on."""
        ...
