#!/usr/bin/env python
"""Training throughput: Likeness' trainer vs a diffusers-textual_inversion.py-style loop, interleaved pairs.

Both loops train the same model with the same settings (batch, resolution,
vectors, learning rate, mixed precision) on the same random images:

- **ours**: ``likeness.train.trainer.Trainer`` — latents cached once per image and flip,
  only the new vectors are parameters (a forward hook splices them in);
- **reference**: the loop of diffusers' ``examples/textual_inversion/textual_inversion.py``:
  the whole token-embedding matrix is trainable (AdamW, weight decay 1e-2,
  rows restored after every update), the text encoder stays float32, and the
  VAE encodes every batch at every step. (It gets pixel tensors preloaded,
  which favours it: the example decodes and resizes the files every step.)

Each loop runs in **its own process** (scripts/bench_common.py), set up and
warmed up once; then ``--pairs`` interleaved runs of ``--steps`` steps each
(reference, ours, reference, ours, ...). Printed: the median and spread of
each loop's steps/s and of the per-pair ratio, the machine and its load.
Default model: the tiny SD 1.5 at 512x512 (where VAE encoding costs what it
does on real models relative to the tiny UNet); ``--full-size`` builds the
real SD 1.5 architecture from config values with random weights (no
download) and is meant for CUDA.

    python scripts/bench_train.py [--pairs 5] [--steps 10] [--batch-size 1] [--resolution 512] [--full-size] [--threads N]
    python scripts/bench_train.py --smoke      # seconds: checks the benchmark runs
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


def full_size_sd15(dtype, device):
    """SD 1.5's architecture (UNet 860M, VAE 84M, CLIP ViT-L text encoder) with random weights."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from likeness.profiles import models_dir

    tiny = models_dir() / "tiny" / "sd15"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    tok = CLIPTokenizer.from_pretrained(tiny / "tokenizer")
    base = StableDiffusionPipeline.from_pretrained(tiny)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=base.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe.to(device, dtype)


def load_pipe(args):
    import torch
    from diffusers import StableDiffusionPipeline

    from likeness.profiles import models_dir

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.full_size:
        return full_size_sd15(dtype, device)
    return StableDiffusionPipeline.from_pretrained(models_dir() / "tiny" / "sd15").to(device, dtype)


