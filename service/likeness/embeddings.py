"""Textual-inversion embeddings: the trained vectors and the files other tools load.

Formats (each proven by loading it through diffusers' ``load_textual_inversion``):

- ``a1111-pt``: A1111's ``.pt`` (``string_to_token``/``string_to_param``/``name``/``step``/
  ``sd_checkpoint``/``sd_checkpoint_name``). SD 1.5 only: A1111 has no SDXL ``.pt``.
- ``safetensors``: A1111/ComfyUI ``.safetensors``: ``emb_params`` for SD 1.5, ``clip_l`` +
  ``clip_g`` for SDXL.
- ``diffusers``: diffusers' ``learned_embeds`` layout, ``{token: (n, dim)}`` for SD 1.5; SDXL stores
  ``clip_l`` and ``clip_g`` (the layout diffusers' SDXL docs load once per text encoder).

Every export is named after its token (``<token>.pt``, ``<token>.safetensors``): A1111 and ComfyUI
take the trigger word from the file name, diffusers from the key. A build keeps the diffusers file
in ``embeddings/diffusers/<token>.safetensors`` beside the A1111 one. Imports take the word the
file's own tool would use (see :func:`load_embedding`).
"""

from __future__ import annotations

import io
import os
import re
import struct
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from likeness.backends.protocols import Pipeline
from likeness.errors import InvalidInput, NotFound
from likeness.files import atomic_save, check_name, ensure_dir

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


# --- formats -------------------------------------------------------------------------------------

Format = Literal["a1111-pt", "safetensors", "diffusers"]
FORMATS: tuple[str, ...] = ("a1111-pt", "safetensors", "diffusers")
# The file suffix each format must carry: A1111/ComfyUI pick the loader by suffix.
FORMAT_SUFFIX: dict[str, str] = {"a1111-pt": ".pt", "safetensors": ".safetensors", "diffusers": ".safetensors"}
# A1111 writes 265 (the id of "*" in the SD 1.x CLIP vocabulary) as the placeholder token.
_A1111_PLACEHOLDER_ID = 265
# Known encoder widths, only for saying which model a file belongs to.
_KNOWN_WIDTHS = {
    768: "SD 1.x (CLIP ViT-L, 768 wide)",
    1024: "SD 2.x (OpenCLIP ViT-H, 1024 wide)",
    4096: "T5-XXL (4096 wide: the T5 text encoder of SD3/Flux, not a CLIP text embedding)",
    32: "the tiny test models (32 wide)",
}


def describe_dims(dims: dict[str, int]) -> str:
    """Name the model family a set of encoder widths belongs to, for error messages."""
    if set(dims) == {"clip_l", "clip_g"}:
        if dims == {"clip_l": 768, "clip_g": 1280}:
            return "SDXL (clip_l 768 + clip_g 1280)"
        return f"an SDXL-layout model (clip_l {dims['clip_l']} + clip_g {dims['clip_g']})"
    width = next(iter(dims.values()))
    if width == 1280:
        return "SDXL's second text encoder alone (clip_g, 1280 wide)"
    return _KNOWN_WIDTHS.get(
        width, f"no Stable Diffusion text encoder ({width} wide; SD's CLIP encoders are 768, 1024 or 1280 wide)"
    )


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise InvalidInput(f"embedding format {fmt!r} is not valid; use one of {', '.join(FORMATS)}")


def _metadata(emb: TrainedEmbedding) -> dict[str, str]:
    # safetensors metadata must be str -> str; A1111 ignores it, load_embedding reads it back.
    return {
        "name": emb.token,
        "step": str(emb.step),
        "sd_checkpoint": emb.base_model_hash,
        "sd_checkpoint_name": emb.base_model,
        "family": emb.family,
        "format": "likeness",
    }


