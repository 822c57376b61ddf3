"""`likeness train DATASET --spec SPEC --steps N --out DIR`: textual inversion with a loss bar."""

from __future__ import annotations

import argparse
import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from likeness.cli.output import emit, progress_bar, say, warn
from likeness.errors import InvalidInput
from likeness.progress import CancelToken


def _config(args: argparse.Namespace) -> Any:
    from likeness.config import from_dict
    from likeness.train.trainer import TrainConfig

    data: dict[str, Any] = {}
    for flag, key in (
        ("steps", "steps"), ("vectors", "n_vectors"), ("batch_size", "batch_size"),
        ("grad_accum", "gradient_accumulation"), ("resolution", "resolution"), ("flip_p", "flip_p"),
        ("seed", "seed"), ("checkpoint_every", "checkpoint_every"), ("mixed_precision", "mixed_precision"),
        ("init_word", "init_word"), ("templates", "templates"),
    ):
        value = getattr(args, flag)
        if value is not None:
            data[key] = value
    if args.lr is not None:
        # A bare number stays a number; anything else is an A1111 schedule string.
        try:
            data["learning_rate"] = float(args.lr)
        except ValueError:
            data["learning_rate"] = args.lr
    validation: dict[str, Any] = {}
    if args.no_validate:
        validation["enabled"] = False
    if args.val_steps is not None:
        validation["steps"] = args.val_steps
    if args.val_seeds:
        try:
            validation["seeds"] = [int(s) for s in args.val_seeds.split(",") if s.strip()]
        except ValueError:
            raise InvalidInput(f"--val-seeds {args.val_seeds!r}: write whole numbers separated by commas, "
                               "e.g. --val-seeds 1,2,3") from None
    if validation:
        data["validation"] = validation
    return from_dict(TrainConfig, data, "train")


@contextmanager
def stop_after_step_on_signal(cancel: CancelToken) -> Iterator[None]:
    """Ctrl-C / SIGTERM cancel ``cancel`` instead of killing training mid-step.

    Training then saves the step it finished as a checkpoint and stops
    (``Cancelled``), so up to ``checkpoint_every - 1`` steps are not lost; a
    second Ctrl-C interrupts at once. Only the main thread can own signals.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        if cancel.cancelled:
            raise KeyboardInterrupt
        cancel.cancel(f"stopped by {signal.Signals(signum).name} after the current step, which is saved as a "
                      "checkpoint; run the same command again to resume")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _warn_uncaptioned(dataset: str, spec_path: str) -> None:
    """Warn when images have no (or an empty) ``.txt`` caption: they train on the template alone.

    Without captions naming the background and clothes, those are learned into the token
    (the workflow's step 3); training still runs, as A1111's does.
    """
    from likeness.train.data import read_dataset

    items = read_dataset(dataset)  # NotFound / InvalidInput for a missing or empty folder, before any model loads
    bare = [it.path for it in items if not it.caption]
    if bare:
        warn(f"warning: {len(bare)} of {len(items)} images in {dataset} have no .txt caption (e.g. {bare[0].name}): "
             "they are trained on the prompt template alone, so their background and clothes go into the "
             f"embedding; caption them first with `likeness caption {dataset} --spec {spec_path}`")


def _train(args: argparse.Namespace) -> int:
    from likeness.cli.commands.profile_choice import resolve_cli_profile
    from likeness.spec import load_spec
    from likeness.train.trainer import BEST_FILE, train_embedding

    spec = load_spec(args.spec)
    config = _config(args)
    profile = resolve_cli_profile(args.profile, spec.profile)
    say(f"training {spec.token!r} on {args.dataset} with profile {profile.name!r}; resumes from {args.out} if it holds checkpoints")
    _warn_uncaptioned(args.dataset, args.spec)
    bar = progress_bar()
    cancel = CancelToken()
    try:
        with stop_after_step_on_signal(cancel):
            result = train_embedding(args.dataset, spec, args.out, config, profile=profile, progress=bar,
                                     cancel=cancel)
    finally:
        bar.close()
    from likeness.files import atomic_write_bytes

    # The chosen embedding at the top of --out as <token>.safetensors, where kohya and A1111 users
    # look for it (it was only inside checkpoints/step-N/).
    chosen = result.out_dir / f"checkpoints/step-{result.best_step}/{spec.token}.safetensors"
    embedding = atomic_write_bytes(result.out_dir / f"{spec.token}.safetensors", chosen.read_bytes())
    say(f"embedding of step {result.best_step}: {embedding}")
    emit({
        "token": spec.token,
        "best_step": result.best_step,
        "reason": result.best_reason,
        "embedding": str(embedding),
        "checkpoint_embedding": str(chosen),
        "best": str(result.out_dir / BEST_FILE),
        "last_step": result.last_step,
        "resumed_from": result.resumed_from,
        "checkpoints": list(result.checkpoints),
        "scores": [s.to_dict() | {"images": len(s.images)} for s in result.scores],
    })
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a textual-inversion embedding on a captioned image folder")
    p.add_argument("dataset", help="folder of images with .txt caption sidecars (the curated set)")
    p.add_argument("--spec", required=True, help="character spec TOML (token, class word, sampler)")
    p.add_argument("--out", required=True,
                   help="output folder: <token>.safetensors (the chosen step), checkpoints/, checkpoint_scores.json, best.json")
    p.add_argument("--steps", type=int, help="optimizer updates (default 1500)")
    p.add_argument("--profile", help="model profile (default: the spec's, else the best this machine runs)")
    p.add_argument("--lr", help='learning rate: a number or an A1111 schedule such as "0.005:100, 1e-3:1000, 1e-5"')
    p.add_argument("--vectors", type=int, help="vectors per token (default 8)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps")
    p.add_argument("--resolution", type=int, help="training side in pixels (default: 512 SD 1.x, 1024 SDXL)")
    p.add_argument("--flip-p", type=float, help="probability of a mirrored image (default 0.5)")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"])
    p.add_argument("--init-word", help="initialise the vectors from this word (default: the spec's class word)")
    p.add_argument("--templates", help="A1111-style template file with [name] and [filewords]")
    p.add_argument("--no-validate", action="store_true", help="skip validation images; the last step is 'best'")
    p.add_argument("--val-steps", type=int, help="sampling steps of validation images (default 20)")
    p.add_argument("--val-seeds", help="comma-separated validation seeds")
    p.set_defaults(func=_train)
