"""Stage 3: captions that keep the face out.

Each curated image gets an A1111 / kohya ``<id>.txt`` sidecar that names the token and the class
word and describes only what the embedding must NOT learn: framing (zoom), camera angle,
clothing and background. Sources: the image's curation metadata (zoom, angle), and, only when
a real CLIP model measures them in the image, the spec's wardrobe and background and zero-shot
tags from a configurable vocabulary (a caption states what is in the picture; a random-weights
CLIP measures nothing, so it adds nothing: ``CaptionResult.clip_measured``).

Identity rule: every content word of the spec's ``traits`` and ``trait_synonyms`` (except the
token and the class word; "eyes"/"eye" and "curls"/"curl" count as one word) is an *identity
word*. A vocabulary tag that contains one is dropped whole before CLIP sees it; a spec phrase
(wardrobe, background, zoom, angle) loses just those words. A caption that still contains one
(e.g. written into the template) is an error, never a silent leak.
"""

from __future__ import annotations

import re
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from likeness.backends.protocols import ClipModel
from likeness.config import from_dict
from likeness.errors import InvalidInput, NotFound
from likeness.files import atomic_write_text
from likeness.progress import ProgressFn, report
from likeness.spec import CharacterSpec

DEFAULT_CLOTHING: tuple[str, ...] = (
    "t-shirt", "shirt", "blouse", "sweater", "hoodie", "jacket", "leather jacket", "denim jacket",
    "coat", "dress", "suit", "tank top", "jeans", "skirt", "scarf", "hat", "glasses", "uniform",
    "apron", "turtleneck",
)
DEFAULT_BACKGROUND: tuple[str, ...] = (
    "plain gray background", "white background", "black background", "studio backdrop", "brick wall",
    "city street", "forest", "beach", "park", "kitchen", "living room", "office", "garden", "sky",
)
# Function words never make a word an identity word ("a", "with", ...).
_STOPWORDS = frozenset(
    "a an the of with and or in on at to for by from her his their its very has have is are".split()
)
_WORD = re.compile(r"[a-z0-9]+")
TEMPLATE_FIELDS = ("token", "class_word", "zoom", "angle", "clothing", "background")


@dataclass(frozen=True)
class CaptionVocabulary:
    """Words CLIP may tag an image with. A TOML file with the same two lists replaces it."""

    # Clothing CLIP may add beyond the spec's wardrobe (captioned so it is not learned).
    clothing: tuple[str, ...] = DEFAULT_CLOTHING
    # Scenes CLIP may add beyond the spec's background.
    background: tuple[str, ...] = DEFAULT_BACKGROUND


@dataclass(frozen=True)
class CaptionConfig:
    # Segments whose placeholders are all empty are left out (e.g. no zoom for a plain folder).
    template: str = "{token} {class_word}, {zoom}, {angle}, wearing {clothing}, {background}"
    # CLIP clothing tags added per image: one keeps captions short (kohya's advice).
    clothing_tags: int = 1
    # CLIP background tags added per image.
    background_tags: int = 1
    # Zero-shot softmax probability a tag needs; 0 = always take the top tags. 0.5, as for the spec's
    # phrases below: a tag is written only when CLIP finds it more likely than all other entries
    # together (with 0, an image showing none of the vocabulary still got its least-bad tag).
    min_probability: float = 0.5
    # Prompt templates for zero-shot scoring ({tag} is the vocabulary entry).
    clothing_prompt: str = "a photo of a person wearing {tag}"
    background_prompt: str = "a photo of a person in front of a {tag}"
    # The spec's wardrobe / background is written into a caption only when a real CLIP model
    # measures it in that image: its zero-shot probability among [spec phrase, *vocabulary] (the
    # background: against curation's contrasting scenes) must reach this. 0.5 = "more likely the
    # spec's than all the alternatives together". A caption states what is in the picture, not
    # what the prompt asked for (issue 13: red-carpet photos were captioned "neutral gray background").
    spec_min_probability: float = 0.5