def save_embedding(emb: TrainedEmbedding, path: str | Path, format: Format, *, any_name: bool = False) -> Path:
    """Write ``emb`` in one of :data:`FORMATS`; returns the written file.

    A1111 and ComfyUI name an embedding after its file, so an export is ``<token>.pt`` /
    ``<token>.safetensors`` (the diffusers file too: diffusers reads the token from its key, the
    others from the name). ``path`` may be a folder (created when missing) to write that name in,
    or a file whose name is the token; another name is refused, because the peers would call the
    embedding by it. ``any_name=True`` is for internal files that are read back with ``token=``.
    Writes are atomic.
    """
    import torch
    from safetensors.torch import save_file

    _check_format(format)
    raw = os.fspath(path)
    path = Path(path)
    if not path.exists() and (path.suffix == "" or raw.endswith(("/", os.sep))):
        # `--out exports/` or `--out exports`: a folder to create, as the CLI help promises,
        # not a file name missing its suffix.
        ensure_dir(path, "output folder")
    if path.is_dir():
        try:
            path = path / (check_name(emb.token, "token") + FORMAT_SUFFIX[format])
        except InvalidInput as exc:
            raise InvalidInput(f"{exc}; the file is named after the token, so pass a token that is (CLI: --token)") from None
    if path.suffix != FORMAT_SUFFIX[format]:
        raise InvalidInput(
            f"{path.name}: a {format} embedding file must end in {FORMAT_SUFFIX[format]} "
            "(A1111 and ComfyUI choose the loader by suffix)"
        )
    if not any_name and path.stem != emb.token:
        raise InvalidInput(
            f"{path.name}: A1111 and ComfyUI would call this embedding {path.stem!r}, not its token {emb.token!r}; "
            f"name the file {emb.token}{FORMAT_SUFFIX[format]}, give a folder, or pass token={path.stem!r} "
            "(CLI: --token) to make that the trigger word"
        )
    vec = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in emb.vectors.items()}
    if format == "a1111-pt":
        if emb.family == "sdxl":
            # A1111 loads an SDXL .pt only as a bare {clip_l, clip_g} dict (extra keys break it).
            data: dict[str, Any] = {"clip_l": vec["clip_l"], "clip_g": vec["clip_g"]}
        else:
            data = {
                "string_to_token": {"*": _A1111_PLACEHOLDER_ID},
                "string_to_param": {"*": vec["clip_l"]},
                "name": emb.token,
                "step": emb.step,
                "sd_checkpoint": emb.base_model_hash or None,
                "sd_checkpoint_name": emb.base_model or None,
            }
        return save_pt(data, path)
    if emb.family == "sdxl":
        tensors = {"clip_l": vec["clip_l"], "clip_g": vec["clip_g"]}
    elif format == "safetensors":
        tensors = {"emb_params": vec["clip_l"]}
    else:
        tensors = {emb.token: vec["clip_l"]}
    return atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata=_metadata(emb)))


# --- .pt files A1111 accepts ---------------------------------------------------------------------

# A1111 (modules/safe.py) opens every .pt as a zip before unpickling it and refuses the file when a
# record name is not one of these; releases before 1.6 accepted only data.pkl, version and data/<n>
# (byteorder and .data/serialization_id came later, with the torch versions that write them).
A1111_ZIP_RECORD = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|\.data/serialization_id|(data\.pkl))$")
# The top folder torch itself uses when saving to a buffer; A1111 before 1.6 opened "archive/data.pkl".
PT_TOP_FOLDER = "archive"
# torch aligns tensor records to 64 bytes so that torch.load(mmap=True) can map them in place.
_PT_ALIGNMENT = 64
# Local file header size of a zip entry, before its name and extra field (zip APPNOTE 4.3.7).
_ZIP_LOCAL_HEADER = 30
# The extra-field id torch pads its records with ("FB").
_ZIP_PAD_ID = 0x4246


def _kept_record(rel: str) -> bool:
    if rel in ("data.pkl", "version") or re.fullmatch(r"data/\d+", rel):
        return True
    # Without a byteorder record torch.load reads little-endian, which is what this machine wrote.
    return rel == "byteorder" and sys.byteorder != "little"


