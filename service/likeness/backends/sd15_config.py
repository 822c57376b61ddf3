"""The Stable Diffusion 1.5 component configs, written as a weightless diffusers folder.

``from_single_file`` needs a diffusers config folder to load an A1111-style
``.safetensors`` checkpoint; offline it cannot fetch one. SD 1.5's configs are
public and fixed, so they are written here instead (checked against the real
parameter counts by ``scripts/bench_generate.py --check-configs``); the
tokenizer is the real CLIP BPE that ``scripts/build_tiny_models.py`` builds
from open_clip's wheel. The benchmark uses the same configs to build a
full-size random-weight SD 1.5.

    python -m likeness.backends.sd15_config models/configs/sd15
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from likeness.files import atomic_write_text

UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu", latent_channels=4,
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
    eos_token_id=49407, pad_token_id=49407,
)
SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
)
# Parameter counts of the real SD 1.5 components: the configs above must reproduce them.
PARAMS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def parameter_counts() -> dict[str, int]:
    """Parameter counts of the configs, built on the meta device (no memory, no time)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**UNET), "vae": AutoencoderKL(**VAE),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER))}
    return {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}


def write_config_folder(out: str | Path, tokenizer_from: str | Path | None = None) -> Path:
    """Write model_index.json and every component's config (no weights) under ``out``."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    from likeness.errors import ModelMissing
    from likeness.profiles import models_dir

    out = Path(out)
    tok_src = Path(tokenizer_from) if tokenizer_from else models_dir() / "tiny" / "sd15" / "tokenizer"
    if not (tok_src / "tokenizer_config.json").is_file():
        raise ModelMissing(f"CLIP tokenizer files missing in {tok_src}; run `python scripts/build_tiny_models.py` first")
    with torch.device("meta"):
        UNet2DConditionModel(**UNET).save_config(out / "unet")
        AutoencoderKL(**VAE).save_config(out / "vae")
    CLIPTextConfig(**TEXT_ENCODER).save_pretrained(out / "text_encoder")
    PNDMScheduler(**SCHEDULER).save_config(out / "scheduler")
    CLIPTokenizer.from_pretrained(tok_src).save_pretrained(out / "tokenizer")
    # model_index.json last: its presence marks the folder complete.
    atomic_write_text(out / "model_index.json", json.dumps(_MODEL_INDEX, indent=2) + "\n")
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("models/configs/sd15")
    print(f"SD 1.5 config folder written to {write_config_folder(target)}", file=sys.stderr)
