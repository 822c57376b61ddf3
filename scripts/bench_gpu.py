#!/usr/bin/env python
"""Every CUDA figure of issue 14 from one process and one device call: random weights, time-boxed phases.

Nothing can be downloaded on a lent device, so every model is the real
architecture built from its config with random weights (speed does not depend
on weight values): SD 1.5's UNet, VAE and text encoder from
``likeness.backends.sd15_config``; CLIP ViT-L/14 from a transformers
``CLIPVisionConfig``; buffalo_l-sized face recognition as an IResNet-50
written here in torch (insightface's w600k_r50 architecture: 112x112 in,
512-d out). Phases, in order of value (``--phases`` picks a subset):

    machine      CPU, torch, CUDA, device name and memory, load average
    matmul       dense fp16 / bf16 matmul ceilings (TFLOP/s), the yardstick for the rest
    e2e          30 steps DPM++ 2M Karras, CFG 7, 512x512, 16 images per run:
                 stock diffusers StableDiffusionPipeline as a user calls it (from_pretrained,
                 fp16, .to("cuda"), the docs' scheduler swap, batch 4, PNGs saved; torch's
                 default flags) vs our generation path (likeness load_pipeline +
                 generate_gallery: batch from free memory, and batch 4), interleaved pairs;
                 images/s and the fraction of the physical limit (50.7 TFLOP per image:
                 UNet 803 GFLOP per call x 60 + VAE decode 2.5 TFLOP; 989 TFLOP/s dense fp16 on
                 H100/H200, and the measured matmul ceiling)
    unet         UNet forward, several batch sizes, NCHW vs channels_last (ms, TFLOP/s; FLOPs
                 counted by torch.utils.flop_counter on one call)
    vae          VAE decode, several batch sizes, NCHW vs channels_last
    train        textual-inversion steps/s at 512: likeness' Trainer vs the diffusers-example
                 loop (scripts/bench_train.py's two loops), interleaved pairs
    recognition  IResNet-50 images/s (fp16, NCHW vs channels_last)
    clip         CLIP ViT-L/14 vision tower images/s (fp16, SDPA)
    compile      torch.compile as a profile's `compile` option does it (likeness.backends.tuning:
                 dynamic=False, fixed batch) of the UNet and the VAE decoder: compile seconds
                 and steady speed against eager

Every phase runs under its own time box (SIGALRM; the boxes are cut to fit
``--budget``), and its result -- also a partial one -- is written into the
``--out`` JSON file as it finishes (atomically), so a run stopped by its time
limit keeps everything that finished. The stock side always runs with torch's
default global flags (cuDNN autotuning off, TF32 matmuls off): they are reset
before each of its runs and ours are put back before each of ours.

    python scripts/bench_gpu.py --out gpu.json --budget 540     # a lent GPU (see README, "GPU run")
    python scripts/bench_gpu.py --smoke --out /tmp/gpu.json      # CPU, tiny sizes, < 60 s on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
# The package from the checkout (a lent device has no install of it), and the sibling scripts.
sys.path.insert(0, str(REPO / "service"))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402

from bench_common import load_average, machine, machine_line, pairs_summary, spread  # noqa: E402

SD15_TFLOP_PER_IMAGE = 50.7
# Issue 14's per-component figures for SD 1.5 at 512x512 (64x64 latents).
UNET_GFLOP_PER_CALL = 803.0
VAE_DECODE_TFLOP = 2.5
PEAK_DENSE_FP16_TFLOPS = 989.0  # H100/H200 SXM, dense (no sparsity)
TINY_SD15 = REPO / "models" / "tiny" / "sd15"
PHASES = ("machine", "matmul", "e2e", "unet", "vae", "train", "recognition", "clip", "compile")
# Seconds per phase on a lent H200 (sum 535, under one 600 s call with start-up): building
# and saving the random SD 1.5 and three pipelines dominate e2e; compile of the UNet with
# inductor took tens of seconds on Hopper in public reports, so it goes last with the rest.
BOXES = {"machine": 5, "matmul": 25, "e2e": 170, "unet": 60, "vae": 40, "train": 80, "recognition": 25,
         "clip": 25, "compile": 105}


class PhaseTimeout(Exception):
    """A phase ran past its time box."""


# ---------------------------------------------------------------- global flags


FLAG_NAMES = ("cudnn.benchmark", "cudnn.allow_tf32", "cuda.matmul.allow_tf32",
              "cuda.matmul.allow_fp16_reduced_precision_reduction")


def get_flags() -> dict[str, bool]:
    b = torch.backends
    return {"cudnn.benchmark": b.cudnn.benchmark, "cudnn.allow_tf32": b.cudnn.allow_tf32,
            "cuda.matmul.allow_tf32": b.cuda.matmul.allow_tf32,
            "cuda.matmul.allow_fp16_reduced_precision_reduction": b.cuda.matmul.allow_fp16_reduced_precision_reduction}


def set_flags(flags: dict[str, bool]) -> None:
    b = torch.backends
    b.cudnn.benchmark = flags["cudnn.benchmark"]
    b.cudnn.allow_tf32 = flags["cudnn.allow_tf32"]
    b.cuda.matmul.allow_tf32 = flags["cuda.matmul.allow_tf32"]
    b.cuda.matmul.allow_fp16_reduced_precision_reduction = flags["cuda.matmul.allow_fp16_reduced_precision_reduction"]


# Torch's defaults, read before anything of ours can change them: the stock side runs with these.
STOCK_FLAGS = get_flags()
# What likeness' load_pipeline sets on CUDA (likeness.backends.diffusion._tune); replaced by the
# state actually found after our pipeline loads (see phase_e2e), so a change there is followed.
OURS_FLAGS = {**STOCK_FLAGS, "cudnn.benchmark": True, "cudnn.allow_tf32": True, "cuda.matmul.allow_tf32": True}


# ---------------------------------------------------------------- plumbing


class Run:
    """The JSON document, rewritten atomically after every phase (and every partial result)."""

    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.out, self.args = out, args
        self.t0 = time.monotonic()
        self.doc: dict[str, Any] = {
            "schema": "likeness-bench-gpu/1", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "smoke": args.smoke,
            "device": args.device, "budget_s": args.budget, "phases": [],
        }
        self.save()

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.t0)

    def save(self) -> None:
        self.doc["elapsed_s"] = round(time.monotonic() - self.t0, 2)
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.out)


class Result(dict):
    """A phase's result; every assignment is saved at once (a kill keeps what was measured)."""

    def __init__(self, run: Run, entry: dict[str, Any]) -> None:
        super().__init__()
        self._run, self._entry = run, entry

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._entry["result"] = dict(self)
        self._run.save()