def make_dataset(root: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text("3m1ly, wearing a coat, gray background\n")
    return root


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup_ours(pipe, items, cfg, spec):
    """Likeness' trainer; returns its step function (setup includes the one-off latent encoding)."""
    from likeness.train.trainer import Trainer
    from likeness.train.data import DEFAULT_TEMPLATES

    t0 = time.perf_counter()
    trainer = Trainer(pipe, spec, items, cfg, DEFAULT_TEMPLATES)
    sync(trainer.device)
    print(f"ours: setup (token rows + latent cache of {len(items)} images x 2 flips) "
          f"{time.perf_counter() - t0:.2f} s", file=sys.stderr)
    counter = iter(range(1, 10**9))
    return lambda: trainer.train_step(next(counter))


def setup_reference(pipe, items, cfg, spec):
    """The diffusers textual_inversion.py training loop (minus accelerate and the data loader); its step function."""
    import random

    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from likeness.images import load_image
    from likeness.train.data import DEFAULT_TEMPLATES, center_crop_resize, fill_template, token_names

    device = pipe.unet.device
    weight_dtype = pipe.unet.dtype
    tok, te, vae, unet = pipe.tokenizer, pipe.text_encoder.float(), pipe.vae, pipe.unet
    names = token_names(spec.token, cfg.n_vectors)
    tok.add_tokens(names)
    ids = tok.convert_tokens_to_ids(names)
    init_id = tok(spec.class_word, add_special_tokens=False).input_ids[0]
    te.resize_token_embeddings(len(tok), mean_resizing=False)
    emb = te.get_input_embeddings()
    with torch.no_grad():
        for i in ids:
            emb.weight[i] = emb.weight[init_id].clone()
    orig = emb.weight.data.clone()
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    te.requires_grad_(False)
    emb.weight.requires_grad_(True)
    te.train()
    optimizer = torch.optim.AdamW(emb.parameters(), lr=0.005, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels = []
    for item in items:
        img = center_crop_resize(load_image(item.path)[0], cfg.resolution)[0]
        pixels.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    rnd = random.Random(0)
    keep = torch.ones(len(tok), dtype=torch.bool)
    keep[min(ids) : max(ids) + 1] = False
    amp = torch.autocast("cuda", dtype=weight_dtype) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step() -> None:
        idx = [rnd.randrange(len(items)) for _ in range(cfg.batch_size)]
        batch = torch.stack([pixels[i].flip(2) if rnd.random() < cfg.flip_p else pixels[i] for i in idx])
        texts = [fill_template(rnd.choice(DEFAULT_TEMPLATES), spec.token, items[i].caption, cfg.n_vectors) for i in idx]
        input_ids = tok(texts, padding="max_length", truncation=True, max_length=tok.model_max_length,
                        return_tensors="pt").input_ids.to(device)
        with amp:
            latents = vae.encode(batch.to(device, weight_dtype)).latent_dist.sample().detach() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            hidden = te(input_ids)[0].to(dtype=weight_dtype)
            pred = unet(noisy, t, hidden).sample
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            emb.weight[keep] = orig[keep]

    return step


def timed(step, device, n: int) -> float:
    """Seconds for ``n`` steps (synchronised on CUDA)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return time.perf_counter() - t0


def _config(args):
    from likeness.spec import spec_from_dict
    from likeness.train.checkpoint_scoring import ValidationConfig
    from likeness.train.trainer import TrainConfig

    spec = spec_from_dict({"name": "Bench", "token": "3m1ly", "class_word": "woman"})
    # Enough scheduled steps for every timed run: the trainer's LR schedule must not end early.
    total = args.warmup + args.steps * args.pairs + 1
    cfg = TrainConfig(steps=total, batch_size=args.batch_size, resolution=args.resolution,
                      n_vectors=args.vectors, validation=ValidationConfig(enabled=False))
    return spec, cfg


def side(args):
    """One loop in this process: set up, warm up; run(i) -> seconds for --steps steps."""
    import torch

    from likeness.train.data import read_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    spec, cfg = _config(args)
    items = read_dataset(Path(args.work))
    t0 = time.perf_counter()
    step = (setup_reference if args.side == "reference" else setup_ours)(load_pipe(args), items, cfg, spec)
    device = torch.device(args.device)
    setup_s = time.perf_counter() - t0
    timed(step, device, args.warmup)
    return (lambda i: timed(step, device, args.steps)), {"torch_threads": torch.get_num_threads(),
                                                          "loop_setup_seconds": round(setup_s, 3)}


def _side_argv(args, name: str) -> list[str]:
    argv = [str(Path(__file__).resolve()), "--side", name, "--work", args.work, "--device", args.device,
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--pairs", str(args.pairs),
            "--batch-size", str(args.batch_size), "--resolution", str(args.resolution),
            "--images", str(args.images), "--vectors", str(args.vectors), "--threads", str(args.threads)]
    if args.full_size:
        argv.append("--full-size")
    return argv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 10; smoke 2)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=None, help="default 512 (smoke 64)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--vectors", type=int, default=8)
    ap.add_argument("--full-size", action="store_true", help="real SD 1.5 architecture, random weights (CUDA)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per loop (0 = torch's default)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line (for scripts/bench_all.py)")
    ap.add_argument("--work", default="", help=argparse.SUPPRESS)
    add_pair_args(ap)
    raw = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(raw)
    pairs_given = any(a == "--pairs" or a.startswith("--pairs=") for a in raw)
    if args.smoke:
        args.steps = args.steps or 2
        args.resolution = args.resolution or 64
        args.images = min(args.images, 2)
        args.warmup = min(args.warmup, 1)
        args.pairs = min(args.pairs, 2) if pairs_given else 1
    args.steps = args.steps or 10
    args.resolution = args.resolution or 512
    check_pairs(args.pairs)

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.side:
        return side_main(lambda: side(args))
    info = machine(args.device)
    print(machine_line(info), file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    sides: list[SideProcess] = []
    try:
        args.work = str(make_dataset(work, args.images, args.resolution))
        sides = [SideProcess(name, _side_argv(args, name)) for name in ("reference", "ours")]
        runs = interleave(sides, args.pairs, log=lambda s: print(s, file=sys.stderr))
    finally:
        for s in sides:
            s.close()
        shutil.rmtree(work, ignore_errors=True)
    summary = pairs_summary([r["seconds"] for r in runs["ours"]], [r["seconds"] for r in runs["reference"]], args.steps)
    model = "SD 1.5 architecture, random weights" if args.full_size else "tiny SD 1.5"
    settings = f"{model}; batch {args.batch_size}; {args.resolution}x{args.resolution}; {args.steps} steps per run"
    print(f"{settings}; {args.pairs} interleaved pairs after {args.warmup} warm-up steps; median [min-max]",
          file=sys.stderr)
    print(f"reference (VAE every step): {fmt_spread(summary['alternative_rate'])} steps/s", file=sys.stderr)
    print(f"ours (cached latents):      {fmt_spread(summary['ours_rate'])} steps/s", file=sys.stderr)
    print(f"ratio ours/reference:       {fmt_spread(summary['ratio'])}", file=sys.stderr)
    if "note" in summary:
        print(f"note: {summary['note']}", file=sys.stderr)
    if args.json:
        print(json.dumps({"stage": "train", "unit": "steps/s", "ours_name": "likeness Trainer (cached latents)",
                          "alternative_name": "diffusers textual_inversion-style loop (VAE encode every step)",
                          "model": model, "device": args.device, "batch_size": args.batch_size,
                          "resolution": args.resolution, "settings": settings, "smoke": args.smoke,
                          "machine": info, "setup": {s.name: s.ready for s in sides}, **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
