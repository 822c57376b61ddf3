"""Training data for textual inversion: captions, prompt templates, placeholder tokens, cached latents.

- A dataset is a folder of images with A1111/kohya ``.txt`` caption sidecars
  (``img.png`` + ``img.txt``); an image without a sidecar has empty filewords.
- Templates are A1111 template lines: ``[name]`` becomes the token, and
  ``[filewords]`` the caption. Every whole-word occurrence of the token in the
  filled prompt (the captions start with it) is then expanded to the
  multi-vector names ``tok tok_1 ... tok_{n-1}``, as diffusers' textual
  inversion loader names them and A1111 reads an embedding wherever its name
  appears.
- Latents are encoded once per image and per flip: we keep the VAE's latent
  distribution (mean and std) and draw ``mean + std * eps`` every step from the
  step's own generator — the same distribution as diffusers' per-step
  ``latent_dist.sample()``, without running the VAE again.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from likeness.embeddings import token_names
from likeness.errors import InvalidInput, NotFound
from likeness.images import list_images, load_image

# Our own template lines (A1111 ships style_filewords/subject_filewords lists of the same shape).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of [name], [filewords]",
    "a portrait photo of [name], [filewords]",
    "a close photo of [name], [filewords]",
    "a clear picture of [name], [filewords]",
    "a good photo of [name], [filewords]",
    "a candid photo of [name], [filewords]",
    "a sharp photo of [name], [filewords]",
    "a snapshot of [name], [filewords]",
    "an image showing [name], [filewords]",
    "a rendition of [name], [filewords]",
    "a well lit photo of [name], [filewords]",
    "a detailed photo of [name], [filewords]",
)


@dataclass(frozen=True)
class TrainItem:
    """One training image and its caption (the A1111 ``[filewords]``)."""

    path: Path
    caption: str


def read_dataset(dataset_dir: str | Path) -> list[TrainItem]:
    """Images of ``dataset_dir`` (sorted, recursive) with their ``.txt`` captions."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise NotFound(f"dataset folder {root} does not exist; pass the curated/captioned folder")
    items = []
    for path in list_images(root):
        side = path.with_suffix(".txt")
        caption = side.read_text(encoding="utf-8").strip() if side.is_file() else ""
        items.append(TrainItem(path, " ".join(caption.split())))
    if not items:
        raise InvalidInput(f"dataset folder {root} has no images; put the curated images (and .txt captions) there")
    return items