@dataclass(frozen=True)
class CaptionResult:
    dataset_dir: Path
    # image id -> caption, in dataset order.
    captions: dict[str, str]
    # The written sidecars, one per image.
    files: tuple[Path, ...]
    # Vocabulary tags and spec words left out because they name the face.
    dropped: tuple[str, ...] = ()
    # The CLIP model that tagged the images; "" = metadata only.
    clip: str = ""
    identity_words: tuple[str, ...] = field(default=())
    # True when a real CLIP model measured the tags and spec phrases; False for none or a random one
    # (then captions hold only the token, class word, zoom and angle).
    clip_measured: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset_dir": str(self.dataset_dir),
            "captions": dict(self.captions),
            "files": [str(p) for p in self.files],
            "dropped": list(self.dropped),
            "clip": self.clip,
            "identity_words": list(self.identity_words),
            "clip_measured": self.clip_measured,
        }


# --- the identity rule ---------------------------------------------------------------------------


def _norm(word: str) -> str:
    # Singular/plural as one word: eyes/eye, freckles/freckle, curls/curl (not "dress").
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def words(text: str) -> list[str]:
    """Lower-case words of ``text`` in the form the identity rule compares ("eyes" -> "eye")."""
    return [_norm(w) for w in _WORD.findall(text.lower())]


def identity_words(spec: CharacterSpec) -> frozenset[str]:
    """Every content word of the spec's traits and synonyms, minus the token and class word."""
    allowed = set(words(spec.token)) | set(words(spec.class_word)) | {_norm(w) for w in _STOPWORDS}
    banned: set[str] = set()
    for phrase in (*spec.traits, *spec.trait_synonyms):
        banned.update(w for w in words(phrase) if len(w) > 1 and w not in allowed)
    return frozenset(banned)


def identity_leaks(caption: str, banned: frozenset[str]) -> list[str]:
    """Identity words found in ``caption`` (empty when it is clean)."""
    return sorted({w for w in words(caption) if w in banned})


def _strip_identity(phrase: str, banned: frozenset[str], dropped: list[str]) -> str:
    """``phrase`` without its identity words (whole words, case-insensitive)."""
    def repl(m: re.Match[str]) -> str:
        if _norm(m.group(0).lower()) in banned:
            dropped.append(m.group(0))
            return ""
        return m.group(0)

    out = re.sub(r"[A-Za-z0-9]+", repl, phrase)
    out = re.sub(r"\s*-\s*(?=\s|$)|(?<=\s)-\s*|^\s*-", " ", out)  # dangling hyphens ("green-eyed" -> "")
    out = re.sub(r"\s+", " ", out).strip(" ,")
    return out if any(w not in _STOPWORDS for w in _WORD.findall(out.lower())) else ""


def _clean_tags(tags: Sequence[str], banned: frozenset[str], dropped: list[str]) -> list[str]:
    kept = []
    for tag in dict.fromkeys(t.strip() for t in tags if t.strip()):
        if identity_leaks(tag, banned):
            dropped.append(tag)
        else:
            kept.append(tag)
    return kept


# --- vocabulary, rows, zero-shot -----------------------------------------------------------------


