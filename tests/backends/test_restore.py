"""Face restoration (A1111's "Restore faces") with spandrel's real GFPGAN and CodeFormer, random weights, on CPU.

The weights are random (no real GFPGAN/CodeFormer file may be downloaded), so the restored faces are
noise: what is tested is what does not depend on trained weights. spandrel detects each architecture
from a file laid out as the released ones (``{"params_ema": state_dict}``), the real insightface pack
finds and aligns the face of a real photo, the paste-back touches only the face's crop, visibility 0
and faceless images come back untouched, sizes and modes are kept, the settings reach the model, and
the infotext carries A1111's ``Face restoration`` key through generation and import.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from likeness.backends import restore as R
from likeness.errors import InvalidInput, ModelMissing
from likeness.generate.gallery import infotext_for
from likeness.generate.infotext import parse_infotext, png_bytes, read_parameters
from likeness.generate.plan import PlannedImage
from likeness.spec import SamplingConfig, spec_from_dict

REPO = Path(__file__).resolve().parents[2]
# One real photo with one face that leaves most of the frame free (853x480, the face ~90 px wide).
PHOTO = ("Barack_Obama", "fr_obama-480p.jpg")


# ---------------------------------------------------------------- random-weight files


def _random_gfpgan():
    from spandrel.architectures.GFPGAN import GFPGAN

    # The hyperparameters of the released GFPGANv1.3/1.4 files (the ones spandrel's loader assumes).
    return GFPGAN(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
                  num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True)


def _random_codeformer():
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    # The released file has 9 transformer layers of width 512; spandrel reads both from the keys, so a
    # 1-layer, 64-wide transformer is the same architecture at a fraction of the CPU time (the VQ
    # autoencoder around it is the real, fixed one).
    return CodeFormer(dim_embd=64, n_head=8, n_layers=1, codebook_size=1024, latent_size=256,
                      connect_list=["32", "64", "128", "256"])


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    """A models/ folder with random GFPGAN and CodeFormer files where A1111 keeps the real ones."""
    import torch

    R.face_registry()  # imports spandrel with its torch.jit.script deprecation warning silenced
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    for model, make in (("GFPGAN", _random_gfpgan), ("CodeFormer", _random_codeformer)):
        folder = root / R.WEIGHT_FOLDERS[model][0]
        folder.mkdir()
        torch.save({"params_ema": make().state_dict()}, folder / R.WEIGHT_FILE[model])
    return root


@pytest.fixture(scope="session")
def nets(weights):
    return {m: R.load_restorer_net(R.find_weights(m, weights), m) for m in R.RESTORE_MODELS}


@pytest.fixture(scope="session")
def analyzer(face_pack: Path):
    from likeness.backends.faces import InsightFaceAnalyzer

    return InsightFaceAnalyzer(face_pack, det_size=640, device="cpu")


@pytest.fixture(scope="session")
def photo(realdata: Path) -> Image.Image:
    path = realdata / "faces" / PHOTO[0] / PHOTO[1]
    if not path.is_file():
        pytest.skip(f"{path} is not in this copy of the shared realdata")
    return Image.open(path).convert("RGB")


@pytest.fixture(scope="session")
def gfpgan_run(nets, analyzer, photo):
    """One GFPGAN restoration of the photo (17 s on 2 CPU threads): (input, output, the face found)."""
    module = nets["GFPGAN"].model
    seen: list[dict] = []
    real_forward = module.forward

    def spy(x, **kwargs):
        seen.append(kwargs)
        return real_forward(x, **kwargs)

    module.forward = spy
    try:
        restorer = R.FaceRestorer(nets["GFPGAN"], analyzer, "GFPGAN")
        (out,) = restorer.restore([photo], R.RestoreSettings("GFPGAN"))
    finally:
        del module.forward
    (faces,) = analyzer.analyze([np.asarray(photo)])
    return photo, out, faces, seen


# ---------------------------------------------------------------- weights and architectures


def test_spandrel_detects_each_random_weight_architecture(weights, nets):
    from spandrel import ModelLoader

    for model in R.RESTORE_MODELS:
        path = R.find_weights(model, weights)
        assert path == weights / R.WEIGHT_FOLDERS[model][0] / R.WEIGHT_FILE[model]
        # Detected from the keys alone, through spandrel's own loader and our face-only registry.
        desc = ModelLoader(registry=R.face_registry()).load_from_file(path)
        assert desc.architecture.id == model and desc.purpose == "FaceSR"
        assert nets[model].architecture.id == model
    # The CodeFormer file's transformer shape was read from the file, not assumed.
    assert nets["CodeFormer"].model.n_layers == 1 and nets["CodeFormer"].model.dim_embd == 64


def test_a_file_of_the_other_restorer_or_of_no_face_model_is_refused(weights, tmp_path):
    import torch

    gfpgan = R.find_weights("GFPGAN", weights)
    with pytest.raises(InvalidInput, match="holds a GFPGAN model, not CodeFormer"):
        R.load_restorer_net(gfpgan, "CodeFormer")
    other = tmp_path / "codeformer.pth"
    torch.save({"conv_first.weight": torch.zeros(64, 3, 3, 3)}, other)  # an upscaler's first key, nothing else
    with pytest.raises(InvalidInput, match="not a face restoration model"):
        R.load_restorer_net(other, "CodeFormer")
    broken = tmp_path / "GFPGANv1.4.pth"
    broken.write_bytes(b"not a pickle")
    with pytest.raises(InvalidInput, match="could not be read"):
        R.load_restorer_net(broken, "GFPGAN")


def test_missing_weights_say_which_file_goes_where(tmp_path, monkeypatch):
    with pytest.raises(ModelMissing) as exc:
        R.find_weights("CodeFormer", tmp_path)
    message = str(exc.value)
    assert str(tmp_path / "Codeformer" / "codeformer-v0.1.0.pth") in message
    assert "facerestore_models" in message and "restore_faces" in message
    # The default folder is models/ ($LIKENESS_MODELS_DIR), as for every profile path.
    monkeypatch.setenv("LIKENESS_MODELS_DIR", str(tmp_path))
    with pytest.raises(ModelMissing, match=str(tmp_path / "GFPGAN" / "GFPGANv1.4.pth")):
        R.find_weights("GFPGAN")
    with pytest.raises(ModelMissing, match="do not exist"):
        R.load_restorer_net(tmp_path / "nothing.pth", "GFPGAN")
    # ComfyUI's folder is read too; of two versions the later name wins.
    (tmp_path / "facerestore_models").mkdir()
    for name in ("GFPGANv1.3.pth", "GFPGANv1.4.pth", "notes.txt"):
        (tmp_path / "facerestore_models" / name).write_bytes(b"x")
    assert R.find_weights("GFPGAN").name == "GFPGANv1.4.pth"


# ---------------------------------------------------------------- the restoration itself


def test_gfpgan_restores_only_the_face_region_of_a_real_photo(gfpgan_run):
    src, out, faces, seen = gfpgan_run
    # The stored noise buffers, not fresh global-RNG noise: the same image restores the same way.
    assert seen == [{"return_rgb": False, "randomize_noise": False}]
    assert out.size == src.size and out.mode == src.mode
    assert len(faces) == 1
    a, b = np.asarray(src).astype(np.int16), np.asarray(out).astype(np.int16)
    changed = np.abs(a - b).max(axis=2) > 0
    lm = np.asarray(faces[0].landmarks)
    eye = float(np.linalg.norm(lm[1] - lm[0]))
    # The FFHQ crop is 512/126 eye distances wide (template eyes 125.9 px apart), centred near the
    # nose: every point of it lies within 2.9 eye distances of the landmarks' centre. Pixels beyond
    # 3.5 are outside any crop and must be exactly the input's.
    yy, xx = np.mgrid[: a.shape[0], : a.shape[1]]
    dist = np.hypot(xx - lm[:, 0].mean(), yy - lm[:, 1].mean()) / eye
    assert changed[dist > 3.5].sum() == 0
    # Random weights paint noise over the face: nearly all of its centre changes.
    assert changed[dist < 1.0].mean() > 0.9
    # Measured 9.5% of this 853x480 photo changed: the crop footprint, not the frame.
    assert 0.03 < changed.mean() < 0.2


def test_paste_back_blends_by_visibility_and_feathers_inside_the_crop():
    img = np.full((300, 400, 3), 100, np.float32)
    face = np.full((R.FACE_SIZE, R.FACE_SIZE, 3), 200, np.uint8)
    landmarks = [(180, 140), (220, 140), (200, 165), (185, 185), (215, 185)]
    m = R.align_affine(landmarks)
    mask = R.feather_mask(m, *img.shape[:2])
    assert mask.min() == 0.0 and mask.max() == pytest.approx(1.0)
    assert mask[160, 200] == pytest.approx(1.0)  # the face centre takes the restored face whole
    assert mask[0, 0] == 0.0 and mask[299, 399] == 0.0
    full, half = img.copy(), img.copy()
    R.paste_back(full, face, m, 1.0)
    R.paste_back(half, face, m, 0.5)
    # A1111's Image.blend(original, restored, visibility) per pixel.
    np.testing.assert_allclose(half - img, 0.5 * (full - img), atol=1e-3)
    assert np.array_equal(full[mask == 0], img[mask == 0])
    # The mask rises over the feather width, not in one step.
    ramp = mask[160, :200]
    assert ((ramp > 0) & (ramp < 1)).sum() >= 2


def test_a_crop_past_the_frame_is_not_faded_at_the_frame_edge():
    # A closeup: the crop (4 eye distances wide) reaches past all four sides of a 200x200 image.
    landmarks = [(70, 90), (130, 90), (100, 120), (78, 150), (122, 150)]
    mask = R.feather_mask(R.align_affine(landmarks), 200, 200)
    assert mask[0, 100] == pytest.approx(1.0) and mask[100, 0] == pytest.approx(1.0)


def test_visibility_zero_and_faceless_images_come_back_untouched(nets, analyzer, photo, realdata):
    restorer = R.FaceRestorer(nets["GFPGAN"], analyzer, "GFPGAN")
    (same,) = restorer.restore([photo], R.RestoreSettings("GFPGAN", visibility=0.0))
    assert same is photo
    no_face = Image.open(realdata / "faces" / "_negative_no_face" / "skimage_coffee.png").convert("RGB")
    assert analyzer.analyze([np.asarray(no_face)]) == [[]]
    grey = Image.new("L", (96, 64), 128)  # another mode, no face: returned as it was
    out = restorer.restore([no_face, grey], R.RestoreSettings("GFPGAN"))
    assert out[0] is no_face and out[1] is grey
    with pytest.raises(InvalidInput, match="runs GFPGAN, not CodeFormer"):
        restorer.restore([photo], R.RestoreSettings("CodeFormer"))


def test_codeformer_gets_its_weight_and_restores_the_face(nets, analyzer, photo, monkeypatch):
    """One CodeFormer pass (about 40 s on 2 CPU threads) with a spy on the real module's forward."""
    net = nets["CodeFormer"]
    seen = []
    real_forward = net.model.forward

    def spy(x, weight=0.5, **kwargs):
        seen.append((tuple(x.shape), float(x.min()), float(x.max()), weight))
        return real_forward(x, weight=weight, **kwargs)

    monkeypatch.setattr(net.model, "forward", spy)
    restorer = R.FaceRestorer(net, analyzer, "CodeFormer")
    rgba = photo.convert("RGBA")
    (out,) = restorer.restore([rgba], R.RestoreSettings("CodeFormer", visibility=0.8, codeformer_weight=0.7))
    assert out.size == photo.size and out.mode == "RGBA"
    # One aligned 512x512 face in [-1, 1] (the models' range, not spandrel's [0, 1]), with w = 0.7.
    (shape, lo, hi, weight), = seen
    assert shape == (1, 3, 512, 512) and -1.0 <= lo < 0.0 < hi <= 1.0 and weight == 0.7
    assert not np.array_equal(np.asarray(out), np.asarray(rgba))


