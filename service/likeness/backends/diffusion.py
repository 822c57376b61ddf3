"""Stable Diffusion pipelines from a model profile: load once, denoise batches.

Loading (:func:`load_pipeline`) accepts what people actually have:

* a diffusers folder (``model_index.json``) -> ``from_pretrained``, local files only;
* a single-file ``.safetensors``/``.ckpt`` checkpoint (A1111's models folder)
  -> ``from_single_file`` with a *local* diffusers config folder
  (``models/configs/<family>``, see :func:`single_file_config`): nothing is
  fetched, a missing config is a :class:`ModelMissing` that says how to get it;
* a hub id, only when ``HF_HUB_OFFLINE`` is not set.

Speed on CUDA (issue 7): fp16 weights, PyTorch SDPA attention, channels_last
UNet/VAE, the whole batch decoded by the VAE at once (slicing only when memory
is short), optional ``torch.compile`` of the UNet, batch size from free memory
(:func:`auto_batch_size`). The CPU runs float32.

Seeds and sampling (:func:`denoise`): every image has its own noise stream of A1111's source
(``[sampling] rng``: CPU, GPU or NV; :class:`likeness.noise.ImageNoise`), so an image is the same
alone or in a batch. The samplers A1111 runs through k-diffusion run through our own
re-implementation of that path (:mod:`likeness.backends.ksampling`: fractional timesteps,
A1111's schedules, per-step noise from each image's stream, a Brownian tree per image for the
SDE samplers); DDIM and UniPC run on diffusers' schedulers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from likeness.backends import choose
from likeness.errors import FailedPrecondition, InvalidInput, ModelMissing
from likeness.noise import ImageNoise
from likeness.profiles import Profile, models_dir
from likeness.spec import SamplerName, SamplingConfig

log = logging.getLogger(__name__)

# A1111 sampler name -> (diffusers scheduler class, extra config). The diffusers
# docs' own A1111 table; "Karras" means Karras sigmas, "a" ancestral.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"},
    ),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
}

# A1111's "second order" samplers call the model twice per step, and A1111 schedules prompt
# editing over twice the steps for them (its total_steps); diffusers' schedulers for them have
# order 2 and run 2*steps-1 model calls (measured: 19 timesteps for 10 steps, the others 10).
SECOND_ORDER = frozenset({"DPM++ SDE Karras", "DPM++ SDE", "Heun", "DPM2"})


def schedule_steps(sampling: SamplingConfig) -> int:
    """A1111's total steps for prompt editing: ``steps``, doubled for second-order samplers."""
    return sampling.steps * (2 if sampling.sampler in SECOND_ORDER else 1)


# Activation memory per image (GiB, fp16, CFG on, VAE decode included) at the
# family's native size; measured orders of magnitude, deliberately generous.
_GIB_PER_IMAGE = {"sd15": (1.2, 512 * 512), "sdxl": (3.0, 1024 * 1024)}
# More than this per batch no longer raises images/s on one GPU.
MAX_AUTO_BATCH = 16
CPU_BATCH = 4

_PIPELINE_CLASSES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
_HUB_CONFIG_REPOS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
_SINGLE_FILE_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".bin"}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


# ---------------------------------------------------------------- samplers


def make_scheduler(sampler: str, base_config: Any) -> Any:
    """A diffusers scheduler that samples like A1111's ``sampler``, from a pipeline's scheduler config."""
    import diffusers

    if sampler not in SAMPLERS:
        raise InvalidInput(f"sampler {sampler!r} is unknown; use one of {', '.join(repr(s) for s in SAMPLERS)}")
    cls_name, extra = SAMPLERS[sampler]
    if cls_name == "DPMSolverSDEScheduler":
        try:
            import torchsde  # noqa: F401
        except ImportError as exc:  # pragma: no cover - torchsde is a dependency
            raise FailedPrecondition(f"sampler {sampler!r} needs torchsde: pip install torchsde") from exc
    cls = getattr(diffusers, cls_name)
    config = dict(base_config)
    # PNDM's "skip_prk_steps"-style keys are ignored by from_config; keep the beta schedule.
    return cls.from_config(config, **extra)


