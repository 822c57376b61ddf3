#!/usr/bin/env python
"""Images/s of Likeness's generation stage against a plain diffusers loop: interleaved pairs.

Both sides use the same model folder, sampler, steps, size, CFG and image
count (A1111's batch count x batch size):

* **plain**: ``StableDiffusionPipeline.from_pretrained(folder, dtype).to(device)``,
  the sampler set the way the diffusers docs say, and ``pipe(prompt,
  negative_prompt, num_images_per_prompt=batch_size, generator=...)`` batch-count
  times, each image saved as a PNG -- a user's script (or A1111's batch) with
  nothing tuned;
* **likeness**: :func:`likeness.generate.gallery.generate_gallery` into a fresh
  folder (prompt weighting, per-image generators, PNG + infotext, manifest,
  plan, contact sheet included) with its own pipeline from ``load_pipeline``.

Each side runs in **its own process** (scripts/bench_common.py): our
process-wide tuning (cuDNN autotuning, TF32) never reaches the plain side.
Model loading and one short warm-up call are excluded on both sides; then
``--pairs`` interleaved runs (plain, likeness, plain, likeness, ...), and the
median and spread of the per-pair ratios and of each side's images/s are
reported, with the machine and its load.

    python scripts/bench_generate.py                       # CPU, cpu-tiny profile, 5 pairs
    python scripts/bench_generate.py --smoke               # seconds: checks the benchmark runs
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
sys.path.insert(0, str(REPO / "scripts"))

from bench_common import (  # noqa: E402
    SideProcess, add_pair_args, check_pairs, fmt_spread, interleave, machine, machine_line, pairs_summary, side_main,
)
from likeness.backends.sd15_config import PARAMS as SD15_PARAMS  # noqa: E402
from likeness.backends.sd15_config import SCHEDULER as SD15_SCHEDULER  # noqa: E402
from likeness.backends.sd15_config import TEXT_ENCODER as SD15_TEXT  # noqa: E402
from likeness.backends.sd15_config import UNET as SD15_UNET  # noqa: E402
from likeness.backends.sd15_config import VAE as SD15_VAE  # noqa: E402
from likeness.backends.sd15_config import parameter_counts  # noqa: E402

# SD 1.5 at 512x512, 30 steps, CFG: UNet ~803 GFLOP per call x 60 calls + VAE decode ~2.5 TFLOP
# (issue 14's figure), and the dense fp16 tensor-core peak of an H100/H200 SXM.
SD15_TFLOP_PER_IMAGE = 50.7
H100_DENSE_FP16_TFLOPS = 989.0


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


def _profile(args):
    from likeness.profiles import Profile, load_profile

    if args.full_size:
        return Profile(name="bench-sd15-random", family="sd15", device=args.device,
                       dtype="float16" if args.device == "cuda" else "float32", base_model=args.model_folder)
    profile = load_profile(args.profile or ("sd15" if args.device == "cuda" else "cpu-tiny"))
    if args.device == "cuda" and profile.device != "cuda":
        profile = Profile(**{**profile.__dict__, "device": "cuda", "dtype": "float16"})
    return profile


def plain_side(args):
    """A user's diffusers script: from_pretrained, .to(device), the sampler from the docs; run(i) -> seconds."""
    import torch
    from diffusers import StableDiffusionPipeline

    from likeness.backends.diffusion import make_scheduler
    from likeness.generate.plan import plan_gallery

    spec = bench_spec(args)
    prompt, negative = plan_gallery(spec, 1)[0].prompt, spec.negative_prompt
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    folder = Path(args.model_folder)
    kw = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False, local_files_only=True)
    if folder.is_file():  # an A1111 checkpoint: what a user would do with one
        from likeness.backends.diffusion import single_file_config

        pipe = StableDiffusionPipeline.from_single_file(str(folder), config=str(single_file_config(_profile(args))), **kw)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder, **kw)
    pipe = pipe.to(args.device)
    pipe.scheduler = make_scheduler(args.sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=args.steps, guidance_scale=args.cfg, width=args.size, height=args.size)
    pipe(prompt, negative_prompt=negative, num_images_per_prompt=1, **{**common, "num_inference_steps": 2})  # warm-up
    work = Path(args.work)

    def run(i: int) -> float:
        out = work / f"plain-{i}"
        out.mkdir(parents=True)
        _sync(args.device)
        t0 = time.perf_counter()
        for b in range(args.batch_count):
            gen = torch.Generator(args.device).manual_seed(1000 + b * args.batch_size)
            images = pipe(prompt, negative_prompt=negative, num_images_per_prompt=args.batch_size,
                          generator=gen, **common).images
            for j, img in enumerate(images):
                img.save(out / f"{b:03d}-{j:03d}.png")
        _sync(args.device)
        secs = time.perf_counter() - t0
        shutil.rmtree(out, ignore_errors=True)
        return secs

    return run, {"torch_threads": torch.get_num_threads()}


