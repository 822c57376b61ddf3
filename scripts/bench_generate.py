#!/usr/bin/env python
"""Images/s of Likeness's generation stage against a plain diffusers loop, in one run.

Both sides use the same model folder, sampler, steps, size, CFG and image
count (A1111's batch count x batch size):

* **plain**: ``StableDiffusionPipeline.from_pretrained(folder, dtype).to(device)``
  and ``pipe(prompt, negative_prompt, num_images_per_prompt=batch_size,
  generator=...)`` batch-count times, each image saved as a PNG, as a user
  script (or A1111's batch) does;
* **likeness**: :func:`likeness.generate.gallery.generate_gallery` into a fresh
  folder (prompt weighting, per-image generators, PNG + infotext, manifest,
  plan, contact sheet included) with its own loaded pipeline.

Pipeline loading is excluded on both sides; one short warm-up call each runs
first (cuDNN autotuning, lazy init); then ``--repeats`` timed runs per side,
interleaved, and the best of each counts (a shared machine's noise only ever
slows a run down). Prints both rates and the ratio.

    python scripts/bench_generate.py                       # CPU, cpu-tiny profile (~1-2 min)
    python scripts/bench_generate.py --device cuda --full-size [--compile]
        # full-size SD 1.5 architecture with random weights, built from its
        # configs here (speed does not depend on weight values; no downloads)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from likeness.backends.sd15_config import PARAMS as SD15_PARAMS  # noqa: E402
from likeness.backends.sd15_config import SCHEDULER as SD15_SCHEDULER  # noqa: E402
from likeness.backends.sd15_config import TEXT_ENCODER as SD15_TEXT  # noqa: E402
from likeness.backends.sd15_config import UNET as SD15_UNET  # noqa: E402
from likeness.backends.sd15_config import VAE as SD15_VAE  # noqa: E402
from likeness.backends.sd15_config import parameter_counts  # noqa: E402


def build_sd15_random(out: Path, device: str) -> Path:
    """Write a full-size SD 1.5 diffusers folder with random fp16 weights (tokenizer: the real CLIP BPE)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU takes a second, on the CPU a minute
        unet = UNet2DConditionModel(**SD15_UNET).half()
        vae = AutoencoderKL(**SD15_VAE).half()
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).half()
    tokenizer = CLIPTokenizer.from_pretrained(REPO / "models/tiny/sd15/tokenizer")
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def bench_spec(args):
    from likeness.spec import spec_from_dict

    return spec_from_dict({
        "name": "Bench", "token": "b3nch", "class_word": "woman",
        "traits": ["25 year old woman", "red curly hair", "freckles"], "wardrobe": "white t-shirt",
        "negative_prompt": "(worst quality, low quality:1.4), blurry, watermark",
        "zooms": ["closeup"], "angles": ["front shot"], "per_cell": args.batch_size * args.batch_count,
        "sampling": {"sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg,
                     "width": args.size, "height": args.size, "seed": 1000},
    })


def plain_runner(folder: Path, device: str, dtype, args, prompt: str, negative: str):
    """A user's diffusers script: from_pretrained, .to(device), the same scheduler; returns run(out) -> seconds."""
    import torch
    from diffusers import StableDiffusionPipeline

    from likeness.backends.diffusion import make_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True).to(device)
    pipe.scheduler = make_scheduler(args.sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=args.steps, guidance_scale=args.cfg, width=args.size, height=args.size)
    pipe(prompt, negative_prompt=negative, num_images_per_prompt=1, **{**common, "num_inference_steps": 2})  # warm-up

    def run(out: Path) -> float:
        out.mkdir(parents=True)
        _sync(device)
        t0 = time.perf_counter()
        for b in range(args.batch_count):
            gen = torch.Generator(device).manual_seed(1000 + b * args.batch_size)
            images = pipe(prompt, negative_prompt=negative, num_images_per_prompt=args.batch_size,
                          generator=gen, **common).images
            for i, img in enumerate(images):
                img.save(out / f"{b:03d}-{i:03d}.png")
        _sync(device)
        return time.perf_counter() - t0

    return run


