"""The checks a build request passes at the door, shared by the CLI and the service.

A request that can only fail should fail before any work, with the same
message wherever it comes from: ``likeness spec check``, ``likeness build``
(embedded) and the service's ``StartBuild`` all call :func:`check_build_request`.
Before, ``StartBuild`` took a token the tokenizer already knows (``woman``) and a
CUDA-only profile on a CPU server, ran import, curation and captions, and
failed at training 100 s later.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from likeness.errors import FailedPrecondition, ModelMissing
from likeness.profiles import Profile, cuda_available, load_profile, models_dir
from likeness.spec import CharacterSpec, check_token_is_new


def fallback_tokenizer_dir() -> Path:
    """The CLIP tokenizer shipped beside the tiny model (scripts/build_tiny_models.py writes it)."""
    return models_dir() / "tiny" / "sd15" / "tokenizer"


@functools.lru_cache(maxsize=8)
def _tokenizer_from(folder: str) -> Any:
    # Loading takes ~0.2 s; a server checks every StartBuild against the same folder.
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


def profile_tokenizer(profile: Profile | str) -> tuple[Any, str]:
    """The CLIP tokenizer of a profile's base model, and the folder it came from.

    A diffusers folder has ``tokenizer/``; for a single-file checkpoint or a
    hub id (no download at run time) we use the tokenizer shipped beside the
    tiny model: it is the real CLIP BPE vocabulary, identical to SD 1.5's and
    to the first SDXL tokenizer's.
    """
    prof = load_profile(profile) if isinstance(profile, str) else profile
    base = prof.base_model_path
    candidates = []
    if base is not None and base.is_dir():
        candidates.append(base / "tokenizer")
    candidates.append(fallback_tokenizer_dir())
    for folder in candidates:
        if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
            return _tokenizer_from(str(folder)), str(folder)
    raise ModelMissing(
        f"no CLIP tokenizer found for profile {prof.name!r} (looked in {', '.join(map(str, candidates))}); "
        "run `python scripts/build_tiny_models.py` (offline, seconds) to create the fallback tokenizer"
    )


def check_device(profile: Profile, has_cuda: bool | None = None, torch_info: str = "") -> None:
    """A ``device = "cuda"`` profile needs a GPU: FailedPrecondition saying what to use instead.

    ``has_cuda`` is what the caller runs on (a server: whether its workers have a GPU);
    None asks torch. A 30-step 512 px gallery would take days on a CPU.
    """
    if has_cuda is None:
        has_cuda = cuda_available()
    if profile.device == "cuda" and not has_cuda:
        detail = f" ({torch_info})" if torch_info else ""
        raise FailedPrecondition(
            f"profile {profile.name!r} needs a CUDA GPU and none is available{detail}; run on a GPU machine, "
            "or use the 'cpu-tiny' profile (--profile cpu-tiny) to exercise the pipeline on the CPU"
        )


def check_build_request(spec: CharacterSpec, profile: Profile, *, has_cuda: bool | None = None) -> None:
    """Everything a build can be refused for before it runs: the profile's device, then the token.

    The spec itself is already valid (:func:`likeness.spec.spec_from_dict`); here
    the token must be new to the profile's tokenizer (InvalidInput, as
    ``likeness spec check`` says it) and the profile must run on this machine.
    """
    check_device(profile, has_cuda)
    tokenizer, _ = profile_tokenizer(profile)
    check_token_is_new(spec.token, tokenizer)