def set_sampler(pipe: Any, sampler: str) -> None:
    """Swap ``pipe.scheduler`` for ``sampler`` (a no-op when it is already set)."""
    if getattr(pipe, "_likeness_sampler", None) == sampler:
        return
    base = getattr(pipe, "_likeness_base_scheduler_config", None) or pipe.scheduler.config
    pipe._likeness_base_scheduler_config = base
    pipe.scheduler = make_scheduler(sampler, base)
    pipe._likeness_sampler = sampler


# ---------------------------------------------------------------- device


def select_device(profile: Profile) -> tuple[torch.device, torch.dtype]:
    """The device and dtype a profile runs with.

    ``device = "cuda"`` refuses to run without a GPU (a 30-step 512 px gallery
    would take days on a CPU); ``"auto"`` takes the GPU when there is one. The
    CPU always computes in float32 (half precision is slow or unsupported there).
    """
    from likeness.preflight import check_device

    has_cuda = torch.cuda.is_available()
    check_device(profile, has_cuda, f"torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}")
    if profile.device == "cuda" or (profile.device == "auto" and has_cuda):
        return torch.device("cuda"), getattr(torch, profile.dtype)
    if profile.dtype != "float32":
        log.info("profile %s asks for %s; the CPU computes in float32", profile.name, profile.dtype)
    return torch.device("cpu"), torch.float32


# ---------------------------------------------------------------- model identity


def model_name(profile: Profile) -> str:
    """A1111's ``Model:`` value: the checkpoint's file stem (or folder / hub repo name)."""
    p = profile.base_model_path
    if p is None:
        return profile.base_model.rsplit("/", 1)[-1]
    return p.stem if p.suffix.lower() in _SINGLE_FILE_SUFFIXES else p.name


# Hashing a 4 GB checkpoint takes ~10 s; done only when cached or the file is small.
_HASH_FREE_BYTES = 256 * 2**20


def model_hash(profile: Profile) -> str:
    """A1111's short ``Model hash`` (first 10 hex digits of the file's sha256), or "".

    Read from a ``<checkpoint>.sha256`` sidecar when present (A1111 and
    several model managers write one); computed only for files under 256 MiB
    and then cached in that sidecar. Diffusers folders and hub ids have none.
    """
    p = profile.base_model_path
    if p is None or not p.is_file():
        return ""
    sidecar = p.with_name(p.name + ".sha256")
    try:
        if sidecar.is_file():
            digest = sidecar.read_text(encoding="utf-8").split()[0].strip().lower()
            return digest[:10]
        if p.stat().st_size > _HASH_FREE_BYTES:
            return ""
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
        try:
            from likeness.files import atomic_write_text

            atomic_write_text(sidecar, digest + "\n")
        except (OSError, InvalidInput):  # a read-only models volume: the cache is optional
            pass
        return digest[:10]
    except (OSError, IndexError):
        return ""


# ---------------------------------------------------------------- loading


def single_file_config(profile: Profile) -> Path:
    """The local diffusers config folder used to load a single-file checkpoint.

    ``$LIKENESS_SD_CONFIG`` or ``models/configs/<family>``: a diffusers model
    folder *without* weights (model_index.json, each component's config.json,
    the tokenizer files). Missing: :class:`ModelMissing` with the fix.
    """
    env = os.environ.get("LIKENESS_SD_CONFIG", "")
    folder = Path(env).expanduser().resolve() if env else models_dir() / "configs" / profile.family
    if (folder / "model_index.json").is_file():
        return folder
    repo = _HUB_CONFIG_REPOS[profile.family]
    offline = (
        f"Write it offline with `python -m likeness.backends.sd15_config {folder}`, or get it"
        if profile.family == "sd15" else "Get it"
    )
    raise ModelMissing(
        f"profile {profile.name!r}: loading the single-file checkpoint {profile.base_model} needs a local "
        f"diffusers config folder for {profile.family} (model_index.json, unet/vae/text_encoder config.json, "
        f"tokenizer files, scheduler config), and {folder} has none. {offline} once on a machine with internet: "
        f"`huggingface-cli download {repo} --exclude '*.safetensors' '*.bin' '*.ckpt' '*.onnx' '*.msgpack' "
        f"--local-dir {folder}` (a few MB, no weights), or set LIKENESS_SD_CONFIG to such a folder, or convert "
        "the checkpoint to a diffusers folder and point base_model at it. Nothing is downloaded automatically."
    )


