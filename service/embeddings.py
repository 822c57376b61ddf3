"""Textual-inversion embeddings: the trained vectors and the files other tools load.

Formats (each proven by loading it through diffusers' ``load_textual_inversion``):

- ``a1111-pt``: A1111's ``.pt`` (``string_to_token``/``string_to_param``/``name``/``step``/
  ``sd_checkpoint``/``sd_checkpoint_name``). SD 1.5 only: A1111 has no SDXL ``.pt``.
- ``safetensors``: A1111/ComfyUI ``.safetensors``: ``emb_params`` for SD 1.5, ``clip_l`` +
  ``clip_g`` for SDXL.
- ``diffusers``: ``learned_embeds.safetensors``: ``{token: (n, dim)}`` for SD 1.5; SDXL stores
  ``clip_l`` and ``clip_g`` (the layout diffusers' SDXL docs load once per text encoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from service.errors import InvalidInput

if TYPE_CHECKING:  # torch is imported lazily: only backends import it at module level
    import torch

Family = Literal["sd15", "sdxl"]
FAMILIES: tuple[str, ...] = ("sd15", "sdxl")
# Which encoder keys each family's vectors carry (SDXL: both text encoders).
FAMILY_KEYS: dict[str, tuple[str, ...]] = {"sd15": ("clip_l",), "sdxl": ("clip_l", "clip_g")}


@dataclass(frozen=True)
class TrainedEmbedding:
    """What training produces: per-encoder vectors for one token."""

    # The trigger word, e.g. "3m1ly"; multi-vector rows become 3m1ly, 3m1ly_1, ... in tokenizers.
    token: str
    # Which base model family the vectors fit; decides the encoders and file layouts.
    family: Family
    # "clip_l": (n_vectors, 768 / tiny 32); SDXL adds "clip_g": (n_vectors, 1280 / tiny 32); float32 CPU.
    vectors: dict[str, "torch.Tensor"]
    # Training step the vectors come from (A1111 shows it; checkpoints are named by it).
    step: int
    # Base checkpoint name (A1111's sd_checkpoint_name), so users know what it was trained on.
    base_model: str
    # A1111's sd_checkpoint (short hash) when known; empty otherwise.
    base_model_hash: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise InvalidInput(f"embedding family {self.family!r} is not valid; use one of {FAMILIES}")
        want = FAMILY_KEYS[self.family]
        if tuple(sorted(self.vectors)) != tuple(sorted(want)):
            raise InvalidInput(
                f"a {self.family} embedding needs vectors for {list(want)}, got {sorted(self.vectors)}"
            )
        rows = set()
        for key, tensor in self.vectors.items():
            shape = tuple(getattr(tensor, "shape", ()))
            if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
                raise InvalidInput(f"embedding vectors[{key!r}] must be (n_vectors, dim), got shape {shape}")
            rows.add(shape[0])
        if len(rows) != 1:
            raise InvalidInput(f"every encoder needs the same number of vectors, got {sorted(rows)}")
        if not self.token or any(c.isspace() for c in self.token):
            raise InvalidInput(f"embedding token {self.token!r} must be one word without spaces")

    @property
    def n_vectors(self) -> int:
        """Vectors per encoder (tokens the trigger word expands to)."""
        return int(next(iter(self.vectors.values())).shape[0])

    def dims(self) -> dict[str, int]:
        """Width of each encoder's vectors, e.g. {"clip_l": 768, "clip_g": 1280}."""
        return {key: int(t.shape[1]) for key, t in self.vectors.items()}
