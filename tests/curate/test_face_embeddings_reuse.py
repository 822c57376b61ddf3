"""Curation's main-face embeddings reused for the training/evaluation centroid (issue 14).

Curation writes ``curated/face_embeddings.safetensors`` (each selected PNG's main-face embedding and the
PNG's sha256); :func:`likeness.identity.curated_centroid` takes an image's embedding from it while the
PNG on disk still has that digest, and analyses the rest. Real photos and the real CPU face pack; the
analyzer is the real one behind a thin wrapper that counts the images it is asked to analyse.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from likeness import layout
from likeness.curate.decide import CurateConfig, curate
from likeness.identity import curated_centroid, folder_centroid, read_face_embeddings

# The stored embeddings are the ones curation decided with (images decoded and reduced to 1024 px,
# detection at the zoom's size); folder_centroid re-reads the written PNGs and detects at 640.
# A plain folder (no zoom words: detection at 640 in both): the centroids agree to cosine 1.00000000
# (measured 2026-12-03, CPU face pack, the 11 photos below at <= 320 px); 0.999 is the bound issue 14's
# brief set.
SAME_CENTROID = 0.999
# A manifest gallery (zoom words: curation detects at 320/512 px per zoom, likeness.curate.analysis.
# ZOOM_DET_SIDE) does not give the 640-px embeddings: measured 2026-12-03 on the 17 photos of
# _manifest_gallery at <= 512 px, cosine 0.99725 between the centroids for k=5 (0.99887 for k=8),
# per image 0.981-0.999; 83 real photos (realdata/faces) scored against either centroid differ by at
# most 0.016 (median 0.004). 0.995 keeps that margin; a wrong row (another person) drops far below.
SAME_CENTROID_PER_ZOOM_DETECTION = 0.995


class CountingFaces:
    """The real analyzer; counts the images each ``analyze`` call is given (results untouched)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.images = 0
        self.shapes: list[tuple[int, ...]] = []

    def analyze(self, images, *args, **kwargs):
        self.images += len(images)
        self.shapes += [tuple(np.asarray(im).shape) for im in images]
        return self.inner.analyze(images, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory, jolie_photos: Path, analyzer) -> Path:
    """A plain-folder curation of 9 photos of one person and 2 others, downscaled (speed), k=5."""
    out = tmp_path_factory.mktemp("curated")
    res = curate(jolie_photos, None, out, CurateConfig(k=5), faces=analyzer, clip=None)
    assert len(res.selected) == 5
    return out


def _copy(curated: Path, tmp_path: Path) -> Path:
    """A private copy of the curated folder (a test that edits it must not change the others')."""
    dst = tmp_path / "curated"
    shutil.copytree(curated, dst)
    return dst


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_curation_writes_one_row_per_selected_face(curated: Path, analyzer) -> None:
    stored = read_face_embeddings(curated / layout.FACE_EMBEDDINGS_FILE, analyzer.recognition_sha256)
    assert sorted(stored) == [p.name for p in _pngs(curated)]
    import hashlib

    for p in _pngs(curated):
        digest, emb = stored[p.name]
        assert digest == hashlib.sha256(p.read_bytes()).hexdigest()
        assert emb.dtype == np.float32 and emb.shape == (analyzer.embedding_dim,)
    # Another recognition model's file is not used (its embeddings live in another space).
    assert read_face_embeddings(curated / layout.FACE_EMBEDDINGS_FILE, "0" * 64) == {}
    assert read_face_embeddings(curated / layout.FACE_EMBEDDINGS_FILE, None) == {}
    assert not [p for p in curated.iterdir() if ".tmp" in p.name]


def test_stored_centroid_equals_analysed_one_without_analysing(curated: Path, analyzer) -> None:
    pngs = _pngs(curated)
    want, n_want = folder_centroid(analyzer, pngs)
    counting = CountingFaces(analyzer)
    got, n_got = curated_centroid(counting, curated, pngs)
    print(f"cosine(stored centroid, analysed centroid) = {_cos(got, want):.8f}")
    assert counting.images == 0, "every curated PNG's embedding came from the file"
    assert n_got == n_want == len(pngs)
    assert _cos(got, want) > SAME_CENTROID
    assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5


def test_replaced_png_is_reanalysed(curated: Path, analyzer, realdata: Path, tmp_path: Path) -> None:
    from PIL import Image

    folder = _copy(curated, tmp_path)
    pngs = _pngs(folder)
    stored_only, _ = curated_centroid(analyzer, folder, pngs)
    # Replace one curated image by another person's photo after curation (same name, new bytes).
    other = Image.open(realdata / "faces" / "Barack_Obama" / "fr_obama1.jpg").convert("RGB")
    other.thumbnail((320, 320))
    other.save(pngs[0], format="PNG")
    counting = CountingFaces(analyzer)
    got, n = curated_centroid(counting, folder, pngs)
    assert counting.images == 1, "only the replaced PNG is analysed"
    want, n_want = folder_centroid(analyzer, pngs)
    assert n == n_want
    assert _cos(got, want) > SAME_CENTROID, "the replaced image's stored row was ignored"
    # The replacement's face really moved the centroid: had its stored row been used, it would not have.
    assert _cos(got, stored_only) < SAME_CENTROID


