"""Off-prompt hair and wardrobe: colours above and below the face against the character's consensus.

Labelled on real generated images (../shared/realdata/generated): IP-Adapter's realistic panels of one
identity (three in a blue shirt, one in a white shirt), Face Editor's one woman with purple-red hair
(deno-*) and with black hair (mask-*), and copies of them with the hair or the shirt recoloured.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from likeness.curate.appearance import REGIONS, colour_distances, colour_outliers, region_colours
from likeness.curate.checks import CurateConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_near_duplicates import _generated  # noqa: E402  (the real generated sets, one loader)


@pytest.fixture(scope="module")
def generated(realdata: Path):
    return _generated(realdata)


def _fit(im):
    from PIL import Image

    s = 512 / max(im.size)
    return im.resize((round(im.width * s), round(im.height * s)), Image.LANCZOS)


def _shrink(im, f: float):
    """``im`` shrunk by ``f`` on a canvas of its mean border colour (a wider framing of the same picture)."""
    from PIL import Image

    a = np.asarray(im)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]).mean(0)
    canvas = Image.new("RGB", im.size, tuple(int(v) for v in border))
    small = im.resize((int(im.width * f), int(im.height * f)), Image.LANCZOS)
    canvas.paste(small, ((im.width - small.width) // 2, int(im.height * 0.08)))
    return canvas


def _variants(im):
    """Consistent images of one generation: itself, mirrored, cropped, darker, brighter, two wider framings."""
    from PIL import Image, ImageEnhance

    w, h = im.size
    return [im, im.transpose(Image.FLIP_LEFT_RIGHT), _fit(im.crop((int(w * .06), int(h * .04), int(w * .94), int(h * .96)))),
            ImageEnhance.Brightness(im).enhance(0.88), ImageEnhance.Brightness(im).enhance(1.12),
            _shrink(im, 0.55), _shrink(im, 0.35)]


def _recolour(im, face_box, region: str, target_lab):
    """``im`` with its hair or clothes recoloured: pixels near the region's dominant colour get ``target_lab``.

    The pixels changed are chosen by colour over the whole head (hair) or below the chin (clothes),
    not by the measured region's box, so the label does not restate the measurement.
    """
    import cv2
    from PIL import Image

    lab = cv2.cvtColor(np.asarray(im).astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
    h, w = lab.shape[:2]
    fx0, fy0, fx1, fy1 = face_box
    fw, fh = fx1 - fx0, fy1 - fy0
    # Where the hair's / the clothes' colour is sampled (face-box units), independent of appearance.REGIONS.
    sx0, sy0, sx1, sy1 = {"hair": (-0.15, -0.5, 1.15, 0.05), "wardrobe": (-0.5, 1.3, 1.5, 2.4)}[region]
    x0, x1 = max(0, int(fx0 + sx0 * fw)), min(w, int(fx0 + sx1 * fw))
    y0, y1 = max(0, int(fy0 + sy0 * fh)), min(h, int(fy0 + sy1 * fh))
    px = lab[y0:y1, x0:x1].reshape(-1, 3)
    if px.shape[0] < 16:
        return None  # the region is out of the frame: nothing to recolour
    keys, counts = np.unique(np.floor(px / 10).astype(int), axis=0, return_counts=True)
    centre = (keys[counts.argmax()] + 0.5) * 10
    dominant = px[np.linalg.norm(px - centre, axis=1) < 15].mean(0)
    yy, xx = np.mgrid[0:h, 0:w]
    if region == "hair":  # the head and long hair, not the face's skin nor the backdrop farther away
        zone = ((yy > fy0 - 0.8 * fh) & (yy < fy1 + 0.8 * fh) & (xx > fx0 - 0.8 * fw) & (xx < fx1 + 0.8 * fw)
                & ~((xx > fx0 + 0.15 * fw) & (xx < fx1 - 0.15 * fw) & (yy > fy0 + 0.25 * fh)))
    else:  # the body below the chin
        zone = (yy > fy1 + 0.2 * fh) & (xx > fx0 - 1.5 * fw) & (xx < fx1 + 1.5 * fw)
    mask = zone & (np.linalg.norm(lab - dominant, axis=2) < 18)
    out = lab.copy()
    out[mask] = lab[mask] - dominant + np.asarray(target_lab, np.float32)
    out[..., 0] = np.clip(out[..., 0], 0, 100)
    rgb = np.clip(cv2.cvtColor(out, cv2.COLOR_Lab2RGB), 0, 1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def _colours(analyzer, images):
    arrays = [np.asarray(im) for im in images]
    faces = analyzer.analyze(arrays)
    assert all(faces), "every test image shows a face"
    return [region_colours(a, f[0].bbox) for a, f in zip(arrays, faces)], [f[0].bbox for f in faces]


def _flags(colours, region: str, cfg: CurateConfig):
    ref = list(range(len(colours)))
    d, _ = colour_distances([c[region] for c in colours], ref)
    z, md = ((cfg.off_hair_z, cfg.off_hair_min_distance) if region == "hair"
             else (cfg.off_wardrobe_z, cfg.off_wardrobe_min_distance))
    off, _limit = colour_outliers(d, ref, z=z, min_delta=md)
    return off, d


def test_rule_is_median_plus_mad_and_ignores_the_unmeasured() -> None:
    d = np.array([0.10, 0.12, 0.11, 0.13, 0.09, 0.50, np.nan, 0.30])
    off, limit = colour_outliers(d, range(8), z=3.0, min_delta=0.35)
    assert off.tolist() == [False] * 5 + [True, False, False] and limit == pytest.approx(0.35)
    # The spread of a loose gallery raises the limit above the minimum.
    loose = np.array([0.1, 0.3, 0.5, 0.2, 0.4, 0.9])
    off, limit = colour_outliers(loose, range(6), z=3.0, min_delta=0.35)
    assert limit > 0.35 and not off[:5].any()
    # Fewer than 5 measured reference images: no consensus, nothing is off; z = 0 turns the rule off.
    assert not colour_outliers(d, [0, 1, 6, 7], z=3.0, min_delta=0.35)[0].any()
    assert not colour_outliers(d, range(8), z=0.0, min_delta=0.35)[0].any()


def test_regions_follow_the_face_and_leave_the_frame_unmeasured() -> None:
    img = np.full((512, 512, 3), 128, np.uint8)
    img[:60] = (200, 40, 30)      # "red hair" above a face at the top...
    img[300:] = (30, 40, 200)     # ...and a blue shirt below it
    got = region_colours(img, (200, 60, 300, 180))
    assert got["hair"] is not None and got["wardrobe"] is not None and len(got["hair"]) == 36
    # An extreme closeup: no room below the face for clothes.
    assert region_colours(img, (40, 60, 470, 500))["wardrobe"] is None
    assert set(REGIONS) == {"hair", "wardrobe"}


def test_recoloured_hair_and_clothes_are_flagged_and_the_consistent_set_is_not(analyzer, generated) -> None:
    cfg = CurateConfig()
    bases = [_fit(generated["ip_adapter"][i]) for i in (0, 2, 3)]  # realistic panels, blue shirts
    consistent = [v for b in bases for v in _variants(b)]
    cols, _ = _colours(analyzer, consistent)
    for region in ("hair", "wardrobe"):
        off, d = _flags(cols, region, cfg)
        assert not off.any(), (region, np.round(d, 3))
    _, boxes = _colours(analyzer, bases)
    # Red and black hair and red or green shirts on every panel. (Blonde hair on these light brown panels
    # measures 0.30-0.33 against the 0.35 limit, black or white shirts 0.26-0.29: the known misses, see CurateConfig.)
    odd = [(region, colour, b, target) for b in range(3)
           for region, colour, target in (("hair", "red", (42, 42, 38)), ("hair", "black", (12, 0, 0)),
                                          ("wardrobe", "red", (45, 55, 35)),
                                          ("wardrobe", "green", (50, -45, 30)))]
    for region, colour, b, target in odd:
        c, _ = _colours(analyzer, [_recolour(bases[b], boxes[b], region, target)])
        off, d = _flags(cols + c, region, cfg)
        assert off[-1] and not off[:-1].any(), (region, colour, b, round(float(d[-1]), 3))


def test_real_off_prompt_generations_are_flagged(analyzer, generated) -> None:
    """IP-Adapter's one white shirt among blue ones; Face Editor's black hair among purple-red."""
    cfg = CurateConfig()
    blue = [v for i in (0, 2, 3) for v in _variants(_fit(generated["ip_adapter"][i]))]
    white, _ = _colours(analyzer, [_fit(generated["ip_adapter"][1])])
    cols, _ = _colours(analyzer, blue)
    off, d = _flags(cols + white, "wardrobe", cfg)
    assert off[-1] and not off[:-1].any(), round(float(d[-1]), 3)
    assert not _flags(cols + white, "hair", cfg)[0].any(), "same hair"
    purple = [v for im in generated["face_editor"][:3] for v in _variants(_fit(im))]
    black, _ = _colours(analyzer, [_fit(generated["face_editor"][3])])
    cols, _ = _colours(analyzer, purple)
    off, d = _flags(cols + black, "hair", cfg)
    assert off[-1] and not off[:-1].any(), round(float(d[-1]), 3)


def test_curation_rejects_off_hair_and_off_wardrobe_with_reasons(tmp_path: Path, analyzer, generated) -> None:
    from likeness.curate.decide import curate
    from likeness.generate.manifest import GalleryImage, write_manifest

    g = tmp_path / "g"
    (g / "images").mkdir(parents=True)
    bases = [_fit(generated["ip_adapter"][i]) for i in (0, 2, 3)]
    _, boxes = _colours(analyzer, bases)
    images = {f"p{b}-{v}": im for b, base in enumerate(bases) for v, im in enumerate(_variants(base))}
    images["red-hair"] = _recolour(bases[0], boxes[0], "hair", (42, 42, 38))
    images["red-shirt"] = _recolour(bases[2], boxes[2], "wardrobe", (45, 55, 35))
    rows = []
    for iid, im in images.items():
        im.save(g / "images" / f"{iid}.png")
        rows.append(GalleryImage(id=iid, file=f"images/{iid}.png", seed=1, prompt="photo of a woman in a garden"))
    write_manifest(g, rows)
    result = curate(g, None, tmp_path / "out", CurateConfig(k=25), faces=analyzer, clip=None)
    d = {x.id: x for x in result.images}
    assert d["red-hair"].reason_code == "off_hair", d["red-hair"].reason
    assert "the hair above the face has other colours" in d["red-hair"].reason
    assert d["red-shirt"].reason_code == "off_wardrobe", d["red-shirt"].reason
    assert "clothing below the face" in d["red-shirt"].reason
    assert not {x.reason_code for k, x in d.items() if k.startswith("p")} & {"off_hair", "off_wardrobe"}
    assert d["red-hair"].scores["hair_distance"] > d["p0-0"].scores["hair_distance"]


def test_off_prompt_settings_are_validated() -> None:
    from likeness.curate.checks import curate_config_from_dict
    from likeness.errors import InvalidInput

    with pytest.raises(InvalidInput, match="off_hair_z"):
        curate_config_from_dict({"off_hair_z": -1})
    with pytest.raises(InvalidInput, match="off_wardrobe_min_distance"):
        curate_config_from_dict({"off_wardrobe_min_distance": 2})


def _region_colours_whole_frame(image, face_box):
    """The region rule stated on the whole frame: CIELAB of every pixel, delta-E by a norm over bands."""
    from likeness.curate import appearance as ap

    h, w = image.shape[:2]
    lab = ap._lab(image)
    bh, bw = max(1, int(round(h * ap._BAND))), max(1, int(round(w * ap._BAND)))
    mid = max(bh, int(round((float(face_box[1]) + float(face_box[3])) / 2)))
    bands = np.stack([lab[:bh].reshape(-1, 3).mean(0), lab[:mid, :bw].reshape(-1, 3).mean(0),
                      lab[:mid, w - bw:].reshape(-1, 3).mean(0)])
    out = {}
    for name in REGIONS:
        x0, y0, x1, y1, inside = ap.region_box(face_box, name, w, h)
        keep = np.ones((max(0, y1 - y0), max(0, x1 - x0)), bool)
        if name in ap._EXCLUDE:
            fx0, fy0, fx1, fy1 = (float(v) for v in face_box)
            ex0, ey0, ex1, ey1 = ap._EXCLUDE[name]
            keep[max(0, int(fy0 + ey0 * (fy1 - fy0)) - y0):max(0, int(fy0 + ey1 * (fy1 - fy0)) - y0),
                 max(0, int(fx0 + ex0 * (fx1 - fx0)) - x0):max(0, int(fx0 + ex1 * (fx1 - fx0)) - x0)] = False
        px = lab[y0:y1, x0:x1][keep]
        if inside < ap._MIN_INSIDE or px.shape[0] < ap._MIN_PIXELS:
            out[name] = None
            continue
        de = np.linalg.norm(px[:, None, :] - bands[None, :, :], axis=2).min(axis=1)
        fg = px[de > ap._BACKDROP_DE]
        use = fg if fg.shape[0] >= max(ap._MIN_PIXELS // 2, ap._MIN_FOREGROUND * px.shape[0]) else px
        hists = [np.histogram(np.clip(use[:, c], lo, hi), bins=ap._BINS, range=(lo, hi))[0] for c, (lo, hi) in
                 enumerate(ap._RANGES)]
        out[name] = [round(float(v), 4) for v in np.concatenate([hh / max(1, hh.sum()) for hh in hists])]
    return out


def test_region_colours_convert_only_what_they_measure(realdata: Path, analyzer) -> None:
    """Converting just the bands and regions (the fast path) gives the whole-frame rule's histograms exactly."""
    from PIL import Image

    files = sorted((realdata / "faces" / "Angelina_Jolie").glob("*.jpg"))[:6]
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    checked = 0
    for arr, faces in zip(arrays, analyzer.analyze(arrays)):
        # The real face, and boxes that push each region off the frame's edges.
        h, w = arr.shape[:2]
        for box in [f.bbox for f in faces[:1]] + [(5, 5, w // 3, h // 3), (w // 2, h // 2, w - 2, h - 2)]:
            assert region_colours(arr, box) == _region_colours_whole_frame(arr, box)
            checked += 1
    assert checked >= 12
