"""Captions name the token, framing, clothes and background, and never the face."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from likeness.caption import (
    CaptionConfig,
    CaptionVocabulary,
    caption_dataset,
    identity_leaks,
    identity_words,
    load_vocabulary,
    render_caption,
)
from likeness.errors import InvalidInput, NotFound
from likeness.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
ADVERSARIAL = CaptionVocabulary(
    clothing=("red hair", "freckles", "ginger", "curly hair", "green eyes", "white t-shirt", "leather jacket",
              "Freckled scarf", "hat"),
    background=("redhead portrait", "pale skin", "Auburn wall", "brick wall", "forest", "neutral gray background"),
)


@pytest.fixture(scope="module")
def emily():
    return load_spec(REPO / "examples" / "emily.toml")


def _curated(tmp_path: Path, spec, n: int = 6) -> Path:
    """A curated folder as curation leaves it: <id>.png + curation.json (curate's own dataclasses)."""
    from likeness.curate.decide import CURATION_NAME, SCHEMA_VERSION, CurationResult, ImageDecision

    folder = tmp_path / "curated"
    folder.mkdir()
    rng = np.random.default_rng(0)
    decisions = []
    for i in range(n + 1):
        image_id = f"img-{i:03d}"
        kept = i < n  # the last one was rejected: no image, no caption
        if kept:
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{image_id}.png")
        decisions.append(ImageDecision(
            id=image_id, file=f"images/{image_id}.png", decision="kept" if kept else "rejected",
            reason_code="kept" if kept else "identity", reason="",
            zoom=spec.zooms[i % len(spec.zooms)], angle=spec.angles[i % len(spec.angles)],
        ))
    result = CurationResult(out_dir=str(folder), selected=tuple(d.id for d in decisions[:n]),
                            images=tuple(decisions), set_scores={}, clusters={}, config={}, summary={})
    (folder / CURATION_NAME).write_text(json.dumps({"schema_version": SCHEMA_VERSION, **result.to_dict()}))
    return folder


class _MeasuringClip:
    """Isolates caption plumbing from CLIP's judgement: image i "shows" the phrases ``shows[i]``
    (image i = the i-th image of each embed_images call); a text's vector is the basis vector of the
    longest known phrase it contains. The real CLIP path (a random tiny CLIP measures nothing) is
    tested with load_clip("cpu-tiny") below."""

    name = "measuring-stand-in"
    random_weights = False

    def __init__(self, shows: list[set[str]], phrases: list[str]) -> None:
        self.shows, self.phrases = shows, sorted(set(phrases), key=len, reverse=True)
        self.dim = len(self.phrases) + 1

    def _vec(self, phrases) -> np.ndarray:
        v = np.zeros(self.dim, np.float32)
        for ph in phrases:
            v[self.phrases.index(ph)] += 1.0
        if not v.any():
            v[-1] = 1.0
        return v / np.linalg.norm(v)

    def embed_images(self, images, batch_size: int = 32) -> np.ndarray:
        return np.stack([self._vec(self.shows[i % len(self.shows)]) for i in range(len(images))])

    def embed_texts(self, texts) -> np.ndarray:
        return np.stack([self._vec([next((p for p in self.phrases if p in t.lower()), None)] if any(
            p in t.lower() for p in self.phrases) else []) for t in texts])


def _assert_clean(caption: str, spec) -> None:
    low = caption.lower()
    for phrase in (*spec.traits, *spec.trait_synonyms):
        for word in re.findall(r"[a-z0-9]+", phrase.lower()):
            if word in (spec.class_word, "year", "old") or len(word) < 2:
                continue
            assert not re.search(rf"\b{re.escape(word)}s?\b", low), (word, caption)
    assert not identity_leaks(caption, identity_words(spec))


def test_identity_words_cover_traits_and_synonyms(emily) -> None:
    banned = identity_words(emily)
    assert {"red", "curly", "hair", "freckle", "green", "eye", "fair", "skin", "ginger", "auburn", "redhead",
            "scottish", "pale", "curl", "freckled", "eyed"} <= banned
    assert "woman" not in banned and "3m1ly" not in banned  # class word and token are allowed
    assert identity_leaks("3m1ly woman, Red Hair", banned) == ["hair", "red"]
    assert identity_leaks("3m1ly woman, white t-shirt, brick wall", banned) == []


def test_metadata_captions_sidecars_and_wardrobe(tmp_path: Path, emily) -> None:
    folder = _curated(tmp_path, emily)
    result = caption_dataset(folder, emily, vocabulary=ADVERSARIAL)
    assert result.clip == "" and len(result.files) == 6
    for image_id, caption in result.captions.items():
        sidecar = folder / f"{image_id}.txt"
        assert sidecar.is_file() and (folder / f"{image_id}.png").is_file()
        assert sidecar.read_text(encoding="utf-8") == caption
        assert caption.startswith("3m1ly woman, ")
        # Nothing measured the spec's wardrobe or background in these images: a caption states
        # what is in the picture, not what the spec asked for (issue 13).
        assert "wearing" not in caption and "background" not in caption
        _assert_clean(caption, emily)
    assert result.captions["img-000"] == "3m1ly woman, extreme closeup, front shot"
    assert "medium closeup, rear angle" in result.captions["img-001"]
    assert not result.clip_measured and result.to_dict()["clip_measured"] is False
    assert {"red hair", "freckles", "ginger", "curly hair", "pale skin", "Auburn wall"} <= set(result.dropped)


def test_spec_wardrobe_and_background_only_where_measured(tmp_path: Path, emily) -> None:
    """With a CLIP that measures, the spec's wardrobe and background are captioned in the images that
    show them and left out of those that do not (red-carpet photos are not 'neutral gray background')."""
    folder = _curated(tmp_path, emily, n=2)
    vocab = CaptionVocabulary(clothing=("leather jacket", "hat", "coat"), background=("city street", "forest", "beach"))
    shows = [{"white t-shirt", "neutral gray background"}, {"leather jacket", "city street"}]
    clip = _MeasuringClip(shows, ["white t-shirt", "neutral gray background", *vocab.clothing, *vocab.background])
    res = caption_dataset(folder, emily, clip=clip, vocabulary=vocab)
    assert res.clip_measured
    assert res.captions["img-000"] == "3m1ly woman, extreme closeup, front shot, wearing white t-shirt, neutral gray background"
    assert res.captions["img-001"] == "3m1ly woman, medium closeup, rear angle, wearing leather jacket, city street"


def test_clip_zero_shot_tags_never_name_the_face(tmp_path: Path, emily) -> None:
    from likeness.backends.clip import load_clip
    from likeness.profiles import load_profile

    folder = _curated(tmp_path, emily)
    config = CaptionConfig(clothing_tags=3, background_tags=3, min_probability=0.0)
    # The real tiny CLIP has random weights: it measures nothing, so it adds no tag and no spec phrase.
    tiny = load_clip(load_profile("cpu-tiny"))
    assert tiny.random_weights
    res = caption_dataset(folder, emily, clip=tiny, vocabulary=ADVERSARIAL, config=config)
    assert res.clip == tiny.name and not res.clip_measured
    assert all(c.count(",") == 2 for c in res.captions.values())  # token class, zoom, angle only
    # A measuring CLIP that would pick every adversarial tag: identity words never reach a caption.
    everything = set(ADVERSARIAL.clothing) | set(ADVERSARIAL.background) | {"white t-shirt", "neutral gray background"}
    clip = _MeasuringClip([everything], [*everything])
    result = caption_dataset(folder, emily, clip=clip, vocabulary=ADVERSARIAL, config=config)
    allowed = {"leather jacket", "hat", "brick wall", "forest"}
    saw_tag = False
    for caption in result.captions.values():
        _assert_clean(caption, emily)
        assert caption.count("white t-shirt") <= 1  # a vocabulary tag equal to the wardrobe is not repeated
        saw_tag |= any(tag in caption for tag in allowed)
    assert saw_tag  # tags from the vocabulary were added
    again = caption_dataset(folder, emily, clip=clip, vocabulary=ADVERSARIAL, config=config)
    assert again.captions == result.captions  # deterministic


def test_spec_phrases_lose_identity_words_and_template_leaks_fail(tmp_path: Path, emily) -> None:
    spec = emily.with_overrides(wardrobe="green dress", background="red brick wall")
    folder = _curated(tmp_path, spec, n=2)
    clip = _MeasuringClip([{"dress", "brick wall"}], ["dress", "brick wall"])
    result = caption_dataset(folder, spec, clip=clip, vocabulary=CaptionVocabulary(clothing=(), background=()))
    for caption in result.captions.values():
        assert "wearing dress" in caption and "brick wall" in caption
        _assert_clean(caption, spec)
    bad = CaptionConfig(template="{token} {class_word} with freckles, {zoom}, {angle}")
    with pytest.raises(InvalidInput, match="identity words"):
        caption_dataset(folder, spec, config=bad)
    with pytest.raises(InvalidInput, match="start with"):
        caption_dataset(folder, spec, config=CaptionConfig(template="photo of {token}"))
    with pytest.raises(InvalidInput, match="unknown placeholder"):
        caption_dataset(folder, spec, config=CaptionConfig(template="{token} {traits}"))


def test_plain_folder_vocabulary_file_and_errors(tmp_path: Path, emily) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    Image.new("RGB", (32, 32), "gray").save(folder / "a.png")
    result = caption_dataset(folder, emily)
    assert result.captions == {"a": "3m1ly woman"}  # no metadata, nothing measured
    vocab_file = tmp_path / "vocab.toml"
    vocab_file.write_text('clothing = ["cardigan"]\nbackground = ["library"]\n')
    assert load_vocabulary(vocab_file) == CaptionVocabulary(clothing=("cardigan",), background=("library",))
    vocab_file.write_text('clothes = ["cardigan"]\n')
    with pytest.raises(InvalidInput, match="clothes"):
        load_vocabulary(vocab_file)
    with pytest.raises(NotFound):
        caption_dataset(tmp_path / "nope", emily)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotFound, match="no images"):
        caption_dataset(empty, emily)
    assert render_caption("{token}, {zoom}, x {angle}", {"token": "t", "zoom": "", "angle": "a"}) == "t, x a"


def test_cli_caption(tmp_path: Path, emily, capsys) -> None:
    from likeness.cli.main import main

    folder = _curated(tmp_path, emily, n=2)
    rc = main(["caption", str(folder), "--spec", str(REPO / "examples" / "emily.toml"), "--profile", "cpu-tiny"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["clip"] and len(out["files"]) == 2
    for caption in out["captions"].values():
        _assert_clean(caption, emily)
    rc = main(["caption", str(tmp_path / "missing"), "--spec", str(REPO / "examples" / "emily.toml"), "--no-clip"])
    assert rc == NotFound.exit_code
