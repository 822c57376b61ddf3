#!/usr/bin/env python
"""Build the tiny random models behind the ``cpu-tiny`` profiles, offline.

Writes diffusers folders ``models/tiny/sd15`` and ``models/tiny/sdxl`` (real
architectures, tiny widths, random weights) with the real CLIP BPE tokenizer
made from the vocabulary open_clip ships in its wheel, and a tiny open_clip
model ``models/tiny/clip``. Deterministic (fixed seed); takes seconds; never
touches the network. The pictures they draw are noise, but every code path
(schedulers, CFG, VAE, text encoders, textual inversion, CLIP) runs for real.

    python scripts/build_tiny_models.py [--out models/tiny] [--force]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
VERSION = 1  # bump when the tiny architectures change, so stale builds are rebuilt


def _bytes_to_unicode() -> dict[int, str]:
    # The byte <-> printable-unicode table of GPT-2/CLIP BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer(out: Path) -> None:
    """vocab.json + merges.txt of the real 49408-token CLIP BPE, from open_clip's wheel."""
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")


def _tokenizer(folder: Path, pad: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    write_clip_tokenizer(folder)
    tok = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad, model_max_length=77
    )
    return tok


def _text_config(hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="quick_gelu",
        projection_dim=projection,
    )


def _vae():
    from diffusers import AutoencoderKL

    # Four blocks: the real x8 downscale, so 512x512 images use 64x64 latents.
    return AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=64,
    )


def _scheduler():
    from diffusers import PNDMScheduler

    # SD 1.5's own training schedule, so sampler swaps behave as on real models.
    return PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
    )


def build_sd15(out: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="tok-"))
    tok = _tokenizer(tmp)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=_vae(), text_encoder=CLIPTextModel(_text_config(32, 32)), tokenizer=tok,
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(tmp, ignore_errors=True)


def build_sdxl(out: Path) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(1)
    tmp = Path(tempfile.mkdtemp(prefix="tok-"))
    tok = _tokenizer(tmp / "a")
    tok2 = _tokenizer(tmp / "b", pad="!")  # SDXL's second tokenizer pads with "!"
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=8 * 6 + 32,
        cross_attention_dim=32 + 32,
        norm_num_groups=32,
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(32, 32)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(32, 32)),
        tokenizer=tok, tokenizer_2=tok2,
        scheduler=_scheduler(), force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(tmp, ignore_errors=True)


TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def build_clip(out: Path) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(2)
    out.mkdir(parents=True, exist_ok=True)
    model = open_clip.model.CLIP(**TINY_CLIP_CONFIG)
    (out / "config.json").write_text(json.dumps(TINY_CLIP_CONFIG, indent=2), encoding="utf-8")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))


def build_all(out: Path, force: bool = False) -> Path:
    """Build every tiny model under ``out`` (atomically: a folder appears whole or not at all)."""
    stamp = out / "VERSION"
    if not force and stamp.exists() and stamp.read_text().strip() == str(VERSION):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    try:
        build_sd15(tmp / "sd15")
        build_sdxl(tmp / "sdxl")
        build_clip(tmp / "clip")
        (tmp / "VERSION").write_text(f"{VERSION}\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "models" / "tiny")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args(argv)
    path = build_all(args.out, args.force)
    print(f"tiny models ready in {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