def load_templates(path: str | Path | None) -> tuple[str, ...]:
    """Template lines from an A1111-style file (one per line, blank lines skipped), or ours."""
    if not path:
        return DEFAULT_TEMPLATES
    p = Path(path)
    if not p.is_file():
        raise NotFound(f"template file {p} does not exist; pass a text file with one template per line")
    lines = tuple(line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
    if not lines:
        raise InvalidInput(f"template file {p} is empty; write lines such as 'a photo of [name], [filewords]'")
    if not any("[name]" in line for line in lines):
        raise InvalidInput(f"template file {p}: no line contains [name]; the token must appear in the prompts")
    return lines


def expand_token(text: str, token: str, n_vectors: int) -> str:
    """Replace every whole-word ``token`` in ``text`` by its vector names (``tok tok_1 ...``)."""
    names = " ".join(token_names(token, n_vectors))
    return re.sub(rf"(?<![\w]){re.escape(token)}(?![\w])", names, text)


def fill_template(template: str, token: str, filewords: str, n_vectors: int = 1) -> str:
    """A1111 template filling: ``[name]`` -> token, ``[filewords]`` -> caption; then token expansion."""
    text = template.replace("[name]", token).replace("[filewords]", filewords)
    text = re.sub(r"(\s*,\s*)+$", "", text.strip())  # "a photo of x, " when the caption is empty
    text = re.sub(r"\s*,\s*(,\s*)+", ", ", text)
    return expand_token(text, token, n_vectors)


def dataset_fingerprint(items: Sequence[TrainItem]) -> str:
    """A hash of image bytes and captions: resuming refuses a changed dataset."""
    h = hashlib.sha256()
    for item in items:
        h.update(item.path.name.encode())
        h.update(hashlib.sha256(item.path.read_bytes()).digest())
        h.update(item.caption.encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ torch parts


def center_crop_resize(image: Any, resolution: int) -> tuple[Any, tuple[int, int], tuple[int, int]]:
    """Resize the short side to ``resolution`` and centre-crop a square.

    Returns (image, original (h, w), crop (top, left)) — the last two are SDXL's
    size/crop conditioning, as diffusers' SDXL training scripts compute them.
    """
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    resized = image.resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return resized.crop((left, top, left + resolution, top + resolution)), (h, w), (top, left)


@dataclass
class LatentCache:
    """Per image and flip (index 0 = as is, 1 = mirrored): the VAE latent distribution.

    ``mean``/``std``: [N, 2, C, h, w] float32 on the training device, before
    the VAE scaling factor; ``time_ids``: [N, 2, 6] SDXL size/crop conditioning.
    """

    mean: Any
    std: Any
    time_ids: Any
    scaling_factor: float
    shift_factor: float

    def sample(self, index: Any, flip: Any, eps: Any) -> Any:
        """Latents ``(mean + std * eps - shift) * scale`` for items ``index`` with flips ``flip``."""
        m = self.mean[index, flip]
        s = self.std[index, flip]
        return (m + s * eps.to(m.device) - self.shift_factor) * self.scaling_factor


def encode_latents(vae: Any, items: Sequence[TrainItem], resolution: int, *, batch_size: int = 4) -> LatentCache:
    """Encode every image (and its mirror image) once with ``vae``; see :class:`LatentCache`."""
    import numpy as np
    import torch

    device, dtype = vae.device, vae.dtype
    # A VAE whose config says force_upcast (SDXL's original) overflows in fp16: NaN latents.
    # Encode in float32 as diffusers' SDXL pipeline decodes, and give the VAE its dtype back.
    upcast = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
        dtype = torch.float32
    means, stds = [], []
    pixels, metas = [], []
    for item in items:
        img, _info = load_image(item.path)
        img, (oh, ow), (top, left) = center_crop_resize(img, resolution)
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        pixels += [arr, torch.flip(arr, dims=[2])]
        # A centre crop is its own mirror image, so both flips share the crop offsets.
        metas += [(oh, ow, top, left, resolution, resolution)] * 2
    try:
        with torch.no_grad():
            for i in range(0, len(pixels), batch_size):
                batch = torch.stack(pixels[i : i + batch_size]).to(device=device, dtype=dtype)
                dist = vae.encode(batch).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
    finally:
        if upcast:
            vae.to(torch.float16)
    mean = torch.cat(means)
    std = torch.cat(stds)
    n = len(items)
    shift = getattr(vae.config, "shift_factor", None)
    return LatentCache(
        mean=mean.reshape(n, 2, *mean.shape[1:]),
        std=std.reshape(n, 2, *std.shape[1:]),
        time_ids=torch.tensor(metas, dtype=torch.float32, device=device).reshape(n, 2, 6),
        scaling_factor=float(vae.config.scaling_factor),
        shift_factor=float(shift or 0.0),
    )


def add_placeholder_tokens(tokenizer: Any, text_encoder: Any, token: str, n_vectors: int, init_word: str) -> tuple[list[int], Any]:
    """Add ``tok, tok_1, ...`` to ``tokenizer``, grow ``text_encoder``'s rows, initialise them from ``init_word``.

    Like A1111, the initial vectors cycle through the init word's token
    vectors (one token for most class words). Returns (the new ids, which are
    consecutive, and the [n, dim] float32 initial vectors). A pipeline that
    already holds exactly these tokens (an earlier run in the same process) is
    reused; the rows are re-initialised.
    """
    import torch

    from likeness.spec import check_token_is_new

    names = token_names(token, n_vectors)
    added = dict(getattr(tokenizer, "added_tokens_encoder", {}) or {})
    present = [n for n in names if n in added]
    if present and len(present) != len(names):
        raise InvalidInput(
            f"the tokenizer already holds {present} but not all of {names}; "
            "load a fresh pipeline or train with the same number of vectors"
        )
    if f"{token}_{n_vectors}" in added:
        raise InvalidInput(f"the tokenizer already holds more than {n_vectors} vectors for {token!r}; load a fresh pipeline")
    if not present:
        check_token_is_new(token, tokenizer)
        tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(ids[0], ids[0] + n_vectors)):
        raise InvalidInput(f"the tokenizer gave non-consecutive ids {ids} to {names}; load a fresh pipeline")
    emb = text_encoder.get_input_embeddings()
    if emb.weight.shape[0] < len(tokenizer):
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        emb = text_encoder.get_input_embeddings()
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not init_ids:
        raise InvalidInput(f"init word {init_word!r} has no tokens; use a plain word such as 'woman'")
    with torch.no_grad():
        src = emb.weight[torch.tensor(init_ids, device=emb.weight.device)].float().cpu()
        init = torch.stack([src[i % len(init_ids)] for i in range(n_vectors)])
        emb.weight[ids[0] : ids[0] + n_vectors] = init.to(emb.weight)
    return ids, init
