"""``likeness import``: a gallery from an existing folder instead of generating one.

People often have the 400 images already (their own A1111 X/Y/Z run, a
ComfyUI batch). The importer walks the folder, decodes every image safely
(:mod:`likeness.images`: format sniffing, decompression-bomb limit, mode
conversion), recovers prompt, seed and settings from A1111 infotext (PNG
``parameters`` chunk, JPEG/WebP EXIF UserComment) or a ComfyUI ``prompt``
graph, assigns zoom and angle by finding the spec's zoom/angle phrases in the
prompt, and writes the same gallery layout as generation: ``images/<id>.png``
(re-encoded, infotext kept), ``manifest.jsonl`` with ``source="imported"``,
``contact_sheet.png``, and ``import.json`` listing every skipped file with its
reason. A broken file is reported and skipped, never a crash; so is a file
whose parameters text is damaged (``Steps: inf``) or longer than
:data:`~likeness.generate.infotext.MAX_INFOTEXT_CHARS` (64 KiB: A1111 writes a
few thousand characters; a PNG stuffed with megabytes of text is not parsed).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from likeness.config import to_dict
from likeness.errors import InvalidInput
from likeness.files import atomic_write_bytes, atomic_write_json, folder_lock
from likeness.generate.infotext import (
    InfoText, format_infotext, parse_infotext, parse_ti_hashes, png_bytes, read_parameters, rng_source, ti_hash,
)
from likeness.generate.manifest import GalleryImage, manifest_path, write_manifest
from likeness.progress import CancelToken, ProgressFn, report
from likeness.spec import DEFAULT_ANGLES, DEFAULT_ZOOMS, CharacterSpec

IMPORT_REPORT = "import.json"
# Bigger files are skipped before being read into memory (a 50 MP PNG is < 150 MB).
MAX_FILE_BYTES = 200 * 2**20


@dataclass(frozen=True)
class ImportResult:
    gallery_dir: str
    manifest: str
    report: str
    contact_sheet: str
    imported: int
    # Images whose prompt/seed came from infotext, and those with both zoom and angle recognised.
    with_infotext: int
    assigned: int
    # [{"file": ..., "reason": ...}] for files not imported.
    skipped: list[dict[str, str]] = field(default_factory=list)
    # [{"file": ..., "warning": ...}] for imported files worth a look (wrong extension, no infotext).
    warnings: list[dict[str, str]] = field(default_factory=list)
    # Per image id: {"rng": "GPU"|"CPU"|"NV" (A1111's noise source; no RNG field = GPU),
    # "ti_hashes": [{"token", "hash", "file" (under the embeddings folder; "" when not found), "note"}]}.
    images: dict[str, dict[str, Any]] = field(default_factory=dict)


# ---------------------------------------------------------------- zoom / angle


def _phrase_re(label: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in label.split()]
    return re.compile(r"(?<![\w-])" + r"[\s_-]+".join(words) + r"(?![\w-])", re.I)


def match_label(prompt: str, labels: Sequence[str]) -> int:
    """Index of the label found in ``prompt`` (whole words, case-insensitive), or -1.

    Longer labels are matched first and their text masked, so "closeup" is not
    found inside "extreme closeup". With several different labels present, the
    one earliest in the prompt wins (A1111 grids put the varied phrase once).
    """
    text = prompt
    found: list[tuple[int, int]] = []  # (position, label index)
    for i in sorted(range(len(labels)), key=lambda i: -len(labels[i])):
        if not labels[i].strip():
            continue
        m = _phrase_re(labels[i]).search(text)
        if m:
            found.append((m.start(), i))
            text = text[: m.start()] + "\0" * (m.end() - m.start()) + text[m.end():]
    return min(found)[1] if found else -1


# ---------------------------------------------------------------- ComfyUI

_COMFY_SAMPLERS = {
    "dpmpp_2m": "DPM++ 2M", "dpmpp_sde": "DPM++ SDE", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "euler_ancestral": "Euler a", "euler": "Euler", "ddim": "DDIM", "uni_pc": "UniPC",
    "heun": "Heun", "lms": "LMS", "dpm_2": "DPM2",
}


def _comfy_text(nodes: dict[str, Any], ref: Any) -> str:
    if not isinstance(ref, list) or not ref:
        return ""
    node = nodes.get(str(ref[0])) or {}
    inputs = node.get("inputs") or {}
    for key in ("text", "text_g", "text_l"):
        if isinstance(inputs.get(key), str):
            return inputs[key]
    return ""


def comfy_infotext(prompt_json: str) -> InfoText | None:
    """Prompt, seed and settings from a ComfyUI PNG's ``prompt`` graph (best effort), or None."""
    try:
        nodes = json.loads(prompt_json)
    except ValueError:
        return None
    if not isinstance(nodes, dict):
        return None
    for node in nodes.values():
        if not isinstance(node, dict) or not str(node.get("class_type", "")).startswith("KSampler"):
            continue
        inp = node.get("inputs") or {}
        seed = inp.get("seed", inp.get("noise_seed", -1))
        name = _COMFY_SAMPLERS.get(str(inp.get("sampler_name", "")), str(inp.get("sampler_name", "")))
        if name and inp.get("scheduler") == "karras":
            name += " Karras"
        model = ""
        for other in nodes.values():
            if isinstance(other, dict) and "ckpt_name" in (other.get("inputs") or {}):
                model = Path(str(other["inputs"]["ckpt_name"])).stem
        try:
            steps, cfg = int(inp.get("steps", 0) or 0), float(inp.get("cfg", 0) or 0)
            seed = int(seed) if isinstance(seed, (int, float)) else -1
        except (TypeError, ValueError, OverflowError):  # JSON allows Infinity and NaN
            return None
        # Same bounds as A1111 infotext (ComfyUI seeds go up to 2**64-1); outside them: not stated.
        if not 0 <= seed <= 2**64 - 1:
            seed = -1
        if not (0 <= steps <= 100_000 and math.isfinite(cfg)):
            return None
        return InfoText(
            prompt=_comfy_text(nodes, inp.get("positive")),
            negative_prompt=_comfy_text(nodes, inp.get("negative")),
            steps=steps, sampler=name, cfg_scale=cfg, seed=seed, model=model,
        )
    return None