def test_missing_or_damaged_file_falls_back_to_analysis(curated: Path, analyzer, tmp_path: Path) -> None:
    folder = _copy(curated, tmp_path)
    pngs = _pngs(folder)
    want, n_want = folder_centroid(analyzer, pngs)
    emb_file = folder / layout.FACE_EMBEDDINGS_FILE
    for damage in ("garbage", "truncated", "deleted"):
        if damage == "garbage":
            emb_file.write_bytes(b"not a safetensors file at all" * 10)
        elif damage == "truncated":
            emb_file.write_bytes((curated / layout.FACE_EMBEDDINGS_FILE).read_bytes()[:200])
        else:
            emb_file.unlink()
        counting = CountingFaces(analyzer)
        got, n = curated_centroid(counting, folder, pngs)
        assert counting.images == len(pngs), damage
        assert n == n_want and _cos(got, want) > SAME_CENTROID, damage


def test_paths_outside_the_curated_folder_are_analysed(curated: Path, analyzer, tmp_path: Path) -> None:
    # Same file name, same bytes, another folder: not the curated set, so not taken from its file.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    src = _pngs(curated)[0]
    shutil.copyfile(src, elsewhere / src.name)
    counting = CountingFaces(analyzer)
    _, n = curated_centroid(counting, curated, [elsewhere / src.name])
    assert counting.images == 1 and n == 1


def test_evaluate_takes_the_curated_reference_from_the_file(curated: Path, analyzer, tiny_models: Path,
                                                            tmp_path: Path) -> None:
    """evaluate() analyses only the images it generates; caller-given references are still analysed."""
    import torch

    from likeness.backends.clip import load_clip
    from likeness.backends.diffusion import load_pipeline
    from likeness.embeddings import TrainedEmbedding, pipeline_dims
    from likeness.evaluate import DEFAULT_SCENES, EvalConfig, evaluate, read_evaluation
    from likeness.profiles import load_profile
    from likeness.spec import spec_from_dict

    spec = spec_from_dict({"name": "Jolie", "token": "j0l1e", "class_word": "woman",
                           "sampling": {"steps": 2, "width": 64, "height": 64, "seed": 1}})
    prof = load_profile("cpu-tiny")
    pipe, clip = load_pipeline(prof, sampler="DPM++ 2M Karras"), load_clip(prof)
    dim = pipeline_dims(pipe)["clip_l"]
    emb = TrainedEmbedding(token="j0l1e", family="sd15",
                           vectors={"clip_l": torch.randn(1, dim, generator=torch.Generator().manual_seed(0)) * 0.01},
                           step=1, base_model="tiny/sd15")
    build = tmp_path / "build"
    shutil.copytree(curated, build / layout.CURATED_DIR)
    one = EvalConfig(scenes=DEFAULT_SCENES[:1], seeds=(7,))
    counting = CountingFaces(analyzer)
    evaluate(build, spec, emb, one, pipe=pipe, faces=counting, clip=clip)
    # Two generated images (token and baseline arm, 64 px); no curated PNG was analysed.
    assert counting.images == 2 and set(counting.shapes) == {(64, 64, 3)}
    doc = read_evaluation(build / layout.EVAL_DIR)
    assert doc["settings"]["reference"] == {"n_images": 5, "n_faces": 5}
    # Given references keep folder_centroid: every one is analysed, even the curated folder's own PNGs.
    counting = CountingFaces(analyzer)
    evaluate(build, spec, emb, one, pipe=pipe, faces=counting, clip=clip, out_dir=tmp_path / "given",
             reference_images=_pngs(build / layout.CURATED_DIR))
    assert counting.images == 5 + 2


def _manifest_gallery(root: Path, realdata: Path) -> Path:
    """17 photos (9 of one person, 8 of another) labelled with four zoom words, as a generated gallery."""
    from PIL import Image

    from likeness.generate.manifest import GalleryImage, write_manifest

    g = root / "gallery"
    (g / "images").mkdir(parents=True)
    zooms = ["extreme closeup", "medium closeup", "closeup", "medium shot"]
    files = (sorted((realdata / "faces" / "Angelina_Jolie").glob("*.jpg"))
             + sorted((realdata / "faces" / "Katy_Perry").glob("*.jpg"))[:8])
    rows = []
    for n, p in enumerate(files):
        z = n % 4
        iid = f"z{z}-a0-{n:04d}"
        img = Image.open(p).convert("RGB")
        img.thumbnail((512, 512))
        img.save(g / "images" / f"{iid}.png")
        rows.append(GalleryImage(id=iid, file=f"images/{iid}.png", zoom=zooms[z], angle="front shot", zoom_index=z,
                                 angle_index=0, seed=1, prompt=f"photo of a woman, {zooms[z]}"))
    write_manifest(g, rows)
    return g


