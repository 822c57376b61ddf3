"""CLIP image and text embeddings through open_clip (background checks, CLIP-T).

The profile names the model: ``clip_model`` is an open_clip architecture
("ViT-L-14") or a path to a JSON config (``tiny/clip/config.json``), and
``clip_pretrained`` a local checkpoint (or, only when online, a pretrained
tag). A JSON config is registered with open_clip under a private name, so no
hub lookup happens; the tokenizer is open_clip's SimpleTokenizer, whose BPE
vocabulary ships in the wheel. Nothing is downloaded: a checkpoint path that
does not exist is a :class:`ModelMissing`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import open_clip
import torch
from PIL import Image

from likeness.backends.protocols import ClipModel
from likeness.errors import InvalidInput, ModelMissing
from likeness.profiles import Profile


def _register_config(config_path: Path) -> str:
    """Register a JSON model config with open_clip under a unique private name."""
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"CLIP config {config_path} is not readable JSON ({exc}); fix clip_model in the profile") from exc
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise InvalidInput(f"CLIP config {config_path} needs embed_dim, vision_cfg and text_cfg (an open_clip model config)")
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    name = f"likeness-{config_path.parent.name}-{digest}"
    # open_clip keeps built-in configs in this dict; add_model_config() would
    # register under the file stem ("config"), which collides across folders.
    open_clip.factory._MODEL_CONFIGS[name] = cfg
    return name


def _device(profile_device: str) -> torch.device:
    if profile_device.startswith("cuda:"):  # a worker's own GPU (issue 14), never GPU 0 by default
        return torch.device(profile_device)
    if profile_device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class OpenClipModel:
    """An open_clip model in eval mode with its validation transform and tokenizer."""

    def __init__(self, model_name: str, pretrained: str, *, device: str = "auto", precision: str = "fp32") -> None:
        if model_name.endswith(".json"):
            cfg_path = Path(model_name)
            if not cfg_path.is_file():
                raise ModelMissing(f"CLIP config {cfg_path} is missing; run `python scripts/build_tiny_models.py` for the tiny one")
            arch = _register_config(cfg_path)
        else:
            arch = model_name
            if arch not in open_clip.list_models():
                raise InvalidInput(f"unknown open_clip architecture {arch!r}; use one of open_clip.list_models() "
                                   "(e.g. ViT-B-32, ViT-L-14) or a path to a JSON config")
        self.device = _device(device)
        dev_precision = precision if self.device.type == "cuda" else "fp32"
        is_tag = bool(pretrained) and not Path(pretrained).exists()
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained or None, device=self.device, precision=dev_precision,
                pretrained_text=False, pretrained_image=False,
            )
        except Exception as exc:  # noqa: BLE001 - a tag offline fails deep inside the hub client
            if not is_tag:
                raise
            raise ModelMissing(
                f"CLIP pretrained tag {pretrained!r} for {arch} is not available offline ({type(exc).__name__}); "
                "download the checkpoint once and set clip_pretrained to its local path"
            ) from exc
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.name = f"open_clip:{Path(model_name).parent.name if model_name.endswith('.json') else model_name}"
        # Set from the profile (profiles.Profile.random_weights): a random CLIP measures nothing.
        self.random_weights = False
        self.embedding_dim = int(getattr(self.model, "embed_dim", 0) or self.model.text_projection.shape[-1])

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """PIL images -> (N, D) L2-normalised float32, ``batch_size`` at a time."""
        if batch_size < 1:
            raise InvalidInput(f"batch_size {batch_size} must be >= 1")
        outs = []
        for start in range(0, len(images), batch_size):
            chunk = [img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img)) for img in images[start:start + batch_size]]
            x = torch.stack([self.preprocess(img.convert("RGB")) for img in chunk]).to(self.device)
            dtype = next(self.model.parameters()).dtype
            feats = self.model.encode_image(x.to(dtype)).float()
            outs.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        if not outs:
            return np.zeros((0, self.embedding_dim), np.float32)
        return np.concatenate(outs).astype(np.float32)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (M, D) L2-normalised float32 (truncated to the context length)."""
        if not texts:
            return np.zeros((0, self.embedding_dim), np.float32)
        tokens = self.tokenizer(list(texts)).to(self.device)
        feats = self.model.encode_text(tokens).float()
        return torch.nn.functional.normalize(feats, dim=-1).cpu().numpy().astype(np.float32)

    def similarity(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """(N, M) cosine of each image to each text."""
        return self.embed_images(images) @ self.embed_texts(texts).T


def _open_clip_from_profile(profile: Profile, device: str | None = None) -> OpenClipModel:
    model_name = profile.clip_model
    if model_name.endswith(".json"):
        model_name = str(profile.resolve(model_name))
    pretrained = profile.clip_pretrained
    looks_like_path = "/" in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors"))
    if not pretrained or looks_like_path:
        pretrained = str(profile.require("clip"))
    precision = {"float16": "fp16", "bfloat16": "bf16"}.get(profile.dtype, "fp32")
    model = OpenClipModel(model_name, pretrained, device=device or profile.device, precision=precision)
    model.random_weights = bool(profile.random_weights)
    return model


# Registry: backend name -> factory(profile). Unknown names fail listing these.
CLIP_BACKENDS: dict[str, Callable[..., ClipModel]] = {
    "open_clip": _open_clip_from_profile,
}


def load_clip(profile: Profile, *, backend: str = "open_clip", device: str | None = None) -> ClipModel:
    """The CLIP model a profile names (on ``device``, e.g. "cuda:1", if given); ModelMissing when weights are absent."""
    try:
        factory = CLIP_BACKENDS[backend]
    except KeyError:
        raise InvalidInput(f"unknown CLIP backend {backend!r}; choose one of {sorted(CLIP_BACKENDS)}") from None
    return factory(profile, device=device) if device else factory(profile)