def likeness_runner(profile, args):
    """Our stage with its own loaded pipeline; returns run(out) -> seconds (a fresh gallery each time)."""
    from likeness.backends.diffusion import load_pipeline
    from likeness.generate.gallery import generate_gallery, render_images
    from likeness.generate.plan import plan_gallery

    spec = bench_spec(args)
    pipe = load_pipeline(profile, compile_unet=args.compile, sampler=args.sampler)
    warm = spec.with_overrides(steps=2)
    render_images(pipe, plan_gallery(warm, 1)[:1], warm.sampling)  # warm-up

    def run(out: Path) -> float:
        _sync(args.device)
        t0 = time.perf_counter()
        generate_gallery(spec, out, profile, pipe=pipe, batch_size=args.batch_size)
        _sync(args.device)
        return time.perf_counter() - t0

    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--full-size", action="store_true", help="full-size SD 1.5 with random weights (use with --device cuda)")
    ap.add_argument("--profile", default="", help="benchmark this profile's model instead (default cpu-tiny on CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="A1111 batch size (default 4 CPU, 8 CUDA)")
    ap.add_argument("--batch-count", type=int, default=None, help="A1111 batch count (default 4)")
    ap.add_argument("--steps", type=int, default=None, help="default 8 on CPU, 30 on CUDA")
    ap.add_argument("--size", type=int, default=None, help="width = height (default 128 CPU, 512 CUDA)")
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--sampler", default="DPM++ 2M Karras")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side, interleaved; the best counts")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet on our side")
    ap.add_argument("--check-configs", action="store_true", help="only check the SD 1.5 configs' parameter counts")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = ap.parse_args(argv)
    if args.check_configs:
        counts = parameter_counts()
        print(json.dumps({"counts": counts, "expected": SD15_PARAMS, "ok": counts == SD15_PARAMS}))
        return 0 if counts == SD15_PARAMS else 1
    cuda = args.device == "cuda"
    args.batch_size = args.batch_size or (8 if cuda else 4)
    args.batch_count = args.batch_count or 4
    args.steps = args.steps or (30 if cuda else 8)
    args.size = args.size or (512 if cuda else 128)

    import torch

    from likeness.profiles import Profile, load_profile

    if cuda and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 6
    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    try:
        if args.full_size:
            folder = build_sd15_random(work / "sd15-random", "cuda" if cuda else "cpu")
            profile = Profile(name="bench-sd15-random", family="sd15", device=args.device,
                              dtype="float16" if cuda else "float32", base_model=str(folder))
        else:
            profile = load_profile(args.profile or ("sd15" if cuda else "cpu-tiny"))
            if cuda and profile.device != "cuda":
                profile = Profile(**{**profile.__dict__, "device": "cuda", "dtype": "float16"})
            folder = profile.require("base_model")
        dtype = torch.float16 if cuda else torch.float32
        spec = bench_spec(args)
        from likeness.generate.plan import plan_gallery

        ours = likeness_runner(profile, args)
        plain = plain_runner(folder, args.device, dtype, args, plan_gallery(spec, 1)[0].prompt, spec.negative_prompt)
        plain_times, our_times = [], []
        for r in range(args.repeats):  # interleaved, so load from other processes hits both sides alike
            plain_times.append(plain(work / f"plain-{r}"))
            our_times.append(ours(work / f"likeness-{r}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = args.batch_size * args.batch_count
    res = {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "model": "SD 1.5 architecture, random weights" if args.full_size else profile.name,
        "sampler": args.sampler, "steps": args.steps, "size": args.size, "cfg": args.cfg,
        "batch_size": args.batch_size, "batch_count": args.batch_count, "images": n, "compile": args.compile,
        "repeats": args.repeats,
        "plain_images_per_s": round(n / min(plain_times), 4), "likeness_images_per_s": round(n / min(our_times), 4),
        "ratio": round(min(plain_times) / min(our_times), 3),
        "plain_seconds": [round(t, 3) for t in plain_times], "likeness_seconds": [round(t, 3) for t in our_times],
    }
    if args.json:
        print(json.dumps(res))
    else:
        print(f"device: {res['device']}; model: {res['model']}; {args.sampler}, {args.steps} steps, "
              f"{args.size}x{args.size}, CFG {args.cfg:g}, {args.batch_count} x {args.batch_size} images")
        print(f"best of {args.repeats} interleaved runs per side")
        print(f"plain diffusers loop : {res['plain_images_per_s']:.4g} images/s")
        print(f"likeness generate    : {res['likeness_images_per_s']:.4g} images/s")
        print(f"ratio (likeness / plain): {res['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
