"""Models the curation tests share: the real CPU face pack (analysed at insightface's defaults) and the
tiny random CLIP. Session-scoped: loading each once serves every curation test module."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def analyzer(face_pack: Path):
    from likeness.backends.faces import InsightFaceAnalyzer

    return InsightFaceAnalyzer(face_pack, device="cpu")


@pytest.fixture(scope="session")
def tiny_clip(tiny_models: Path):
    from likeness.backends.clip import load_clip
    from likeness.profiles import load_profile

    return load_clip(load_profile("cpu-tiny"))
