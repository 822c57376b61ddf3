"""Build options: what a build request may set, each with its default and its bound, validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from likeness.config import SEED_MAX, bounded, from_dict, same_as
from likeness.curate.checks import CurateConfig
from likeness.errors import InvalidInput
from likeness.spec import CharacterSpec

# Limits that keep one request from occupying a device for days.
MAX_TRAINING_STEPS = 100_000
MAX_ROUNDS = 10


@dataclass(frozen=True)
class BuildOptions:
    # models/<profile>.toml; empty = the spec's profile, else the best this machine has.
    profile: str = ""
    # Images per zoom x angle cell; 0 = the spec's per_cell (16 in the hand workflow).
    images_per_cell: int = bounded(0, 0, 1000, zero_means="the spec's")
    # Images curation keeps: ~25 is what the hand workflow trains on (default and bound: CurateConfig.k).
    k: int = same_as(CurateConfig, "k")
    # Training steps; 0 = the training stage's default.
    training_steps: int = bounded(0, 0, MAX_TRAINING_STEPS, zero_means="the training stage's default")
    # Extra generate-curate-train rounds with the trained token (0 = one pass).
    refinement_rounds: int = bounded(0, 0, MAX_ROUNDS)
    # Stop refining when identity consistency improves by less than this.
    refinement_margin: float = bounded(0.02, 0.0, 1.0)
    # A folder of existing images to use instead of generation (server: under --import-root).
    import_gallery: str = ""
    # Set by the server, never by a client: its import roots; the import reads no file that links
    # outside them. Empty (the CLI) follows links anywhere.
    import_roots: tuple[str, ...] = ()
    # Base seed of the gallery; -1 = the spec's seed (or one drawn once and recorded).
    base_seed: int = bounded(-1, -1, SEED_MAX)
    # Evaluation scenes ("cooking", ...); empty = the evaluation stage's defaults.
    eval_scenes: tuple[str, ...] = ()
    # Training resolution; 0 = the spec's image size.
    train_resolution: int = 0
    # Sampler steps for evaluation images; 0 = the spec's steps.
    eval_steps: int = bounded(0, 0, 500, zero_means="the spec's steps")
    # Save a resumable training checkpoint every this many steps; 0 = training's default.
    checkpoint_every: int = bounded(0, 0, MAX_TRAINING_STEPS, zero_means="training's default")


def build_options(data: dict[str, Any] | None = None) -> BuildOptions:
    """Validated options from a dict (CLI flags, protobuf, the store).

    Numeric bounds are declared on the fields (``bounded``) and checked by ``from_dict``;
    the rules below are the ones a bound cannot express.
    """
    opts = from_dict(BuildOptions, dict(data or {}), "options")
    checks = [
        (len(opts.eval_scenes) <= 64, "at most 64 eval_scenes"),
        (all(0 < len(s) <= 300 for s in opts.eval_scenes), "each eval scene must be 1-300 characters"),
        (opts.train_resolution == 0 or (opts.train_resolution % 8 == 0 and 64 <= opts.train_resolution <= 2048),
         "train_resolution must be 0 (spec's size) or a multiple of 8 from 64 to 2048"),
    ]
    for ok, message in checks:
        if not ok:
            raise InvalidInput(f"options: {message}")
    return opts


def effective_spec(spec: CharacterSpec, opts: BuildOptions) -> CharacterSpec:
    """The spec with the build's overrides applied (per_cell, seed, profile)."""
    changes: dict[str, Any] = {}
    if opts.images_per_cell:
        changes["per_cell"] = opts.images_per_cell
    if opts.base_seed >= 0:
        changes["seed"] = opts.base_seed
    if opts.profile:
        changes["profile"] = opts.profile
    return spec.with_overrides(**changes) if changes else spec
