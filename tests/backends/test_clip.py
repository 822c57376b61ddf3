"""open_clip backend with the tiny random model: shapes, normalisation, determinism, batching, CLIP-T.

The tiny weights are random, so nothing here checks semantics.
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from likeness.errors import InvalidInput, ModelMissing


@pytest.fixture(scope="module")
def clip(tiny_models):
    from likeness.backends.clip import load_clip
    from likeness.profiles import load_profile

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    return load_clip(load_profile("cpu-tiny"))


def _images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(n)]


def test_image_embeddings_shape_norm_and_batching(clip):
    imgs = _images(5)
    a = clip.embed_images(imgs, batch_size=32)
    b = clip.embed_images(imgs, batch_size=2)
    assert a.shape == (5, 32) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(clip.embed_images(imgs[:1])[0], a[0], atol=1e-5)
    assert clip.embed_images([]).shape == (0, 32)
    with pytest.raises(InvalidInput):
        clip.embed_images(imgs, batch_size=0)


def test_text_embeddings_deterministic_and_distinct(clip):
    t1 = clip.embed_texts(["a woman cooking", "a grey studio backdrop"])
    t2 = clip.embed_texts(["a woman cooking", "a grey studio backdrop"])
    assert t1.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(t1, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(t1, t2)
    assert not np.allclose(t1[0], t1[1])


def test_similarity_and_clip_t(clip):
    from likeness.scores import clip_t

    imgs = _images(3)
    sim = clip.similarity(imgs, ["cooking", "gardening"])
    assert sim.shape == (3, 2) and np.all(np.abs(sim) <= 1.0 + 1e-5)
    ct = clip_t(clip, imgs, ["(3m1ly:1.2) cooking", "3m1ly gardening", "cooking"], token="3m1ly")
    # The identity token is removed: image 0 against "cooking", same as the plain prompt.
    np.testing.assert_allclose(ct[0], sim[0, 0], atol=1e-5)
    np.testing.assert_allclose(ct[1], sim[1, 1], atol=1e-5)
    np.testing.assert_allclose(ct[2], sim[2, 0], atol=1e-5)
    with pytest.raises(ValueError):
        clip_t(clip, imgs, ["one prompt"])


def test_unknown_backend_and_missing_weights(tiny_models, tmp_path):
    from likeness.backends.clip import load_clip
    from likeness.profiles import load_profile

    prof = load_profile("cpu-tiny")
    with pytest.raises(InvalidInput, match=r"unknown CLIP backend 'hf'.*open_clip"):
        load_clip(prof, backend="hf")
    with pytest.raises(ModelMissing, match="CLIP weights"):
        load_clip(replace(prof, clip_pretrained=str(tmp_path / "none.safetensors")))
    with pytest.raises(InvalidInput, match="unknown open_clip architecture"):
        load_clip(replace(prof, clip_model="ViT-Nope-99"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"embed_dim": 8}')
    with pytest.raises(InvalidInput, match="vision_cfg"):
        load_clip(replace(prof, clip_model=str(bad)))
