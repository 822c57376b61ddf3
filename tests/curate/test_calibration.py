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


def test_real_devtrain_file_counts() -> None:
    p = Path("/work/shared/realdata/lfw_view1_devtrain/pairsDevTrain.txt")
    if not p.is_file():
        pytest.skip("realdata lfw_view1_devtrain absent")
    rows = read_pairs(p)
    assert sum(r[2] for r in rows) == 1084 and sum(not r[2] for r in rows) == 1091
    assert all((p.parent / a).is_file() and (p.parent / b).is_file() for a, b, _ in rows[:50])