def load_vocabulary(path: str | Path) -> CaptionVocabulary:
    """A TOML file with ``clothing = [...]`` and/or ``background = [...]``."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"vocabulary file {path} does not exist; write a TOML file with clothing/background lists")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{path}: not valid TOML: {exc}") from exc
    return from_dict(CaptionVocabulary, data, path.name)


def _rows(dataset_dir: Path) -> list[tuple[str, Path, str, str]]:
    """(id, image, zoom, angle) of every image to caption.

    A curated folder (has ``curation.json``): its selected ``<id>.png`` images, with the measured
    zoom (the label's when none was measured) and the angle from curate's
    :func:`likeness.curate.decide.read_curation`. Any other folder of images (a
    dataset made by hand): every image in it, without zoom/angle.
    """
    from likeness.images import list_images

    if (dataset_dir / "curation.json").is_file():
        from likeness.curate.decide import read_curation  # curate owns its file format and versions

        curation = read_curation(dataset_dir)
        rows = []
        for image_id in curation.selected:
            decision = curation.decision(image_id)
            image = dataset_dir / f"{image_id}.png"
            if not image.is_file():
                raise NotFound(f"{image} is listed as selected in curation.json but missing; re-run curation")
            # The zoom the picture shows (curation measures it from the face's size), not the prompt's word:
            # the workflow re-labels zooms by what is visible before captioning.
            zoom = (decision.measures or {}).get("zoom_measured") or decision.zoom
            rows.append((image_id, image, zoom, decision.angle))
    else:
        rows = [(p.stem, p, "", "") for p in list_images(dataset_dir) if p.parent == dataset_dir]
    if not rows:
        raise NotFound(f"{dataset_dir} has no images to caption; run curation first or point at a folder of images")
    return rows


def _zero_shot(clip: ClipModel, images: list[Any], tags: list[str], prompt: str, k: int, min_p: float) -> list[list[str]]:
    """Top-``k`` tags per image by CLIP softmax (temperature 100, as CLIP's logit scale)."""
    import numpy as np

    if not tags or k <= 0 or not images:
        return [[] for _ in images]
    img = clip.embed_images(images)
    txt = clip.embed_texts([prompt.format(tag=t) for t in tags])
    logits = 100.0 * img @ txt.T
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    out = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        out.append([tags[i] for i in order if row[i] >= min_p])
    return out


def _phrase_probability(clip: ClipModel, images: list[Any], phrase: str, vocabulary: list[str], prompt: str) -> Any:
    """Per image: CLIP softmax probability (temperature 100) of ``phrase`` among ``[phrase, *vocabulary]``."""
    import numpy as np

    others = [t for t in vocabulary if t.strip().lower() != phrase.strip().lower()]
    img = clip.embed_images(images)
    txt = clip.embed_texts([prompt.format(tag=t) for t in (phrase, *others)])
    logits = 100.0 * img @ txt.T
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs[:, 0] / probs.sum(axis=1)


# --- captions ------------------------------------------------------------------------------------


def render_caption(template: str, values: dict[str, str]) -> str:
    """Fill ``template``; comma-separated segments whose placeholders are all empty are dropped."""
    parts = []
    for segment in template.split(","):
        names = [n for _, n, _, _ in string.Formatter().parse(segment) if n]
        if names and not any(values.get(n) for n in names):
            continue
        parts.append(segment.format(**values).strip())
    return ", ".join(p for p in parts if p)


def _check_template(template: str) -> None:
    try:
        names = {n for _, n, _, _ in string.Formatter().parse(template) if n is not None}
    except ValueError as exc:
        raise InvalidInput(f"caption template: {exc}") from exc
    unknown = names - set(TEMPLATE_FIELDS)
    if unknown:
        raise InvalidInput(f"caption template: unknown placeholder {{{sorted(unknown)[0]}}}; use {TEMPLATE_FIELDS}")
    if not template.lstrip().startswith("{token}"):
        raise InvalidInput("caption template must start with {token} (kohya's keep_tokens keeps it first)")


def _merge(phrases: list[str]) -> str:
    """Join phrases, skipping any whose words are all already said ("t-shirt" after "white t-shirt")."""
    said: set[str] = set()
    out = []
    for p in phrases:
        ws = set(words(p))
        if p and not ws <= said:
            out.append(p)
            said |= ws
    return ", ".join(out)


def caption_dataset(
    dataset_dir: str | Path,
    spec: CharacterSpec,
    *,
    clip: ClipModel | None = None,
    vocabulary: CaptionVocabulary | None = None,
    config: CaptionConfig | None = None,
    progress: ProgressFn | None = None,
) -> CaptionResult:
    """Write ``<id>.txt`` beside each image of ``dataset_dir``; captions never name the face.

    ``clip`` (a :class:`likeness.backends.clip.ClipModel`) adds zero-shot clothing and background
    tags from ``vocabulary``; without it captions come from metadata and the spec alone.
    """
    from likeness.images import load_image

    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise NotFound(f"dataset folder {dataset_dir} does not exist")
    config = config or CaptionConfig()
    vocabulary = vocabulary or CaptionVocabulary()
    _check_template(config.template)
    if config.clothing_tags < 0 or config.background_tags < 0 or not 0.0 <= config.min_probability <= 1.0:
        raise InvalidInput("caption config: tag counts must be >= 0 and min_probability in [0, 1]")
    banned = identity_words(spec)
    dropped: list[str] = []
    clothing_vocab = _clean_tags(vocabulary.clothing, banned, dropped)
    background_vocab = _clean_tags(vocabulary.background, banned, dropped)
    wardrobe = _strip_identity(spec.wardrobe, banned, dropped)
    background = _strip_identity(spec.background, banned, dropped)

    rows = _rows(dataset_dir)
    clothing_tags: list[list[str]] = [[] for _ in rows]
    background_tags: list[list[str]] = [[] for _ in rows]
    # A CLIP with random weights (cpu-tiny) measures nothing: no tags, no spec phrases from it.
    measured = clip is not None and not getattr(clip, "random_weights", False)
    show_wardrobe = [False] * len(rows)
    show_background = [False] * len(rows)
    if measured:
        assert clip is not None
        images = [load_image(path)[0] for _, path, _, _ in rows]
        clothing_tags = _zero_shot(clip, images, clothing_vocab, config.clothing_prompt,
                                   config.clothing_tags, config.min_probability)
        background_tags = _zero_shot(clip, images, background_vocab, config.background_prompt,
                                     config.background_tags, config.min_probability)
        if wardrobe:
            p = _phrase_probability(clip, images, wardrobe, clothing_vocab, config.clothing_prompt)
            show_wardrobe = [bool(v >= config.spec_min_probability) for v in p]
        if background:
            from likeness.curate.background import clip_background_probability
            from likeness.curate.checks import DEFAULT_BACKGROUND_ALTERNATIVES

            p = clip_background_probability(clip.embed_images(images), clip, background,
                                            DEFAULT_BACKGROUND_ALTERNATIVES)
            show_background = [bool(v >= config.spec_min_probability) for v in p]

    captions: dict[str, str] = {}
    files = []
    for i, (image_id, path, zoom, angle) in enumerate(rows):
        values = {
            "token": spec.token,
            "class_word": spec.class_word,
            "zoom": _strip_identity(zoom, banned, dropped),
            "angle": _strip_identity(angle, banned, dropped),
            "clothing": _merge([wardrobe if show_wardrobe[i] else "", *clothing_tags[i]]),
            "background": _merge([background if show_background[i] else "", *background_tags[i]]),
        }
        caption = render_caption(config.template, values)
        leaks = identity_leaks(caption, banned)
        if leaks:
            raise InvalidInput(
                f"caption template writes identity words {leaks} (from the spec's traits); remove them "
                "from the caption template, or the embedding will not learn them"
            )
        captions[image_id] = caption
        files.append(atomic_write_text(path.with_suffix(".txt"), caption))
        report(progress, "caption", i + 1, len(rows), image_id)
    return CaptionResult(
        dataset_dir=dataset_dir,
        captions=captions,
        files=tuple(files),
        dropped=tuple(dict.fromkeys(dropped)),
        clip=str(getattr(clip, "name", "")) if clip is not None else "",
        identity_words=tuple(sorted(banned)),
        clip_measured=measured,
    )
