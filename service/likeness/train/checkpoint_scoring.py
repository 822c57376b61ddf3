"""The best training step is measured: validation images at each checkpoint, scored, and one rule.

At every checkpoint the trainer renders the token in new scenes (fixed seeds),
and a *validator* scores them:

- **identity**: cosine of each image's main face to the centroid of the
  training set's faces (``scores.identity_centroid``/``identity_similarities``);
  an image where no face is found counts **0** (the character did not show
  up), so ``identity`` is the mean over *all* validation images;
- **clip_t**: CLIP-T prompt adherence (``scores.clip_t``) of each image to its
  prompt with the token replaced by the class word ("a photo of woman,
  cooking in a kitchen"): does the scene still follow the prompt (editability)?

The rule (:func:`choose_best`): among checkpoints whose CLIP-T is within
``clip_t_tolerance`` (relative) of the best CLIP-T seen, take the highest
identity; ties go to the higher CLIP-T, then to the earlier step (less
overfitted). Checkpoints without a finite CLIP-T are not candidates; with no
candidate at all, the last checkpoint wins. The choice is a pure function of
the score table, so it is deterministic and can be recomputed from
``checkpoint_scores.json``.

Validators are plain callables ``(step, pipe, embedding) -> CheckpointScores``;
:class:`ScoringValidator` is the real one, and tests or batch jobs may pass
their own (e.g. a precomputed table).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from likeness.identity import folder_centroid
from likeness.backends.protocols import ClipModel, FaceAnalyzer, Pipeline
from likeness.errors import InvalidInput

if TYPE_CHECKING:  # pragma: no cover
    from likeness.embeddings import TrainedEmbedding
    from likeness.profiles import Profile
    from likeness.spec import CharacterSpec

DEFAULT_SCENES = ("cooking in a kitchen", "tending a garden", "conducting a choir")


@dataclass(frozen=True)
class ValidationConfig:
    # Off = no images and no scores; the last checkpoint is then "best".
    enabled: bool = True
    # New scenes (never in the captions), so the score measures likeness *and* editability.
    scenes: tuple[str, ...] = DEFAULT_SCENES
    # {token} and {scene}; the token alone (not the class word) so identity comes from the embedding.
    prompt: str = "a photo of {token}, {scene}"
    # One image per scene and seed; fixed seeds make checkpoints comparable.
    seeds: tuple[int, ...] = (1001, 1002)
    # Sampling steps of the validation images (the pipeline's scheduler); 20 keeps it cheap.
    steps: int = 20
    # A1111's default CFG.
    cfg_scale: float = 7.0
    # Image side in pixels; 0 = the training resolution.
    size: int = 0
    # Editability floor: candidates keep CLIP-T >= best - tolerance * |best| (0.1 = within 10 %).
    clip_t_tolerance: float = 0.1
    # Keep the validation images next to the scores (the report shows them).
    save_images: bool = True


def check_validation_config(cfg: ValidationConfig) -> None:
    """Raise InvalidInput naming the field and the fix."""
    if cfg.enabled and not cfg.scenes:
        raise InvalidInput("validation.scenes: list at least one scene, e.g. 'cooking in a kitchen'")
    if cfg.enabled and not cfg.seeds:
        raise InvalidInput("validation.seeds: list at least one seed")
    if "{token}" not in cfg.prompt or "{scene}" not in cfg.prompt:
        raise InvalidInput("validation.prompt: must contain {token} and {scene}, e.g. 'a photo of {token}, {scene}'")
    if not 1 <= cfg.steps <= 150:
        raise InvalidInput(f"validation.steps: {cfg.steps} must be 1-150")
    if cfg.size and (cfg.size % 8 or not 64 <= cfg.size <= 2048):
        raise InvalidInput(f"validation.size: {cfg.size} must be 0 or a multiple of 8 in 64-2048")
    if not 0.0 <= cfg.clip_t_tolerance <= 1.0:
        raise InvalidInput(f"validation.clip_t_tolerance: {cfg.clip_t_tolerance} must be in 0-1")


@dataclass(frozen=True)
class CheckpointScores:
    """Validation scores of one checkpoint (one row of ``checkpoint_scores.json``)."""

    step: int
    # Mean over validation images of cos(main face, training-set centroid); no face = 0.
    identity: float
    # Mean CLIP-T of the validation images (raw cosine); NaN = not measured.
    clip_t: float
    # Validation images in which a face was found, and images in all.
    faces_found: int = 0
    n_images: int = 0
    # Training loss (mean over the steps since the previous checkpoint); filled by the trainer.
    loss: float | None = None
    # Per image: prompt, seed, identity (None = no face), clip_t, file.
    images: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["images"] = list(self.images)
        for k in ("identity", "clip_t", "loss"):
            v = d[k]
            d[k] = None if v is None or not math.isfinite(v) else round(float(v), 6)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "CheckpointScores":
        nan = float("nan")
        return CheckpointScores(
            step=int(d["step"]),
            identity=nan if d.get("identity") is None else float(d["identity"]),
            clip_t=nan if d.get("clip_t") is None else float(d["clip_t"]),
            faces_found=int(d.get("faces_found", 0)),
            n_images=int(d.get("n_images", 0)),
            loss=None if d.get("loss") is None else float(d["loss"]),
            images=tuple(d.get("images", ())),
        )


Validator = Callable[[int, Any, "TrainedEmbedding"], CheckpointScores]


@dataclass(frozen=True)
class BestChoice:
    step: int
    # Which rule picked it, in words (stored in best.json).
    reason: str
    # The CLIP-T floor the candidates had to reach (None when no candidates).
    clip_t_floor: float | None


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def choose_best(scores: Sequence[CheckpointScores], clip_t_tolerance: float = 0.1) -> BestChoice:
    """The documented rule: best identity among checkpoints with CLIP-T near the best (see module doc)."""
    if not scores:
        raise InvalidInput("no checkpoints to choose from; train at least one checkpoint")
    cands = [s for s in scores if _finite(s.clip_t)]
    if not cands:
        last = max(s.step for s in scores)
        return BestChoice(last, "no CLIP-T scores: the last checkpoint", None)
    top = max(s.clip_t for s in cands)
    floor = top - clip_t_tolerance * abs(top)
    eligible = [s for s in cands if s.clip_t >= floor - 1e-12]

    def key(s: CheckpointScores) -> tuple[float, float, int]:
        ident = s.identity if _finite(s.identity) else 0.0
        return (round(ident, 9), round(s.clip_t, 9), -s.step)

    best = max(eligible, key=key)
    return BestChoice(
        best.step,
        f"highest identity ({best.identity:.4f}) among {len(eligible)} checkpoint(s) with CLIP-T >= "
        f"{floor:.4f} (best CLIP-T {top:.4f} minus {clip_t_tolerance:.0%}); ties: higher CLIP-T, then earlier step",
        floor,
    )


def scene_prompts(token: str, cfg: ValidationConfig) -> list[str]:
    return [cfg.prompt.format(token=token, scene=scene) for scene in cfg.scenes]


def clip_text(prompt: str, token: str, class_word: str) -> str:
    """The prompt CLIP-T compares against: the token replaced by the class word."""
    return re.sub(rf"(?<![\w]){re.escape(token)}(?![\w])", class_word, prompt)


class ScoringValidator:
    """Renders the scene prompts with the pipeline and scores them with the face and CLIP backends.

    ``centroid`` is the identity centroid of the training images' main faces
    (None when no face was found there: identity is then 0 for every image).
    """

    def __init__(
        self,
        spec: "CharacterSpec",
        cfg: ValidationConfig,
        *,
        faces: FaceAnalyzer,
        clip: ClipModel,
        centroid: Any,
        size: int,
        image_dir: str | Path | None = None,
    ) -> None:
        check_validation_config(cfg)
        self.spec, self.cfg, self.faces, self.clip, self.centroid = spec, cfg, faces, clip, centroid
        self.size = cfg.size or size
        self.image_dir = Path(image_dir) if image_dir else None

    def render(self, pipe: Pipeline, token: str) -> list[tuple[str, int, Any]]:
        """(prompt, seed, PIL image) for every scene x seed: the spec's sampler, one generator per image."""
        import dataclasses

        from likeness.backends.diffusion import denoise, schedule_steps
        from likeness.prompts import encode_prompts

        sampling = dataclasses.replace(
            self.spec.sampling, steps=self.cfg.steps, cfg_scale=self.cfg.cfg_scale, width=self.size, height=self.size
        )
        seeds = [int(s) for s in self.cfg.seeds]
        out = []
        for prompt in scene_prompts(token, self.cfg):
            embeds = encode_prompts(pipe, [prompt] * len(seeds), [self.spec.negative_prompt],
                                    steps=schedule_steps(sampling), pad_conds=sampling.pad_conds)
            for seed, image in zip(seeds, denoise(pipe, embeds, seeds, sampling)):
                out.append((prompt, seed, image))
        return out

    def __call__(self, step: int, pipe: Pipeline, embedding: "TrainedEmbedding") -> CheckpointScores:
        import numpy as np

        from likeness import scores as S
        from likeness.backends.faces import main_face
        from likeness.files import atomic_save

        rendered = self.render(pipe, embedding.token)
        images = [img for _, _, img in rendered]
        faces = self.faces.analyze([np.asarray(img.convert("RGB")) for img in images])
        idents: list[float | None] = []
        for found in faces:
            face = main_face(found)
            if face is None or self.centroid is None:
                idents.append(None)
            else:
                idents.append(float(S.identity_similarities(np.asarray(face.embedding)[None], self.centroid)[0]))
        texts = [clip_text(p, embedding.token, self.spec.class_word) for p, _, _ in rendered]
        ct = S.clip_t(self.clip, images, texts)
        rows = []
        for i, ((prompt, seed, img), ident) in enumerate(zip(rendered, idents)):
            row: dict[str, Any] = {"prompt": prompt, "seed": seed, "identity": ident, "clip_t": round(float(ct[i]), 6)}
            if self.image_dir is not None and self.cfg.save_images:
                path = self.image_dir / f"step-{step}" / f"{i:02d}-seed{seed}.png"
                atomic_save(path, lambda tmp, img=img: img.save(tmp))
                row["file"] = str(path.relative_to(self.image_dir.parent))
            rows.append(row)
        n = len(rendered)
        return CheckpointScores(
            step=step,
            identity=float(sum(v for v in idents if v is not None) / n) if n else float("nan"),
            clip_t=float(np.mean(ct)) if n else float("nan"),
            faces_found=sum(v is not None for v in idents),
            n_images=n,
            images=tuple(rows),
        )


def make_validator(
    spec: "CharacterSpec", cfg: ValidationConfig, profile: "Profile", image_paths: Sequence[Path], *, size: int,
    image_dir: str | Path | None = None,
) -> ScoringValidator:
    """The real validator of a profile: its face pack and CLIP model, centroid of the training faces."""
    from likeness.backends.clip import load_clip
    from likeness.backends.faces import load_face_analyzer

    faces = load_face_analyzer(profile)
    clip = load_clip(profile)
    centroid, _ = folder_centroid(faces, image_paths)
    return ScoringValidator(spec, cfg, faces=faces, clip=clip, centroid=centroid, size=size, image_dir=image_dir)
