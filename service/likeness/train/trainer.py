"""Stage 4: textual inversion — train a new token's vectors on the captioned, curated set.

``train_embedding`` adds the token (``tok``, ``tok_1``, ... — one tokenizer
entry per vector, as diffusers names them) to every text encoder, initialised
from the class word, and trains *only those rows*: the vectors live in their
own float32 parameter that a forward hook splices into the token-embedding
output, so the embedding matrix, UNet and VAE never receive gradients and the
optimizer state is a few KB (not 2 x 49408 rows). Every step runs only the text
encoder(s) and the UNet: the VAE encodes each image and its mirror image once
(``train_data.encode_latents``).

Determinism and resume: every random choice of step ``s`` (images, flips,
templates, VAE latent sample, noise, timesteps) comes from a generator seeded
by ``(seed, s)``, and the data order of epoch ``e`` from ``(seed, e)``. A
checkpoint therefore needs only the vectors, the optimizer (and fp16 loss
scaler) state and the step to continue exactly as if training had not
stopped. Checkpoints are folders ``<out>/checkpoints/step-<n>/`` that appear
whole (written under a temporary name, then renamed); training resumes from
the latest one automatically and refuses one made with different settings.

After each checkpoint the validator scores it (``likeness.train.checkpoint_scoring``); the
scores of all checkpoints go to ``checkpoint_scores.json`` and the chosen one
to ``best.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from likeness.backends.protocols import Pipeline
from likeness.config import to_dict
from likeness.errors import InvalidInput
from likeness.files import atomic_write_json
from likeness.train.lr_schedule import LearnRateSchedule, parse_learn_rate
from likeness.progress import CancelToken, ProgressFn, report
from likeness.train.data import TrainItem, dataset_fingerprint, fill_template, load_templates, read_dataset
from likeness.train.checkpoints import (
    BEST_FILE, CHECKPOINTS, check_fingerprint, checkpoint_loss, list_checkpoints, load_checkpoint_embedding,
    load_checkpoint_state, read_scores, save_checkpoint, write_scores,
)
from likeness.train.checkpoint_scoring import CheckpointScores, ValidationConfig, Validator, check_validation_config, choose_best

if TYPE_CHECKING:  # pragma: no cover
    from likeness.embeddings import TrainedEmbedding
    from likeness.profiles import Profile
    from likeness.spec import CharacterSpec



@dataclass(frozen=True)
class TrainConfig:
    # Optimizer updates (A1111's "max steps"); ~1500 x batch 2 is ~120 passes over 25 images.
    steps: int = 1500
    # A number or an A1111 schedule string, e.g. "0.005:100, 1e-3:1000, 1e-5" (A1111's default is 0.005).
    learning_rate: float | str = 0.005
    # Vectors per token: 8 holds a face; more overfits 25 images, fewer loses detail.
    n_vectors: int = 8
    # Images per micro-batch; 2 halves the gradient noise of A1111's 1 and fits 8 GB at 512.
    batch_size: int = 2
    # Micro-batches per update (effective batch = batch_size x gradient_accumulation).
    gradient_accumulation: int = 1
    # Square training side in pixels; 0 = the family's native size (512 SD 1.x, 1024 SDXL).
    resolution: int = 0
    # Probability of training on the mirror image; 0 keeps asymmetric features (a parting, a mole).
    flip_p: float = 0.5
    # Seeds every random choice; same seed + data + settings = same embedding.
    seed: int = 0
    # Save (and validate) every N steps; the last step is always saved.
    checkpoint_every: int = 250
    # "auto": the pipeline's half dtype on CUDA (bf16 if it is float32 and supported), float32 on CPU.
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    # AdamW weight decay on the new vectors; 0 as A1111 (decay would shrink them toward zero).
    weight_decay: float = 0.0
    # Word whose token vectors initialise the new ones; empty = the spec's class word.
    init_word: str = ""
    # A1111-style template file ([name], [filewords]); empty = train_data.DEFAULT_TEMPLATES.
    templates: str = ""
    # Validation at each checkpoint (choice of the best step).
    validation: ValidationConfig = field(default_factory=ValidationConfig)


def check_train_config(cfg: TrainConfig) -> LearnRateSchedule:
    """Validate ``cfg`` up front; returns the parsed learning-rate schedule."""
    if not 1 <= cfg.steps <= 1_000_000:
        raise InvalidInput(f"train.steps: {cfg.steps} must be 1 or more")
    if not 1 <= cfg.n_vectors <= 75:
        raise InvalidInput(f"train.n_vectors: {cfg.n_vectors} must be 1-75 (a prompt chunk holds 75 tokens)")
    if not 1 <= cfg.batch_size <= 256 or not 1 <= cfg.gradient_accumulation <= 256:
        raise InvalidInput("train.batch_size and train.gradient_accumulation must be 1-256")
    if cfg.resolution and (cfg.resolution % 8 or not 64 <= cfg.resolution <= 2048):
        raise InvalidInput(f"train.resolution: {cfg.resolution} must be 0 (native) or a multiple of 8 in 64-2048")
    if not 0.0 <= cfg.flip_p <= 1.0:
        raise InvalidInput(f"train.flip_p: {cfg.flip_p} must be a probability in 0-1")
    if cfg.checkpoint_every < 1:
        raise InvalidInput(f"train.checkpoint_every: {cfg.checkpoint_every} must be 1 or more")
    if cfg.weight_decay < 0:
        raise InvalidInput(f"train.weight_decay: {cfg.weight_decay} must be 0 or more")
    if not 0 <= cfg.seed < 2**63:
        raise InvalidInput(f"train.seed: {cfg.seed} must be in 0..2**63-1")
    check_validation_config(cfg.validation)
    return parse_learn_rate(cfg.learning_rate)


@dataclass(frozen=True)
class TrainResult:
    # The chosen checkpoint's vectors (also loaded into the pipeline's rows).
    best: "TrainedEmbedding"
    best_step: int
    # Why that step (the rule, in words).
    best_reason: str
    # The last step trained (the schedule may stop before config.steps).
    last_step: int
    # Step the run continued from (0 = fresh).
    resumed_from: int
    checkpoints: tuple[int, ...]
    scores: tuple[CheckpointScores, ...]
    out_dir: Path


def _seed_for(*parts: int) -> int:
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _hidden_layer(sdxl: bool) -> str:
    return "penultimate" if sdxl else "last"


class Trainer:
    """The training state of one run: token rows, cached latents, optimizer; one method per unit of work."""

    def __init__(
        self, pipe: Pipeline, spec: "CharacterSpec", items: Sequence[TrainItem], config: TrainConfig,
        templates: Sequence[str], *, base_model: str = "",
    ) -> None:
        import torch
        from diffusers import DDPMScheduler

        from likeness.train.data import add_placeholder_tokens, encode_latents

        self.schedule = check_train_config(config)
        self.pipe, self.spec, self.items, self.cfg = pipe, spec, list(items), config
        self.templates = list(templates)
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.family = "sdxl" if self.sdxl else "sd15"
        self.resolution = config.resolution or (1024 if self.sdxl else 512)
        self.base_model = base_model
        self.device = pipe.unet.device
        self.token = spec.token
        encs = [("clip_l", pipe.tokenizer, pipe.text_encoder)]
        if self.sdxl:
            encs.append(("clip_g", pipe.tokenizer_2, pipe.text_encoder_2))
        for module in [pipe.unet, pipe.vae] + [e for _, _, e in encs]:
            module.requires_grad_(False)
            module.eval()
        init_word = config.init_word or spec.class_word
        self.encoders: list[tuple[str, Any, Any]] = encs
        self.params: dict[str, torch.nn.Parameter] = {}
        self.first_id: dict[str, int] = {}
        self._hooks = []
        self._splice = False
        for key, tok, enc in encs:
            ids, init = add_placeholder_tokens(tok, enc, self.token, config.n_vectors, init_word)
            self.first_id[key] = ids[0]
            self.params[key] = torch.nn.Parameter(init.to(self.device, torch.float32))
            self._hooks.append(enc.get_input_embeddings().register_forward_hook(self._make_hook(key)))
        self.latents = encode_latents(pipe.vae, self.items, self.resolution)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise InvalidInput(f"scheduler prediction_type {self.prediction_type!r} is not supported for training")
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()), lr=self.schedule.rate_at(1), betas=(0.9, 0.999), eps=1e-8,
            weight_decay=config.weight_decay,
        )
        self.autocast_dtype = self._autocast_dtype()
        use_scaler = self.autocast_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler) if use_scaler else None
        self._perms: dict[int, Any] = {}
        self._token_cache: dict[tuple[str, str], tuple[tuple[int, ...], tuple[float, ...]]] = {}

    # -- the splice: new rows come from self.params ------------------------------------------

    def _make_hook(self, key: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> Any:
            if not self._splice:
                return output
            import torch

            ids = args[0]
            first = self.first_id[key]
            param = self.params[key]
            mask = (ids >= first) & (ids < first + param.shape[0])
            if not bool(mask.any()):
                return output
            rows = param.to(output.dtype)[(ids - first).clamp(0, param.shape[0] - 1)]
            return torch.where(mask.unsqueeze(-1), rows, output)

        return hook

    def close(self) -> None:
        """Remove the hooks and leave the current vectors in the pipeline's rows."""
        self.sync_rows()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def sync_rows(self, vectors: dict[str, Any] | None = None) -> None:
        """Write ``vectors`` (default: the trained ones) into the text encoders' rows, for inference."""
        import torch

        with torch.no_grad():
            for key, _, enc in self.encoders:
                src = (vectors or self.params)[key]
                w = enc.get_input_embeddings().weight
                first = self.first_id[key]
                w[first : first + src.shape[0]] = src.detach().to(w.device, w.dtype)

    def _autocast_dtype(self) -> Any:
        import torch

        mp = self.cfg.mixed_precision
        if self.device.type != "cuda" or mp == "no":
            return None
        if mp == "fp16":
            return torch.float16
        if mp == "bf16":
            return torch.bfloat16
        if self.pipe.unet.dtype in (torch.float16, torch.bfloat16):
            return self.pipe.unet.dtype
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    # -- randomness ------------------------------------------------------------------------

    def _order(self, epoch: int) -> Any:
        import torch

        if epoch not in self._perms:
            g = torch.Generator().manual_seed(_seed_for(self.cfg.seed, 1, epoch))
            self._perms = {epoch: torch.randperm(len(self.items), generator=g)}
        return self._perms[epoch]

    def batch_indices(self, step: int, micro: int) -> list[int]:
        """Dataset indices of micro-batch ``micro`` of 1-based ``step`` (epochs in a seeded order)."""
        n, b = len(self.items), self.cfg.batch_size
        start = ((step - 1) * self.cfg.gradient_accumulation + micro) * b
        return [int(self._order(j // n)[j % n]) for j in range(start, start + b)]

    def draw(self, gen: Any, indices: Sequence[int]) -> dict[str, Any]:
        """The random inputs of one micro-batch, all from ``gen`` (on the CPU, so every device agrees)."""
        import torch

        b = len(indices)
        shape = (b, *self.latents.mean.shape[2:])
        return {
            "index": torch.tensor(list(indices)),
            "flip": (torch.rand(b, generator=gen) < self.cfg.flip_p).long(),
            "template": torch.randint(len(self.templates), (b,), generator=gen),
            "eps": torch.randn(shape, generator=gen),
            "noise": torch.randn(shape, generator=gen),
            "timesteps": torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=gen),
        }

    # -- the loss --------------------------------------------------------------------------

    def prompts(self, batch: dict[str, Any]) -> list[str]:
        return [
            fill_template(self.templates[int(t)], self.token, self.items[int(i)].caption, self.cfg.n_vectors)
            for i, t in zip(batch["index"], batch["template"])
        ]

    def _chunks(self, key: str, tokenizer: Any, texts: Sequence[str]) -> tuple[Any, Any]:
        """Token ids and A1111 weights [B, 77] of each prompt's first chunk (memoised: prompts repeat)."""
        import torch

        from likeness.prompts import tokenize_prompt

        rows = []
        for text in texts:
            hit = self._token_cache.get((key, text))
            if hit is None:
                chunk = tokenize_prompt(tokenizer, text).chunks[0]
                hit = self._token_cache[(key, text)] = (chunk.ids, chunk.weights)
            rows.append(hit)
        return (torch.tensor([r[0] for r in rows], dtype=torch.long),
                torch.tensor([r[1] for r in rows], dtype=torch.float32))

    def loss(self, batch: dict[str, Any]) -> Any:
        """MSE of the UNet's prediction (epsilon / v / sample, as the scheduler says) for one micro-batch."""
        import contextlib

        import torch
        import torch.nn.functional as F

        from likeness.prompts import encode_chunk_batch

        dev = self.device
        index, flip = batch["index"].to(dev), batch["flip"].to(dev)
        latents = self.latents.sample(index, flip, batch["eps"])
        noise, t = batch["noise"].to(dev), batch["timesteps"].to(dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        texts = self.prompts(batch)
        amp = (
            torch.autocast(device_type="cuda", dtype=self.autocast_dtype)
            if self.autocast_dtype is not None else contextlib.nullcontext()
        )
        self._splice = True
        try:
            with amp:
                hiddens, pooled = [], None
                for key, tok, enc in self.encoders:
                    ids, weights = self._chunks(key, tok, texts)
                    h, p = encode_chunk_batch(enc, ids, weights, layer=_hidden_layer(self.sdxl), grad=True)  # type: ignore[arg-type]
                    hiddens.append(h)
                    pooled = p
                cond = torch.cat(hiddens, dim=-1)
                extra = {}
                if self.sdxl:
                    tids = self.latents.time_ids[index, flip]
                    extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": tids}
                unet_dtype = self.pipe.unet.dtype
                pred = self.pipe.unet(noisy.to(unet_dtype), t, cond.to(unet_dtype), **extra).sample
        finally:
            self._splice = False
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = latents
        return F.mse_loss(pred.float(), target.float(), reduction="mean")

    def train_step(self, step: int, batches: Sequence[dict[str, Any]] | None = None) -> tuple[float, float]:
        """One optimizer update (1-based ``step``); returns (loss, learning rate).

        ``batches`` (one per accumulation micro-batch, from :meth:`draw`) replaces the
        step's own random draw: tests and benchmarks use it to train on a fixed batch.
        """
        import torch

        gen = torch.Generator().manual_seed(_seed_for(self.cfg.seed, 2, step))
        lr = self.schedule.rate_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        accum = self.cfg.gradient_accumulation
        for micro in range(accum):
            batch = batches[micro] if batches is not None else self.draw(gen, self.batch_indices(step, micro))
            loss = self.loss(batch) / accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += float(loss.detach())
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return total, lr

    def fixed_batch(self, seed: int = 1234, indices: Sequence[int] | None = None) -> dict[str, Any]:
        """A reproducible micro-batch (images ``indices``, default all) drawn from ``seed``."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        return self.draw(gen, list(indices) if indices is not None else list(range(len(self.items))))

    def fixed_loss(self, seed: int = 1234, indices: Sequence[int] | None = None) -> float:
        """Loss on a fixed batch with fixed noise and timesteps (no update): a before/after yardstick."""
        import torch

        with torch.no_grad():
            return float(self.loss(self.fixed_batch(seed, indices)))

    # -- state -----------------------------------------------------------------------------

    def vectors(self) -> dict[str, Any]:
        return {k: p.detach().to("cpu", copy=True).float() for k, p in self.params.items()}

    def embedding(self, step: int, vectors: dict[str, Any] | None = None) -> "TrainedEmbedding":
        from likeness.embeddings import TrainedEmbedding

        return TrainedEmbedding(
            token=self.token, family=self.family, vectors=vectors or self.vectors(), step=step,  # type: ignore[arg-type]
            base_model=self.base_model,
        )

    def state_dict(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "vectors": self.vectors(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        with torch.no_grad():
            for key, p in self.params.items():
                p.copy_(state["vectors"][key].to(p.device, p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to continue this run exactly."""
        c = self.cfg
        return {
            "token": self.token, "family": self.family, "n_vectors": c.n_vectors, "seed": c.seed,
            "batch_size": c.batch_size, "gradient_accumulation": c.gradient_accumulation,
            "resolution": self.resolution, "flip_p": c.flip_p, "learning_rate": self.schedule.text,
            "weight_decay": c.weight_decay, "init_word": c.init_word or self.spec.class_word,
            "templates": hashlib.sha256("\n".join(self.templates).encode()).hexdigest()[:16],
            "dataset": dataset_fingerprint(self.items),
        }


# ------------------------------------------------------------------ the stage


def load_training_pipeline(profile: "Profile") -> Any:
    """The profile's pipeline on its device and dtype (via the diffusion backend)."""
    from likeness.backends.diffusion import load_pipeline

    return load_pipeline(profile)


def train_embedding(
    dataset_dir: str | Path,
    spec: "CharacterSpec",
    out_dir: str | Path,
    config: TrainConfig = TrainConfig(),
    *,
    pipe: Pipeline | None = None,
    profile: "Profile | None" = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    validator: Validator | None = None,
) -> TrainResult:
    """Train ``spec.token`` on ``dataset_dir``; checkpoints, scores and the best step under ``out_dir``.

    ``pipe`` (a diffusers SD 1.x / SDXL pipeline) is used as given and gets the
    token rows added (left holding the best vectors); without it the profile's
    pipeline is loaded. ``validator`` overrides the scoring at each checkpoint
    (default: :func:`likeness.train.checkpoint_scoring.make_validator` with the profile's face
    pack and CLIP model; ``config.validation.enabled = False`` skips it).
    Resumes from the latest checkpoint in ``out_dir``. ``cancel`` stops after
    the current step, saving a checkpoint first.
    """
    schedule = check_train_config(config)
    out = Path(out_dir)
    items = read_dataset(dataset_dir)
    templates = load_templates(config.templates or None)
    if pipe is None:
        if profile is None:
            raise InvalidInput("train_embedding needs a pipeline or a profile to load one from")
        pipe = load_training_pipeline(profile)
    base_model = Path(profile.base_model).name if profile is not None else str(getattr(getattr(pipe, "config", None), "_name_or_path", ""))
    trainer = Trainer(pipe, spec, items, config, templates, base_model=base_model)
    try:
        return _run(trainer, out, config, schedule, profile, progress, cancel, validator)
    finally:
        trainer.close()


def _run(
    trainer: Trainer, out: Path, config: TrainConfig, schedule: LearnRateSchedule, profile: "Profile | None",
    progress: ProgressFn | None, cancel: CancelToken | None, validator: Validator | None,
) -> TrainResult:
    last = schedule.stop_step(config.steps)
    existing = [s for s in list_checkpoints(out) if s <= last]
    start = 0
    if existing:
        state, meta = load_checkpoint_state(out, existing[-1])
        check_fingerprint(meta.get("fingerprint", {}), trainer.fingerprint(), out)
        trainer.load_state_dict(state)
        start = existing[-1]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "train_config.json", {"config": to_dict(config), "fingerprint": trainer.fingerprint(),
                                                   "schedule": schedule.describe(config.steps), "last_step": last})
    if validator is None and config.validation.enabled:
        if profile is None:
            raise InvalidInput("validation needs a profile (face pack and CLIP model); pass profile=, a validator, "
                               "or set validation.enabled = false")
        from likeness.train.checkpoint_scoring import make_validator

        validator = make_validator(trainer.spec, config.validation, profile, [i.path for i in trainer.items],
                                   size=trainer.resolution, image_dir=out / "validation")
    scores = {s.step: s for s in read_scores(out) if s.step in set(existing)}
    saved = list(existing)
    losses: list[float] = []
    report(progress, "train", start, last, "resumed" if start else "")

    def checkpoint(step: int, validate: bool) -> None:
        mean_loss = sum(losses) / len(losses) if losses else None
        save_checkpoint(out, trainer, step, {"loss": mean_loss, "lr": schedule.rate_at(max(step, 1)), "time": time.time()})
        saved.append(step)
        if validate and validator is not None:
            trainer.sync_rows()
            s = validator(step, trainer.pipe, trainer.embedding(step))
            scores[step] = dataclasses.replace(s, loss=mean_loss)
            write_scores(out, scores, config)
        losses.clear()

    step = start
    while step < last:
        if cancel is not None and cancel.cancelled:
            if step > (saved[-1] if saved else 0):
                checkpoint(step, validate=False)
            cancel.check()
        step += 1
        loss, lr = trainer.train_step(step)
        losses.append(loss)
        report(progress, "train", step, last, loss=loss, lr=lr)
        if step % config.checkpoint_every == 0 or step == last:
            checkpoint(step, validate=True)

    # Checkpoints saved on a cancel (or by an older run) still need scores.
    if validator is not None:
        for s in sorted(set(saved)):
            if s not in scores:
                trainer.sync_rows(load_checkpoint_embedding(out, s, trainer.token).vectors)
                scored = validator(s, trainer.pipe, load_checkpoint_embedding(out, s, trainer.token))
                # The loss of those steps was recorded with the checkpoint (a kill during validation
                # must not turn it into null): read it back from its meta.json.
                scores[s] = dataclasses.replace(scored, loss=checkpoint_loss(out, s))
        write_scores(out, scores, config)
    steps = sorted(set(saved))
    if validator is not None:
        choice = choose_best([scores[s] for s in steps], config.validation.clip_t_tolerance)
        best_step, reason = choice.step, choice.reason
    else:
        best_step, reason = steps[-1], "validation disabled: the last checkpoint"
    best = load_checkpoint_embedding(out, best_step, trainer.token)
    best_scores = scores.get(best_step)
    atomic_write_json(out / BEST_FILE, {
        "step": best_step, "reason": reason,
        "checkpoint": f"{CHECKPOINTS}/step-{best_step}",
        "embedding": f"{CHECKPOINTS}/step-{best_step}/{trainer.token}.safetensors",
        "scores": best_scores.to_dict() if best_scores else None,
    })
    with_vectors = {k: v.clone() for k, v in best.vectors.items()}
    import torch

    with torch.no_grad():
        for key, p in trainer.params.items():
            p.copy_(with_vectors[key].to(p.device, p.dtype))
    return TrainResult(
        best=best, best_step=best_step, best_reason=reason, last_step=steps[-1], resumed_from=start,
        checkpoints=tuple(steps), scores=tuple(scores[s] for s in steps if s in scores), out_dir=out,
    )
