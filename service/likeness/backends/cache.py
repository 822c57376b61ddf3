"""Loaded models per (kind, profile, device), shared by requests and builds: loading is slow, using is not.

Each model is loaded once, under its own lock (two requests for one model wait for one load;
requests for different models load in parallel). The loaders are the backends' own
``load_*`` functions, imported only when a model is first asked for. A ``device``
("cuda:1") loads the model straight onto that worker's GPU and keeps it apart from the
same model on another device; without one the profile's own rule decides (GPU workers of
one process would then all share the current GPU).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from likeness.backends.protocols import ClipModel, FaceAnalyzer
    from likeness.profiles import Profile


class ModelCache:
    """Loaded models per profile, shared by requests and builds (loading is slow)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str, str], Any] = {}
        self._locks: dict[tuple[str, str, str], threading.Lock] = {}

    def get(self, kind: str, profile_name: str, load: Callable[[], Any], device: str | None = None) -> Any:
        """The model ``kind`` of ``profile_name`` (on ``device``), loaded by ``load()`` on first use."""
        key = (kind, profile_name, device or "")
        with self._lock:
            if key in self._models:
                return self._models[key]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            model = load()
            with self._lock:
                self._models[key] = model
            return model

    def pipeline(self, profile: Profile, device: str | None = None, **options: Any) -> Any:
        """The profile's diffusion pipeline on ``device`` (``load_pipeline`` options: sampler, compile_unet)."""
        from likeness.backends.diffusion import load_pipeline

        return self.get("pipe", profile.name, lambda: load_pipeline(profile, device=device, **options), device)

    def faces(self, profile: Profile, device: str | None = None) -> FaceAnalyzer:
        from likeness.backends.faces import load_face_analyzer

        return self.get("faces", profile.name, lambda: load_face_analyzer(profile, device=device), device)

    def clip(self, profile: Profile, device: str | None = None) -> ClipModel:
        from likeness.backends.clip import load_clip

        return self.get("clip", profile.name, lambda: load_clip(profile, device=device), device)
