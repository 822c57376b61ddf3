"""Model profiles: which base model, face pack and CLIP model a run uses.

Profiles are declarative TOML files in ``models/`` (the folder A1111 and
ComfyUI users know). Paths inside a profile are relative to the models
folder, may use ``${VAR:-default}`` environment expansion, and are checked
before any model loads: a missing file is a :class:`ModelMissing` that says
what is missing and how to get it. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from likeness.config import from_dict
from likeness.errors import InvalidInput, ModelMissing

REPO_ROOT = Path(__file__).resolve().parents[2]
_ENV_RE = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")


def models_dir() -> Path:
    """``$LIKENESS_MODELS_DIR`` or the repository's ``models/``."""
    return Path(os.environ.get("LIKENESS_MODELS_DIR", REPO_ROOT / "models")).resolve()


def realdata_dir() -> Path:
    """``$LIKENESS_REALDATA`` or ``../shared/realdata`` beside the checkout."""
    return Path(os.environ.get("LIKENESS_REALDATA", REPO_ROOT.parent / "shared" / "realdata")).resolve()


@dataclass(frozen=True)
class Profile:
    # Profile name (file stem); what --profile and the spec's profile name.
    name: str
    # Model family decides the text encoders and embedding formats.
    family: Literal["sd15", "sdxl"] = "sd15"
    # "cuda" profiles refuse to run without a GPU instead of crawling on CPU.
    device: Literal["cuda", "cpu", "auto"] = "auto"
    # fp16 on CUDA halves memory and doubles speed; CPU needs float32.
    dtype: Literal["float16", "bfloat16", "float32"] = "float32"
    # Diffusers folder, single-file .safetensors/.ckpt, or a hub id (online only).
    base_model: str = ""
    # Optional VAE override (diffusers folder or single file), as A1111's SD VAE.
    vae: str = ""
    # SDXL's VAE overflows in fp16, so its config says force_upcast (every decode in float32, twice
    # the memory); madebyollin's fp16-fix VAE does not need it. "auto": a VAE folder's own config;
    # a single file has none, so its file name decides ("fp16" and "fix" in it: no upcast).
    # "yes"/"no" override both.
    vae_upcast: Literal["auto", "yes", "no"] = "auto"
    # torch.compile of the UNet and the VAE decoder (CUDA): "off", or an inductor mode. Shapes are
    # fixed (dynamic=False, the first batch's size; smaller batches are padded to it), so a build's
    # last partial batch and its validation batches do not recompile.
    compile: Literal["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "off"
    # insightface pack folder (detection + recognition .onnx files).
    face_pack: str = ""
    # Detector input size; 640 finds small faces in full-body shots.
    face_det_size: int = 640
    # open_clip architecture name, or a JSON config path for custom ones.
    clip_model: str = "ViT-B-32"
    # open_clip pretrained tag, or a local checkpoint path.
    clip_pretrained: str = ""
    # True for profiles built from random weights (cpu-tiny): their images are noise and their CLIP
    # judges nothing; reports say so and captions write no CLIP tags from them.
    random_weights: bool = False
    # Human-readable note shown by `likeness profiles`.
    description: str = ""
    # Where to get the weights when they are missing (shown in errors).
    how_to_get: str = ""

    def resolve(self, value: str) -> Path:
        """A profile path with ${VAR:-default} expanded, relative to models/."""
        expanded = _ENV_RE.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
        p = Path(expanded).expanduser()
        if not p.is_absolute():
            p = models_dir() / p
        return p.resolve()

    @property
    def base_model_path(self) -> Path | None:
        """Local path of the base model, or None for a hub id."""
        if not self.base_model:
            return None
        p = self.resolve(self.base_model)
        looks_like_hub_id = (
            self.base_model.count("/") == 1
            and not self.base_model.startswith((".", "/", "$"))
            and not p.exists()
            and not Path(self.base_model).suffix
        )
        return None if looks_like_hub_id else p

    @property
    def face_pack_path(self) -> Path:
        return self.resolve(self.face_pack)

    def require(self, what: Literal["base_model", "face_pack", "clip"]) -> Path:
        """The local path of one model, or ModelMissing saying how to get it."""
        hint = f" {self.how_to_get}" if self.how_to_get else ""
        if what == "base_model":
            if not self.base_model.strip():
                raise ModelMissing(
                    f"profile {self.name!r} names no base_model; set base_model in models/{self.name}.toml to a "
                    "diffusers folder or a .safetensors/.ckpt checkpoint (relative to models/)"
                )
            p = self.base_model_path
            if p is None:
                return Path(self.base_model)
            if not p.exists():
                raise ModelMissing(
                    f"profile {self.name!r}: base model {p} is missing; put a diffusers folder or a "
                    f".safetensors/.ckpt checkpoint there, or edit base_model in models/{self.name}.toml.{hint}"
                )
            return p
        if what == "face_pack":
            p = self.face_pack_path
            onnx = sorted(p.glob("*.onnx")) if p.is_dir() else []
            if not onnx:
                raise ModelMissing(
                    f"profile {self.name!r}: face pack {p} has no .onnx models; put insightface's pack "
                    f"(e.g. buffalo_l: det_10g.onnx + w600k_r50.onnx) there or set LIKENESS_FACE_PACK.{hint}"
                )
            return p
        p = self.resolve(self.clip_pretrained) if self.clip_pretrained else None
        if p is None or not p.exists():
            raise ModelMissing(
                f"profile {self.name!r}: CLIP weights {p or '(clip_pretrained unset)'} are missing; "
                f"put an open_clip checkpoint there.{hint}"
            )
        return p


def profile_names() -> list[str]:
    return sorted(p.stem for p in models_dir().glob("*.toml"))


def load_profile(name: str) -> Profile:
    """Load ``models/<name>.toml``; an unknown name lists the valid ones."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or ""):
        raise InvalidInput(f"profile {name!r} is not a valid profile name; choose one of {profile_names()}")
    path = models_dir() / f"{name}.toml"
    if not path.is_file():
        raise InvalidInput(f"unknown profile {name!r}; choose one of {profile_names()}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"profile {path}: not valid TOML ({exc}); fix the file or remove it") from None
    data.setdefault("name", name)
    return from_dict(Profile, data, where=path.name)


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return bool(torch.cuda.is_available())


class ChoiceSentence(str):
    """The sentence saying why a profile was chosen, with the bare reason beside it (``.reason``)."""

    reason: str

    def __new__(cls, sentence: str, reason: str) -> "ChoiceSentence":
        out = super().__new__(cls, sentence)
        out.reason = reason
        return out


def best_profile(preferred: tuple[str, ...] = ("sdxl", "sd15")) -> tuple[Profile, ChoiceSentence]:
    """The best profile this machine can run, and a sentence saying why (its ``.reason``: the bare why).

    A CUDA profile is chosen only when a GPU is present *and* its weights are
    on disk; otherwise ``cpu-tiny`` (tiny random weights: the pipeline runs for
    real, the pictures are noise).
    """
    reasons = []
    if cuda_available():
        for name in preferred:
            try:
                prof = load_profile(name)
                prof.require("base_model")
                return prof, ChoiceSentence(f"using profile {name!r} on CUDA",
                                            "a CUDA GPU and its weights were found")
            except (ModelMissing, InvalidInput) as exc:
                reasons.append(str(exc))
    else:
        reasons.append("no CUDA GPU found")
    tiny = load_profile("cpu-tiny")
    reason = "; ".join(reasons)
    return tiny, ChoiceSentence(
        "using profile 'cpu-tiny' (tiny random weights on the CPU: the pipeline runs end to end "
        "but images are noise, not faces) because " + reason, reason)


def resolve_profile(explicit: Profile | str | None = None, spec_profile: str = "",
                    say: Callable[[ChoiceSentence], None] | None = None) -> Profile:
    """The one profile rule: the explicit name, else the spec's, else the best this machine runs.

    ``say`` receives the sentence explaining an automatic choice (for example that
    ``cpu-tiny`` was picked because no GPU was found; its ``.reason`` is the bare why),
    so no caller falls back silently.
    """
    if isinstance(explicit, Profile):
        return explicit
    name = explicit or spec_profile
    if name:
        return load_profile(name)
    best, why = best_profile()
    if say is not None:
        say(why)
    return best