def save_pt(obj: Any, path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` as a zip that A1111's loader accepts (atomically).

    torch 2.14 adds ``.format_version``, ``.storage_alignment``, ``byteorder`` and
    ``.data/serialization_id`` records and names the top folder after the (temporary) file; A1111
    refuses the first two and its older releases the last two. This keeps torch's own pickle and
    tensor bytes, drops those records, names the folder ``archive``, writes ``data.pkl`` first (the
    oldest check reads the first record) and keeps torch's 64-byte alignment, so ``torch.load``
    (ComfyUI, kohya, diffusers), ``torch.load(mmap=True)`` and A1111 all read it.
    """
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    with zipfile.ZipFile(buf) as src:
        records = [(name.split("/", 1)[1], src.read(name)) for name in src.namelist()]
    records = [r for r in records if _kept_record(r[0])]
    records.sort(key=lambda r: r[0] != "data.pkl")  # stable: torch's order otherwise

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as out:
            for rel, data in records:
                name = f"{PT_TOP_FOLDER}/{rel}"
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_STORED
                start = fh.tell() + _ZIP_LOCAL_HEADER + len(name.encode()) + 4
                pad = -start % _PT_ALIGNMENT
                info.extra = struct.pack("<HH", _ZIP_PAD_ID, pad) + b"Z" * pad
                out.writestr(info, data)

    return atomic_save(path, write)


# --- loading -------------------------------------------------------------------------------------


def _read_file(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(state dict, safetensors metadata) of a .pt/.bin/.safetensors file, sniffed by content."""
    import torch

    with path.open("rb") as fh:
        head = fh.read(16)
    if head[:2] == b"PK" or path.suffix in (".pt", ".bin", ".ckpt") and head[:1] == b"\x80":
        try:
            # weights_only: never run pickled code from a file someone handed us.
            with warnings.catch_warnings():
                # A damaged file makes torch warn about its "pickle protocol" before failing;
                # the InvalidInput below says what is wrong, the warning only adds noise.
                warnings.simplefilter("ignore", UserWarning)
                data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InvalidInput(
                f"{path.name}: not a loadable PyTorch embedding ({type(exc).__name__}: {str(exc)[:200]}); "
                "export it again as .safetensors"
            ) from exc
        if not isinstance(data, dict):
            raise InvalidInput(f"{path.name}: holds a {type(data).__name__}, not an embedding dict")
        return data, {}
    if len(head) >= 9 and head[8:9] == b"{":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
        except SafetensorError as exc:
            raise InvalidInput(f"{path.name}: damaged safetensors file: {exc}") from exc
    raise InvalidInput(
        f"{path.name}: not an embedding file; expected an A1111 .pt, an A1111/ComfyUI .safetensors "
        "or a diffusers learned_embeds.safetensors"
    )


def _as_matrix(value: Any, where: str) -> "torch.Tensor":
    import torch

    if not isinstance(value, torch.Tensor):
        raise InvalidInput(f"{where}: expected a tensor, got {type(value).__name__}")
    t = value.detach().to("cpu", torch.float32)
    if t.ndim == 1:
        t = t.unsqueeze(0)  # diffusers' learned_embeds.bin holds one vector as a 1-D tensor
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise InvalidInput(f"{where}: expected (n_vectors, dim), got shape {tuple(value.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise InvalidInput(f"{where}: holds NaN or infinite values (a diverged training run); use another checkpoint")
    return t.contiguous()


@dataclass(frozen=True)
class _Parsed:
    vectors: dict[str, Any]
    # "a1111" (string_to_param / emb_params / clip_l+clip_g: peers name it after the file) or
    # "diffusers" ({token: tensor}: diffusers names it after the key).
    kind: str
    # The name stored inside the file (A1111's `name`, a diffusers key, our metadata), or "".
    internal: str
    step: int
    base: str
    digest: str


def _parse(data: dict[str, Any], meta: dict[str, str], name: str) -> _Parsed:
    """The vectors and names of any supported layout."""
    step = int(meta["step"]) if meta.get("step", "").lstrip("-").isdigit() else 0
    internal, base, digest = meta.get("name", ""), meta.get("sd_checkpoint_name", ""), meta.get("sd_checkpoint", "")
    if not data:
        raise InvalidInput(f"{name}: holds no tensors (an empty embedding file); export the embedding again")
    t5 = sorted(str(k) for k in data if "t5" in str(k).lower())
    if t5:
        raise InvalidInput(
            f"{name}: holds a T5 text-encoder part ({t5}), so it is an SD3/Flux embedding, not a CLIP-space "
            "SD 1.5/SDXL one; use an embedding trained for SD 1.5 or SDXL"
        )
    kind = "a1111"
    if "clip_l" in data and "clip_g" in data:
        vectors = {k: _as_matrix(data[k], f"{name}[{k}]") for k in ("clip_l", "clip_g")}
    elif "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise InvalidInput(f"{name}: A1111 string_to_param must hold exactly one tensor")
        vectors = {"clip_l": _as_matrix(next(iter(params.values())), f"{name}[string_to_param]")}
        internal = str(data.get("name") or internal)
        step = int(data["step"]) if isinstance(data.get("step"), int) else step
        base = str(data.get("sd_checkpoint_name") or base)
        digest = str(data.get("sd_checkpoint") or digest)
    elif "emb_params" in data:
        vectors = {"clip_l": _as_matrix(data["emb_params"], f"{name}[emb_params]")}
    elif len(data) == 1:
        key, value = next(iter(data.items()))
        if key in ("clip_l", "clip_g"):
            raise InvalidInput(f"{name}: holds only {key}; an SDXL embedding needs both clip_l and clip_g")
        vectors = {"clip_l": _as_matrix(value, f"{name}[{key}]")}
        kind, internal = "diffusers", str(key)
    else:
        raise InvalidInput(
            f"{name}: unknown embedding layout (keys {sorted(map(str, data))[:8]}); expected A1111 "
            "string_to_param/emb_params, clip_l+clip_g (SDXL), or diffusers {token: tensor}"
        )
    return _Parsed(vectors, kind, internal, step, base, digest)


# Names tools write in place of a real trigger word: diffusers' default file name, A1111's "*"
# placeholder, the embedding-merge extension's scratch name. Never a usable trigger word.
_PLACEHOLDER_NAMES = frozenset({"learned_embeds", "*", "_EmbeddingMerge_temp"})
_MAX_TOKEN = 128


def usable_token(name: str) -> bool:
    """True when ``name`` can be a trigger word: one word, printable, no path separator, no placeholder."""
    return (
        0 < len(name) <= _MAX_TOKEN
        and name not in _PLACEHOLDER_NAMES
        and name.isprintable()
        and not any(c.isspace() or c in "/\\" for c in name)
    )


def _trigger_word(parsed: _Parsed, path: Path) -> str:
    """The word a prompt uses for this file, as the peer that wrote its layout names it.

    A1111 and ComfyUI name an embedding after its file (``badhandv4.pt`` is ``badhandv4`` though
    it stores ``name='badhandv3'``); diffusers after the key of ``{token: tensor}``. The other name
    is the fallback when the first is not a usable word (spaces, a placeholder).
    """
    order = [path.stem, parsed.internal] if parsed.kind == "a1111" else [parsed.internal, path.stem]
    for name in order:
        if usable_token(name):
            return name
    raise InvalidInput(
        f"{path.name}: neither its file name {path.stem!r} nor its stored name {parsed.internal!r} is a usable "
        "trigger word (one word, no spaces, not a placeholder); pass token=... (CLI: --token WORD)"
    )


# Widths of the CLIP text encoders of SD 1.x (ViT-L 768), SD 2.x (OpenCLIP ViT-H 1024) and SDXL's
# second encoder (OpenCLIP ViT-bigG 1280). The tiny test models' encoders are 32 wide
# (scripts/build_tiny_models.py), the cpu-tiny profile's model.
_SD15_WIDTH, _SDXL_G_WIDTH, _TINY_WIDTH = 768, 1280, 32
_SERVED_DIMS = ({"clip_l": _SD15_WIDTH}, {"clip_l": _SD15_WIDTH, "clip_g": _SDXL_G_WIDTH},
                {"clip_l": _TINY_WIDTH}, {"clip_l": _TINY_WIDTH, "clip_g": _TINY_WIDTH})


def load_embedding(
    path: str | Path,
    *,
    token: str | None = None,
    expect_dims: dict[str, int] | None = None,
) -> TrainedEmbedding:
    """Read an embedding in any supported format (ours or trained elsewhere).

    ``token`` overrides the trigger word; by default it is the word the file's own tool uses
    (:func:`_trigger_word`: the file name for A1111/ComfyUI layouts, the key for diffusers').
    Files that are not CLIP-space SD 1.5/SDXL embeddings (SD 2.x, T5-XXL, unknown widths) are
    refused with what they are. ``expect_dims`` (e.g. :func:`pipeline_dims` of the pipeline it
    will serve) makes a file for another model fail with :class:`InvalidInput` naming both models.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"embedding file {path} does not exist; pass a .pt or .safetensors embedding")
    data, meta = _read_file(path)
    parsed = _parse(data, meta, path.name)
    vectors = parsed.vectors
    family = "sdxl" if "clip_g" in vectors else "sd15"
    dims = {k: int(v.shape[1]) for k, v in vectors.items()}
    if expect_dims is not None:
        check_dims(dims, expect_dims, what=path.name)
    elif dims not in _SERVED_DIMS:
        raise InvalidInput(
            f"{path.name} is an embedding for {describe_dims(dims)}; Likeness serves SD 1.5 (768 wide) and SDXL "
            "(768 + 1280), so use an embedding trained for one of those"
        )
    name = token or _trigger_word(parsed, path)
    return TrainedEmbedding(
        token=name, family=family, vectors=vectors, step=parsed.step, base_model=parsed.base,
        base_model_hash=parsed.digest,
    )


def check_dims(dims: dict[str, int], expect: dict[str, int], *, what: str = "embedding") -> None:
    """Raise InvalidInput when an embedding's encoder widths do not fit a model's."""
    if dims != expect:
        raise InvalidInput(
            f"{what} is an embedding for {describe_dims(dims)}, but the model expects "
            f"{describe_dims(expect)}; use an embedding trained for that model family"
        )


# --- pipelines -----------------------------------------------------------------------------------


def _encoders(pipe: Pipeline) -> dict[str, tuple[Any, Any]]:
    """{"clip_l": (tokenizer, text_encoder)[, "clip_g": (tokenizer_2, text_encoder_2)]}."""
    out = {"clip_l": (pipe.tokenizer, pipe.text_encoder)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        out["clip_g"] = (pipe.tokenizer_2, pipe.text_encoder_2)
    return out


def pipeline_dims(pipe: Pipeline) -> dict[str, int]:
    """Width of each text encoder's token embeddings, keyed like :attr:`TrainedEmbedding.vectors`."""
    return {k: int(enc.get_input_embeddings().weight.shape[-1]) for k, (_, enc) in _encoders(pipe).items()}


def token_names(token: str, n_vectors: int) -> list[str]:
    """The tokenizer entries of a multi-vector token, diffusers style: t, t_1, ..., t_{n-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, n_vectors)]


def _is_token_row(entry: str, token: str) -> bool:
    rest = entry[len(token) + 1 :]
    return entry == token or (entry.startswith(token + "_") and rest.isdigit())


def load_into_pipeline(pipe: Pipeline, emb: TrainedEmbedding) -> None:
    """Add ``emb`` to a diffusers pipeline via ``load_textual_inversion`` (SDXL: once per encoder).

    Loading the same token again replaces it (evaluation loads checkpoint after checkpoint).
    A token that is an ordinary word of the tokenizer is refused.
    """
    encoders = _encoders(pipe)
    check_dims(emb.dims(), pipeline_dims(pipe), what=f"embedding {emb.token!r}")
    for key, (tokenizer, encoder) in encoders.items():
        added = [t for t in tokenizer.added_tokens_encoder if _is_token_row(t, emb.token)]
        if added:
            pipe.unload_textual_inversion(added, tokenizer=tokenizer, text_encoder=encoder)
        elif emb.token in tokenizer.get_vocab():
            raise InvalidInput(f"token {emb.token!r} is already a word of the tokenizer; train a rare token")
        try:
            pipe.load_textual_inversion(
                emb.vectors[key].clone(), token=emb.token, tokenizer=tokenizer, text_encoder=encoder
            )
        except ValueError as exc:
            raise InvalidInput(f"could not load embedding {emb.token!r} into {key}: {exc}") from exc


def vectors_in_pipeline(pipe: Pipeline, token: str, n_vectors: int) -> dict[str, "torch.Tensor"]:
    """The rows a token occupies in each text encoder (to check a load, or to read training back)."""
    out = {}
    for key, (tokenizer, encoder) in _encoders(pipe).items():
        ids = tokenizer.convert_tokens_to_ids(token_names(token, n_vectors))
        weight = encoder.get_input_embeddings().weight
        out[key] = weight.detach()[ids].to("cpu").float().clone()
    return out
