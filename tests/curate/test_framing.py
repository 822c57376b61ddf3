"""Measured framing and pose: zoom from the face's size, yaw from the landmarks, against the prompt's labels.

The measured zoom goes into curation.json, decides the grid cell coverage counts and selection
spreads over, and is the zoom captions write; a label the picture contradicts is reported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from likeness import scores
from likeness.curate.checks import CurateConfig
from likeness.curate.framing import ZOOM_BOUNDARIES, ZOOMS_BY_FACE_SIZE, label_disagreements, measured_zoom, yaw_degrees

# insightface's 5-point template of a frontal 112x112 face (arcface_dst): eyes, nose tip, mouth corners.
FRONTAL = ((38.29, 51.70), (73.53, 51.50), (56.03, 71.74), (41.55, 92.37), (70.73, 92.20))


def test_zoom_words_ordered_and_each_range_centre_measures_as_itself() -> None:
    assert ZOOMS_BY_FACE_SIZE == ("extreme closeup", "closeup", "medium closeup", "medium shot", "full body")
    assert list(ZOOM_BOUNDARIES) == sorted(ZOOM_BOUNDARIES, reverse=True)
    for zoom, (lo, hi) in scores.ZOOM_FACE_AREA.items():
        assert measured_zoom(math.sqrt(lo * hi)) == zoom
    assert measured_zoom(1.0) == "extreme closeup" and measured_zoom(0.0) == "full body"
    # A 32 px face on 512x512 is a full-body face; the face filling 60% of the frame an extreme closeup.
    assert measured_zoom(32 * 40 / 512**2) == "full body" and measured_zoom(0.6 * 0.7) == "extreme closeup"


def test_yaw_is_zero_frontal_antisymmetric_under_mirror_and_ignores_roll() -> None:
    assert abs(yaw_degrees(FRONTAL)) < 3.0
    turned = [(x, y) for x, y in FRONTAL]
    turned[2] = (FRONTAL[2][0] + 12.0, FRONTAL[2][1])  # nose towards the image's right
    y = yaw_degrees(turned)
    assert y > 20
    # The mirror image: x -> 112 - x, and the left/right eye swap places.
    mirrored = [(112 - x, yy) for x, yy in turned]
    mirrored[0], mirrored[1] = mirrored[1], mirrored[0]
    assert yaw_degrees(mirrored) == pytest.approx(-y, abs=1.0)
    c, s = math.cos(0.5), math.sin(0.5)
    rolled = [(56 + c * (x - 56) - s * (yy - 70), 70 + s * (x - 56) + c * (yy - 70)) for x, yy in turned]
    assert yaw_degrees(rolled) == pytest.approx(y, abs=0.5)
    assert yaw_degrees([(10, 10), (10, 10), (12, 20)]) is None


def test_label_disagreements_in_words() -> None:
    kw = dict(rear_words=("rear", "back"), yaw_front_max=45.0, yaw_side_min=15.0)
    assert label_disagreements("closeup", 0.15, "front shot", 5.0, **kw) == []
    # Neighbouring zoom words overlap: inside the label's own range it is not a disagreement.
    assert label_disagreements("medium closeup", 0.12, "front shot", 5.0, **kw) == []
    (z,) = label_disagreements("full body", 0.4, "front shot", 5.0, **kw)
    assert "'full body'" in z and "'extreme closeup'" in z and "40.0%" in z
    (r,) = label_disagreements("closeup", 0.15, "rear angle", -3.0, **kw)
    assert "rear angle" in r and "face is visible" in r
    assert "looks frontal" in label_disagreements("closeup", 0.15, "side angle", 4.0, **kw)[0]
    assert "turned 60 degrees" in label_disagreements("closeup", 0.15, "front shot", -60.0, **kw)[0]
    assert label_disagreements("closeup", 0.15, "shot from above", 30.0, **kw) == []
    assert label_disagreements("", 0.15, "", None, **kw) == []


def _photo(realdata: Path, name: str):
    from PIL import Image

    return Image.open(realdata / "faces" / name).convert("RGB")


def _framings(img, face, share: float = 0.7):
    """The photo as an extreme closeup (face box ``share`` of the frame) and as a full-body shot (35 px face)."""
    from PIL import Image

    x0, y0, x1, y1 = face.bbox
    side = max(x1 - x0, y1 - y0) / share
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    ec = img.crop((round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2)))
    s = 35 / (x1 - x0)
    fb = Image.new("RGB", (512, 512), (128, 128, 128))
    fb.paste(img.resize((round(img.width * s), round(img.height * s)), Image.LANCZOS), (200, 80))
    return ec.resize((512, 512), Image.BICUBIC), fb


def test_real_photos_measure_their_framing_and_mirrored_yaw(realdata: Path, analyzer) -> None:
    from PIL import Image

    for name in ("Angelina_Jolie/deepface_img1.jpg", "Barack_Obama/fr_obama1.jpg", "Kit_Harington/fr_john2.jpeg"):
        img = _photo(realdata, name)
        (face,) = analyzer.analyze([np.asarray(img)])[0][:1]
        ec, fb = _framings(img, face)
        got = analyzer.analyze([np.asarray(ec), np.asarray(fb), np.asarray(img.transpose(Image.FLIP_LEFT_RIGHT))])
        assert measured_zoom(got[0][0].area_ratio) == "extreme closeup", name
        assert measured_zoom(got[1][0].area_ratio) == "full body", name
        yaw, mirrored = yaw_degrees(face.landmarks), yaw_degrees(got[2][0].landmarks)
        assert mirrored == pytest.approx(-yaw, abs=5.0), (name, yaw, mirrored)
    # fr_john2: Kit Harington turned towards the image's left, clearly off frontal.
    (face,) = analyzer.analyze([np.asarray(_photo(realdata, "Kit_Harington/fr_john2.jpeg"))])[0][:1]
    assert yaw_degrees(face.landmarks) < -20


def test_curation_reports_measured_framing_counts_measured_cells_and_captions_use_it(
        tmp_path: Path, realdata: Path, analyzer) -> None:
    """Jolie photos all labelled "medium shot, front shot"; two are really an extreme closeup and a full-body shot."""
    from likeness.caption import caption_dataset
    from likeness.curate.decide import CURATION_NAME, curate
    from likeness.generate.manifest import GalleryImage, write_manifest
    from likeness.spec import spec_from_dict

    g = tmp_path / "g"
    (g / "images").mkdir(parents=True)
    names = ["deepface_img1.jpg", "deepface_img2.jpg", "deepface_img4.jpg", "deepface_img5.jpg", "deepface_img6.jpg"]
    photos = [_photo(realdata, f"Angelina_Jolie/{n}") for n in names]
    faces = analyzer.analyze([np.asarray(p) for p in photos])
    ec, _ = _framings(photos[0], faces[0][0])
    _, fb = _framings(photos[1], faces[1][0])
    images = {"ec": ec, "fb": fb, "p2": photos[2], "p3": photos[3], "p4": photos[4]}
    rows = []
    for iid, im in images.items():
        im.save(g / "images" / f"{iid}.png")
        rows.append(GalleryImage(id=iid, file=f"images/{iid}.png", zoom="medium shot", angle="front shot",
                                 zoom_index=3, angle_index=0, seed=1, prompt="photo of a woman, medium shot, front shot"))
    write_manifest(g, rows)
    spec = spec_from_dict({"name": "Angelina", "token": "4ng3l", "background": "neutral gray background"})
    out = tmp_path / "out"
    result = curate(g, spec, out, CurateConfig(k=3), faces=analyzer, clip=None)
    d = {x.id: x for x in result.images}
    assert d["ec"].measures["zoom_measured"] == "extreme closeup" and d["fb"].measures["zoom_measured"] == "full body"
    assert all(isinstance(x.measures["yaw"], float) for x in d.values())
    assert any("'medium shot'" in s and "'extreme closeup'" in s for s in d["ec"].measures["label_disagrees"])
    assert any("'full body'" in s for s in d["fb"].measures["label_disagrees"])
    assert result.summary["label_disagreements"] >= 2
    doc = json.loads((out / CURATION_NAME).read_text())
    assert {i["id"]: i["measures"]["zoom_measured"] for i in doc["images"]}["fb"] == "full body"
    # Selection spreads over measured cells: one label cell, as many measured ones as zoom words measured;
    # with K = that many, one image of each is chosen (the only full-body shot among them), and coverage
    # counts them all (by the labels it would be 1 cell of K).
    passed = [x for x in d.values() if x.reason_code in ("selected", "not_selected")]
    k = len({x.measures["zoom_measured"] for x in passed})
    assert k >= 3
    result = curate(g, spec, out, CurateConfig(k=k), faces=analyzer, clip=None)
    d = {x.id: x for x in result.images}
    assert "fb" in result.selected, [(x.id, x.reason_code, x.measures["zoom_measured"]) for x in result.images]
    assert len({d[i].measures["zoom_measured"] for i in result.selected}) == k
    assert result.set_scores["selected"]["grid_coverage"] == pytest.approx(1.0)
    # Captions write the zoom the picture shows.
    caps = caption_dataset(out, spec).captions
    assert ", full body," in caps["fb"] and "medium shot" not in caps["fb"]
    for iid in result.selected:
        assert f", {d[iid].measures['zoom_measured']}," in caps[iid] and "medium shot" not in caps[iid], caps[iid]


def test_yaw_settings_are_validated() -> None:
    from likeness.curate.checks import curate_config_from_dict
    from likeness.errors import InvalidInput

    assert CurateConfig().yaw_front_max > CurateConfig().yaw_side_min
    with pytest.raises(InvalidInput, match="yaw_front_max"):
        curate_config_from_dict({"yaw_front_max": 120})