def likeness_side(args):
    """Our stage with its own loaded pipeline; run(i) -> seconds (a fresh gallery each time)."""
    import torch

    from likeness.backends.diffusion import load_pipeline
    from likeness.generate.gallery import generate_gallery

    spec = bench_spec(args)
    profile = _profile(args)
    pipe = load_pipeline(profile, compile_unet=args.compile, sampler=args.sampler)
    work = Path(args.work)
    # Warm-up: the whole stage once (1 image, 2 steps), so first-call costs (lazy imports, fonts,
    # tokenizer caches) are paid outside the timed runs, as the plain side's warm-up call does.
    warm = spec.with_overrides(steps=2, per_cell=1)
    generate_gallery(warm, work / "likeness-warmup", profile, pipe=pipe, batch_size=1)
    shutil.rmtree(work / "likeness-warmup", ignore_errors=True)

    def run(i: int) -> float:
        out = work / f"likeness-{i}"
        _sync(args.device)
        t0 = time.perf_counter()
        generate_gallery(spec, out, profile, pipe=pipe, batch_size=args.batch_size)
        _sync(args.device)
        secs = time.perf_counter() - t0
        shutil.rmtree(out, ignore_errors=True)
        return secs

    return run, {"torch_threads": torch.get_num_threads(), "profile": profile.name}


def _defaults(args) -> None:
    cuda = args.device == "cuda"
    if args.smoke:
        args.batch_size = args.batch_size or 2
        args.batch_count = args.batch_count or 1
        args.steps = args.steps or 2
        args.size = args.size or 64
        args.pairs = min(args.pairs, 2) if args.pairs_given else 1
    args.batch_size = args.batch_size or (4 if cuda else 4)  # 4: the workflow's X/Y/Z batch
    args.batch_count = args.batch_count or 4
    args.steps = args.steps or (30 if cuda else 8)
    args.size = args.size or (512 if cuda else 128)