def test_settings_are_checked():
    with pytest.raises(InvalidInput, match="CodeFormer, GFPGAN"):
        R.RestoreSettings("RealESRGAN")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="visibility"):
        R.RestoreSettings("GFPGAN", visibility=1.5)
    with pytest.raises(InvalidInput, match="restore_faces"):
        spec_from_dict({"name": "E", "token": "3m1ly", "sampling": {"restore_faces": "codeformer"}})
    with pytest.raises(InvalidInput, match="codeformer_weight"):
        spec_from_dict({"name": "E", "token": "3m1ly", "sampling": {"restore_faces": "CodeFormer",
                                                                    "codeformer_weight": -0.1}})
    spec = spec_from_dict({"name": "E", "token": "3m1ly", "sampling": {"restore_faces": "CodeFormer"}})
    assert R.settings_from_sampling(spec.sampling) == R.RestoreSettings("CodeFormer", 1.0, 0.5)
    assert R.settings_from_sampling(SamplingConfig()) is None


def test_restoration_settings_travel_in_a_spec_over_grpc():
    from likeness.serve.servicer import spec_from_pb, spec_to_pb

    spec = spec_from_dict({"name": "E", "token": "3m1ly", "sampling": {
        "restore_faces": "CodeFormer", "restore_visibility": 0.75, "codeformer_weight": 0.25}})
    back = spec_from_pb(spec_to_pb(dataclasses.asdict(spec))).sampling
    assert (back.restore_faces, back.restore_visibility, back.codeformer_weight) == ("CodeFormer", 0.75, 0.25)
    assert spec_from_pb(spec_to_pb(dataclasses.asdict(spec_from_dict({"name": "E", "token": "3m1ly"})))).sampling \
        .restore_faces == ""


