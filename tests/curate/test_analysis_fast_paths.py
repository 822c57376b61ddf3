"""Curation's faster per-image paths give the numbers of the plain ones (likeness.curate.analysis)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def test_border_bands_equal_border_features_on_real_images(realdata: Path) -> None:
    """Only the bands are converted to CIELAB, yet the 12 numbers are those of border_features:
    square, portrait, landscape, large (downsized first) and tiny images."""
    from PIL import Image

    from likeness.curate.analysis import border_bands
    from likeness.curate.background import border_features

    photo = Image.open(realdata / "faces" / "Barack_Obama" / "fr_obama.jpg").convert("RGB")
    variants = [photo, photo.resize((512, 512)), photo.resize((300, 700)), photo.resize((1600, 900)),
                photo.resize((40, 33))]
    for im in variants:
        arr = np.asarray(im)
        np.testing.assert_array_equal(border_bands(arr), border_features(arr), err_msg=str(im.size))


def test_border_bands_see_the_border_not_the_middle() -> None:
    """A red middle on a blue frame: the bands report blue (Lab b strongly negative) on all four sides."""
    from likeness.curate.analysis import border_bands

    img = np.zeros((256, 256, 3), np.uint8)
    img[..., 2] = 255
    img[40:216, 40:216] = (255, 0, 0)
    f = border_bands(img).reshape(4, 3)
    assert (f[:, 2] < -60).all(), f
