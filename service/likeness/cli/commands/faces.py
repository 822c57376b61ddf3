"""`likeness faces compare|calibrate` and `likeness score`: identity checks from the command line.

JSON on stdout (one document, or one line per pair for ``--pairs``);
progress and warnings on stderr. Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterable

from likeness.backends.protocols import FaceAnalyzer
from likeness.cli.output import emit, emit_line, say, warn



def _profile(name: str | None):
    from likeness.profiles import resolve_profile

    prof = resolve_profile(name)
    if not name:
        # The profile's "why" speaks of its diffusion weights ("images are noise"); face tools
        # only use its face pack, which is real even in cpu-tiny.
        say(f"using profile {prof.name!r}: face pack {prof.face_pack_path}")
    return prof


def _analyzer(args: argparse.Namespace):
    from likeness.backends.faces import load_face_analyzer

    return load_face_analyzer(_profile(args.profile), backend=args.backend)


def _load(path: Path):
    import numpy as np

    from likeness.images import load_image

    img, _ = load_image(path)
    return np.asarray(img)


def _analyze_files(analyzer: FaceAnalyzer, files: Iterable[Path]) -> dict[Path, dict[str, Any]]:
    """file -> {"faces": [FaceRecord...]} or {"error": reason}; analysed in chunks (likeness.identity)."""
    from likeness.identity import analyze_paths

    return {f: ({"error": r} if isinstance(r, str) else {"faces": r})
            for f, r in analyze_paths(analyzer, list(files)).items()}


def _calibration(analyzer: FaceAnalyzer):
    from likeness.curate.calibration import calibration_for

    cal = calibration_for(getattr(analyzer, "recognition_sha256", None))
    if not cal.calibrated:
        warn(f"warning: no calibration for this face pack; using the CPU pack's threshold {cal.threshold}. "
            "Run `likeness faces calibrate --pairs PAIRS.csv --write` with labelled pairs.")
    return cal


def _pair_result(a: str, b: str, ra: dict[str, Any], rb: dict[str, Any], threshold: float) -> dict[str, Any]:
    import numpy as np

    row: dict[str, Any] = {"a": a, "b": b, "cosine": None, "same_person": None, "threshold": threshold}
    problems = []
    for key, r in (("a", ra), ("b", rb)):
        if "error" in r:
            problems.append(f"{key}: {r['error']}")
        else:
            row[f"faces_{key}"] = len(r["faces"])
            if not r["faces"]:
                problems.append(f"no face found in {key} ({row[key]})")
    if problems:
        row["error"] = "; ".join(problems)
        row["no_face"] = [k for k, r in (("a", ra), ("b", rb)) if "faces" in r and not r["faces"]]
        return row
    cos = float(np.dot(ra["faces"][0].embedding, rb["faces"][0].embedding))
    row["cosine"] = round(cos, 4)
    row["same_person"] = bool(cos >= threshold)
    return row


def _compare(args: argparse.Namespace) -> int:
    from likeness.curate.calibration import read_pairs, resolve_image
    from likeness.errors import InvalidInput, NotFound
    from likeness.profiles import realdata_dir

    if args.pairs and (args.a or args.b):
        raise InvalidInput("give either two images A B or --pairs PAIRS.csv, not both")
    if not args.pairs and not (args.a and args.b):
        raise InvalidInput("faces compare needs two images (likeness faces compare A B) or --pairs PAIRS.csv")
    analyzer = _analyzer(args)
    cal = _calibration(analyzer)
    if not args.pairs:
        files = [Path(args.a), Path(args.b)]
        for f in files:
            if not f.is_file():
                raise NotFound(f"image {f} not found")
        res = _analyze_files(analyzer, files)
        for f in files:
            if "error" in res[f]:
                raise InvalidInput(res[f]["error"])
        row = _pair_result(args.a, args.b, res[files[0]], res[files[1]], cal.threshold)
        row["calibrated"] = cal.calibrated
        emit(row)
        if "error" in row:  # no face in A or B: no answer, and a script must not read it as one
            warn(f"error: could not compare: {row['error']}")
            return 1
        return 0
    rows = read_pairs(args.pairs)
    base = Path(args.pairs).resolve().parent
    rd = realdata_dir()
    paths: dict[str, Path | str] = {}
    for a, b, _ in rows:
        for n in (a, b):
            if n not in paths:
                try:
                    paths[n] = resolve_image(n, base, rd)
                except NotFound as exc:
                    paths[n] = str(exc)
    res = _analyze_files(analyzer, [p for p in paths.values() if isinstance(p, Path)])
    same = wrong = errors = 0
    for a, b, label in rows:
        ra = res[paths[a]] if isinstance(paths[a], Path) else {"error": paths[a]}
        rb = res[paths[b]] if isinstance(paths[b], Path) else {"error": paths[b]}
        row = _pair_result(a, b, ra, rb, cal.threshold)
        if label is not None:
            row["label_same"] = label
            # A pair that could not be compared (a missing file, no face) is neither right nor
            # wrong: it used to count as correct whenever the label said "different people".
            row["correct"] = None if "error" in row else row["same_person"] == label
            wrong += row["correct"] is False
        errors += "error" in row
        same += row["same_person"] is True
        emit_line(row)
    summary = (f"{len(rows)} pairs, {same} judged same person at threshold {cal.threshold}"
               + (f", {wrong} disagree with the labels" if any(lab is not None for *_, lab in rows) else ""))
    if errors:
        # Every pair is still listed on stdout; the exit status says the answer is incomplete
        # (a missing or undecodable file, or no face), so a script cannot take it for a full run.
        warn(f"error: {summary}, {errors} could not be compared (see 'error' in their lines)")
        return 1
    say(summary)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from likeness.curate.calibration import calibrate, save_calibration
    from likeness.profiles import realdata_dir

    analyzer = _analyzer(args)
    faceless: list[str] = []
    cal = calibrate(analyzer, args.pairs, realdata_dir(), check=args.check, faceless=faceless,
                    identities=args.identities)
    out = {"sha256": analyzer.recognition_sha256, **cal.to_dict(), "faceless_images": faceless, "written": False}
    if args.write:
        out["written"] = str(save_calibration(analyzer.recognition_sha256, cal))
    emit(out)
    return 0


def _folder_faces(analyzer: FaceAnalyzer, folder: Path) -> tuple[list[Path], dict[Path, dict[str, Any]]]:
    from likeness.images import list_images

    files = list_images(folder)
    if not files:
        from likeness.errors import InvalidInput

        raise InvalidInput(f"{folder} holds no images (png, jpg, webp, ...)")
    return files, _analyze_files(analyzer, files)


def _score(args: argparse.Namespace) -> int:
    import numpy as np

    from likeness import scores
    from likeness.curate.background import border_features
    from likeness.generate.manifest import read_manifest

    folder = Path(args.dir)
    analyzer = _analyzer(args)
    cal = _calibration(analyzer)
    files, res = _folder_faces(analyzer, folder)
    ok = [f for f in files if "faces" in res[f]]
    skipped = [{"file": str(f.relative_to(folder)), "error": res[f]["error"]} for f in files if "error" in res[f]]
    mains = {f: (res[f]["faces"][0] if res[f]["faces"] else None) for f in ok}

    if args.reference:
        ref_files, ref_res = _folder_faces(analyzer, Path(args.reference))
        ref_emb = [r["faces"][0].embedding for r in ref_res.values() if r.get("faces")]
        if not ref_emb:
            from likeness.errors import InvalidInput

            raise InvalidInput(f"no face found in any image of the reference folder {args.reference}")
        centroid = scores.identity_centroid(np.stack(ref_emb))
        rows = []
        for f in ok:
            m = mains[f]
            cos = None if m is None else float(scores.identity_similarities(m.embedding[None], centroid)[0])
            rows.append({"file": str(f.relative_to(folder)), "faces": len(res[f]["faces"]),
                         "identity": None if cos is None else round(cos, 4),
                         "identity_score": None if cos is None else round(float(scores.identity_score(cos, cal.scale)), 4),
                         "same_person": None if cos is None else scores.same_person(cos, cal.threshold)})
        ids = [r["identity"] for r in rows if r["identity"] is not None]
        emit({"folder": str(folder), "reference": str(args.reference), "reference_faces": len(ref_emb),
              "threshold": cal.threshold, "calibrated": cal.calibrated,
              "mean_identity": round(float(np.mean(ids)), 4) if ids else None,
              "same_person": sum(1 for r in rows if r["same_person"]), "images": rows, "skipped": skipped})
        return 0

    manifest = _grid_rows(folder, read_manifest(folder))
    total_cells = _total_cells(folder)
    emb = [mains[f].embedding if mains[f] is not None else None for f in ok]
    centroid = scores.identity_centroid(np.stack([e for e in emb if e is not None])) if any(e is not None for e in emb) else None
    background, quality, cells, rows = [], [], [], []
    for f, e in zip(ok, emb):
        rel = f.relative_to(folder).as_posix()
        row = manifest.get(rel)
        img = _load(f)
        bg_feat = border_features(img)  # curation's own border colours: one definition
        m = mains[f]
        q = 0.0
        if m is not None:
            sharp = scores.sharpness(scores.face_gray_crop(img, m.bbox))
            q = scores.quality(m.det_score, m.area_ratio, sharp, row.zoom if row else None)
        quality.append(q)
        background.append(bg_feat)
        # An image without a zoom/angle label (an imported folder) has no grid cell, as in curation.
        # A curated image's cell takes its measured zoom, as curation counts it (measures.grid_zoom).
        zoom = (getattr(row, "measures", None) or {}).get("grid_zoom") or (row.zoom if row is not None else "")
        cells.append((zoom, row.angle) if row is not None and (row.zoom or row.angle) else None)
        rows.append({"file": rel, "faces": len(res[f]["faces"]), "face": m.to_dict() if m else None, "quality": round(q, 4)})
    bg_scores = scores.background_consistency(np.stack(background)) if background else np.zeros(0)
    for r, e, b in zip(rows, emb, bg_scores):
        s = scores.image_scores(e, centroid, background=float(b), quality=r["quality"])
        r.update(s.to_dict())
    use_cells = bool(cells) and all(c is not None for c in cells)
    st = scores.set_scores(emb, background=bg_scores, quality=quality, cells=cells if use_cells else None,
                           total_cells=total_cells, scale=cal.scale)
    emit({"folder": str(folder), "set": st.to_dict(), "threshold": cal.threshold, "calibrated": cal.calibrated,
          "images": rows, "skipped": skipped})
    return 0


def _grid_rows(folder: Path, manifest_rows: list) -> dict[str, Any]:
    """file (relative, posix) -> row with ``zoom``/``angle``: the gallery manifest, else curation.json.

    A curated folder holds ``<id>.png`` and ``curation.json`` but no manifest; without
    this, ``likeness score`` of a curation's output lost every image's zoom and angle
    (no grid coverage, no zoom-aware face size) and disagreed with the curation's own scores.
    """
    rows = {Path(r.file).as_posix(): r for r in manifest_rows}
    if rows or not (folder / "curation.json").is_file():
        return rows
    from likeness.curate.decide import read_curation

    try:
        result = read_curation(folder)
    except Exception as exc:  # noqa: BLE001 - a damaged curation.json only loses grid info
        warn(f"warning: {folder / 'curation.json'} unreadable ({exc}); scoring without zoom/angle")
        return {}
    return {f"{d.id}.png": d for d in result.images if d.id in set(result.selected)}


def _total_cells(folder: Path) -> int:
    """The grid size coverage is counted against: the curation's (curation.json beside a curated set),
    else the default 5 x 5 grid."""
    import json

    try:
        doc = json.loads((folder / "curation.json").read_text(encoding="utf-8"))
        n = int((doc.get("set_scores") or {}).get("total_cells") or 25)
    except (OSError, ValueError, TypeError, AttributeError):
        return 25
    return n if n > 0 else 25


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", help="model profile (models/<name>.toml); default: the best this machine runs")
    p.add_argument("--backend", default="insightface", help="face backend (default insightface)")


def register(sub: argparse._SubParsersAction) -> None:
    faces = sub.add_parser("faces", help="face identity tools: compare two photos, calibrate the threshold")
    fsub = faces.add_subparsers(dest="faces_command", required=True, metavar="ACTION")
    p = fsub.add_parser("compare", help="identity cosine of the main faces of A and B, and same person or not")
    p.add_argument("a", nargs="?")
    p.add_argument("b", nargs="?")
    p.add_argument("--pairs", help="CSV with columns a,b (optional same); one JSON line per pair")
    _common(p)
    p.set_defaults(func=_compare)
    p = fsub.add_parser("calibrate", help="recompute the identity threshold on labelled pairs")
    p.add_argument("--pairs", required=True,
                   help="CSV a,b,same, deepface's file_x,file_y,Decision, or an LFW pairs file (pairsDevTrain.txt)")
    p.add_argument("--check", help="a second labelled pairs file scored at the fitted threshold (not refitted), "
                                   "e.g. the deepface pairs beside LFW")
    p.add_argument("--identities", help="a folder of per-person photo folders (LFW's lfw-deepfunneled) to calibrate "
                                        "curation's membership and clustering thresholds on")
    p.add_argument("--write", action="store_true", help="store it in service/likeness/curate/calibration_table.json")
    _common(p)
    p.set_defaults(func=_calibrate)
    p = sub.add_parser("score", help="consistency scores of a folder, or identity against a reference folder")
    p.add_argument("dir")
    p.add_argument("--reference", help="folder of photos of the reference identity")
    _common(p)
    p.set_defaults(func=_score)