# ---------------------------------------------------------------- infotext, generation, import


def _item() -> PlannedImage:
    return PlannedImage(id="g0", zoom_index=-1, angle_index=-1, index_in_cell=0, zoom="", angle="",
                        prompt="photo of a woman", negative_prompt="", seed=7)


def test_infotext_writes_face_restoration_where_a1111_does():
    on = dataclasses.replace(SamplingConfig(), restore_faces="CodeFormer")
    text = infotext_for(_item(), on, "v1-5", "6ce0161689")
    # A1111's create_infotext: "..., Seed: 7, Face restoration: CodeFormer, Size: 512x512, ...";
    # at its default weight and full visibility nothing else (txt2img writes no weight).
    assert "Seed: 7, Face restoration: CodeFormer, Size: 512x512" in text
    assert "CodeFormer weight" not in text and "visibility" not in text
    assert parse_infotext(text).face_restoration == "CodeFormer"
    assert "Face restoration" not in parse_infotext(text).extra
    # Not the defaults: A1111 Extras' keys, rounded to 3 places as it writes them.
    tuned = dataclasses.replace(on, codeformer_weight=0.7, restore_visibility=0.8)
    info = parse_infotext(infotext_for(_item(), tuned, "v1-5"))
    assert info.extra["CodeFormer weight"] == "0.7" and info.extra["CodeFormer visibility"] == "0.8"
    gfp = parse_infotext(infotext_for(_item(), dataclasses.replace(tuned, restore_faces="GFPGAN"), "v1-5"))
    assert gfp.face_restoration == "GFPGAN" and gfp.extra["GFPGAN visibility"] == "0.8"
    assert "CodeFormer weight" not in gfp.extra
    assert "Face restoration" not in infotext_for(_item(), SamplingConfig(), "v1-5")


