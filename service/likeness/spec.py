"""Character spec: a TOML file -> a frozen, validated :class:`CharacterSpec`.

Every field has a default that reproduces the hand workflow (A1111: DPM++ 2M
Karras, 30 steps, CFG 7, 512x512, 5 zooms x 5 angles x 16 images). Errors name
the field and the fix.
"""

from __future__ import annotations

import dataclasses
import re
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from likeness.config import bounded, check_seed, from_dict, to_dict
from likeness.errors import InvalidInput
from likeness.prompt_schedule import check_prompt

SamplerName = Literal[
    "DPM++ 2M Karras",
    "DPM++ 2M",
    "DPM++ SDE Karras",
    "DPM++ SDE",
    "DPM++ 2M SDE Karras",
    "Euler a",
    "Euler",
    "DDIM",
    "UniPC",
    "Heun",
    "LMS",
    "DPM2",
]

DEFAULT_ZOOMS = ("extreme closeup", "medium closeup", "closeup", "medium shot", "full body")
DEFAULT_ANGLES = ("front shot", "rear angle", "side angle", "shot from above", "low angle shot")
TEMPLATE_FIELDS = ("token", "class_word", "traits", "wardrobe", "background", "zoom", "angle")

_TOKEN_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{1,31}$")


@dataclass(frozen=True)
class SamplingConfig:
    # A1111 sampler names, so settings copy over from PNG Info unchanged.
    sampler: SamplerName = "DPM++ 2M Karras"
    # 30 steps of DPM++ 2M Karras is the workflow's quality/speed balance.
    steps: int = 30
    # CFG 7: A1111's default; higher burns colours, lower drifts off-prompt.
    cfg_scale: float = 7.0
    # SD 1.5 was trained at 512; other sizes duplicate or crop the person.
    width: int = 512
    height: int = 512
    # -1 draws a random base seed once per run; every image's seed is recorded.
    seed: int = -1
    # Images per denoising batch (A1111's "batch size"); 0 = choose by memory.
    batch_size: int = 0
    # A1111's "Pad prompt/negative prompt" option: pad the shorter of prompt and negative prompt with
    # empty chunks to the other's length. Off by default, as in A1111 (it moved the final latents by
    # 14-15% with examples/emily.toml's 106-token negative); when on, infotext records "Pad conds: True".
    pad_conds: bool = False
    # A1111's noise source ("Random number generator source"): "CPU" = a CPU torch generator per image,
    # the same numbers on every machine and GPU (Likeness's default: builds and tests reproduce on CPU);
    # "GPU" = torch's CUDA Philox generator, A1111's default (drawn by likeness.noise's re-creation when
    # the device is not CUDA); "NV" = A1111's CPU re-creation of it. Infotext records "RNG: <source>".
    rng: Literal["CPU", "GPU", "NV"] = "CPU"
    # --- A1111's "Restore faces" (likeness.backends.restore), applied to every image before it is saved.
    # "" = off (A1111's default), or the restorer: "CodeFormer" / "GFPGAN" (weights in models/Codeformer/,
    # models/GFPGAN/; infotext "Face restoration: CodeFormer"). The workflow's galleries are made with it on.
    restore_faces: Literal["", "CodeFormer", "GFPGAN"] = ""
    # Share of the restored face blended over the original (A1111 Extras' visibility; txt2img uses 1).
    restore_visibility: float = bounded(1.0, 0.0, 1.0)
    # CodeFormer's fidelity w (A1111's "CodeFormer weight", default 0.5): 0 restores most, 1 keeps the input.
    codeformer_weight: float = bounded(0.5, 0.0, 1.0)
    # --- end of face restoration