def _pipeline_class(profile: Profile) -> Any:
    import diffusers

    return getattr(diffusers, _PIPELINE_CLASSES[profile.family])


def _check_family(profile: Profile, folder: Path) -> None:
    try:
        cls_name = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError) as exc:
        raise ModelMissing(f"profile {profile.name!r}: {folder}/model_index.json is unreadable ({exc})") from exc
    is_xl = "XL" in cls_name
    if is_xl != (profile.family == "sdxl"):
        family = "sdxl" if is_xl else "sd15"
        raise InvalidInput(
            f"profile {profile.name!r} says family {profile.family!r} but {folder} holds a {cls_name}; "
            f'set family = "{family}" in models/{profile.name}.toml'
        )


def _load_vae(profile: Profile, dtype: torch.dtype, config_folder: Path | None) -> Any:
    from diffusers import AutoencoderKL

    p = profile.resolve(profile.vae)
    if not p.exists():
        raise ModelMissing(
            f"profile {profile.name!r}: VAE {p} is missing; put a diffusers VAE folder or a .safetensors file "
            f"there, or remove vae from models/{profile.name}.toml. {profile.how_to_get}".rstrip()
        )
    if p.is_dir():
        return AutoencoderKL.from_pretrained(p, dtype=dtype, local_files_only=True)
    if config_folder is None:
        config_folder = single_file_config(profile)
    return AutoencoderKL.from_single_file(
        p, config=str(config_folder), subfolder="vae", dtype=dtype, local_files_only=True
    )


def _load_diffusers(profile: Profile, dtype: torch.dtype) -> Any:
    cls = _pipeline_class(profile)
    extra: dict[str, Any] = {}
    if profile.family == "sd15":
        # Curation judges the images; a blacked-out false positive would just be lost.
        extra = {"safety_checker": None, "requires_safety_checker": False, "feature_extractor": None}
    profile.require("base_model")  # no base_model, or a local path that is missing: say so first
    path = profile.base_model_path
    if path is None:  # a hub id
        if hub_offline():
            raise ModelMissing(
                f"profile {profile.name!r}: base_model {profile.base_model!r} is a hub id but HF_HUB_OFFLINE is set; "
                f"download it (`huggingface-cli download {profile.base_model} --local-dir models/{profile.base_model.rsplit('/', 1)[-1]}`) "
                "and point base_model at the folder, or unset HF_HUB_OFFLINE"
            )
        return cls.from_pretrained(profile.base_model, dtype=dtype, **extra)
    config_folder = None
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelMissing(
                f"profile {profile.name!r}: {path} is a folder without model_index.json, so not a diffusers model; "
                f"point base_model at a diffusers folder or a .safetensors checkpoint. {profile.how_to_get}".rstrip()
            )
        _check_family(profile, path)
        pipe = cls.from_pretrained(path, dtype=dtype, local_files_only=True, **extra)
    elif path.suffix.lower() in _SINGLE_FILE_SUFFIXES:
        config_folder = single_file_config(profile)
        _check_family(profile, config_folder)
        pipe = cls.from_single_file(
            str(path), config=str(config_folder), dtype=dtype, local_files_only=True, **extra
        )
    else:
        raise InvalidInput(
            f"profile {profile.name!r}: base_model {path} is neither a diffusers folder nor a "
            f"{'/'.join(sorted(_SINGLE_FILE_SUFFIXES))} checkpoint"
        )
    if profile.vae:
        pipe.vae = _load_vae(profile, dtype, config_folder)
    return pipe


def _tune(pipe: Any, device: torch.device, compile_unet: bool | str) -> Any:
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.to(device)
    for module in (pipe.unet, pipe.vae):
        # diffusers picks SDPA on torch 2 already; make sure nothing swapped it out.
        module.set_attn_processor(AttnProcessor2_0())
    if device.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    mode = compile_unet if isinstance(compile_unet, str) else ("default" if compile_unet else "off")
    if mode != "off":
        # The first batch pays the compile (tens of seconds); the shapes stay fixed after it.
        from likeness.backends.tuning import compile_pipeline

        compile_pipeline(pipe, mode)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _quiet_loading() -> None:
    # Loading bars from diffusers/transformers would interleave with the CLI's own bar on stderr.
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