def test_import_records_the_restoration_an_image_was_made_with(tmp_path):
    from likeness.generate.importer import import_gallery

    src = tmp_path / "src"
    src.mkdir()
    base = "a photo, closeup, front shot\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, "
    texts = {
        "a.png": base + "Face restoration: CodeFormer, Size: 64x64",  # A1111 txt2img
        "b.png": base + "Face restoration: GFPGAN, Size: 64x64, GFPGAN visibility: 0.6",
        "c.png": base + "Size: 64x64",
    }
    for name, text in texts.items():
        (src / name).write_bytes(png_bytes(Image.new("RGB", (64, 64), (90, 80, 70)), text))
    res = import_gallery(src, tmp_path / "out")
    report = json.loads(Path(res.report).read_text())
    by_source = {report["sources"][i]: rec for i, rec in report["images"].items()}
    assert by_source["a.png"]["face_restoration"] == {"model": "CodeFormer", "visibility": 1.0, "codeformer_weight": 0.5}
    assert by_source["b.png"]["face_restoration"] == {"model": "GFPGAN", "visibility": 0.6}
    assert "face_restoration" not in by_source["c.png"]
    # The imported PNG keeps A1111's text, key included.
    a_id = next(i for i, s in report["sources"].items() if s == "a.png")
    assert "Face restoration: CodeFormer" in read_parameters((tmp_path / "out" / "images" / f"{a_id}.png").read_bytes())


