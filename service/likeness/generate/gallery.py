"""Stage 1: generate the zoom x angle x per-cell gallery of one character.

Layout of the gallery folder (``out_dir``)::

    plan.json           base seed + every planned image (written once, reused on resume)
    images/<id>.png     PNGs with A1111's ``parameters`` text (PNG Info reads them)
    manifest.jsonl      one row per finished image (likeness.generate.manifest)
    contact_sheet.png   zoom columns x angle rows, the first image of each cell

Resumable: the plan fixes every prompt and seed up front; a re-run renders
only the images that have no manifest row and file yet, with their planned
seeds. Files are written under a temporary name and renamed, rows appended
after the batch's files exist, so an interruption never leaves a half file or
a row without an image. Changing the spec so that the plan would differ is
refused (use a new folder), never silently mixed.

The pipeline is loaded once (:func:`likeness.backends.diffusion.load_pipeline`)
and reused; :func:`render_images` turns planned images into PNG bytes with a
loaded pipeline, which is what a Ray worker runs per shard
(:class:`GalleryWorkerFactory`). Prompts go through
:func:`likeness.prompts.encode_prompts` (A1111 attention weights and 75-token
chunks). torch is imported lazily: this module stays light.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from likeness.backends.protocols import Pipeline
from likeness.config import to_dict
from likeness.errors import InvalidInput
from likeness.files import atomic_write_bytes, atomic_write_json, ensure_dir, folder_lock, read_json
from likeness.generate.plan import PlannedImage, plan_gallery
from likeness.generate.manifest import GalleryImage, append_rows, manifest_path, read_manifest
from likeness.profiles import Profile, resolve_profile
from likeness.progress import CancelToken, ProgressFn, report
from likeness.spec import CharacterSpec, SamplingConfig

log = logging.getLogger(__name__)

PLAN_NAME = "plan.json"
IMAGES_DIR = "images"
CONTACT_SHEET_NAME = "contact_sheet.png"
PLAN_VERSION = 1


@dataclass(frozen=True)
class GenerateResult:
    gallery_dir: str
    manifest: str
    plan: str
    # Redrawn at the end of every run that has images; "" when the gallery is empty.
    contact_sheet: str
    # Images in the plan; images made by this call; images that were already there.
    planned: int
    generated: int
    already_done: int
    # Seconds spent rendering (pipeline loading excluded) and the resulting throughput.
    seconds: float
    images_per_second: float
    load_seconds: float
    base_seed: int
    profile: str
    model: str
    device: str
    batch_size: int


@dataclass(frozen=True)
class RenderedImage:
    id: str
    # Encoded PNG with the A1111 parameters chunk (bytes, so it crosses process boundaries).
    png: bytes
    # This image's share of its batch's wall time.
    seconds: float
    width: int
    height: int
    # --- PNG overlap (issue 14): an image rendered with ``encode_png=False`` has ``png == b""``
    # and keeps the decoded image and its infotext here, for GalleryWriter to encode on its
    # threads while the next batch denoises (in-process workers only; never pickled).
    image: Any = None
    infotext: str = ""


# ---------------------------------------------------------------- plan


def _plan_settings(spec: CharacterSpec, profile: str, model: str) -> dict[str, Any]:
    s = spec.sampling
    return {
        "profile": profile,
        "model": model,
        "sampler": s.sampler,
        "steps": s.steps,
        "cfg_scale": s.cfg_scale,
        "width": s.width,
        "height": s.height,
        # Face restoration (likeness.backends.restore) changes every image: a resume must not mix
        # restored and plain ones. None when off, so plans written before the option still match.
        "restore_faces": ({"model": s.restore_faces, "visibility": s.restore_visibility,
                           "codeformer_weight": s.codeformer_weight} if s.restore_faces else None),
        # The noise source and Pad conds change every image too; None at their defaults (CPU, off),
        # so plans written before these options still match.
        "rng": s.rng if s.rng != "CPU" else None,
        "pad_conds": True if s.pad_conds else None,
    }


def _first_difference(saved: list[dict[str, Any]], planned: list[PlannedImage]) -> str:
    if len(saved) != len(planned):
        return f"{len(saved)} planned images before, {len(planned)} now (zooms, angles or per_cell changed)"
    for old, new in zip(saved, planned):
        new_d = dataclasses.asdict(new)
        for key in ("id", "zoom", "angle", "prompt", "negative_prompt", "seed"):
            if old.get(key) != new_d[key]:
                return f"image {old.get('id')}: {key} was {old.get(key)!r}, now {new_d[key]!r}"
    return ""


def load_or_create_plan(
    spec: CharacterSpec, gallery_dir: str | os.PathLike[str], profile: str, model: str
) -> tuple[int, list[PlannedImage]]:
    """The gallery's plan: saved at the first run, checked against ``spec`` on every later one.

    Returns ``(base_seed, planned images)``. A spec whose plan differs from the
    saved one (other prompts, seeds, grid, sampler, size or model) raises
    :class:`InvalidInput` saying what changed and how to proceed; so does a
    folder holding manifest rows but no plan (an imported gallery).
    """
    path = Path(gallery_dir) / PLAN_NAME
    settings = _plan_settings(spec, profile, model)
    if path.is_file():
        try:
            saved = read_json(path)
            base_seed = int(saved["base_seed"])
            saved_images = list(saved["images"])
            saved_settings = dict(saved["settings"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(f"{path} is unreadable ({exc}); delete it to plan the gallery again") from exc
        seed = base_seed if spec.sampling.seed < 0 else spec.sampling.seed
        plan = plan_gallery(spec, seed)
        why = ""
        for key, value in settings.items():
            if saved_settings.get(key) != value:
                why = f"{key} was {saved_settings.get(key)!r}, now {value!r}"
                break
        why = why or _first_difference(saved_images, plan)
        if why:
            raise InvalidInput(
                f"{Path(gallery_dir)} holds a gallery planned with other settings ({why}); resuming would mix "
                "two galleries. Use a new --out folder, restore the original spec/options, or delete "
                f"{path.name}, images/ and manifest.jsonl there to start over"
            )
        return base_seed, plan
    if read_manifest(gallery_dir):
        # Imported rows use the same ids (z0-a0-0000) as planned images: they would pass for done.
        raise InvalidInput(
            f"{Path(gallery_dir)} already holds a gallery without a plan (an imported one, see import.json); "
            "generating into it would mix the two. Use a new --out folder"
        )
    plan = plan_gallery(spec)
    base_seed = plan[0].seed if plan else 0
    atomic_write_json(
        path,
        {
            "version": PLAN_VERSION,
            "base_seed": base_seed,
            "settings": settings,
            "spec": spec.to_dict(),
            "images": [dataclasses.asdict(p) for p in plan],
        },
    )
    return base_seed, plan


def effective_spec(
    spec: CharacterSpec,
    *,
    per_cell: int | None = None,
    zooms: Sequence[str] | None = None,
    angles: Sequence[str] | None = None,
) -> CharacterSpec:
    """``spec`` with the command-line overrides applied and validated."""
    changes: dict[str, Any] = {}
    if per_cell is not None:
        changes["per_cell"] = per_cell
    if zooms:
        changes["zooms"] = list(zooms)
    if angles:
        changes["angles"] = list(angles)
    return spec.with_overrides(**changes) if changes else spec


# ---------------------------------------------------------------- rendering


class PromptCache:
    """Encoded prompts per distinct (prompt, negative prompt) pair, for one loaded pipeline.

    A gallery has one prompt per cell (25) but hundreds of images: each pair is
    tokenized and encoded once by :func:`likeness.prompts.encode_prompts` and
    reused by every batch. Batches only mix pairs of equal 75-token chunk
    count (encode_prompts pads a call to its longest prompt), so a cached
    encoding is exactly what a batched call would give, and an image's
    conditioning never depends on its batch-mates. The cache empties itself
    when the pipeline or its vocabulary (a textual-inversion token) changes.
    """

    def __init__(self) -> None:
        self._key: tuple[int, int, int] | None = None
        self._counts: dict[tuple[str, bool, int | None], int] = {}
        self._embeds: dict[tuple[str, str, int | None, bool], Any] = {}

    def _sync(self, pipe: Pipeline, clip_skip: int) -> None:
        tok = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
        key = (id(pipe), len(tok) if tok is not None else 0, clip_skip)
        if key != self._key:
            self._key, self._counts, self._embeds = key, {}, {}

    def chunk_count(self, pipe: Pipeline, item: PlannedImage, clip_skip: int = 1, steps: int | None = None,
                    pad_conds: bool = False) -> tuple[int, int]:
        """75-token chunks of the item's (prompt, negative prompt), over every scheduled step.

        Both are the larger with ``pad_conds``; batches share one value, so an image's
        conditioning never depends on its batch-mates.
        """
        from likeness.prompts import scheduled_texts, tokenize_prompt

        self._sync(pipe, clip_skip)
        tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]
        for text, negative in ((item.prompt, False), (item.negative_prompt, True)):
            key = (text, negative, steps)
            if key not in self._counts:
                texts = scheduled_texts(text, steps, negative=negative) if steps else [text]
                self._counts[key] = max(len(tokenize_prompt(t, x).chunks) for t in tokenizers for x in texts)
        pos, neg = self._counts[(item.prompt, False, steps)], self._counts[(item.negative_prompt, True, steps)]
        return (max(pos, neg), max(pos, neg)) if pad_conds else (pos, neg)

    def encode(self, pipe: Pipeline, batch: Sequence[PlannedImage], clip_skip: int = 1, steps: int | None = None,
               pad_conds: bool = False) -> Any:
        """encode_prompts' conditioning for ``batch`` (items of equal chunk count), from the cache where possible.

        ``steps`` is A1111's total steps (:func:`likeness.backends.diffusion.schedule_steps`): prompt
        editing and alternation switch at the model call A1111 switches them.
        """
        from likeness.prompts import Conditioning, encode_prompts

        self._sync(pipe, clip_skip)
        pairs = [(b.prompt, b.negative_prompt, steps, pad_conds) for b in batch]
        missing = list(dict.fromkeys(p for p in pairs if p not in self._embeds))
        if missing:
            fresh = encode_prompts(pipe, [p[0] for p in missing], [p[1] for p in missing], clip_skip=clip_skip,
                                   steps=steps, pad_conds=pad_conds)
            for i, pair in enumerate(missing):
                self._embeds[pair] = fresh.select(i)
        return Conditioning.concat([self._embeds[p] for p in pairs])


def used_ti_hashes(item: PlannedImage, ti_hashes: Mapping[str, str] | None) -> dict[str, str]:
    """The ``{token: short hash}`` entries whose token the item's prompt or negative prompt uses.

    A1111 lists only the embeddings a prompt used. The tokenizer splits an added token out of any
    text that contains it (case-insensitive, as CLIP lowercases), so containment is the test.
    """
    text = f"{item.prompt}\n{item.negative_prompt}".lower()
    return {tok: h for tok, h in (ti_hashes or {}).items() if tok and tok.lower() in text}


def infotext_for(item: PlannedImage, sampling: SamplingConfig, model: str, model_hash: str = "",
                 ti_hashes: Mapping[str, str] | None = None) -> str:
    """The A1111 parameters text of one planned image.

    ``ti_hashes`` maps the trigger word of each loaded embedding to A1111's short hash of the file
    it came from (:func:`likeness.generate.infotext.ti_hash`); those the prompt uses are written
    as ``TI hashes``. ``RNG: CPU`` / ``RNG: NV`` say where the noise came from
    (``sampling.rng``, :func:`likeness.backends.diffusion.draw_latents`); like A1111, no field is
    written for its GPU default.
    """
    from likeness.generate.infotext import InfoText, format_infotext, format_ti_hashes

    extra: dict[str, str] = {}
    if sampling.pad_conds:
        extra["Pad conds"] = "True"  # A1111 writes the option only when it is on
    if sampling.rng != "GPU":
        extra["RNG"] = sampling.rng  # A1111 writes RNG only for a source other than its GPU default
    used = used_ti_hashes(item, ti_hashes)
    if used:
        extra["TI hashes"] = format_ti_hashes(used)
    # --- face restoration: "Face restoration: <model>" as A1111 writes it (+ non-default Extras keys)
    from likeness.backends.restore import infotext_fields, settings_from_sampling

    restore = settings_from_sampling(sampling)
    extra.update(infotext_fields(restore))
    # --- end of face restoration
    return format_infotext(
        InfoText(
            prompt=item.prompt,
            negative_prompt=item.negative_prompt,
            steps=sampling.steps,
            sampler=sampling.sampler,
            cfg_scale=sampling.cfg_scale,
            seed=item.seed,
            width=sampling.width,
            height=sampling.height,
            model=model,
            model_hash=model_hash,
            extra=extra,
            face_restoration=restore.model if restore else "",
        )
    )


def render_images(
    pipe: Pipeline,
    items: Sequence[PlannedImage],
    sampling: SamplingConfig,
    *,
    model: str = "",
    model_hash: str = "",
    batch_size: int = 0,
    clip_skip: int = 1,
    cache: PromptCache | None = None,
    cancel: CancelToken | None = None,
    ti_hashes: Mapping[str, str] | None = None,
    encode_png: bool = True,
    encode_threads: int = 0,
) -> list[RenderedImage]:
    """Render planned images with a loaded pipeline; PNG bytes carry A1111 infotext.

    Items are denoised in batches of ``batch_size`` (0 = all at once) of equal
    prompt-chunk count, one seeded generator per image, prompts encoded by
    :func:`likeness.prompts.encode_prompts` once per distinct pair (``cache``,
    kept across calls by :class:`GalleryWorker`). Order of the result = order of ``items``.
    PNGs are encoded after denoising on ``encode_threads`` threads (0: :func:`encode_threads`);
    ``encode_png=False`` leaves that to the caller (:class:`GalleryWriter`): ``png`` is ``b""``
    and ``image``/``infotext`` are set.
    """
    from likeness.backends.diffusion import denoise, schedule_steps

    cache = cache if cache is not None else PromptCache()
    # --- face restoration (A1111's "Restore faces"): loaded before the first batch, so missing weights
    # fail before any denoising; applied to each batch's images before they are encoded and saved.
    from likeness.backends.restore import restore_generated

    if sampling.restore_faces:
        restore_generated(pipe, [], sampling)
    # --- end of face restoration
    steps = schedule_steps(sampling)
    groups: dict[tuple[int, int], list[PlannedImage]] = {}
    for item in items:
        groups.setdefault(cache.chunk_count(pipe, item, clip_skip, steps, sampling.pad_conds), []).append(item)
    size = batch_size or max(1, len(items))
    out: dict[str, RenderedImage] = {}
    for group in groups.values():
        for start in range(0, len(group), size):
            batch = group[start : start + size]
            t0 = time.perf_counter()
            embeds = cache.encode(pipe, batch, clip_skip, steps, sampling.pad_conds)
            images = denoise(pipe, embeds, [b.seed for b in batch], sampling, cancel=cancel)
            images = restore_generated(pipe, images, sampling)  # face restoration; unchanged when off
            share = (time.perf_counter() - t0) / len(batch)  # --- PNG overlap: encoded below, not here
            for b, img in zip(batch, images):
                out[b.id] = RenderedImage(b.id, b"", share, img.width, img.height, image=img,
                                          infotext=infotext_for(b, sampling, model, model_hash, ti_hashes))
    rendered = [out[item.id] for item in items]
    return encode_rendered(rendered, encode_threads) if encode_png else rendered


# ---------------------------------------------------------------- PNG encoding and writing (issue 14)


def encode_threads() -> int:
    """Threads for PNG encoding: the CPUs torch may use here (a Ray actor's ``num_cpus``), at most 8.

    Pillow releases the GIL while it compresses, so threads encode in parallel; more than 8
    gains nothing for a batch of at most a few dozen images.
    """
    import torch

    return max(1, min(8, torch.get_num_threads()))


def _encoded(r: RenderedImage) -> RenderedImage:
    from likeness.generate.infotext import png_bytes

    if r.png or r.image is None:
        return r
    return dataclasses.replace(r, png=png_bytes(r.image, r.infotext), image=None)


def encode_rendered(rendered: Sequence[RenderedImage], threads: int = 0) -> list[RenderedImage]:
    """``rendered`` with every PNG encoded (and the decoded images dropped), on up to ``threads`` threads."""
    todo = [r for r in rendered if not r.png]
    n = min(len(todo), threads or encode_threads())
    if n <= 1:
        return [_encoded(r) for r in rendered]
    with ThreadPoolExecutor(n, thread_name_prefix="likeness-png") as pool:
        return list(pool.map(_encoded, rendered))


class GalleryWriter:
    """Encodes and writes each finished batch's PNGs on a few threads while the next batch denoises.

    ``put(tag, rendered)`` hands a batch over and returns at once unless ``max_batches``
    batches are already waiting (then it waits for the oldest: memory stays a few batches).
    ``on_written(tag, rendered)`` runs in the caller's thread, in ``put`` order, once every
    file of that batch is on disk -- so the manifest rows it appends name whole files only.
    Each file is written under a temporary name and renamed: a kill at any moment leaves
    whole files, and rows only for files that exist; a rendered batch not yet written is
    rendered again on resume (the same seeds, the same pixels). A failed write is raised
    by the next ``put`` or by ``close``.
    """

    def __init__(self, images_dir: Path, on_written: Callable[[Any, list[RenderedImage]], None],
                 threads: int = 0, max_batches: int = 2) -> None:
        self.images_dir = images_dir
        self.on_written = on_written
        # Beside denoising, which keeps torch's threads busy: half the CPUs, 1 to 4.
        self.threads = threads or max(1, min(4, (os.cpu_count() or 2) // 2))
        self.max_batches = max(1, max_batches)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="likeness-png-writer")
        self._pending: deque[tuple[Any, list[RenderedImage], list[Future]]] = deque()

    def _write(self, r: RenderedImage) -> None:
        atomic_write_bytes(self.images_dir / f"{r.id}.png", _encoded(r).png)

    def put(self, tag: Any, rendered: Sequence[RenderedImage]) -> None:
        """Queue one batch for encoding and writing; report the batches already finished."""
        batch = list(rendered)
        self._pending.append((tag, batch, [self._pool.submit(self._write, r) for r in batch]))
        while self._pending and (len(self._pending) > self.max_batches or all(f.done() for f in self._pending[0][2])):
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        tag, batch, futures = self._pending.popleft()
        for f in futures:
            f.result()  # a failed write (disk full) surfaces here; its batch gets no rows
        self.on_written(tag, batch)

    def close(self) -> None:
        """Write and report every queued batch, then stop the threads (raises a failed write)."""
        try:
            while self._pending:
                self._finish_oldest()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "GalleryWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # Cancelled or failed while rendering: the batches already rendered are still written
        # (finished work is kept); an error while doing so must not hide the first one.
        try:
            self.close()
        except Exception:  # noqa: BLE001 - logged; the original error propagates
            log.exception("writing the rendered batches after an interruption failed")


class GalleryWorker:
    """Renders shards (lists of PlannedImage) with one loaded pipeline (an executor worker)."""

    def __init__(
        self, pipe: Pipeline, sampling: SamplingConfig, model: str, model_hash: str = "", cancel: CancelToken | None = None,
        ti_hashes: Mapping[str, str] | None = None,
    ) -> None:
        self.pipe, self.sampling, self.model, self.model_hash = pipe, sampling, model, model_hash
        self.ti_hashes = dict(ti_hashes or {})
        # In-process workers stop mid-batch on cancel; Ray workers stop between shards.
        self.cancel = cancel
        self.cache = PromptCache()
        # --- PNG overlap: False for the in-process worker of generate_gallery, whose GalleryWriter
        # encodes while the next batch denoises; True where results cross processes (Ray).
        self.encode_png = True

    def run(self, shard: Sequence[PlannedImage]) -> list[RenderedImage]:
        return render_images(self.pipe, shard, self.sampling, model=self.model, model_hash=self.model_hash,
                             cache=self.cache, cancel=self.cancel, ti_hashes=self.ti_hashes,
                             encode_png=self.encode_png)


@dataclass(frozen=True)
class GalleryWorkerFactory:
    """Picklable factory for :mod:`likeness.executor`: loads the pipeline once per worker."""

    profile: Profile
    sampling: SamplingConfig
    compile_unet: bool = False
    # A TrainedEmbedding (its tensors travel with the factory) for galleries drawn with the
    # character's token, e.g. refinement rounds; None for the first gallery.
    embedding: Any = None
    # {token: A1111 short hash of the embedding's file} for the infotext's "TI hashes".
    ti_hashes: Mapping[str, str] | None = None
    # --- device (issue 14): the worker's device for load_pipeline ("cuda:1", "cpu"); None = the
    # profile's rule on the current device, which is the actor's own GPU under Ray.
    device: str | None = None

    def __call__(self) -> GalleryWorker:
        from likeness.backends.diffusion import load_pipeline, model_hash, model_name

        pipe = load_pipeline(self.profile, compile_unet=self.compile_unet, sampler=self.sampling.sampler,
                             device=self.device)
        if self.embedding is not None:
            from likeness.embeddings import load_into_pipeline

            load_into_pipeline(pipe, self.embedding)
        return GalleryWorker(pipe, self.sampling, model_name(self.profile), model_hash(self.profile),
                             ti_hashes=self.ti_hashes)


# ---------------------------------------------------------------- the stage


def _clean_temporaries(images_dir: Path) -> None:
    # Leftovers of a kill during an atomic write: hidden ".<stem>.*.tmp.png" siblings.
    if images_dir.is_dir():
        for p in images_dir.glob(".*.tmp*"):
            try:
                p.unlink()
            except OSError:
                pass


def _row(item: PlannedImage, r: RenderedImage, sampling: SamplingConfig, model: str) -> GalleryImage:
    return GalleryImage(
        id=item.id,
        file=f"{IMAGES_DIR}/{item.id}.png",
        zoom=item.zoom,
        angle=item.angle,
        zoom_index=item.zoom_index,
        angle_index=item.angle_index,
        index_in_cell=item.index_in_cell,
        seed=item.seed,
        prompt=item.prompt,
        negative_prompt=item.negative_prompt,
        width=r.width,
        height=r.height,
        steps=sampling.steps,
        sampler=sampling.sampler,
        cfg_scale=sampling.cfg_scale,
        model=model,
        seconds=round(r.seconds, 4),
        source="generated",
    )


def generate_gallery(
    spec: CharacterSpec,
    out_dir: str | os.PathLike[str],
    profile: Profile | str | None = None,
    *,
    per_cell: int | None = None,
    zooms: Sequence[str] | None = None,
    angles: Sequence[str] | None = None,
    batch_size: int | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    pipe: Pipeline | None = None,
    executor: Any = None,
    compile_unet: bool = False,
    embedding: Any = None,
    ti_hashes: Mapping[str, str] | None = None,
    device: str | None = None,
) -> GenerateResult:
    """Generate (or finish) the gallery of ``spec`` in ``out_dir``; see the module docstring.

    ``pipe`` reuses an already loaded pipeline of ``profile``; ``executor``
    (from :func:`likeness.executor.make_executor`) spreads batches over workers
    that each load their own. ``batch_size`` overrides the spec's (0/None =
    chosen from free memory). ``cancel`` is checked between batches: finished
    batches are kept and :class:`likeness.errors.Cancelled` is raised.
    ``embedding`` (a :class:`likeness.embeddings.TrainedEmbedding`) is loaded
    into the pipeline (every worker's, with an executor) so prompts can use
    the character's token; ``ti_hashes`` (``{token: ti_hash(file)}`` of the file it was read
    from) puts A1111's ``TI hashes`` in the infotext of images whose prompt uses it.
    ``device`` ("cuda:1", "cpu"; None = the profile's rule) is where a pipeline this call loads
    itself goes (not ``pipe``'s, nor an executor's workers', which use their own).
    """
    if batch_size is not None and not 0 <= batch_size <= 256:
        # A negative size made range() empty: the run "succeeded" without drawing anything.
        raise InvalidInput(f"batch size {batch_size} must be 0 (chosen from free memory) to 256; e.g. --batch-size 4")
    ensure_dir(out_dir, "gallery folder")
    with folder_lock(out_dir, "generation"):
        return _generate_locked(
            spec, out_dir, profile, per_cell=per_cell, zooms=zooms, angles=angles, batch_size=batch_size,
            progress=progress, cancel=cancel, pipe=pipe, executor=executor, compile_unet=compile_unet,
            embedding=embedding, ti_hashes=ti_hashes, load_device=device,
        )


def _generate_locked(
    spec: CharacterSpec,
    out_dir: str | os.PathLike[str],
    profile: Profile | str | None,
    *,
    per_cell: int | None,
    zooms: Sequence[str] | None,
    angles: Sequence[str] | None,
    batch_size: int | None,
    progress: ProgressFn | None,
    cancel: CancelToken | None,
    pipe: Pipeline,
    executor: Any,
    compile_unet: bool,
    embedding: Any,
    ti_hashes: Mapping[str, str] | None = None,
    load_device: str | None = None,
) -> GenerateResult:
    from likeness.backends.diffusion import auto_batch_size, load_pipeline, model_hash, model_name, pipeline_device
    from likeness.generate.contact_sheet import contact_sheet

    spec = effective_spec(spec, per_cell=per_cell, zooms=zooms, angles=angles)
    prof = resolve_profile(profile, spec.profile, say=log.info)
    if spec.sampling.restore_faces:  # face restoration: missing weights fail before the plan is written
        from likeness.backends.restore import find_weights

        find_weights(spec.sampling.restore_faces)
    gallery = Path(out_dir)
    gallery.mkdir(parents=True, exist_ok=True)
    images_dir = gallery / IMAGES_DIR
    model = model_name(prof)
    base_seed, plan = load_or_create_plan(spec, gallery, prof.name, model)
    _clean_temporaries(images_dir)
    done_ids = {r.id for r in read_manifest(gallery) if (gallery / r.file).is_file()}
    pending = [p for p in plan if p.id not in done_ids]
    already = len(plan) - len(pending)
    sampling = spec.sampling
    report(progress, "generate", already, len(plan), "planned")

    load_seconds, device = 0.0, "n/a"
    size = batch_size or sampling.batch_size
    worker_factory: Any
    if pending and executor is None:
        t0 = time.perf_counter()
        if pipe is None:
            pipe = load_pipeline(prof, compile_unet=compile_unet, sampler=sampling.sampler, device=load_device)
        if embedding is not None:
            from likeness.embeddings import load_into_pipeline

            load_into_pipeline(pipe, embedding)
        load_seconds = time.perf_counter() - t0
        device = str(pipeline_device(pipe))
        size = size or auto_batch_size(pipe, sampling.width, sampling.height, prof.family)
        worker = GalleryWorker(pipe, sampling, model, model_hash(prof), cancel=cancel, ti_hashes=ti_hashes)
        worker.encode_png = False  # --- PNG overlap: the GalleryWriter below encodes
        worker_factory = lambda: worker  # noqa: E731 - the local executor calls it once
    else:
        size = size or 8
        worker_factory = GalleryWorkerFactory(prof, sampling, compile_unet, embedding, ti_hashes)
        device = "executor" if pending else device
    shards = [pending[i : i + size] for i in range(0, len(pending), size)]

    state = {"done": already, "generated": 0}
    t_start = time.perf_counter()

    def on_written(i: int, rendered: list[RenderedImage]) -> None:
        # --- PNG overlap: called by the GalleryWriter once all of shard i's files are on disk.
        by_id = {p.id: p for p in shards[i]}
        append_rows(gallery, [_row(by_id[r.id], r, sampling, model) for r in rendered])
        state["done"] += len(rendered)
        state["generated"] += len(rendered)
        elapsed = time.perf_counter() - t_start
        report(progress, "generate", state["done"], len(plan), f"batch {i + 1}/{len(shards)}",
               images_per_second=state["generated"] / elapsed if elapsed > 0 else 0.0)

    if shards:
        if executor is None:
            from likeness.executor import LocalExecutor

            executor = LocalExecutor()
        images_dir.mkdir(parents=True, exist_ok=True)
        with GalleryWriter(images_dir, on_written) as writer:  # --- PNG overlap
            executor.map_shards(worker_factory, shards, writer.put, cancel)
    seconds = time.perf_counter() - t_start if shards else 0.0

    rows = read_manifest(gallery)
    order = {p.id: i for i, p in enumerate(plan)}
    rows = sorted((r for r in rows if r.id in order), key=lambda r: order[r.id])
    sheet = ""
    if rows:
        sheet = str(contact_sheet(rows, gallery, gallery / CONTACT_SHEET_NAME,
                                  title=f"{spec.name} - {model} - {sampling.sampler}, {sampling.steps} steps, CFG {sampling.cfg_scale:g}"))
    return GenerateResult(
        gallery_dir=str(gallery),
        manifest=str(manifest_path(gallery)),
        plan=str(gallery / PLAN_NAME),
        contact_sheet=sheet,
        planned=len(plan),
        generated=state["generated"],
        already_done=already,
        seconds=round(seconds, 3),
        images_per_second=round(state["generated"] / seconds, 4) if seconds > 0 else 0.0,
        load_seconds=round(load_seconds, 3),
        base_seed=base_seed,
        profile=prof.name,
        model=model,
        device=device,
        batch_size=size,
    )


def result_dict(result: GenerateResult) -> dict[str, Any]:
    """The result as a JSON-ready dict (build summaries)."""
    return to_dict(result)