# ---------------------------------------------------------------- TI hashes

# The files A1111 loads as embeddings (its embeddings folder, searched recursively).
EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors", ".png", ".webp", ".jxl", ".avif")


def index_embeddings(folder: str | os.PathLike[str]) -> dict[str, list[str]]:
    """``{A1111 short hash: [files relative to folder]}`` of every embedding file under ``folder``.

    The short hash is :func:`~likeness.generate.infotext.ti_hash` (sha256 of the bytes, 12 hex
    digits), what A1111 writes in ``TI hashes``. Files over :data:`MAX_FILE_BYTES` are not hashed
    (no embedding is that big). A folder that does not exist is InvalidInput.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InvalidInput(f"embeddings folder {root} does not exist or is not a folder; pass the folder that "
                           "holds your .pt/.safetensors embeddings (A1111's embeddings/)")
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in EMBEDDING_SUFFIXES or not path.is_file():
            continue
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            short = ti_hash(path)
        except OSError:
            continue
        found.setdefault(short, []).append(path.relative_to(root).as_posix())
    return found


def resolve_ti_hashes(value: str, index: dict[str, list[str]] | None) -> list[dict[str, str]]:
    """One entry per ``name: hash`` of a ``TI hashes`` value, resolved against ``index``.

    ``file`` is the matching file (relative to the embeddings folder) or ``""``; ``note`` says why
    nothing was found, or that the file's name differs from the trigger word (A1111 takes the word
    from the file name, so the prompt would not find it under that name).
    """
    out = []
    for name, short in parse_ti_hashes(value).items():
        entry = {"token": name, "hash": short, "file": "", "note": ""}
        if index is None:
            entry["note"] = "no embeddings folder given (likeness import --embeddings DIR) to resolve it"
        elif len(short) != 12 or any(c not in "0123456789abcdef" for c in short):
            entry["note"] = f"{short!r} is not A1111's 12-digit sha256 prefix"
        elif short not in index:
            entry["note"] = "no file in the embeddings folder has this hash (sha256[:12] of the file's bytes)"
        else:
            files = index[short]
            named = [f for f in files if Path(f).stem == name]
            entry["file"] = (named or files)[0]
            if not named:
                entry["note"] = (f"found as {entry['file']}; A1111 takes the trigger word from the file name, "
                                 f"so rename it to {name}{Path(entry['file']).suffix} for the prompt to use it")
        out.append(entry)
    return out


# ---------------------------------------------------------------- import


def _metadata(data: bytes, png_text: dict[str, str]) -> tuple[InfoText | None, str]:
    """(parsed infotext, raw A1111 text) of a file's bytes; (None, "") when it has none."""
    raw = png_text.get("parameters", "")
    if not raw and "prompt" in png_text:
        info = comfy_infotext(png_text["prompt"])
        if info is not None:
            return info, ""
    if not raw and not png_text:
        raw = read_parameters(data)
    if not raw.strip():
        return None, ""
    return parse_infotext(raw), raw