@pytest.fixture()
def models_with_weights(weights, face_pack, tmp_path, monkeypatch) -> Path:
    """A models/ folder ($LIKENESS_MODELS_DIR) with the cpu-tiny profile and the random restorers."""
    root = tmp_path / "models"
    root.mkdir()
    for name in ("cpu-tiny.toml", "tiny"):
        os.symlink(REPO / "models" / name, root / name)
    for model in R.RESTORE_MODELS:
        os.symlink(weights / R.WEIGHT_FOLDERS[model][0], root / R.WEIGHT_FOLDERS[model][0])
    monkeypatch.setenv("LIKENESS_MODELS_DIR", str(root))
    monkeypatch.setenv("LIKENESS_FACE_PACK", str(face_pack))
    return root


def _tiny_spec(restore: str):
    return spec_from_dict({
        "name": "R", "token": "r3st", "template": "photo of a woman, {zoom}, {angle}", "per_cell": 2,
        "zooms": ["closeup"], "angles": ["front shot"], "profile": "cpu-tiny",
        "sampling": {"steps": 1, "width": 64, "height": 64, "seed": 5, "restore_faces": restore},
    })


def test_generation_restores_every_image_before_saving(tiny_models, models_with_weights, tmp_path, monkeypatch):
    from likeness.generate.gallery import generate_gallery

    calls = []
    real_restore = R.FaceRestorer.restore

    def spy(self, images, settings):
        calls.append((len(images), settings))
        return real_restore(self, images, settings)

    monkeypatch.setattr(R.FaceRestorer, "restore", spy)
    plain = generate_gallery(_tiny_spec(""), tmp_path / "plain", "cpu-tiny", batch_size=1)
    assert calls == []
    restored = generate_gallery(_tiny_spec("GFPGAN"), tmp_path / "restored", "cpu-tiny", batch_size=1)
    assert restored.generated == 2
    # Each batch of one went through the restorer (after a load with no image, before the first batch).
    assert [n for n, _ in calls if n] == [1, 1] and all(s.model == "GFPGAN" for _, s in calls)
    for png in sorted((Path(restored.gallery_dir) / "images").glob("*.png")):
        info = parse_infotext(read_parameters(png.read_bytes()))
        assert info.face_restoration == "GFPGAN"
        # The tiny model draws noise: no face is found, so the pixels are the unrestored ones.
        twin = Path(plain.gallery_dir) / "images" / png.name
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(twin)))
    # Through executor workers (each loads its own pipeline, as builds and Ray do): restored too.
    from likeness.executor import LocalExecutor

    calls.clear()
    workers = generate_gallery(_tiny_spec("GFPGAN"), tmp_path / "workers", "cpu-tiny", executor=LocalExecutor())
    assert workers.generated == 2 and sum(n for n, _ in calls) == 2
    # Resuming with restoration switched off would mix restored and plain images: refused.
    with pytest.raises(InvalidInput, match="restore_faces"):
        generate_gallery(_tiny_spec(""), tmp_path / "restored", "cpu-tiny", per_cell=2)


def test_generation_without_the_weights_fails_before_planning(tiny_models, models_with_weights, tmp_path):
    from likeness.generate.gallery import PLAN_NAME, generate_gallery

    (models_with_weights / "Codeformer").unlink()
    with pytest.raises(ModelMissing, match="codeformer-v0.1.0.pth"):
        generate_gallery(_tiny_spec("CodeFormer"), tmp_path / "g", "cpu-tiny")
    assert not (tmp_path / "g" / PLAN_NAME).exists()