def _side_argv(args, side: str) -> list[str]:
    argv = [str(Path(__file__).resolve()), "--side", side, "--device", args.device, "--model-folder", args.model_folder,
            "--work", args.work, "--batch-size", str(args.batch_size), "--batch-count", str(args.batch_count),
            "--steps", str(args.steps), "--size", str(args.size), "--cfg", str(args.cfg), "--sampler", args.sampler]
    if args.profile:
        argv += ["--profile", args.profile]
    if args.full_size:
        argv.append("--full-size")
    if args.compile:
        argv.append("--compile")
    return argv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--full-size", action="store_true", help="full-size SD 1.5 with random weights (use with --device cuda)")
    ap.add_argument("--profile", default="", help="benchmark this profile's model instead (default cpu-tiny on CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="A1111 batch size (default 4)")
    ap.add_argument("--batch-count", type=int, default=None, help="A1111 batch count (default 4)")
    ap.add_argument("--steps", type=int, default=None, help="default 8 on CPU, 30 on CUDA")
    ap.add_argument("--size", type=int, default=None, help="width = height (default 128 CPU, 512 CUDA)")
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--sampler", default="DPM++ 2M Karras")
    ap.add_argument("--compile", action="store_true", help="torch.compile on our side")
    ap.add_argument("--check-configs", action="store_true", help="only check the SD 1.5 configs' parameter counts")
    ap.add_argument("--json", action="store_true", help="print one JSON line at the end (for bench_all.py)")
    ap.add_argument("--model-folder", default="", help=argparse.SUPPRESS)
    ap.add_argument("--work", default="", help=argparse.SUPPRESS)
    add_pair_args(ap)
    raw = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(raw)
    args.pairs_given = any(a == "--pairs" or a.startswith("--pairs=") for a in raw)
    if args.check_configs:
        counts = parameter_counts()
        print(json.dumps({"counts": counts, "expected": SD15_PARAMS, "ok": counts == SD15_PARAMS}))
        return 0 if counts == SD15_PARAMS else 1
    if args.side:
        return side_main(lambda: (plain_side if args.side == "plain" else likeness_side)(args))
    _defaults(args)
    check_pairs(args.pairs)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 6
    info = machine(args.device)
    print(machine_line(info), file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    sides: list[SideProcess] = []
    try:
        args.work = str(work)
        if args.full_size:
            args.model_folder = str(build_sd15_random(work / "sd15-random", args.device))
            if args.device == "cuda":
                torch.cuda.empty_cache()
        else:
            args.model_folder = str(_profile(args).require("base_model"))
        sides = [SideProcess(name, _side_argv(args, name)) for name in ("plain", "likeness")]
        runs = interleave(sides, args.pairs, log=lambda s: print(s, file=sys.stderr))
    finally:
        for s in sides:
            s.close()
        shutil.rmtree(work, ignore_errors=True)
    n = args.batch_size * args.batch_count
    summary = pairs_summary([r["seconds"] for r in runs["likeness"]], [r["seconds"] for r in runs["plain"]], n)
    res = {
        "stage": "generate", "unit": "images/s", "ours_name": "likeness generate_gallery",
        "alternative_name": "plain diffusers loop",
        "model": "SD 1.5 architecture, random weights" if args.full_size else (args.profile or ("sd15" if args.device == "cuda" else "cpu-tiny")),
        "sampler": args.sampler, "steps": args.steps, "size": args.size, "cfg": args.cfg,
        "batch_size": args.batch_size, "batch_count": args.batch_count, "images": n, "compile": args.compile,
        "smoke": args.smoke, "machine": info, "setup": {s.name: s.ready for s in sides}, **summary,
    }
    res["settings"] = (f"{res['model']}, {args.sampler}, {args.steps} steps, {args.size}px, CFG {args.cfg:g}, "
                       f"{args.batch_count} x {args.batch_size} images")
    if args.device == "cuda" and args.size == 512 and args.steps == 30:
        limit = H100_DENSE_FP16_TFLOPS / SD15_TFLOP_PER_IMAGE  # images/s at 100% of the dense fp16 peak
        res["fraction_of_limit"] = summary["ours_rate"]["median"] / limit
        res["alternative_fraction_of_limit"] = summary["alternative_rate"]["median"] / limit
    print(f"{res['settings']}; {args.pairs} interleaved pairs, median [min-max]", file=sys.stderr)
    print(f"plain diffusers loop : {fmt_spread(summary['alternative_rate'])} images/s", file=sys.stderr)
    print(f"likeness generate    : {fmt_spread(summary['ours_rate'])} images/s", file=sys.stderr)
    print(f"ratio likeness/plain : {fmt_spread(summary['ratio'])} (IQR {summary['ratio']['q1']:.3g}-"
          f"{summary['ratio']['q3']:.3g})", file=sys.stderr)
    if "note" in summary:
        print(f"note: {summary['note']}", file=sys.stderr)
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