@dataclass(frozen=True)
class CharacterSpec:
    # Human name of the character; also the default folder/build name.
    name: str
    # The unique trigger word the embedding is trained for (e.g. "3m1ly").
    token: str
    # A plain word for what the character is; initialises the embedding.
    class_word: str = "person"
    # Facial features and hair: in generation prompts, never in captions.
    traits: tuple[str, ...] = ()
    # Other words for the traits (e.g. "ginger"), also kept out of captions.
    trait_synonyms: tuple[str, ...] = ()
    # Clothes: captioned, so the embedding does not learn them.
    wardrobe: str = ""
    # The scene behind the character; checked by CLIP during curation.
    background: str = "neutral gray background"
    # Placeholders: {token} {class_word} {traits} {wardrobe} {background} {zoom} {angle}.
    # Without {zoom}/{angle} the zoom and angle lists act as A1111 Prompt S/R.
    template: str = (
        "photo of a {traits}, {wardrobe}, {zoom}, {angle}, {background}, "
        "detailed skin, sharp focus, natural light"
    )
    # What every image must avoid; long ones are encoded in 75-token chunks, never cut.
    negative_prompt: str = ""
    # Grid axes: framing and camera angle vary so the embedding learns the face, not one shot.
    zooms: tuple[str, ...] = DEFAULT_ZOOMS
    angles: tuple[str, ...] = DEFAULT_ANGLES
    # 16 per cell x 25 cells = 400: enough to keep ~25 after three passes.
    per_cell: int = 16
    # A1111's generation settings, shared by every image of the gallery.
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Model profile from models/*.toml; empty = the best one the machine has.
    profile: str = ""

    @property
    def grid_size(self) -> int:
        return len(self.zooms) * len(self.angles) * self.per_cell

    def with_overrides(self, **changes: Any) -> "CharacterSpec":
        """A copy with some fields replaced, validated like a loaded spec."""
        data = to_dict(self)
        for key, value in changes.items():
            if key in {f.name for f in dataclasses.fields(SamplingConfig)}:
                data["sampling"][key] = value
            else:
                data[key] = value
        return spec_from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def _validate(spec: CharacterSpec) -> None:
    if not spec.name.strip():
        raise InvalidInput("name: must not be empty; e.g. name = \"Emily\"")
    if not _TOKEN_RE.match(spec.token):
        raise InvalidInput(
            f"token: {spec.token!r} must be one lower-case word of 2-32 letters/digits "
            "(no spaces), rare enough to have no meaning, e.g. \"3m1ly\""
        )
    if not spec.class_word.strip() or " " in spec.class_word.strip():
        raise InvalidInput(f"class_word: {spec.class_word!r} must be one plain word such as \"woman\"")
    for name in ("zooms", "angles"):
        values = getattr(spec, name)
        if not values:
            raise InvalidInput(f"{name}: must list at least one value")
        if len(set(values)) != len(values):
            raise InvalidInput(f"{name}: values must be distinct, got {list(values)}")
        if any(not v.strip() for v in values):
            raise InvalidInput(f"{name}: values must not be empty")
    if not 1 <= spec.per_cell <= 1000:
        raise InvalidInput(f"per_cell: {spec.per_cell} must be between 1 and 1000")
    s = spec.sampling
    if not 1 <= s.steps <= 500:
        raise InvalidInput(f"sampling.steps: {s.steps} must be between 1 and 500")
    if not 0.0 <= s.cfg_scale <= 50.0:
        raise InvalidInput(f"sampling.cfg_scale: {s.cfg_scale} must be between 0 and 50")
    for dim in ("width", "height"):
        v = getattr(s, dim)
        if v % 8 or not 64 <= v <= 4096:
            raise InvalidInput(f"sampling.{dim}: {v} must be a multiple of 8 between 64 and 4096")
    check_seed(s.seed, "sampling.seed")
    if not 0 <= s.batch_size <= 256:
        raise InvalidInput(f"sampling.batch_size: {s.batch_size} must be 0 (auto) to 256")
    try:
        names = {n for _, n, _, _ in string.Formatter().parse(spec.template) if n is not None}
    except ValueError as exc:
        raise InvalidInput(f"template: {exc}; double braces {{{{ }}}} for literal braces") from exc
    unknown = names - set(TEMPLATE_FIELDS)
    if unknown:
        raise InvalidInput(
            f"template: unknown placeholder {{{sorted(unknown)[0]}}}; use {', '.join('{'+f+'}' for f in TEMPLATE_FIELDS)}"
        )
    try:
        # A format spec or conversion ("{traits:d}", "{zoom!z}") only fails when filled in.
        spec.template.format(**{f: "x" for f in TEMPLATE_FIELDS})
    except (ValueError, TypeError) as exc:
        raise InvalidInput(
            f"template: {exc}; write placeholders plainly, e.g. {{traits}} (no ':' format or '!' conversion)"
        ) from exc
    if ("zoom" in names) != ("angle" in names):
        raise InvalidInput(
            "template: use both {zoom} and {angle}, or neither (then zooms/angles are "
            "A1111 Prompt S/R lists whose first value must appear in the template)"
        )
    if "zoom" not in names:
        for name in ("zooms", "angles"):
            first = getattr(spec, name)[0]
            if first not in spec.template:
                raise InvalidInput(
                    f"{name}: Prompt S/R needs its first value {first!r} in the template; "
                    f"write it into the template or use {{{name[:-1]}}}"
                )
    if spec.token.lower() in {t.lower() for t in spec.traits}:
        raise InvalidInput("traits: must describe the face, not repeat the token")
    _check_prompt_syntax(spec)


def _check_prompt_syntax(spec: CharacterSpec) -> None:
    """A template, field or negative prompt with syntax Likeness refuses (A1111's ``AND``, extra-network
    tags like ``<lora:name:0.8>``) is an error at load, naming the field, not 100 s later at generation."""
    fields = {"token": spec.token, "class_word": spec.class_word, "traits": ", ".join(spec.traits),
              "wardrobe": spec.wardrobe, "background": spec.background}
    names = {n for _, n, _, _ in string.Formatter().parse(spec.template) if n}
    filled = spec.template.format(**fields, **({"zoom": "", "angle": ""} if "zoom" in names else {}))
    texts = [("template", filled, False), ("negative_prompt", spec.negative_prompt, True)]
    texts += [(name, v, False) for name in ("zooms", "angles") for v in getattr(spec, name)]
    for name, text, negative in texts:
        try:
            check_prompt(text, negative=negative)
        except InvalidInput as exc:
            raise InvalidInput(f"{name}: {exc}") from exc


def spec_from_dict(data: dict[str, Any], where: str = "spec") -> CharacterSpec:
    """Validate a dict (from TOML, JSON or protobuf) into a :class:`CharacterSpec`."""
    spec = from_dict(CharacterSpec, data, where)
    try:
        _validate(spec)
    except InvalidInput as exc:
        raise InvalidInput(f"{where}.{exc}") from None
    return spec


def load_spec(path: str | Path) -> CharacterSpec:
    """Read and validate a character spec TOML file."""
    path = Path(path)
    if path.is_dir():
        raise InvalidInput(f"spec {path} is a folder; pass the .toml character spec file in it (e.g. examples/emily.toml)")
    if not path.is_file():
        raise InvalidInput(f"spec file {path} does not exist; pass a .toml character spec (see examples/)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        # TOML is UTF-8 by definition; Latin-1/Windows-1252 editors write "é" as one byte 0xE9.
        raise InvalidInput(
            f"{path}: the file must be UTF-8 (TOML is); byte {exc.object[exc.start]:#04x} at offset "
            f"{exc.start} is not. Save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{path}: not valid TOML: {exc}") from exc
    return spec_from_dict(data, where=path.name)


def check_token_is_new(token: str, tokenizer: Any) -> None:
    """The token must not already be one token of the tokenizer's vocabulary.

    A token that exists (``woman``) carries meaning the embedding would fight;
    one that splits into several pieces (``3m1ly`` -> ``3``, ``m``, ``1``,
    ``ly``) is added as a new token by textual inversion.
    """
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) == 1:
        raise InvalidInput(
            f"token: {token!r} is already a single token of the tokenizer and has a meaning; "
            "pick a rare spelling such as \"3m1ly\""
        )
