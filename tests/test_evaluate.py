"""Evaluation stage with the real classes: tiny SD 1.5 pipeline, tiny open_clip, real face pack.

The tiny pipeline paints noise, so generated images have no face (identity is
None there); the identity reference is built from real photos, which checks
the face path end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from likeness.errors import FailedPrecondition, InvalidInput
from likeness.evaluate import DEFAULT_SCENES, EvalConfig, eval_config, evaluate, read_evaluation
from likeness.identity import folder_centroid
from likeness.spec import spec_from_dict

SPEC = spec_from_dict({
    "name": "Emily", "token": "3m1ly", "class_word": "woman",
    "traits": ["25 year old Scottish woman", "red curly hair", "freckles"],
    "wardrobe": "white t-shirt",
    "negative_prompt": "(worst quality:1.4), blurry",
    "sampling": {"steps": 2, "width": 64, "height": 64, "seed": 1},
})


@pytest.fixture(scope="module")
def models(tiny_models, face_pack):
    from likeness.backends.clip import load_clip
    from likeness.backends.diffusion import load_pipeline
    from likeness.backends.faces import load_face_analyzer
    from likeness.profiles import load_profile

    prof = load_profile("cpu-tiny")
    return {"pipe": load_pipeline(prof, sampler="DPM++ 2M Karras"), "faces": load_face_analyzer(prof),
            "clip": load_clip(prof)}


def _embedding(pipe, token: str = "3m1ly", seed: int = 0):
    import torch

    from likeness.embeddings import TrainedEmbedding, pipeline_dims

    dim = pipeline_dims(pipe)["clip_l"]
    g = torch.Generator().manual_seed(seed)
    return TrainedEmbedding(token=token, family="sd15", vectors={"clip_l": torch.randn(2, dim, generator=g) * 0.01},
                            step=10, base_model="tiny/sd15")


@pytest.fixture()
def build_dir(tmp_path: Path, realdata: Path) -> Path:
    """A build folder whose curated set is three real photos of one person."""
    from PIL import Image

    cur = tmp_path / "curated"
    cur.mkdir(parents=True)
    for i, src in enumerate(sorted((realdata / "faces" / "Angelina_Jolie").glob("*"))[:3]):
        with Image.open(src) as im:
            im = im.convert("RGB")
            im.thumbnail((384, 384))
            im.save(cur / f"z0-a0-{i:04d}.png")
    return tmp_path


def test_evaluate_writes_both_arms_and_resumes(build_dir: Path, models) -> None:
    emb = _embedding(models["pipe"])
    res = evaluate(build_dir, SPEC, emb, EvalConfig(scenes=DEFAULT_SCENES[:2], seeds=(7,)), **models)
    doc = read_evaluation(build_dir / "eval")
    assert doc["scenes"] == list(DEFAULT_SCENES[:2])
    # one image per scene per seed per arm, on disk, with the same seeds in both arms
    assert len(res.images) == 4 and len(doc["images"]) == 4
    for arm in ("token", "baseline"):
        rows = [r for r in doc["images"] if r["arm"] == arm]
        assert [r["scene"] for r in rows] == list(DEFAULT_SCENES[:2])
        assert {r["seed"] for r in rows} == {7}
    for r in doc["images"]:
        assert (build_dir / "eval" / r["file"]).is_file()
        assert isinstance(r["clip_t"], float) and -1.0 <= r["clip_t"] <= 1.0
        # CLIP-T text is the scene alone, shared by both arms
        assert r["scene_text"] == f"photo of a woman, {r['scene']}"
        if r["arm"] == "token":
            assert r["prompt"] == f"photo of 3m1ly woman, {r['scene']}"
        else:
            assert "3m1ly" not in r["prompt"] and "red curly hair" in r["prompt"] and r["scene"] in r["prompt"]
        # noise images: no face, so no identity (never a made-up number)
        assert r["face_found"] is (r["identity"] is not None)
    # the reference came from the real photos' faces
    assert doc["settings"]["reference"]["n_faces"] >= 2
    assert doc["summary"]["token"]["n_images"] == 2 and doc["summary"]["baseline"]["n_images"] == 2
    assert doc["summary"]["token"]["clip_t_mean"] is not None
    assert set(res.scores) >= {"eval_clip_t_token", "eval_clip_t_baseline", "eval_face_rate_token"}

    # Second run with the same embedding: every image is reused (no regeneration).
    stamps = {p.name: p.stat().st_mtime_ns for p in (build_dir / "eval" / "images").glob("*.png")}
    evaluate(build_dir, SPEC, emb, EvalConfig(scenes=DEFAULT_SCENES[:2], seeds=(7,)), **models)
    assert {p.name: p.stat().st_mtime_ns for p in (build_dir / "eval" / "images").glob("*.png")} == stamps

    # Same seed, same pixels: a fresh folder re-makes scene 0 identically.
    import numpy as np
    from PIL import Image

    one = EvalConfig(scenes=DEFAULT_SCENES[:1], seeds=(7,))
    again = evaluate(build_dir, SPEC, emb, one, out_dir=build_dir / "again", **models)
    for im in again.images:
        x = np.asarray(Image.open(build_dir / "again" / im.file), np.int16)
        y = np.asarray(Image.open(build_dir / "eval" / im.file), np.int16)
        # Batched and single convolutions may round differently by one level; the noise is the same.
        assert x.shape == y.shape and np.abs(x - y).max() <= 2

    # Another embedding: token images are redone, baseline images (no embedding) are reused, stale files removed.
    evaluate(build_dir, SPEC, _embedding(models["pipe"], seed=1), one, **models)
    after = {p.name: p.stat().st_mtime_ns for p in (build_dir / "eval" / "images").glob("*.png")}
    assert len(after) == 2
    base = [n for n in after if n.startswith("baseline")]
    assert len(base) == 1 and after[base[0]] == stamps[base[0]]
    assert not ({n for n in after if n.startswith("token")} & set(stamps))


def test_reference_centroid_of_real_faces(models, realdata: Path) -> None:
    photos = sorted((realdata / "faces" / "Angelina_Jolie").glob("*"))[:3]
    centroid, n = folder_centroid(models["faces"], photos)
    assert n >= 2 and centroid is not None
    assert abs(float((centroid ** 2).sum()) - 1.0) < 1e-4
    none, zero = folder_centroid(models["faces"], sorted((realdata / "faces" / "_negative_no_face").glob("*"))[:1])
    assert none is None and zero == 0


def test_inputs_are_checked(build_dir: Path, models, tmp_path: Path) -> None:
    emb = _embedding(models["pipe"])
    with pytest.raises(InvalidInput, match="token"):
        evaluate(build_dir, SPEC, _embedding(models["pipe"], token="0th3r"), **models)
    with pytest.raises(FailedPrecondition, match="curated"):
        evaluate(tmp_path / "empty", SPEC, emb, **models)
    with pytest.raises(InvalidInput, match="scenes"):
        eval_config({"scenes": []})
    with pytest.raises(InvalidInput, match="seeds"):
        eval_config({"seeds": [-1]})
    with pytest.raises(InvalidInput, match="placeholder"):
        eval_config({"token_template": "photo of {who}"})
    with pytest.raises(InvalidInput, match="unknown field"):
        eval_config({"scene": ["x"]})
    with pytest.raises(FailedPrecondition, match="has not run"):
        read_evaluation(tmp_path / "nothing")


def test_later_round_copies_the_baseline_and_sampler_is_in_the_key(build_dir: Path, models) -> None:
    import dataclasses
    import time

    one = EvalConfig(scenes=DEFAULT_SCENES[:1], seeds=(7,))
    t0 = time.perf_counter()
    first = evaluate(build_dir, SPEC, _embedding(models["pipe"]), one, **models)
    t_first = time.perf_counter() - t0
    # Round 1: a new embedding in its own folder; round 0's baseline file (same key) is copied, not rendered.
    r1 = build_dir / "rounds" / "1" / "eval"
    t0 = time.perf_counter()
    second = evaluate(build_dir, SPEC, _embedding(models["pipe"], seed=1), one, out_dir=r1,
                      reuse_dirs=[build_dir / "eval"], **models)
    t_second = time.perf_counter() - t0
    print(f"round 0 evaluate {t_first:.2f} s, round 1 with reuse {t_second:.2f} s")
    assert second.reused == 1 and first.reused == 0
    base0 = next(im.file for im in first.images if im.arm == "baseline")
    base1 = next(im.file for im in second.images if im.arm == "baseline")
    assert base0 == base1
    assert (r1 / base1).read_bytes() == (build_dir / "eval" / base0).read_bytes()
    assert next(im.file for im in second.images if im.arm == "token") != next(
        im.file for im in first.images if im.arm == "token")
    # Another sampler makes another image: its key (file name) differs, so nothing is reused.
    euler = dataclasses.replace(SPEC, sampling=dataclasses.replace(SPEC.sampling, sampler="Euler a"))
    third = evaluate(build_dir, euler, _embedding(models["pipe"]), one, out_dir=build_dir / "euler",
                     reuse_dirs=[build_dir / "eval"], **models)
    assert third.reused == 0
    assert {im.file for im in third.images}.isdisjoint({im.file for im in first.images})
