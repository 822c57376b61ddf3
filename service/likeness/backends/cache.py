"""Loaded models per (kind, profile), shared by requests and builds: loading is slow, using is not.

Each model is loaded once, under its own lock (two requests for one model wait for one load;
requests for different models load in parallel). The loaders are the backends' own
``load_*`` functions, imported only when a model is first asked for.
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
        self._models: dict[tuple[str, str], Any] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}

    def get(self, kind: str, profile_name: str, load: Callable[[], Any]) -> Any:
        """The model ``kind`` of ``profile_name``, loaded by ``load()`` on first use."""
        key = (kind, profile_name)
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

    def faces(self, profile: Profile) -> FaceAnalyzer:
        from likeness.backends.faces import load_face_analyzer

        return self.get("faces", profile.name, lambda: load_face_analyzer(profile))

    def clip(self, profile: Profile) -> ClipModel:
        from likeness.backends.clip import load_clip

        return self.get("clip", profile.name, lambda: load_clip(profile))
