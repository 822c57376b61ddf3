"""LFW pairs format reader (issue 11 item 1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from likeness.curate.calibration import is_lfw_pairs, read_pairs
from likeness.errors import InvalidInput


def test_lfw_pairs_rows_and_paths(tmp_path: Path) -> None:
    p = tmp_path / "pairs.txt"
    p.write_text("1\t1\nAaron_Peirsol\t1\t2\nAJ_Cook\t1\tMarsha_Thomason\t12\n", encoding="utf-8")
    assert is_lfw_pairs(p)
    assert read_pairs(p) == [
        ("lfw-deepfunneled/Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "lfw-deepfunneled/Aaron_Peirsol/Aaron_Peirsol_0002.jpg", True),
        ("lfw-deepfunneled/AJ_Cook/AJ_Cook_0001.jpg", "lfw-deepfunneled/Marsha_Thomason/Marsha_Thomason_0012.jpg", False),
    ]


@pytest.mark.parametrize("row", ["A\tx\t2", "A\t1", "../A\t1\t2", "A\t0\t2"], ids=["not-int", "2-fields", "path", "zero"])
def test_bad_lfw_rows_are_invalid_input(tmp_path: Path, row: str) -> None:
    p = tmp_path / "pairs.txt"
    p.write_text(f"1\t1\n{row}\n", encoding="utf-8")
    with pytest.raises(InvalidInput):
        read_pairs(p)


def test_real_devtrain_file_counts(realdata: Path) -> None:
    p = realdata / "lfw_view1_devtrain" / "pairsDevTrain.txt"
    if not p.is_file():
        pytest.skip(f"LFW devtrain split missing at {p}")
    rows = read_pairs(p)
    assert sum(r[2] for r in rows) == 1084 and sum(not r[2] for r in rows) == 1091
    assert all((p.parent / a).is_file() and (p.parent / b).is_file() for a, b, _ in rows[:50])


def test_membership_thresholds_separate_own_centroid_from_nearest_other() -> None:
    """calibrate_membership on labelled identities: the member threshold lies between a face's cosine to its
    own identity's leave-one-out centroid and to the nearest other identity's centroid; the cluster cut
    between two halves of one identity and the nearest other identity's faces; fewer than 2 usable
    identities is InvalidInput."""
    import numpy as np
    import pytest

    from likeness.curate.calibration import calibrate_membership
    from likeness.errors import InvalidInput

    rng = np.random.default_rng(0)
    d, embs, who = 32, [], []
    centres = rng.normal(size=(6, d))
    centres[1] = centres[0] + 0.8 * rng.normal(size=d)  # a lookalike pair of identities
    for k, c in enumerate(centres):
        c = c / np.linalg.norm(c)
        for _ in range(6):
            embs.append(c + 0.12 * rng.normal(size=d))
            who.append(f"id{k}")
    x = np.stack(embs)
    out = calibrate_membership(x, who)
    assert out["membership_identities"] == 6
    assert out["member_accuracy"] >= 0.95 and out["cluster_accuracy"] >= 0.95
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    # The lookalike identities' centroids are nearer each other than the member threshold lets in.
    c0 = xn[:6].mean(0)
    assert float(xn[6] @ (c0 / np.linalg.norm(c0))) < out["member_threshold"] < float(xn[0] @ (c0 / np.linalg.norm(c0)))
    assert float((xn[:6] @ xn[6:12].T).mean()) < out["cluster_threshold"]
    with pytest.raises(InvalidInput, match="at least 2 identities"):
        calibrate_membership(x[:6], who[:6])
