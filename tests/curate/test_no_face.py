"""Images without a face are decided honestly: a rear view is kept only on evidence.

Issue 11: a coffee cup labelled "rear angle" was kept in 4 of 5 pools ("CLIP similarity 0.96 to the
character's images is at least 0.80"): with the tiny random CLIP every image scores 0.93-0.97. A
random-weights CLIP is no evidence, and no threshold is calibrated for any real CLIP on this project's
machines, so by default no rear shot without a face is kept.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from likeness.curate.decide import CurateConfig, curate
from likeness.generate.manifest import GalleryImage, write_manifest


class _TreatedAsReal:
    """The tiny CLIP with its random-weights flag cleared: exercises the rule a real CLIP would follow.

    Plumbing only (the threshold path and its reasons); it proves nothing about a real CLIP's numbers.
    """

    random_weights = False

    def __init__(self, clip) -> None:
        self._clip = clip
        self.name = clip.name

    def embed_images(self, images, batch_size: int = 32):
        return self._clip.embed_images(images, batch_size=batch_size)

    def embed_texts(self, texts):
        return self._clip.embed_texts(texts)


def _cup(path: Path) -> None:
    """A drawn coffee cup on a grey backdrop: no person at all."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (512, 512), (128, 128, 128))
    d = ImageDraw.Draw(im)
    d.rectangle((170, 200, 330, 400), fill=(240, 240, 235), outline=(60, 40, 30), width=6)
    d.ellipse((170, 175, 330, 225), fill=(90, 55, 30), outline=(60, 40, 30), width=6)
    d.arc((300, 250, 390, 350), -90, 90, fill=(60, 40, 30), width=12)
    im.save(path)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory, realdata: Path) -> Path:
    g = tmp_path_factory.mktemp("nofacegallery")
    (g / "images").mkdir()
    plan = [
        ("z2-a0-0000", "faces/Katy_Perry/deepface_img26.jpg", "front shot", 0),
        ("z2-a0-0001", "faces/Katy_Perry/deepface_img45.jpg", "front shot", 0),
        ("z2-a2-0000", "faces/Katy_Perry/deepface_img42.jpg", "side angle", 2),
        ("z4-a1-0000", "faces/_negative_back_of_head/mmpose_h36m_S1_Directions_back_view.jpg", "rear angle", 1),
        ("z2-a1-0000", None, "rear angle", 1),  # the coffee cup
        ("z2-a0-0002", "faces/_negative_no_face/skimage_brick.png", "front shot", 0),
    ]
    rows = []
    for iid, src, angle, ai in plan:
        dst = g / "images" / f"{iid}.png"
        if src is None:
            _cup(dst)
        else:
            from PIL import Image

            Image.open(realdata / src).convert("RGB").save(dst)
        zoom, zi = ("full body", 4) if iid.startswith("z4") else ("closeup", 2)
        rows.append(GalleryImage(id=iid, file=f"images/{iid}.png", zoom=zoom, angle=angle, zoom_index=zi,
                                 angle_index=ai, seed=1, prompt=f"photo of a woman, {zoom}, {angle}, gray background"))
    write_manifest(g, rows)
    return g


def test_random_clip_keeps_no_coffee_cup_and_says_why(gallery: Path, tmp_path: Path, analyzer, tiny_clip) -> None:
    assert tiny_clip.random_weights, "cpu-tiny's CLIP is marked random (profiles: random_weights = true)"
    # Even a user threshold that would keep anything cannot make a random CLIP evidence.
    for cfg in (CurateConfig(k=6), CurateConfig(k=6, rear_clip_threshold=-1.0)):
        d = {x.id: x for x in curate(gallery, None, tmp_path / str(cfg.rear_clip_threshold), cfg,
                                     faces=analyzer, clip=tiny_clip).images}
        for iid in ("z2-a1-0000", "z4-a1-0000"):  # the cup and a real back of a head, both "rear angle"
            assert d[iid].decision == "rejected" and d[iid].reason_code == "no_face", (iid, d[iid].reason)
            assert "a rear view can't be verified without a real CLIP model" in d[iid].reason
            assert "random weights" in d[iid].reason
        assert d["z2-a0-0002"].reason_code == "no_face" and "not labelled a rear-angle shot" in d["z2-a0-0002"].reason


def test_without_clip_no_rear_view_is_kept(gallery: Path, tmp_path: Path, analyzer) -> None:
    d = {x.id: x for x in curate(gallery, None, tmp_path / "o", CurateConfig(k=6), faces=analyzer, clip=None).images}
    assert d["z2-a1-0000"].reason_code == "no_face" and "no CLIP model was given" in d["z2-a1-0000"].reason


def test_a_real_clip_needs_a_calibrated_threshold(gallery: Path, tmp_path: Path, analyzer, tiny_clip) -> None:
    real = _TreatedAsReal(tiny_clip)
    # No threshold is calibrated by default: rejected, and the reason says what to do.
    d = {x.id: x for x in curate(gallery, None, tmp_path / "a", CurateConfig(k=6), faces=analyzer, clip=real).images}
    cup = d["z2-a1-0000"]
    assert cup.reason_code == "rear_rejected" and "no threshold is calibrated" in cup.reason
    assert "rear_clip_threshold" in cup.reason and cup.scores["clip_identity"] is not None
    # A threshold the user measured is applied both ways.
    low = {x.id: x for x in curate(gallery, None, tmp_path / "b", CurateConfig(k=6, rear_clip_threshold=-1.0),
                                   faces=analyzer, clip=real).images}
    assert low["z2-a1-0000"].reason_code in {"rear_kept", "not_selected"}
    if low["z2-a1-0000"].reason_code == "rear_kept":
        assert "calibrated -1.00" in low["z2-a1-0000"].reason
    high = {x.id: x for x in curate(gallery, None, tmp_path / "c", CurateConfig(k=6, rear_clip_threshold=1.01),
                                    faces=analyzer, clip=real).images}
    assert high["z2-a1-0000"].reason_code == "rear_rejected" and "below 1.01" in high["z2-a1-0000"].reason


def test_rear_threshold_is_optional_and_validated() -> None:
    from likeness.curate.checks import curate_config_from_dict
    from likeness.errors import InvalidInput

    assert curate_config_from_dict({}).rear_clip_threshold is None
    assert curate_config_from_dict({"rear_clip_threshold": 0.3}).rear_clip_threshold == 0.3
    with pytest.raises(InvalidInput, match="rear_clip_threshold"):
        curate_config_from_dict({"rear_clip_threshold": 2.0})