def test_manifest_gallery_reuses_the_per_zoom_embeddings(realdata: Path, analyzer, tmp_path: Path) -> None:
    out = tmp_path / "curated"
    res = curate(_manifest_gallery(tmp_path, realdata), None, out, CurateConfig(k=5), faces=analyzer, clip=None)
    assert len(res.selected) == 5
    pngs = _pngs(out)
    counting = CountingFaces(analyzer)
    got, n = curated_centroid(counting, out, pngs)
    want, n_want = folder_centroid(analyzer, pngs)
    print(f"manifest gallery: cosine(stored centroid, analysed centroid) = {_cos(got, want):.6f}")
    assert counting.images == 0 and n == n_want == 5
    assert _cos(got, want) > SAME_CENTROID_PER_ZOOM_DETECTION


def test_a_selected_image_without_a_face_has_no_row(realdata: Path, analyzer, tmp_path: Path) -> None:
    """A kept image without a face (a rear view kept by a real CLIP model) gets no row and is analysed.

    The tiny CLIP cannot keep a rear view (tests/curate/test_no_face.py), so this drives ``_write``
    with curation's own items: one with the faces the real analyzer found, one with none.
    """
    from PIL import Image

    from likeness.curate import decide
    from likeness.curate.passes import _Item

    g = tmp_path / "gallery"
    g.mkdir()
    for name, src in (("face", "faces/Katy_Perry/deepface_img26.jpg"),
                      ("back", "faces/_negative_back_of_head/mmpose_h36m_S1_Directions_back_view.jpg")):
        img = Image.open(realdata / src).convert("RGB")
        img.thumbnail((320, 320))
        img.save(g / f"{name}.png")
    items = [_Item(r) for r in decide.gallery_rows(g)]
    for it in items:
        it.faces = list(analyzer.analyze([np.asarray(Image.open(g / it.row.file).convert("RGB"))])[0]) \
            if it.row.id == "face" else []
    assert [bool(it.faces) for it in items] == [False, True]  # "back" sorts first
    result = decide.CurationResult(out_dir=str(tmp_path / "out"), selected=("back", "face"), images=(), set_scores={},
                                   clusters={}, config={}, summary={})
    decide._write(g, tmp_path / "out", items, [0, 1], result, analyzer.recognition_sha256)
    stored = read_face_embeddings(tmp_path / "out" / layout.FACE_EMBEDDINGS_FILE, analyzer.recognition_sha256)
    assert sorted(stored) == ["face.png"]
    counting = CountingFaces(analyzer)
    _, n = curated_centroid(counting, tmp_path / "out", _pngs(tmp_path / "out"))
    assert counting.images == 1 and n == 1, "only the faceless image is analysed (and has no face)"


class _Models:
    """The build's model cache as stage functions ask it (``faces``/``clip`` per profile and device)."""

    def __init__(self, faces: Any, clip: Any) -> None:
        self._faces, self._clip = faces, clip

    def faces(self, profile: Any, device: Any) -> Any:
        return self._faces

    def clip(self, profile: Any, device: Any) -> Any:
        return self._clip


def test_train_stage_validator_centroid_comes_from_the_file(curated: Path, analyzer, tiny_models: Path,
                                                           tmp_path: Path) -> None:
    """stage_train (real trainer, tiny SD 1.5, validation on) analyses only its validation images."""
    from likeness.backends.clip import load_clip
    from likeness.build.context import BuildContext
    from likeness.build.options import BuildOptions
    from likeness.build.stages import stage_train
    from likeness.profiles import load_profile
    from likeness.progress import CancelToken
    from likeness.spec import spec_from_dict

    spec = spec_from_dict({"name": "Jolie", "token": "j0l1e", "class_word": "woman", "profile": "cpu-tiny",
                           "sampling": {"steps": 2, "width": 64, "height": 64, "seed": 1}})
    shutil.copytree(curated, tmp_path / layout.CURATED_DIR)
    curated_shapes = set()
    from PIL import Image

    for p in _pngs(tmp_path / layout.CURATED_DIR):
        with Image.open(p) as im:
            curated_shapes.add((im.height, im.width, 3))
    counting = CountingFaces(analyzer)
    ctx = BuildContext(store=None, build_id="b", root=tmp_path, spec=spec,
                       options=BuildOptions(training_steps=2, checkpoint_every=2, train_resolution=64, eval_steps=2,
                                            eval_scenes=("cooking in a kitchen",)),
                       device="cpu", cancel=CancelToken(), progress=None,
                       models=_Models(counting, load_clip(load_profile("cpu-tiny"))))
    res = stage_train(ctx, 0)
    assert res["last_step"] == 2
    # The validator's images (64 px) were analysed; no curated PNG was (their embeddings came from the file).
    assert counting.images > 0 and set(counting.shapes) == {(64, 64, 3)}
    assert not (set(counting.shapes) & curated_shapes)
