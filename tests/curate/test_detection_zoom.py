"""Faces at every zoom reach curation: extreme closeups and full-body faces are found and pass the face checks.

Real photos from ../shared/realdata/faces (Jolie, Obama), cropped so the face box fills 60-80% of the
512x512 frame (labelled "extreme closeup") and shrunk so it is 30-40 px wide on a grey 512x512 canvas
(labelled "full body"). A ``no_face`` or ``face_too_small`` for a face the detector finds and the
embedding still recognises is a bug (issue 11).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from likeness.curate.analysis import AnalysisInput, AnalysisShard, analyse_shard
from likeness.curate.checks import CurateConfig


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def framed(realdata: Path, analyzer):
    """(name, zoom word, zoom index, image, expected face width px or share, reference embedding) per test image."""
    from PIL import Image

    files = [realdata / "faces" / "Angelina_Jolie" / f"deepface_img{n}.jpg" for n in (1, 2, 4, 6)]
    files += [realdata / "faces" / "Barack_Obama" / n for n in ("fr_obama.jpg", "fr_obama1.jpg")]
    out = []
    for f in files:
        img = Image.open(f).convert("RGB")
        (face,) = analyzer.analyze([np.asarray(img)])[0][:1]
        x0, y0, x1, y1 = face.bbox
        w, h = x1 - x0, y1 - y0
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        for share in (0.6, 0.7, 0.8):  # the face box's longer side / the frame's side
            side = max(w, h) / share
            crop = img.crop((round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2)))
            out.append((f"{f.stem}-ec{share}", "extreme closeup", 0, crop.resize((512, 512), Image.BICUBIC),
                        share, face.embedding))
        for px in (30, 35, 40):
            s = px / w
            small = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.LANCZOS)
            canvas = Image.new("RGB", (512, 512), (128, 128, 128))
            canvas.paste(small, (200, 80))
            out.append((f"{f.stem}-fb{px}", "full body", 4, canvas, px, face.embedding))
    return out


def test_extreme_closeups_and_full_body_faces_pass_the_face_checks(framed, analyzer) -> None:
    shard = AnalysisShard(CurateConfig(), tuple(
        AnalysisInput(i, f"{name}.png", zoom, zi, _png(im)) for i, (name, zoom, zi, im, *_rest) in enumerate(framed)))
    results = analyse_shard(shard, analyzer, None)
    assert len(results) == len(framed) == 36
    for a, (name, zoom, _zi, _im, size, ref) in zip(results, framed):
        assert a.faces, f"{name}: no face found ({zoom})"
        assert a.code == "", f"{name}: {a.code}: {a.reason}"
        main = a.faces[0]
        x0, y0, x1, y1 = main.bbox
        if zoom == "full body":
            assert size * 0.8 <= x1 - x0 <= size * 1.25, (name, x1 - x0)
        else:
            assert max(x1 - x0, y1 - y0) >= 0.45 * 512, (name, main.bbox)
        # It is the same person as the whole photo, above the membership threshold.
        assert float(main.embedding @ ref) >= 0.4892, (name, float(main.embedding @ ref))


def test_faces_below_the_measurable_size_are_still_too_small(realdata: Path, analyzer) -> None:
    """The size floor still holds: a 16 px face is found but rejected as face_too_small, with its size in the reason."""
    from PIL import Image

    img = Image.open(realdata / "faces" / "Barack_Obama" / "fr_obama.jpg").convert("RGB")
    (face,) = analyzer.analyze([np.asarray(img)])[0][:1]
    s = 16 / (face.bbox[2] - face.bbox[0])
    canvas = Image.new("RGB", (512, 512), (128, 128, 128))
    canvas.paste(img.resize((round(img.width * s), round(img.height * s)), Image.LANCZOS), (200, 80))
    (a,) = analyse_shard(AnalysisShard(CurateConfig(), (AnalysisInput(0, "tiny.png", "full body", 4, _png(canvas)),)),
                         analyzer, None)
    assert a.faces, "SCRFD finds this 16 px face (down to ~12 px here)"
    assert a.code == "face_too_small" and "minimum 24 px" in a.reason, (a.code, a.reason)


def test_a_small_face_under_a_closeup_label_is_still_found(framed, analyzer) -> None:
    """Curation detects extreme closeups on a smaller copy (analysis.ZOOM_DET_SIDE); a label that
    is wrong (a 30-40 px full-body face called an extreme closeup) must not lose the face: found on
    the small copy (15-20 px there) or else by the fallback at full size, it is the same box and
    the same person as under its true label."""
    full = [(name, im, ref) for name, zoom, _zi, im, _size, ref in framed if zoom == "full body"]
    items = []
    for i, (name, im, _ref) in enumerate(full):
        items.append(AnalysisInput(2 * i, f"{name}.png", "full body", 4, _png(im)))
        items.append(AnalysisInput(2 * i + 1, f"{name}-mislabelled.png", "extreme closeup", 0, _png(im)))
    results = analyse_shard(AnalysisShard(CurateConfig(), tuple(items)), analyzer, None)
    for right, wrong, (name, _im, ref) in zip(results[::2], results[1::2], full):
        assert right.faces and wrong.faces, (right.code, wrong.code)
        a, b = right.faces[0], wrong.faces[0]
        ix = max(0.0, min(a.bbox[2], b.bbox[2]) - max(a.bbox[0], b.bbox[0]))
        iy = max(0.0, min(a.bbox[3], b.bbox[3]) - max(a.bbox[1], b.bbox[1]))
        area = lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])  # noqa: E731
        # The same box up to the detector's few-pixel jitter (IoU measured >= 0.9 here).
        assert ix * iy / (area(a) + area(b) - ix * iy) >= 0.8, (a.bbox, b.bbox)
        # Measured: cosine >= 0.887 to the face under its true label (15 px faces in the small copy
        # lose some landmark precision), and still the person of the whole photo above the
        # membership threshold 0.4892, as under the true label.
        assert float(a.embedding @ b.embedding) > 0.8, name
        assert float(b.embedding @ ref) >= 0.4892, (name, float(b.embedding @ ref))


def test_closeups_detected_small_match_detection_at_full_size(framed, analyzer) -> None:
    """The smaller detection copy for extreme closeups finds the face the full-size detection (with
    its padded retry) finds, with the same identity: cosine >= 0.95 (measured >= 0.98 on the bench pool)."""
    from likeness.curate.analysis import ZOOM_DET_SIDE

    closeups = [im for _name, zoom, _zi, im, *_rest in framed if zoom == "extreme closeup"]
    arrays = [np.asarray(im) for im in closeups]
    small = analyzer.analyze(arrays, det_sides=[ZOOM_DET_SIDE["extreme closeup"]] * len(arrays))
    full = analyzer.analyze(arrays)
    for s, f in zip(small, full):
        assert s and f
        assert float(s[0].embedding @ f[0].embedding) >= 0.95