def import_gallery(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    spec: CharacterSpec | None = None,
    *,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    roots: Sequence[str | os.PathLike[str]] | None = None,
    embeddings_dir: str | os.PathLike[str] | None = None,
) -> ImportResult:
    """Import every image under ``src`` into the gallery folder ``out_dir``.

    Each image's noise source (A1111's ``RNG:``) and ``TI hashes`` are recorded in
    ``ImportResult.images`` and ``import.json``; with ``embeddings_dir`` every TI hash is
    resolved to the file there whose sha256[:12] it is, or a note says it was not found.

    ``roots`` (a server's import roots): a file that is a link to something
    outside all of them is skipped with the reason, never read. None (the
    CLI, on the user's own files) follows links anywhere. Skip reasons and
    warnings name files relative to ``src``, never by absolute path.

    Zoom and angle phrases come from ``spec`` (default: the workflow's five
    zooms and five angles). Ids are ``z<zoom>-a<angle>-<n>`` like generated
    ones, with ``x`` for an unrecognised axis. Re-running replaces the
    manifest. Refuses an ``out_dir`` that holds a generated gallery, is the
    source folder itself, or is being written by another run.
    """
    src_p, out = Path(src).resolve(), Path(out_dir).resolve()
    if out == src_p:
        # Every file under the gallery folder counts as our own output: nothing would be imported.
        raise InvalidInput(f"--out {out} is the source folder itself; write the gallery to another folder, "
                           f"e.g. {out / 'gallery'}")
    if (out / "plan.json").exists():
        raise InvalidInput(f"{out} holds a generated gallery (plan.json); import into another folder")
    allowed = None if roots is None else [Path(r).resolve() for r in roots]
    index = index_embeddings(embeddings_dir) if embeddings_dir is not None else None
    with folder_lock(out, "import"):
        return _import_locked(src_p, out, spec, progress, cancel, allowed, index)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk_types(data: bytes) -> set[bytes] | None:
    """The chunk types of a PNG file, walked by their lengths up to IEND; None if ``data`` is not a whole PNG.

    Only the 8-byte headers are read (no CRCs, no inflating): it answers "is there an eXIf chunk?"
    without mistaking those four bytes inside compressed pixel data or text for a chunk.
    """
    if not data.startswith(_PNG_SIGNATURE):
        return None
    types: set[bytes] = set()
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        types.add(kind)
        pos += 12 + length
        if kind == b"IEND":
            return types if pos <= len(data) else None
    return None


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _read(path: Path, rel: str, roots: Sequence[Path] | None) -> bytes:
    """The bytes of one listed file, or InvalidInput naming it by ``rel`` (never the server's path)."""
    if roots is not None and not _inside(path.resolve(), roots):
        # A link inside an import root to /etc/... or another user's files: not ours to read.
        raise InvalidInput(f"{rel}: is a link to a file outside the import roots; put the file itself "
                           "(not a link to it) under an import root")
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InvalidInput(f"{rel}: {size / 2**20:.0f} MB is over the {MAX_FILE_BYTES // 2**20} MB limit")
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{rel}: cannot be read ({exc.strerror or exc})") from None


