"""The score formulas on hand-made arrays, with values chosen so a wrong formula fails."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from likeness import scores
from likeness.scores import IdentityScale


def _unit(*rows):
    a = np.array(rows, np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_scores_module_imports_no_torch():
    code = "import sys, likeness.scores; print('torch' in sys.modules, 'insightface' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_centroid_is_normalised_mean_not_plain_mean():
    e = _unit([1, 0, 0], [0, 1, 0])
    c = scores.identity_centroid(e)
    np.testing.assert_allclose(c, [2 ** -0.5, 2 ** -0.5, 0], atol=1e-6)
    # Rows are re-normalised: a long vector does not dominate.
    c2 = scores.identity_centroid(np.array([[10.0, 0, 0], [0, 1.0, 0]]))
    np.testing.assert_allclose(c2, c, atol=1e-6)
    np.testing.assert_allclose(scores.identity_similarities(e, c), [2 ** -0.5] * 2, atol=1e-6)


def test_pairwise_mean_and_min_with_an_outlier():
    e = _unit([1, 0, 0], [1, 0, 0], [0, 1, 0])
    pc = scores.pairwise_cosines(e)
    np.testing.assert_allclose(sorted(pc), [0, 0, 1], atol=1e-6)
    st = scores.set_scores(e)
    # centroid of (2,1,0)/sqrt(5): cos to the pair = 2/sqrt5, to the outlier = 1/sqrt5
    assert st.identity_mean_to_centroid == pytest.approx((2 * 2 / 5 ** 0.5 + 1 / 5 ** 0.5) / 3, abs=1e-6)
    assert st.identity_min_to_centroid == pytest.approx(1 / 5 ** 0.5, abs=1e-6)
    assert st.identity_mean_pairwise == pytest.approx(1 / 3, abs=1e-6)
    assert st.n_images == st.n_faces == 3


def test_identity_score_anchors_and_clipping():
    s = IdentityScale(threshold=0.4, different=0.0, same=0.8)
    assert scores.identity_score(0.0, s) == 0.0
    assert scores.identity_score(0.2, s) == pytest.approx(0.25)
    assert scores.identity_score(0.4, s) == pytest.approx(0.5)
    assert scores.identity_score(0.6, s) == pytest.approx(0.75)
    assert scores.identity_score(0.8, s) == 1.0
    assert scores.identity_score(-0.5, s) == 0.0 and scores.identity_score(1.0, s) == 1.0
    np.testing.assert_allclose(scores.identity_score(np.array([0.2, 0.6]), s), [0.25, 0.75])
    with pytest.raises(ValueError):
        IdentityScale(threshold=0.9, different=0.0, same=0.8)
    assert scores.same_person(scores.IDENTITY_THRESHOLD) and not scores.same_person(scores.IDENTITY_THRESHOLD - 1e-3)


def test_faceless_images_count_against_identity():
    e = _unit([1, 0, 0], [1, 0, 0])
    full = scores.set_scores([e[0], e[1]])
    half = scores.set_scores([e[0], e[1], None, None])
    assert full.identity_consistency == pytest.approx(1.0)
    assert half.identity_consistency == pytest.approx(0.5)
    assert half.n_images == 4 and half.n_faces == 2
    none = scores.set_scores([None, None])
    assert none.n_faces == 0 and none.identity_consistency == 0.0 and none.identity_mean_pairwise is None
    assert none.overall == 0.0


def test_overall_weights_renormalise_over_measured_parts():
    e = _unit([1, 0, 0], [1, 0, 0])
    only_id = scores.set_scores(e)
    assert only_id.weights == {"identity": 1.0} and only_id.overall == pytest.approx(1.0)
    st = scores.set_scores(e, background=[0.0, 0.0], quality=[1.0, 0.5], cells=[("z", "a"), ("z", "a")], total_cells=25)
    w = scores.OVERALL_WEIGHTS
    expected = (w["identity"] * 1.0 + w["background"] * 0.0 + w["quality"] * 0.75 + w["coverage"] * 0.5) / sum(w.values())
    assert st.overall == pytest.approx(expected)
    assert st.grid_coverage == 0.5 and st.quality == pytest.approx(0.75) and st.background_consistency == 0.0
    assert 0.0 <= st.overall <= 1.0
    with pytest.raises(ValueError, match="cells"):
        scores.set_scores(e, cells=[("z", "a")])
    d = st.to_dict()
    assert set(d) >= {"identity_mean_to_centroid", "identity_min_to_centroid", "identity_mean_pairwise",
                      "background_consistency", "grid_coverage", "overall", "n_images", "n_faces"}


def test_grid_coverage():
    assert scores.grid_coverage([], 25) == 0.0
    assert scores.grid_coverage([(0, 0), (0, 1), (1, 1)], 25) == 1.0
    assert scores.grid_coverage([(0, 0)] * 25, 25) == pytest.approx(1 / 25)
    cells = [(z, a) for z in range(5) for a in range(5)] * 2
    assert scores.grid_coverage(cells, 25) == 1.0


def test_sharpness_orders_blur_and_is_bounded():
    rng = np.random.default_rng(0)
    flat = np.full((112, 112), 128.0)
    noise = rng.uniform(0, 255, (112, 112))
    blurred = (noise + np.roll(noise, 1, 0) + np.roll(noise, 1, 1) + np.roll(noise, (1, 1), (0, 1))) / 4
    assert scores.sharpness(flat) == 0.0
    assert 0 < scores.sharpness(blurred) < scores.sharpness(noise) < 1.0
    # Hand-computed: a single bright pixel -> Laplacian 4*255 at centre, -255 at 4 neighbours.
    img = np.zeros((5, 5))
    img[2, 2] = 255
    lap = np.array([-255, -255, -255, -255, 4 * 255, 0, 0, 0, 0], float)
    v = lap.var()
    assert scores.sharpness(img) == pytest.approx(v / (v + scores.SHARPNESS_HALF))
    assert scores.sharpness(np.zeros((2, 2))) == 0.0


def test_face_crop_at_its_own_size_is_never_enlarged():
    rng = np.random.default_rng(1)
    # Faint pixel noise (about +-6 grey levels), so sharpness stays far from its ceiling of 1.
    image = rng.integers(120, 133, (200, 300, 3), dtype=np.uint8)
    assert scores.face_gray_crop(image, (10, 20, 50, 70)).shape == (112, 112)
    # A 40x50 box: squared at its shorter side, shrunk but never enlarged.
    own = scores.face_gray_crop(image, (10, 20, 50, 70), enlarge=False)
    assert own.shape == (40, 40)
    # A box wider than 112 px on both sides: the same 112 px crop either way.
    np.testing.assert_array_equal(scores.face_gray_crop(image, (0, 0, 150, 180), enlarge=False),
                                  scores.face_gray_crop(image, (0, 0, 150, 180)))
    # Enlarging by interpolation smooths: the enlarged crop of pixel noise reads much less sharp.
    assert scores.sharpness(own) > 2 * scores.sharpness(scores.face_gray_crop(image, (10, 20, 50, 70)))


def test_face_size_and_quality():
    assert scores.face_size_score(0.3, "extreme closeup") == 1.0
    lo = scores.ZOOM_FACE_AREA["full body"][1]
    assert scores.face_size_score(lo * 2, "full body") == pytest.approx(0.5)
    assert scores.face_size_score(lo * 4, "full body") == pytest.approx(0.0)
    assert scores.face_size_score(0.0, None) == 0.0
    assert scores.quality(1.0, 0.3, 1.0, "extreme closeup") == pytest.approx(1.0)
    assert scores.quality(0.8, 0.3, 0.1, "extreme closeup") == pytest.approx((0.8 * 0.1) ** (1 / 3))
    assert scores.quality(0.9, 0.3, 0.0) == 0.0


def test_lab_border_stats_and_background_consistency():
    white = np.full((64, 64, 3), 255, np.uint8)
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 255
    f_white = scores.lab_border_stats(white)
    assert f_white.shape == (12,)
    np.testing.assert_allclose(f_white.reshape(4, 3), [[100, 0, 0]] * 4, atol=0.05)
    np.testing.assert_allclose(scores.lab_border_stats(red)[:3], [53.24, 80.09, 67.20], atol=0.1)
    # The centre does not count: a subject in the middle leaves the border alone.
    subject = white.copy()
    subject[16:48, 16:48] = 0
    np.testing.assert_allclose(scores.lab_border_stats(subject), f_white, atol=1e-3)
    feats = np.stack([f_white, f_white, scores.lab_border_stats(subject), scores.lab_border_stats(red)])
    bg = scores.background_consistency(feats)
    np.testing.assert_allclose(bg[:3], 1.0, atol=1e-4)
    de = np.linalg.norm(feats[3].reshape(4, 3) - f_white.reshape(4, 3), axis=1).mean()
    assert bg[3] == pytest.approx(np.exp(-de / scores.BACKGROUND_DELTA_E), rel=1e-4) and bg[3] < 0.1
    with pytest.raises(ValueError):
        scores.background_consistency(np.zeros((3, 4)))


def test_strip_token_and_image_scores():
    assert scores.strip_token("photo of 3m1ly, cooking", "3m1ly") == "photo of, cooking"
    assert "3m1ly" not in scores.strip_token("(3m1ly:1.2), cooking in a kitchen", "3m1ly")
    assert scores.strip_token("(3m1ly:1.2), cooking in a kitchen", "3m1ly") == "cooking in a kitchen"
    assert scores.strip_token("a 3m1ly woman, [3m1ly]", "3m1ly") == "a woman"
    assert scores.strip_token("3m1lyx stays", "3m1ly") == "3m1lyx stays"
    e = _unit([1, 0, 0])[0]
    s = scores.image_scores(e, _unit([1, 1, 0])[0], background=0.5, quality=0.25, prompt_adherence=0.3)
    assert s.identity == pytest.approx(2 ** -0.5, abs=1e-6) and s.background == 0.5
    assert scores.image_scores(None, e).identity is None


def test_one_face_never_reports_identity_one() -> None:
    """Issue 11: a set of one face is not a consistent character; it scored identity 1.00 before."""
    one = scores.set_scores([_unit([1.0, 0.0, 0.0])[0]])
    assert one.n_faces == 1
    assert one.identity_mean_pairwise is None
    assert one.identity_consistency == 0.0
    two = scores.set_scores(list(_unit([1.0, 0.0, 0.0], [1.0, 0.1, 0.0])))
    assert two.identity_consistency > 0.9


def test_srgb_to_lab_of_uint8_is_the_formula_on_every_value():
    """The uint8 path linearises by table lookup: the same numbers as the transfer function per pixel,
    and known CIELAB values (white L=100, black 0, sRGB red L 53.24 a 80.09 b 67.20)."""
    from likeness.scores import _srgb_to_lab

    v = np.arange(256, dtype=np.uint8)
    every = np.stack(np.meshgrid(v, v[::-1], v[::3], indexing="ij"), axis=-1)
    assert np.array_equal(_srgb_to_lab(every), _srgb_to_lab(every.astype(np.float64)))
    lab = _srgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0]], np.uint8))
    np.testing.assert_allclose(lab, [[100, 0, 0], [0, 0, 0], [53.24, 80.09, 67.20]], atol=0.02)
