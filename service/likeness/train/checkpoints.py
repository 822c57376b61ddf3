"""Training checkpoints on disk: ``<out>/checkpoints/step-<n>/`` folders that appear whole, and the score files.

A checkpoint holds the embedding (``<token>.safetensors``, likeness.embeddings'
A1111/ComfyUI layout), ``state.pt`` (vectors, AdamW and fp16-scaler state,
step) and ``meta.json`` (step, run fingerprint, loss, learning rate). It is
written as ``.step-<n>.tmp`` and renamed, so a listed checkpoint is complete.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from likeness.errors import FailedPrecondition
from likeness.files import atomic_write_json, read_json
from likeness.train.checkpoint_scoring import CheckpointScores

if TYPE_CHECKING:  # pragma: no cover
    from likeness.embeddings import TrainedEmbedding
    from likeness.train.trainer import Trainer, TrainConfig

CHECKPOINTS = "checkpoints"
SCORES_FILE = "checkpoint_scores.json"
BEST_FILE = "best.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(out_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints under ``<out>/checkpoints`` (sorted)."""
    root = Path(out_dir) / CHECKPOINTS
    steps = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / "meta.json").is_file() and (d / "state.pt").is_file():
                steps.append(int(m.group(1)))
    return sorted(steps)


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step-{step}"


def save_checkpoint(out_dir: str | Path, trainer: "Trainer", step: int, meta: dict[str, Any]) -> Path:
    """Write ``checkpoints/step-<n>/`` (embedding, optimizer state, meta) whole or not at all."""
    from likeness.embeddings import save_embedding, save_pt

    final = checkpoint_dir(out_dir, step)
    tmp = final.parent / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_embedding(trainer.embedding(step), tmp / f"{trainer.token}.safetensors", "safetensors")
    state = trainer.state_dict(step)
    save_pt(state, tmp / "state.pt")
    atomic_write_json(tmp / "meta.json", {"step": step, "fingerprint": trainer.fingerprint(), **meta})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_checkpoint_state(out_dir: str | Path, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    d = checkpoint_dir(out_dir, step)
    return torch.load(d / "state.pt", map_location="cpu", weights_only=True), read_json(d / "meta.json")


def checkpoint_loss(out_dir: str | Path, step: int) -> float | None:
    """The mean training loss recorded in a checkpoint's meta.json (None when absent or unreadable)."""
    try:
        v = read_json(checkpoint_dir(out_dir, step) / "meta.json").get("loss")
    except (OSError, ValueError, AttributeError):
        return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def load_checkpoint_embedding(out_dir: str | Path, step: int, token: str) -> "TrainedEmbedding":
    from likeness.embeddings import load_embedding

    return load_embedding(checkpoint_dir(out_dir, step) / f"{token}.safetensors", token=token)


def check_fingerprint(have: dict[str, Any], want: dict[str, Any], out_dir: Path) -> None:
    for k, v in want.items():
        if have.get(k) != v:
            raise FailedPrecondition(
                f"{out_dir} holds checkpoints of a different run ({k}: {have.get(k)!r} there, {v!r} now); "
                "use a new --out folder, or the same settings and dataset to resume"
            )


def read_scores(out_dir: str | Path) -> list[CheckpointScores]:
    p = Path(out_dir) / SCORES_FILE
    if not p.is_file():
        return []
    return [CheckpointScores.from_dict(r) for r in read_json(p).get("checkpoints", [])]


def write_scores(out_dir: Path, scores: dict[int, CheckpointScores], cfg: "TrainConfig") -> None:
    atomic_write_json(out_dir / SCORES_FILE, {
        "rule": {"clip_t_tolerance": cfg.validation.clip_t_tolerance, "no_face_identity": 0.0},
        "checkpoints": [scores[s].to_dict() for s in sorted(scores)],
    })