def _alarm(_signum: int, _frame: Any) -> None:
    raise PhaseTimeout()


def run_phase(run: Run, name: str, fn: Callable[[Result, float], None], box: float) -> dict[str, Any]:
    """Run one phase under its time box; its entry (status ok/timeout/error/skipped) is in the JSON."""
    left = run.left()
    entry: dict[str, Any] = {"phase": name, "box_s": round(min(box, left), 1), "status": "running"}
    run.doc["phases"].append(entry)
    if left < min(box, 8.0):
        entry.update(status="skipped", reason=f"{left:.0f} s of the --budget left")
        run.save()
        print(f"[{name}] skipped: {entry['reason']}", file=sys.stderr, flush=True)
        return entry
    box = min(box, left)
    res = Result(run, entry)
    t0 = time.monotonic()
    print(f"[{name}] start, box {box:.0f} s, load {load_average()[:1]}", file=sys.stderr, flush=True)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, box)
    try:
        fn(res, t0 + box)
        entry["status"] = "ok"
    except PhaseTimeout:
        entry["status"] = "timeout"
    except Exception as exc:  # noqa: BLE001 - one phase failing must not cost the others
        entry.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    entry["seconds"] = round(time.monotonic() - t0, 2)
    entry["result"] = dict(res)
    _free()
    run.save()
    print(f"[{name}] {entry['status']} in {entry['seconds']} s" + (f": {entry.get('error')}" if "error" in entry else ""),
          file=sys.stderr, flush=True)
    return entry


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str, *, warmup: int, iters: int, deadline: float) -> dict[str, Any]:
    """Milliseconds per call (median and spread of ``iters`` timed calls after ``warmup``), stopping at ``deadline``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if times and time.monotonic() > deadline - 1.0:
            break
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in spread(times).items()}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call as torch's flop counter sees them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


# ---------------------------------------------------------------- models


def sd15_configs(smoke: bool) -> tuple[dict, dict, dict]:
    """(UNet, VAE, text encoder) configs: SD 1.5's, or the tiny model's in smoke mode."""
    from likeness.backends.sd15_config import TEXT_ENCODER, UNET, VAE

    if not smoke:
        return dict(UNET), dict(VAE), dict(TEXT_ENCODER)
    unet = json.loads((TINY_SD15 / "unet" / "config.json").read_text(encoding="utf-8"))
    vae = json.loads((TINY_SD15 / "vae" / "config.json").read_text(encoding="utf-8"))
    text = json.loads((TINY_SD15 / "text_encoder" / "config.json").read_text(encoding="utf-8"))
    return unet, vae, text


def build_unet(args, dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    cfg = sd15_configs(args.smoke)[0]
    with torch.device(args.device):
        return UNet2DConditionModel.from_config(cfg).to(dtype).eval()


def build_vae(args, dtype):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    with torch.device(args.device):
        return AutoencoderKL.from_config(sd15_configs(args.smoke)[1]).to(dtype).eval()


def build_pipeline(args, dtype):
    """A StableDiffusionPipeline of random weights on the device (the tokenizer: the real CLIP BPE)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from likeness.backends.sd15_config import SCHEDULER

    _, _, text_cfg = sd15_configs(args.smoke)
    text_cfg = {k: v for k, v in text_cfg.items() if not k.startswith("_") and k not in ("architectures", "transformers_version")}
    torch.manual_seed(0)
    with torch.device(args.device):
        text = CLIPTextModel(CLIPTextConfig(**text_cfg)).to(dtype)
    return StableDiffusionPipeline(
        unet=build_unet(args, dtype), vae=build_vae(args, dtype), text_encoder=text,
        tokenizer=CLIPTokenizer.from_pretrained(TINY_SD15 / "tokenizer"), scheduler=PNDMScheduler(**SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


class IBasicBlock(torch.nn.Module):
    """insightface's improved residual block: BN-conv-BN-PReLU-conv(stride)-BN, plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin, eps=2e-5), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout, eps=2e-5),
            nn.PReLU(cout), nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout, eps=2e-5),
        )
        self.short = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=2e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + (x if self.short is None else self.short(x))


class IResNet(torch.nn.Module):
    """IResNet (ArcFace): 112x112 face crop -> 512-d embedding; layers (3, 4, 14, 3) is IResNet-50 (buffalo_l's w600k_r50)."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 14, 3), width: int = 64, dim: int = 512) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width, eps=2e-5), nn.PReLU(width))
        blocks, cin = [], width
        for i, n in enumerate(layers):
            cout = width * 2**i
            blocks += [IBasicBlock(cin, cout, 2)] + [IBasicBlock(cout, cout) for _ in range(n - 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.BatchNorm2d(cin, eps=2e-5), nn.Flatten(), nn.Linear(cin * 7 * 7, dim),
                                  nn.BatchNorm1d(dim, eps=2e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


# ---------------------------------------------------------------- phases


def phase_machine(res: Result, deadline: float, args) -> None:
    info = machine(args.device)
    for k, v in info.items():
        res[k] = v
    res["stock_flags"] = STOCK_FLAGS
    for mod in ("diffusers", "transformers"):
        try:
            res[f"{mod}_version"] = __import__(mod).__version__
        except ImportError:
            res[f"{mod}_version"] = None
    print(machine_line(info), file=sys.stderr)


def phase_matmul(res: Result, deadline: float, args) -> None:
    n = 256 if args.smoke else 8192
    set_flags(STOCK_FLAGS)
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        ab = [torch.randn(n, n, device=args.device, dtype=dtype) for _ in range(2)]
        t = time_call(lambda: ab[0] @ ab[1], args.device, warmup=3, iters=2 if args.smoke else 20, deadline=deadline)
        res[name] = {"n": n, "ms": t, "tflops_median": round(2 * n**3 / (t["median"] / 1000) / 1e12, 2),
                     "tflops_best": round(2 * n**3 / (t["min"] / 1000) / 1e12, 2)}
        ab.clear()


def _ceiling(run: Run) -> float | None:
    for e in run.doc["phases"]:
        if e["phase"] == "matmul" and "float16" in e.get("result", {}):
            return float(e["result"]["float16"]["tflops_median"])
    return None


def phase_e2e(res: Result, deadline: float, args, run: Run) -> None:
    global OURS_FLAGS
    import bench_generate
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from likeness.backends.diffusion import load_pipeline
    from likeness.generate.gallery import generate_gallery
    from likeness.generate.plan import plan_gallery
    from likeness.profiles import Profile

    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    steps, size, per_call = (2, 64, 2) if args.smoke else (30, 512, 4)
    images = args.e2e_images or (2 if args.smoke else 16)
    if images % per_call:
        raise ValueError(f"--e2e-images {images} must be a multiple of the stock batch {per_call}")
    work = Path(args.work)
    if args.smoke:
        folder = TINY_SD15
    else:
        t0 = time.monotonic()
        folder = bench_generate.build_sd15_random(work / "sd15-random", args.device)
        res["build_and_save_seconds"] = round(time.monotonic() - t0, 1)
        _free()
    ns = argparse.Namespace(batch_size=per_call, batch_count=images // per_call, sampler="DPM++ 2M Karras",
                            steps=steps, cfg=7.0, size=size)
    spec = bench_generate.bench_spec(ns)
    prompt, negative = plan_gallery(spec, 1)[0].prompt, spec.negative_prompt
    res["settings"] = {"steps": steps, "size": size, "cfg": 7.0, "sampler": ns.sampler, "images_per_run": images,
                       "stock_batch": per_call, "model": "SD 1.5 architecture, random fp16 weights" if not args.smoke
                       else "tiny SD 1.5 (smoke)"}

    # Stock: what the diffusers docs tell a user to write; torch's default flags.
    set_flags(STOCK_FLAGS)
    t0 = time.monotonic()
    stock = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True).to(args.device)
    stock.scheduler = DPMSolverMultistepScheduler.from_config(stock.scheduler.config, use_karras_sigmas=True)
    stock.set_progress_bar_config(disable=True)
    res["stock_load_seconds"] = round(time.monotonic() - t0, 2)

    def stock_run(i: int) -> float:
        out = work / f"stock-{i}"
        out.mkdir(parents=True, exist_ok=True)
        set_flags(STOCK_FLAGS)
        sync(args.device)
        t0 = time.perf_counter()
        for b in range(images // per_call):
            gen = torch.Generator(args.device).manual_seed(1000 + b)
            imgs = stock(prompt, negative_prompt=negative, num_images_per_prompt=per_call, num_inference_steps=steps,
                         guidance_scale=7.0, width=size, height=size, generator=gen).images
            for j, img in enumerate(imgs):
                img.save(out / f"{b:03d}-{j}.png")
        sync(args.device)
        secs = time.perf_counter() - t0
        shutil.rmtree(out, ignore_errors=True)
        return secs

    # Ours: the generation stage as a build runs it.
    profile = Profile(name="bench-sd15-random", family="sd15", device="cuda" if cuda else "cpu",
                      dtype="float16" if cuda else "float32", base_model=str(folder))
    t0 = time.monotonic()
    pipe = load_pipeline(profile, sampler=ns.sampler)
    OURS_FLAGS = get_flags()
    res["ours_flags"] = OURS_FLAGS
    res["ours_load_seconds"] = round(time.monotonic() - t0, 2)

    def ours_run(batch: int) -> Callable[[int], float]:
        def go(i: int) -> float:
            out = work / f"ours-{batch}-{i}"
            set_flags(OURS_FLAGS)
            sync(args.device)
            t0 = time.perf_counter()
            r = generate_gallery(spec, out, profile, pipe=pipe, batch_size=batch)
            sync(args.device)
            secs = time.perf_counter() - t0
            res[f"ours_batch_{batch or 'auto'}_used"] = r.batch_size
            shutil.rmtree(out, ignore_errors=True)
            return secs
        return go

    sides = {"stock": stock_run, "ours": ours_run(0), "ours_batch4": ours_run(per_call)}
    for name, fn in sides.items():  # warm-up: one whole run each (lazy init, autotuning)
        t0 = time.monotonic()
        fn(-1)
        res[f"{name}_warmup_seconds"] = round(time.monotonic() - t0, 2)
    times: dict[str, list[float]] = {k: [] for k in sides}
    for i in range(args.pairs):
        if i and time.monotonic() + 1.2 * sum(t[-1] for t in times.values()) > deadline:
            res["stopped"] = f"after {i} rounds: the next would pass the time box"
            break
        for name, fn in sides.items():
            times[name].append(fn(i))
        res["seconds"] = {k: [round(x, 3) for x in v] for k, v in times.items()}
    ceiling = _ceiling(run)
    for name in ("ours", "ours_batch4"):
        s = pairs_summary(times[name], times["stock"], images)
        res[f"{name}_vs_stock"] = s
    if args.smoke:  # the physical limit is for 512 px, 30 steps: meaningless at smoke sizes
        return
    limit = PEAK_DENSE_FP16_TFLOPS / SD15_TFLOP_PER_IMAGE
    fr = {}
    for name in sides:
        ips = statistics.median(images / t for t in times[name])
        fr[name] = {"images_per_s": round(ips, 3), "of_989_tflops": round(ips / limit, 4)}
        if ceiling:
            fr[name]["of_measured_fp16_ceiling"] = round(ips * SD15_TFLOP_PER_IMAGE / ceiling, 4)
    res["fraction_of_limit"] = fr


def phase_unet(res: Result, deadline: float, args) -> None:
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    unet = build_unet(args, dtype)
    c = unet.config
    side = 8 if args.smoke else 64
    cross = c.cross_attention_dim
    batches = [2] if args.smoke else [2, 8, 16, 32]  # UNet batch = 2 x images (CFG)
    set_flags(OURS_FLAGS)

    def inputs(b: int, cl: bool):
        x = torch.randn(b, c.in_channels, side, side, device=args.device, dtype=dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.full((b,), 500, device=args.device), torch.randn(b, 77, cross, device=args.device, dtype=dtype)

    with torch.inference_mode():
        x, t, e = inputs(1, False)
        flops = count_flops(lambda: unet(x, t, e))
        res["gflop_per_sample_counted"] = round(flops / 1e9, 2)
        res["gflop_per_sample_issue"] = UNET_GFLOP_PER_CALL
        for cl in (False, True):
            unet.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            fmt = "channels_last" if cl else "nchw"
            for b in batches:
                x, t, e = inputs(b, cl)
                ms = time_call(lambda: unet(x, t, e), args.device, warmup=2, iters=2 if args.smoke else 10,
                               deadline=deadline)
                res[f"{fmt}_b{b}"] = {"ms": ms, "tflops": round(flops * b / (ms["median"] / 1000) / 1e12, 2),
                                      "ms_per_sample": round(ms["median"] / b, 3)}


def phase_vae(res: Result, deadline: float, args) -> None:
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    vae = build_vae(args, dtype)
    side = 8 if args.smoke else 64
    batches = [1] if args.smoke else [1, 4, 8, 16]
    set_flags(OURS_FLAGS)
    with torch.inference_mode():
        z1 = torch.randn(1, vae.config.latent_channels, side, side, device=args.device, dtype=dtype)
        flops = count_flops(lambda: vae.decode(z1))
        res["tflop_per_image_counted"] = round(flops / 1e12, 3)
        res["tflop_per_image_issue"] = VAE_DECODE_TFLOP
        for cl in (False, True):
            vae.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            fmt = "channels_last" if cl else "nchw"
            for b in batches:
                z = torch.randn(b, vae.config.latent_channels, side, side, device=args.device, dtype=dtype)
                if cl:
                    z = z.contiguous(memory_format=torch.channels_last)
                ms = time_call(lambda: vae.decode(z), args.device, warmup=1, iters=2 if args.smoke else 6,
                               deadline=deadline)
                res[f"{fmt}_b{b}"] = {"ms": ms, "images_per_s": round(b / (ms["median"] / 1000), 2),
                                      "tflops": round(flops * b / (ms["median"] / 1000) / 1e12, 2)}


def phase_train(res: Result, deadline: float, args) -> None:
    import bench_train

    from likeness.spec import spec_from_dict
    from likeness.train.checkpoint_scoring import ValidationConfig
    from likeness.train.data import read_dataset
    from likeness.train.trainer import TrainConfig

    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    resolution, steps, warmup = (64, 2, 1) if args.smoke else (512, 10, 3)
    spec = spec_from_dict({"name": "Bench", "token": "3m1ly", "class_word": "woman"})
    cfg = TrainConfig(steps=warmup + steps * args.pairs + 1, batch_size=args.train_batch, resolution=resolution,
                      n_vectors=8, validation=ValidationConfig(enabled=False))
    data = Path(args.work) / "train-data"
    data.mkdir(parents=True, exist_ok=True)
    items = read_dataset(bench_train.make_dataset(data, 2 if args.smoke else 8, resolution))
    res["settings"] = {"resolution": resolution, "batch_size": args.train_batch, "steps_per_run": steps,
                       "model": "tiny SD 1.5 (smoke)" if args.smoke else "SD 1.5 architecture, random fp16 weights"}
    dev = torch.device(args.device)
    loops = {}
    set_flags(STOCK_FLAGS)
    loops["reference"] = (bench_train.setup_reference(build_pipeline(args, dtype), items, cfg, spec), STOCK_FLAGS)
    set_flags(OURS_FLAGS)
    loops["ours"] = (bench_train.setup_ours(build_pipeline(args, dtype), items, cfg, spec), OURS_FLAGS)
    for name, (step, flags) in loops.items():
        set_flags(flags)
        bench_train.timed(step, dev, warmup)
    times: dict[str, list[float]] = {k: [] for k in loops}
    for i in range(args.pairs):
        if i and time.monotonic() + 1.2 * sum(t[-1] for t in times.values()) > deadline:
            res["stopped"] = f"after {i} pairs: the next would pass the time box"
            break
        for name, (step, flags) in loops.items():
            set_flags(flags)
            times[name].append(bench_train.timed(step, dev, steps))
        res["seconds"] = {k: [round(x, 4) for x in v] for k, v in times.items()}
    res["ours_vs_reference"] = pairs_summary(times["ours"], times["reference"], steps)


def phase_recognition(res: Result, deadline: float, args) -> None:
    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device(args.device):
        model = (IResNet((1, 1, 1, 1), width=16) if args.smoke else IResNet()).to(dtype).eval()
    res["parameters"] = sum(p.numel() for p in model.parameters())
    res["architecture"] = "IResNet (1,1,1,1) (smoke)" if args.smoke else "IResNet-50 (3,4,14,3), 112x112 -> 512"
    set_flags(OURS_FLAGS)
    with torch.inference_mode():
        x1 = torch.randn(1, 3, 112, 112, device=args.device, dtype=dtype)
        res["gflop_per_image_counted"] = round(count_flops(lambda: model(x1)) / 1e9, 3)
        for cl in (False, True):
            model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            fmt = "channels_last" if cl else "nchw"
            for b in ([2] if args.smoke else [32, 128, 512]):
                x = torch.randn(b, 3, 112, 112, device=args.device, dtype=dtype)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                ms = time_call(lambda: model(x), args.device, warmup=2, iters=2 if args.smoke else 10, deadline=deadline)
                res[f"{fmt}_b{b}"] = {"ms": ms, "images_per_s": round(b / (ms["median"] / 1000), 1)}


def phase_clip(res: Result, deadline: float, args) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    if args.smoke:
        cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8)
    else:  # ViT-L/14 at 224 (what the sd15 profile's OpenCLIP ViT-L-14 is)
        cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(args.device):
        model = CLIPVisionModel(cfg).to(dtype).eval()
    res["parameters"] = sum(p.numel() for p in model.parameters())
    res["architecture"] = "tiny CLIP vision (smoke)" if args.smoke else "CLIP ViT-L/14 vision tower, 224 px"
    set_flags(OURS_FLAGS)
    with torch.inference_mode():
        for b in ([2] if args.smoke else [32, 128, 256]):
            x = torch.randn(b, 3, cfg.image_size, cfg.image_size, device=args.device, dtype=dtype)
            ms = time_call(lambda: model(pixel_values=x), args.device, warmup=2, iters=2 if args.smoke else 10,
                           deadline=deadline)
            res[f"b{b}"] = {"ms": ms, "images_per_s": round(b / (ms["median"] / 1000), 1)}


def phase_compile(res: Result, deadline: float, args) -> None:
    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    set_flags(OURS_FLAGS)
    unet, vae = build_unet(args, dtype), build_vae(args, dtype)
    if cuda:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    c = unet.config
    side = 8 if args.smoke else 64
    b = 2 if args.smoke else 8  # 4 images with CFG
    x = torch.randn(b, c.in_channels, side, side, device=args.device, dtype=dtype)
    t = torch.full((b,), 500, device=args.device)
    e = torch.randn(b, 77, c.cross_attention_dim, device=args.device, dtype=dtype)
    z = torch.randn(b // 2, vae.config.latent_channels, side, side, device=args.device, dtype=dtype)
    if cuda:
        x, z = x.contiguous(memory_format=torch.channels_last), z.contiguous(memory_format=torch.channels_last)
    res["settings"] = {"mode": args.compile_mode, "backend": args.compile_backend, "dynamic": False,
                       "unet_batch": b, "vae_batch": b // 2}
    iters = 2 if args.smoke else 10
    with torch.inference_mode():
        res["unet_eager_ms"] = time_call(lambda: unet(x, t, e), args.device, warmup=2, iters=iters, deadline=deadline)
        res["vae_eager_ms"] = time_call(lambda: vae.decode(z), args.device, warmup=1, iters=iters, deadline=deadline)
    # Our path (likeness.backends.tuning, what a profile's `compile` option does): dynamic=False
    # behind FixedBatch, the UNet and the VAE's decoder module.
    from likeness.backends.tuning import compile_module

    cunet = compile_module(unet, args.compile_mode, backend=args.compile_backend)
    vae.decoder = compile_module(vae.decoder, args.compile_mode, backend=args.compile_backend)
    cdecode = vae.decode
    with torch.inference_mode():
        t0 = time.monotonic()
        cunet(x, t, e)
        sync(args.device)
        res["unet_compile_seconds"] = round(time.monotonic() - t0, 2)
        res["unet_compiled_ms"] = time_call(lambda: cunet(x, t, e), args.device, warmup=2, iters=iters, deadline=deadline)
        res["unet_speedup"] = round(res["unet_eager_ms"]["median"] / res["unet_compiled_ms"]["median"], 3)
        t0 = time.monotonic()
        cdecode(z)
        sync(args.device)
        res["vae_compile_seconds"] = round(time.monotonic() - t0, 2)
        res["vae_compiled_ms"] = time_call(lambda: cdecode(z), args.device, warmup=1, iters=iters, deadline=deadline)
        res["vae_speedup"] = round(res["vae_eager_ms"]["median"] / res["vae_compiled_ms"]["median"], 3)


# ---------------------------------------------------------------- main


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """The headline figures, one line each, from whatever finished."""
    by = {e["phase"]: e for e in doc["phases"]}
    out = [f"{e['phase']:12} {e['status']:8} {e.get('seconds', 0):7.1f} s" for e in doc["phases"]]

    def r(name: str) -> dict:
        return by.get(name, {}).get("result", {}) or {}

    if "float16" in r("matmul"):
        out.append(f"matmul ceiling: fp16 {r('matmul')['float16']['tflops_median']} TFLOP/s, "
                   f"bf16 {r('matmul').get('bfloat16', {}).get('tflops_median')} TFLOP/s")
    for name, fr in r("e2e").get("fraction_of_limit", {}).items():
        out.append(f"e2e {name}: {fr['images_per_s']} images/s, {fr['of_989_tflops']:.1%} of 989 TFLOP/s"
                   + (f", {fr['of_measured_fp16_ceiling']:.1%} of the measured ceiling" if "of_measured_fp16_ceiling" in fr else ""))
    if "ours_vs_stock" in r("e2e"):
        s = r("e2e")["ours_vs_stock"]["ratio"]
        out.append(f"e2e ours/stock: {s['median']:.2f}x [{s['min']:.2f}-{s['max']:.2f}]")
    if "ours_vs_reference" in r("train"):
        s = r("train")["ours_vs_reference"]["ratio"]
        out.append(f"train ours/diffusers loop: {s['median']:.2f}x [{s['min']:.2f}-{s['max']:.2f}]")
    for name in ("unet_speedup", "vae_speedup"):
        if name in r("compile"):
            out.append(f"compile {name}: {r('compile')[name]}x after {r('compile').get(name.split('_')[0] + '_compile_seconds')} s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the JSON file (rewritten after every phase)")
    ap.add_argument("--budget", type=float, default=540.0,
                    help="seconds for all phases together (default 540: one 600 s device call with start-up)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, 1 pair: checks the script, measures nothing")
    ap.add_argument("--device", default="", help="default cuda (cpu with --smoke)")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ",".join(PHASES))
    ap.add_argument("--pairs", type=int, default=0, help="interleaved rounds for e2e and train (default 5; smoke 1)")
    ap.add_argument("--e2e-images", type=int, default=0, help="images per e2e run (default 16; smoke 2)")
    ap.add_argument("--train-batch", type=int, default=1)
    # "default": the max-autotune modes benchmark every kernel choice and can take minutes for
    # the SD 1.5 UNet, more than the phase's box on one 10-minute device call.
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode (inductor): default, reduce-overhead, max-autotune-no-cudagraphs, ...")
    ap.add_argument("--compile-backend", default="", help="default inductor (eager with --smoke: no C++ build on CPU)")
    ap.add_argument("--work", default="", help="scratch folder (default: a temporary one, removed at the end)")
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.pairs = args.pairs or (1 if args.smoke else 5)
    args.compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    phases = [p for p in args.phases.split(",") if p]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise SystemExit(f"error: unknown phase(s) {unknown}; choose from {', '.join(PHASES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device is visible; run on a GPU machine, or use --smoke (CPU) to check the script")
    if args.budget <= 0:
        raise SystemExit(f"error: --budget {args.budget} must be positive (seconds)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    own_scratch = not args.work
    scratch = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    scratch.mkdir(parents=True, exist_ok=True)
    args.work = str(scratch)
    run = Run(args.out, args)
    fns: dict[str, Callable[[Result, float], None]] = {
        "machine": lambda r, d: phase_machine(r, d, args), "matmul": lambda r, d: phase_matmul(r, d, args),
        "e2e": lambda r, d: phase_e2e(r, d, args, run), "unet": lambda r, d: phase_unet(r, d, args),
        "vae": lambda r, d: phase_vae(r, d, args), "train": lambda r, d: phase_train(r, d, args),
        "recognition": lambda r, d: phase_recognition(r, d, args), "clip": lambda r, d: phase_clip(r, d, args),
        "compile": lambda r, d: phase_compile(r, d, args),
    }
    try:
        for name in PHASES:
            if name in phases:
                # Smoke: 45 s a phase, room for 2 cores shared with other jobs, yet a hang is cut short.
                run_phase(run, name, fns[name], 45.0 if args.smoke else BOXES[name])
    finally:
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        run.doc["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        run.doc["summary"] = summary_lines(run.doc)
        run.save()
    print("\n".join(run.doc["summary"]))
    return 0 if all(e["status"] in ("ok", "skipped") for e in run.doc["phases"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