def _import_locked(
    src_p: Path, out: Path, spec: CharacterSpec | None, progress: ProgressFn | None, cancel: CancelToken | None,
    roots: Sequence[Path] | None, index: dict[str, list[str]] | None = None,
) -> ImportResult:
    from likeness.generate.contact_sheet import contact_sheet
    from likeness.images import list_images, load_image_bytes

    # Importing into a subfolder of the source is fine: our own output is not re-imported.
    files = [p for p in list_images(src_p) if out not in p.resolve().parents]
    zooms = spec.zooms if spec else DEFAULT_ZOOMS
    angles = spec.angles if spec else DEFAULT_ANGLES
    rows: list[GalleryImage] = []
    skipped: list[dict[str, str]] = []
    warnings: list[dict[str, str]] = []
    sources: dict[str, str] = {}
    records: dict[str, dict[str, Any]] = {}
    counters: dict[tuple[int, int], int] = {}
    with_info = assigned = 0
    report(progress, "import", 0, len(files), "scanning")
    for n, path in enumerate(files, 1):
        if cancel is not None:
            cancel.check()
        rel = path.relative_to(src_p).as_posix()
        try:
            data = _read(path, rel, roots)
            img, info = load_image_bytes(data, rel)
        except InvalidInput as exc:
            skipped.append({"file": rel, "reason": str(exc)})
            report(progress, "import", n, len(files), "skipped")
            continue
        notes = []
        if info.extension_mismatch:
            notes.append(f"the file is {info.format} but named {path.suffix}; imported as PNG")
        try:
            meta, raw = _metadata(data, info.text)
        except InvalidInput as exc:
            # Damaged parameters (Steps: inf, a 30-digit seed, megabytes of text): this image
            # is skipped with the reason; the others are imported.
            skipped.append({"file": rel, "reason": f"{rel}: {exc}"})
            report(progress, "import", n, len(files), "skipped")
            continue
        if meta is None:
            notes.append("no A1111/ComfyUI parameters: prompt, seed, zoom and angle unknown")
            meta = InfoText()
        else:
            with_info += 1
        record: dict[str, Any] = {}
        if raw:
            # Only A1111-style infotext says which noise source; ComfyUI graphs and bare files don't.
            try:
                record["rng"] = rng_source(meta)
            except InvalidInput as exc:
                notes.append(str(exc))
            if meta.extra.get("TI hashes"):
                record["ti_hashes"] = resolve_ti_hashes(meta.extra["TI hashes"], index)
            if meta.face_restoration:  # A1111's "Face restoration: CodeFormer": the settings it ran with
                from likeness.backends.restore import recorded_settings

                record["face_restoration"] = recorded_settings(meta.face_restoration, meta.extra)
        if notes:
            warnings.append({"file": rel, "warning": "; ".join(notes)})
        if cancel is not None:
            # Decoding and re-encoding a 50 MP image each take seconds: a cancel that arrived
            # while this one was decoded stops here, before the encode, not one image later.
            cancel.check()
        zi, ai = match_label(meta.prompt, zooms), match_label(meta.prompt, angles)
        assigned += zi >= 0 and ai >= 0
        k = counters.get((zi, ai), 0)
        counters[(zi, ai)] = k + 1
        image_id = f"z{zi if zi >= 0 else 'x'}-a{ai if ai >= 0 else 'x'}-{k:04d}"
        text = raw or (format_infotext(InfoText(**{**to_dict(meta), "width": img.width, "height": img.height}))
                       if meta.prompt else "")
        # An RGB PNG whose parameters chunk is already the text we would write is copied byte for byte
        # (no re-encode: same pixels, same parameters); anything else (JPEG/WebP, other modes, an eXIf
        # chunk that may rotate it, infotext we rebuilt) is encoded as PNG: the gallery layout is PNG.
        chunks = png_chunk_types(data) if info.format == "PNG" else None
        same = (info.mode == "RGB" and chunks is not None and b"eXIf" not in chunks and bool(text)
                and text == info.text.get("parameters"))
        atomic_write_bytes(out / "images" / f"{image_id}.png", data if same else png_bytes(img, text or None))
        sources[image_id] = rel
        if record:
            records[image_id] = record
        rows.append(
            GalleryImage(
                id=image_id, file=f"images/{image_id}.png",
                zoom=zooms[zi] if zi >= 0 else "", angle=angles[ai] if ai >= 0 else "",
                zoom_index=zi, angle_index=ai, index_in_cell=k,
                seed=meta.seed, prompt=meta.prompt, negative_prompt=meta.negative_prompt,
                width=img.width, height=img.height, steps=meta.steps, sampler=meta.sampler,
                cfg_scale=meta.cfg_scale, model=meta.model, seconds=0.0, source="imported",
            )
        )
        report(progress, "import", n, len(files), "imported")
    if cancel is not None:
        cancel.check()  # before the manifest and the contact sheet: a cancelled import leaves no manifest
    write_manifest(out, rows)
    report_path = atomic_write_json(
        out / IMPORT_REPORT,
        {"source": str(src_p), "imported": len(rows), "skipped": skipped, "warnings": warnings, "sources": sources,
         "images": records},
    )
    sheet = str(contact_sheet(rows, out, out / "contact_sheet.png", title=f"imported from {src_p.name}")) if rows else ""
    return ImportResult(
        gallery_dir=str(out), manifest=str(manifest_path(out)), report=str(report_path), contact_sheet=sheet,
        imported=len(rows), with_infotext=with_info, assigned=assigned, skipped=skipped, warnings=warnings,
        images=records,
    )