DIFFUSION_BACKENDS: dict[str, Callable[[Profile, torch.dtype], Any]] = {"diffusers": _load_diffusers}


def load_pipeline(
    profile: Profile, *, backend: str = "diffusers", compile_unet: bool = False, sampler: SamplerName | None = None,
    device: str | torch.device | None = None,
) -> Any:
    """Load the profile's base model as a ready diffusers pipeline on its device.

    Returns the diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``
    (kept loaded by the service and by each Ray worker). ``backend`` picks a
    loader from :data:`DIFFUSION_BACKENDS`; ``device`` (``"cuda:1"``) the worker's
    device (:func:`likeness.backends.tuning.worker_device`); the profile's ``compile`` option (or
    ``compile_unet``) compiles the UNet and the VAE decoder with fixed shapes.
    Raises :class:`ModelMissing` for missing weights or configs,
    :class:`FailedPrecondition` for a CUDA profile without a GPU. Nothing is
    downloaded unless ``base_model`` is a hub id and ``HF_HUB_OFFLINE`` is unset.
    """
    from likeness.backends.tuning import compile_mode, device_scope, set_vae_upcast, worker_device

    loader = choose(DIFFUSION_BACKENDS, backend, "diffusion")
    device, dtype = worker_device(profile, device, select_device(profile) if device is None else None)
    _quiet_loading()
    with device_scope(device):
        pipe = loader(profile, dtype)
        set_vae_upcast(profile, pipe)
        pipe = _tune(pipe, device, compile_mode(profile, compile_unet))
    pipe._likeness_profile = profile.name
    if sampler:
        set_sampler(pipe, sampler)
    return pipe


def pipeline_device(pipe: Any) -> torch.device:
    return getattr(pipe, "_execution_device", None) or pipe.unet.device


# ---------------------------------------------------------------- batches


def auto_batch_size(pipe: Any, width: int, height: int, family: str = "sd15") -> int:
    """Images per denoising batch from free accelerator memory (CPU: a small fixed batch)."""
    device = pipeline_device(pipe)
    if device.type != "cuda":
        return CPU_BATCH
    free, _total = torch.cuda.mem_get_info(device)
    gib, ref_pixels = _GIB_PER_IMAGE.get(family, _GIB_PER_IMAGE["sd15"])
    per_image = gib * 2**30 * (width * height) / ref_pixels
    return max(1, min(MAX_AUTO_BATCH, int(free * 0.7 // per_image)))


def _fit_vae(pipe: Any, batch: int, width: int, height: int) -> None:
    """Decode the whole batch at once unless that would not fit; then slice."""
    device = pipeline_device(pipe)
    if device.type != "cuda":
        pipe.vae.disable_slicing()
        return
    free, _ = torch.cuda.mem_get_info(device)
    # The decoder's largest activations: ~4 tensors of 128 ch at full size, 2 bytes each.
    need = batch * 4 * 128 * width * height * 2
    if need > free * 0.5:
        pipe.vae.enable_slicing()
    else:
        pipe.vae.disable_slicing()


def draw_latents(seeds: Sequence[int], width: int, height: int, channels: int = 4, *, source: str = "CPU",
                 device: Any = "cpu") -> tuple[torch.Tensor, list[ImageNoise]]:
    """Initial noise per image from its own generator of A1111's noise ``source`` (float32, on
    ``device``), and the per-image noise streams (whose later draws are the samplers' per-step noise)."""
    streams = [ImageNoise(source, int(s), device) for s in seeds]
    shape = (channels, height // 8, width // 8)
    latents = torch.stack([st.randn(shape) for st in streams])
    return latents, streams


def _same_length(kwargs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prompt and negative embeddings zero-padded to one sequence length (diffusers requires it).

    The padding is never seen by the UNet: :func:`_separate_cond_uncond` cuts each half back.
    """
    pos, neg = kwargs["prompt_embeds"], kwargs["negative_prompt_embeds"]
    n = max(pos.shape[1], neg.shape[1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        return t if t.shape[1] == n else torch.cat([t, t.new_zeros(t.shape[0], n - t.shape[1], t.shape[2])], dim=1)

    return {**kwargs, "prompt_embeds": pad(pos), "negative_prompt_embeds": pad(neg)}


class _separate_cond_uncond:
    """While active, the UNet runs the unconditional and conditional halves of a CFG batch as two
    calls, each with its own sequence length, as A1111 does when prompt and negative prompt differ
    in chunk count and "Pad prompt/negative prompt" is off (its default)."""

    def __init__(self, pipe: Any, n: int, neg_len: int, pos_len: int) -> None:
        self.unet, self.n, self.neg_len, self.pos_len = pipe.unet, n, neg_len, pos_len

    def __enter__(self) -> None:
        unet, n, neg_len, pos_len = self.unet, self.n, self.neg_len, self.pos_len
        original = unet.forward

        def half(value: Any, sl: slice, batch: int) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
                return value[sl]
            if isinstance(value, dict):
                return {k: half(v, sl, batch) for k, v in value.items()}
            return value

        def forward(sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, *args: Any,
                    **kwargs: Any) -> Any:
            batch = sample.shape[0]
            if batch == n:  # no guidance: the prompt alone
                return original(sample, timestep, encoder_hidden_states[:, :pos_len], *args, **kwargs)
            outs = []
            for sl, length in ((slice(0, n), neg_len), (slice(n, batch), pos_len)):
                outs.append(original(half(sample, sl, batch), half(timestep, sl, batch),
                                     encoder_hidden_states[sl, :length], *args,
                                     **{k: half(v, sl, batch) for k, v in kwargs.items()}))
            if isinstance(outs[0], tuple):
                return (torch.cat([outs[0][0], outs[1][0]]),) + tuple(outs[0][1:])
            return type(outs[0])(sample=torch.cat([outs[0].sample, outs[1].sample]))

        # An instance-level forward (an offload hook) is kept and restored; otherwise the class's.
        self.saved = unet.__dict__.get("forward")
        unet.forward = forward

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            self.unet.forward = self.saved
        else:
            del self.unet.forward


def _conditioning_inputs(pipe: Any, kwargs: dict[str, torch.Tensor], sdxl: bool) -> dict[str, torch.Tensor]:
    """The tensors diffusers' denoising loop reads its text conditioning from, for one call's kwargs.

    The loop keeps ``prompt_embeds`` as ``cat([negative, prompt])`` under classifier-free guidance
    (and SDXL's pooled embeddings as ``add_text_embeds``); a step-end callback may replace them.
    """
    cfg = bool(getattr(pipe, "do_classifier_free_guidance", True))
    kwargs = _same_length(kwargs)
    pos, neg = kwargs["prompt_embeds"], kwargs["negative_prompt_embeds"]
    out = {"prompt_embeds": torch.cat([neg, pos]) if cfg else pos}
    if sdxl:
        ppos, pneg = kwargs["pooled_prompt_embeds"], kwargs["negative_pooled_prompt_embeds"]
        out["add_text_embeds"] = torch.cat([pneg, ppos]) if cfg else ppos
    return out


def _call_conditioning(embeds: Any, per_call: bool, sdxl: bool, width: int, height: int) -> Callable[[int], Any]:
    """Model call ``i``'s :class:`likeness.backends.ksampling.CallConditioning` from ``embeds`` (cached per
    distinct set of rows: a prompt schedule switches a few times at most)."""
    from likeness.backends.ksampling import CallConditioning

    first = dict(embeds)
    n = first["prompt_embeds"].shape[0]
    time_ids = None
    if sdxl:
        # SDXL's size conditioning: original size = target size = the image, no crop (A1111's and
        # diffusers' defaults), the same for the negative half.
        pos = first["prompt_embeds"]
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pos.dtype, device=pos.device).repeat(n, 1)
    cache: dict[Any, Any] = {}

    def at(call: int) -> Any:
        key = embeds.rows_at(call) if per_call else None
        if key not in cache:
            kw = embeds.at(call) if per_call else first
            added = uadded = None
            if sdxl:
                added = {"text_embeds": kw["pooled_prompt_embeds"], "time_ids": time_ids}
                uadded = {"text_embeds": kw["negative_pooled_prompt_embeds"], "time_ids": time_ids}
            cache.clear()  # one entry is enough: calls come in order
            cache[key] = CallConditioning(kw["prompt_embeds"], kw["negative_prompt_embeds"], added, uadded)
        return cache[key]

    return at


@torch.inference_mode()
def _decode(pipe: Any, latents: torch.Tensor, sdxl: bool) -> list[Any]:
    """Final latents to PIL images the way diffusers' own pipeline does after its loop (VAE scaling,
    SDXL's fp16 upcast and latent mean/std, safety checker and watermark when present, postprocess)."""
    vae = pipe.vae
    device = pipeline_device(pipe)
    if not sdxl:
        image = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
        image, nsfw = pipe.run_safety_checker(image, device, pipe.unet.dtype)
        denorm = [True] * image.shape[0] if nsfw is None else [not flag for flag in nsfw]
        return list(pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=denorm))
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(dtype=torch.float32)
    latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std_t = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std_t / vae.config.scaling_factor + mean_t
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    if upcast:
        vae.to(dtype=torch.float16)
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return list(pipe.image_processor.postprocess(image, output_type="pil"))


def k_schedule(pipe: Any) -> Any:
    """The pipeline model's :class:`likeness.backends.ksampling.EpsSchedule` (from its scheduler config; cached)."""
    from likeness.backends.ksampling import EpsSchedule, alphas_cumprod

    cached = getattr(pipe, "_likeness_k_schedule", None)
    if cached is None:
        base = getattr(pipe, "_likeness_base_scheduler_config", None) or pipe.scheduler.config
        cached = EpsSchedule(alphas_cumprod(base))
        pipe._likeness_k_schedule = cached
    return cached


def denoise_latents(
    pipe: Any, embeds: dict[str, torch.Tensor], seeds: Sequence[int], sampling: SamplingConfig, cancel: Any = None
) -> torch.Tensor:
    """The final latents (float32) of A1111's k-diffusion ``sampling.sampler`` for one batch.

    :mod:`likeness.backends.ksampling` does the sampling: fractional timesteps, A1111's schedule
    for the sampler, ``x = noise * sigmas[0]``, per-step noise from each image's stream (ancestral)
    or a Brownian tree per image seeded with its seed (SDE). ``cancel`` is checked after every step.
    """
    from likeness.backends import ksampling

    n = len(seeds)
    per_call = _check_embeds(embeds, n, sampling)
    if not ksampling.is_ksampler(sampling.sampler):
        raise InvalidInput(f"sampler {sampling.sampler!r} runs on diffusers' scheduler, not k-diffusion; "
                           f"use one of {', '.join(ksampling.KSAMPLERS)}")
    device = pipeline_device(pipe)
    noise, streams = draw_latents(seeds, sampling.width, sampling.height, pipe.unet.config.in_channels,
                                  source=sampling.rng, device=device)
    schedule = k_schedule(pipe)
    sigmas = ksampling.sampler_sigmas(sampling.sampler, sampling.steps, schedule)
    sdxl = "pooled_prompt_embeds" in embeds
    model = ksampling.GuidedDenoiser(pipe.unet, schedule,
                                     _call_conditioning(embeds, per_call, sdxl, sampling.width, sampling.height),
                                     sampling.cfg_scale)

    def step_end(_i: int) -> None:
        if cancel is not None:
            cancel.check()

    with torch.inference_mode():
        return ksampling.sample(sampling.sampler, model, noise, sigmas, streams=streams, seeds=[int(s) for s in seeds],
                                source=sampling.rng, step_end=step_end)


def _check_embeds(embeds: Any, n: int, sampling: SamplingConfig) -> bool:
    """Whether ``embeds`` is scheduled per call; refuses a batch or step-count mismatch."""
    if embeds["prompt_embeds"].shape[0] != n:
        raise InvalidInput(f"got {embeds['prompt_embeds'].shape[0]} prompt embeddings for {n} seeds")
    per_call = bool(getattr(embeds, "scheduled", False))
    if per_call and embeds.steps != schedule_steps(sampling):
        raise InvalidInput(
            f"the prompts were scheduled for {embeds.steps} steps but {sampling.sampler!r} at {sampling.steps} steps "
            f"runs {schedule_steps(sampling)}; encode them with steps=schedule_steps(sampling)"
        )
    return per_call


def denoise(
    pipe: Any, embeds: dict[str, torch.Tensor], seeds: Sequence[int], sampling: SamplingConfig, cancel: Any = None
) -> list[Any]:
    """Run one batch: ``embeds`` from :func:`likeness.prompts.encode_prompts`, one seed per image.

    The samplers A1111 runs through k-diffusion (all but DDIM and UniPC) run as A1111 runs them
    (:func:`denoise_latents`, :mod:`likeness.backends.ksampling`); DDIM and UniPC run on diffusers'
    schedulers. When ``embeds`` is scheduled (A1111 prompt editing / alternation, encoded with
    ``steps=schedule_steps(sampling)``), the conditioning switches at the model call A1111
    switches it.

    Returns PIL images in the order of ``seeds``. Each image's noise comes
    from its own generator (see the module docstring), so the result does not
    depend on the batch it ran in. ``cancel`` (a :class:`likeness.progress.CancelToken`)
    is checked after every denoising step, so a cancelled call or a passed
    deadline stops within one step instead of one batch.
    """
    from likeness.backends.ksampling import is_ksampler

    n = len(seeds)
    if is_ksampler(sampling.sampler):
        _fit_vae(pipe, n, sampling.width, sampling.height)
        latents = denoise_latents(pipe, embeds, seeds, sampling, cancel)
        return _decode(pipe, latents, "pooled_prompt_embeds" in embeds)
    return _denoise_diffusers(pipe, embeds, seeds, sampling, cancel)


def _denoise_diffusers(
    pipe: Any, embeds: dict[str, torch.Tensor], seeds: Sequence[int], sampling: SamplingConfig, cancel: Any = None
) -> list[Any]:
    """DDIM and UniPC (A1111 runs them outside k-diffusion): diffusers' pipeline and scheduler."""
    n = len(seeds)
    per_call = _check_embeds(embeds, n, sampling)
    set_sampler(pipe, sampling.sampler)
    device = pipeline_device(pipe)
    latents, streams = draw_latents(seeds, sampling.width, sampling.height, pipe.unet.config.in_channels,
                                    source=sampling.rng, device=device)
    # diffusers wants a generator per image; DDIM (eta 0) and UniPC draw no per-step noise, so for a
    # Philox re-creation (GPU off CUDA, NV), which has none, a seeded CPU generator stands in unused.
    gens = [st.torch_generator or torch.Generator("cpu").manual_seed(int(s)) for st, s in zip(streams, seeds)]
    latents = latents.to(device=device, dtype=pipe.unet.dtype)
    if device.type == "cuda":
        latents = latents.contiguous(memory_format=torch.channels_last)
    _fit_vae(pipe, n, sampling.width, sampling.height)
    step_kwargs: dict[str, Any] = {}
    sdxl = "pooled_prompt_embeds" in embeds
    if cancel is not None or per_call:
        def _on_step_end(_pipe: Any, step: int, _t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if cancel is not None:
                cancel.check()
            if per_call and embeds.rows_at(step + 1) != embeds.rows_at(step):
                # The loop index is A1111's model-call count (second-order schedulers step per call).
                callback_kwargs.update(_conditioning_inputs(_pipe, embeds.at(step + 1), sdxl))
            return callback_kwargs

        step_kwargs["callback_on_step_end"] = _on_step_end
        if per_call:
            step_kwargs["callback_on_step_end_tensor_inputs"] = (
                ["latents", "prompt_embeds", "add_text_embeds"] if sdxl else ["latents", "prompt_embeds"])
    first = dict(embeds)
    pos_len, neg_len = first["prompt_embeds"].shape[1], first["negative_prompt_embeds"].shape[1]
    separate = _separate_cond_uncond(pipe, n, neg_len, pos_len) if pos_len != neg_len else contextlib.nullcontext()
    with torch.inference_mode(), separate:
        out = pipe(
            **_same_length(first),
            **step_kwargs,
            num_inference_steps=sampling.steps,
            guidance_scale=sampling.cfg_scale,
            width=sampling.width,
            height=sampling.height,
            generator=gens if n > 1 else gens[0],
            latents=latents,
            output_type="pil",
        )
    return list(out.images)
