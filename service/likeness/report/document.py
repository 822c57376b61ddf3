"""The report of one build: ``report.json`` (for tools) and ``report.html`` (for people).

Input is only the build folder (docs/TEAM.md layout); every stage's section is
read from that stage's artifacts, so a build cancelled after curation still
gets a report, with the sections of stages that did not run set to ``null``
and a line in ``stages`` saying so. The JSON is validated against
``report_schema.json`` (versioned by ``schema_version``) before anything is
written; the HTML embeds every image and plot, so it opens offline.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

from likeness import layout
from likeness.errors import FailedPrecondition, NotFound
from likeness.files import atomic_write_json, atomic_write_text, read_json

SCHEMA_VERSION = "1.1"  # 1.1: build.state, error, profile, embeddings; checkpoint images (optional)
SCHEMA_PATH = Path(__file__).with_name("schema.json")
STAGES = ("generate", "curate", "caption", "train", "evaluate")
# Scores shown side by side for the curated set and its baselines.
SET_METRICS = ("overall", "identity_consistency", "identity_mean_to_centroid", "background_consistency",
               "quality", "grid_coverage")


@lru_cache(maxsize=1)
def report_schema() -> dict[str, Any]:
    """The JSON Schema of report.json."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def validate_report(report: dict[str, Any]) -> None:
    """Raise FailedPrecondition naming the first violation if ``report`` breaks the schema."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(report_schema())
    errors = sorted(validator.iter_errors(report), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise FailedPrecondition(f"report.json breaks its schema at {where}: {e.message}")


def _num(value: Any) -> float | None:
    """A finite float rounded for reading, or None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return round(f, 4) if math.isfinite(f) else None


def _scores(d: Any) -> dict[str, Any]:
    """A score mapping with numbers cleaned (non-numeric leaves dropped except nested dicts)."""
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out[str(k)] = {str(a): _num(b) for a, b in v.items() if not isinstance(b, (list, dict, str))}
        elif isinstance(v, (int, float)) or v is None:
            out[str(k)] = _num(v) if not isinstance(v, int) or isinstance(v, bool) else v
    return out


def _load(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _rel(build_dir: Path, path: Path) -> str:
    return path.resolve().relative_to(build_dir.resolve()).as_posix()


# ---------------------------------------------------------------- sections

def _spec(build_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(spec, build options) from spec.json; the build runner stores {"spec": ..., "options": ...}."""
    doc = _load(build_dir / layout.SPEC_FILE)
    if not isinstance(doc, dict):
        return None, None
    if isinstance(doc.get("spec"), dict):
        return doc["spec"], doc.get("options") if isinstance(doc.get("options"), dict) else None
    return doc, None


def _curation_doc(build_dir: Path) -> dict[str, Any] | None:
    """curation.json through curate's own reader when it is there, else as plain JSON."""
    path = build_dir / layout.CURATED_DIR / layout.CURATION_FILE
    if not path.is_file():
        return None
    try:
        from likeness.curate.decide import read_curation  # the owner's reader knows its versions

        doc = read_curation(build_dir / layout.CURATED_DIR)
        if hasattr(doc, "to_dict"):
            doc = doc.to_dict()
        if isinstance(doc, dict):
            return doc
    except Exception:  # noqa: BLE001 - fall back to the file itself
        pass
    doc = _load(path)
    return doc if isinstance(doc, dict) else None


def _image_decisions(cur: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """id -> {kept, reason_code, reason, scores, ...} from curation.json's per-image decisions."""
    out: dict[str, dict[str, Any]] = {}
    for row in cur.get("images") or []:
        if isinstance(row, dict) and "id" in row:
            out[str(row["id"])] = dict(row, kept=str(row.get("decision", "")) == "kept")
    for kid in cur.get("selected") or []:
        out.setdefault(str(kid), {"id": str(kid), "reason_code": "kept", "reason": ""})["kept"] = True
    return out


def _reason(row: dict[str, Any]) -> tuple[str, str]:
    """(reason code, sentence) of a rejected image."""
    code = str(row.get("reason_code") or "not_selected")
    return code, str(row.get("reason") or code.replace("_", " "))


def _gallery(build_dir: Path, spec: dict[str, Any] | None, decisions: dict[str, dict[str, Any]] | None) -> dict[str, Any] | None:
    from likeness.generate.manifest import read_manifest

    gallery = build_dir / layout.GALLERY_DIR
    rows = [r for r in read_manifest(gallery) if (gallery / r.file).is_file()]
    if not rows:
        return None
    zooms = list((spec or {}).get("zooms") or sorted({r.zoom for r in rows}))
    angles = list((spec or {}).get("angles") or sorted({r.angle for r in rows}))
    images = []
    for r in sorted(rows, key=lambda r: (r.zoom_index, r.angle_index, r.index_in_cell, r.id)):
        d = (decisions or {}).get(r.id)
        kept = None if decisions is None else bool(d and d.get("kept"))
        code, why = ("", "") if kept in (None, True) else _reason(d or {"reason_code": "not_curated",
                                                                          "reason": "not in curation.json"})
        images.append({
            "id": r.id, "file": _rel(build_dir, gallery / r.file), "zoom_index": r.zoom_index,
            "angle_index": r.angle_index, "seed": r.seed, "kept": kept, "reason_code": code, "reason": why,
        })
    rejections = Counter(i["reason_code"] for i in images if i["kept"] is False)
    sheet = gallery / layout.CONTACT_SHEET
    return {
        "n_images": len(images), "zooms": zooms, "angles": angles,
        "contact_sheet": _rel(build_dir, sheet) if sheet.is_file() else None,
        "images": images, "rejections": dict(rejections.most_common()),
    }


def _curation(build_dir: Path, cur: dict[str, Any], decisions: dict[str, dict[str, Any]],
              gallery: dict[str, Any] | None) -> dict[str, Any]:
    curated = build_dir / layout.CURATED_DIR
    by_id = {i["id"]: i for i in (gallery or {}).get("images", [])}
    kept = []
    for row in decisions.values():
        if not row.get("kept"):
            continue
        img = curated / f"{row['id']}.png"
        if not img.is_file():
            img = build_dir / layout.GALLERY_DIR / str(by_id.get(row["id"], {}).get("file", f"images/{row['id']}.png"))
        cap = curated / f"{row['id']}.txt"
        g = by_id.get(row["id"], {})
        kept.append({
            "id": row["id"], "file": _rel(build_dir, img) if img.is_file() else f"curated/{row['id']}.png",
            "zoom_index": int(row.get("zoom_index", g.get("zoom_index", -1))),
            "angle_index": int(row.get("angle_index", g.get("angle_index", -1))),
            "caption": cap.read_text(encoding="utf-8").strip() if cap.is_file() else None,
            "scores": _scores(row.get("scores") or {}),
        })
    sets = cur.get("set_scores") or {}
    curated_s = _scores(sets.get("selected") or {})
    pool_s = sets.get("pool")
    rand_s = sets.get("random_k")
    set_scores = {"curated": curated_s, "whole_pool": _scores(pool_s) if pool_s else None,
                  "random_k": _scores(rand_s) if rand_s else None}
    gain = {}
    for base in ("whole_pool", "random_k"):
        b = set_scores[base]
        if b:
            gain[f"vs_{base}"] = {m: (_num(curated_s[m] - b[m]) if isinstance(curated_s.get(m), (int, float))
                                      and isinstance(b.get(m), (int, float)) else None) for m in SET_METRICS}
    ident_all = [_num((r.get("scores") or {}).get("identity")) for r in decisions.values()]
    ident_kept = [k["scores"].get("identity") for k in kept]
    threshold = _num((cur.get("clusters") or {}).get("threshold"))
    if threshold is None:
        from likeness.scores import IDENTITY_THRESHOLD

        threshold = IDENTITY_THRESHOLD
    zooms = (gallery or {}).get("zooms") or []
    angles = (gallery or {}).get("angles") or []
    kept_m = [[0] * len(angles) for _ in zooms]
    gen_m = [[0] * len(angles) for _ in zooms]
    unplaced = 0
    for img in (gallery or {}).get("images", []):
        zi, ai = img["zoom_index"], img["angle_index"]
        if 0 <= zi < len(zooms) and 0 <= ai < len(angles):
            gen_m[zi][ai] += 1
            kept_m[zi][ai] += 1 if img["kept"] else 0
        else:
            unplaced += 1  # imported images carry no zoom/angle
    details = {k: v for k, v in cur.items() if k in ("config", "clusters", "summary")}
    if isinstance(sets.get("random_k_ids"), list):
        details["random_k_ids"] = sets["random_k_ids"]
    return {
        "kept": kept, "set_scores": set_scores, "gain": gain,
        "identity": {"threshold": threshold, "pool": [v for v in ident_all if v is not None],
                     "kept": [v for v in ident_kept if v is not None]},
        "heatmap": {"zooms": zooms, "angles": angles, "kept": kept_m, "generated": gen_m, "unplaced": unplaced},
        "details": json.loads(json.dumps(details, default=str)),
    }


def _training(build_dir: Path) -> dict[str, Any] | None:
    """checkpoint_scores.json + best.json of service/likeness/train/trainer.py."""
    train = build_dir / layout.TRAIN_DIR
    doc = _load(train / "checkpoint_scores.json")
    best = _load(train / "best.json")
    if not isinstance(doc, dict) and not isinstance(best, dict):
        return None
    checkpoints = []
    for r in (doc or {}).get("checkpoints", []) if isinstance(doc, dict) else []:
        if isinstance(r, dict) and isinstance(r.get("step"), int):
            cp: dict[str, Any] = {"step": r["step"], "scores": _scores({k: v for k, v in r.items() if k != "step"})}
            # Validation images (files relative to train/) that are still on disk, for the page.
            imgs = [i for i in r.get("images") or [] if isinstance(i, dict) and isinstance(i.get("file"), str)
                    and (train / i["file"]).is_file()]
            if imgs:
                cp["images"] = [{"file": f"{layout.TRAIN_DIR}/{i['file']}", "prompt": str(i.get("prompt", "")),
                                 "identity": _num(i.get("identity")), "clip_t": _num(i.get("clip_t"))} for i in imgs]
            checkpoints.append(cp)
    checkpoints.sort(key=lambda c: c["step"])
    best = best if isinstance(best, dict) else {}
    step = best.get("step")
    return {
        "checkpoints": checkpoints, "best_step": step if isinstance(step, int) else None,
        # train.py picks the best identity among checkpoints whose CLIP-T stays within a tolerance.
        "metric": "identity", "reason": str(best.get("reason", "")),
        "rule": (doc or {}).get("rule") if isinstance(doc, dict) else None,
        "best": {k: v for k, v in best.items() if k in ("step", "checkpoint", "embedding", "reason")} or None,
    }


def _evaluation(build_dir: Path) -> dict[str, Any] | None:
    doc = _load(build_dir / layout.EVAL_DIR / layout.EVALUATION_FILE)
    if not isinstance(doc, dict):
        return None
    images = []
    for r in doc.get("images", []):
        if (build_dir / layout.EVAL_DIR / r["file"]).is_file():
            images.append(dict({k: r[k] for k in r if k != "file"}, file=f"eval/{r['file']}"))
    return {"scenes": list(doc.get("scenes", [])), "images": images, "summary": doc.get("summary", {}),
            "settings": doc.get("settings", {})}


def _summary(cur: dict[str, Any] | None, training: dict[str, Any] | None, ev: dict[str, Any] | None) -> dict[str, Any]:
    s: dict[str, float | None] = {}
    notes = []
    if cur:
        c = cur["set_scores"]["curated"]
        for m in ("overall", "identity_consistency", "identity_mean_to_centroid", "background_consistency"):
            s[f"curated_{m}"] = _num(c.get(m))
        g = cur["gain"].get("vs_random_k", {}).get("overall")
        if g is not None:
            s["curation_gain_overall_vs_random_k"] = g
            if g >= 0:
                notes.append(f"Curation raised the overall consistency score by {g:.3f} over a random set of the same size.")
            else:
                notes.append(f"Curation LOWERED the overall consistency score by {-g:.3f} below a random set of the "
                             "same size: the kept set is less consistent than chance; look at the rejection reasons.")
    if training and training["best_step"] is not None:
        best = next((c for c in training["checkpoints"] if c["step"] == training["best_step"]), None)
        if best and training["metric"] in best["scores"] and isinstance(best["scores"][training["metric"]], (int, float)):
            s["train_best_score"] = _num(best["scores"][training["metric"]])
    if ev:
        t = ev["summary"].get("token", {})
        s["eval_identity_token"] = _num(t.get("identity_mean"))
        s["eval_clip_t_token"] = _num(t.get("clip_t_mean"))
        s["eval_face_rate_token"] = _num(t.get("face_rate"))
        gain = ev["summary"].get("identity_gain")
        if gain is not None:
            s["eval_identity_gain_vs_baseline"] = _num(gain)
            notes.append(f"With the token, identity similarity to the curated set is {gain:+.3f} vs. the "
                         "full-description prompt without the embedding.")
        if t.get("identity_mean") is None:
            notes.append("No face was found in the evaluation images made with the token.")
    return {"scores": s, "notes": notes}


def _build_id(build_dir: Path) -> str:
    """The build id; a refinement round's folder (<build>/rounds/<r>) reports as "<build> round <r>"."""
    p = build_dir.resolve()
    if p.parent.name == layout.ROUNDS_DIR:
        return f"{p.parent.parent.name} round {p.name}"
    return p.name


def _profile_info(build_dir: Path, spec: dict[str, Any] | None, options: dict[str, Any] | None) -> dict[str, Any]:
    """The profile the build ran on (the gallery plan's record, else the options', else the spec's) and
    whether its weights are real: a report made on tiny random weights must say so."""
    plan = _load(build_dir / layout.GALLERY_DIR / "plan.json")
    name = ""
    if isinstance(plan, dict):
        name = str((plan.get("settings") or {}).get("profile") or plan.get("profile") or "")
    name = name or str((options or {}).get("profile") or (spec or {}).get("profile") or "")
    info: dict[str, Any] = {"name": name, "description": "", "random_weights": None}
    if name:
        try:
            from likeness.profiles import load_profile

            prof = load_profile(name)
            info["description"] = str(getattr(prof, "description", "") or "")
            info["random_weights"] = bool(prof.random_weights)
        except Exception:  # noqa: BLE001 - a report never fails over a profile file that moved
            info["random_weights"] = None  # unknown: the profile file is gone
    return info


def _embedding_files(build_dir: Path) -> list[dict[str, Any]]:
    """The exported embedding files (paths relative to the build folder), for "where is my embedding"."""
    root = build_dir / layout.EMBEDDINGS_DIR
    if not root.is_dir():
        return []
    return [{"file": _rel(build_dir, p), "bytes": p.stat().st_size} for p in sorted(root.rglob("*")) if p.is_file()]


def build_report(build_dir: str | Path, outcome: dict[str, Any] | None = None) -> dict[str, Any]:
    """report.json of a build folder as a dict, validated against the schema.

    ``outcome``: the build's final state from the store (``{"state": ..., "error": ...}``) when
    it did not succeed; the report then says, first, that the build failed or was cancelled.
    """
    build_dir = Path(build_dir)
    if not build_dir.is_dir():
        raise NotFound(f"build folder {build_dir} does not exist; pass a folder under <data_dir>/builds/")
    spec, options = _spec(build_dir)
    cur_doc = _curation_doc(build_dir)
    decisions = _image_decisions(cur_doc) if cur_doc else None
    gallery = _gallery(build_dir, spec, decisions)
    curation = _curation(build_dir, cur_doc, decisions or {}, gallery) if cur_doc else None
    captions = sorted((build_dir / layout.CURATED_DIR).glob("*.txt")) if (build_dir / layout.CURATED_DIR).is_dir() else []
    training = _training(build_dir)
    evaluation = _evaluation(build_dir)
    ran = {
        "generate": (gallery is not None, f"{gallery['n_images']} images" if gallery else "no gallery images"),
        "curate": (curation is not None, f"{len(curation['kept'])} images kept" if curation else "no curated/curation.json"),
        "caption": (bool(captions), f"{len(captions)} captions" if captions else "no captions beside the curated images"),
        "train": (training is not None, f"{len(training['checkpoints'])} checkpoints scored, chosen step "
                  f"{training['best_step']}" if training else "no train/checkpoint_scores.json"),
        "evaluate": (evaluation is not None, f"{len(evaluation['images'])} images over {len(evaluation['scenes'])} "
                     "scenes" if evaluation else "no eval/evaluation.json"),
    }
    stages = [{"name": n, "ran": r, "detail": d if r else f"did not run: {d}"} for n, (r, d) in ran.items()]
    report = {
        "schema_version": SCHEMA_VERSION,
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "build": {"id": _build_id(build_dir), "character": str((spec or {}).get("name", "")),
                  "token": str((spec or {}).get("token", "")), "options": options,
                  "state": str((outcome or {}).get("state") or ("succeeded" if all(r for r, _ in ran.values())
                                                               else "unknown")),
                  "error": str((outcome or {}).get("error") or ""),
                  "profile": _profile_info(build_dir, spec, options),
                  "embeddings": _embedding_files(build_dir)},
        "stages": stages,
        "summary": _summary(curation, training, evaluation),
        "spec": spec,
        "gallery": gallery,
        "curation": curation,
        "training": training,
        "evaluation": evaluation,
    }
    missing = [s["name"] for s in stages if not s["ran"]]
    if missing:
        report["summary"]["notes"].append("Stages that did not run: " + ", ".join(missing) + ".")
    notes = report["summary"]["notes"]
    state, error = report["build"]["state"], report["build"]["error"]
    if state in ("failed", "cancelled"):
        notes.insert(0, f"This build {state.upper()}" + (f": {error}" if error else "") + ". The sections below show "
                     "what its finished stages left; it exported no usable embedding unless the embeddings are listed.")
    prof = report["build"]["profile"]
    if prof["random_weights"]:
        notes.insert(0 if state not in ("failed", "cancelled") else 1,
                     f"This build ran on profile {prof['name']!r}: tiny RANDOM weights (the images are noise, not "
                     "pictures of the character). The numbers test the pipeline, not the character; use a real "
                     "profile (e.g. sd15 on a GPU) for a character you mean to keep.")
    calibrated = ((curation or {}).get("details") or {}).get("clusters", {}).get("calibrated")
    if calibrated is False:
        notes.append("The face recognition model has no calibration: identity decisions use the CPU pack's "
                     "threshold. Run `likeness faces calibrate` for this pack.")
    elif calibrated:
        thr = ((curation or {}).get("details") or {}).get("clusters", {})
        notes.append("The face model is calibrated (same-person threshold "
                     f"{thr.get('threshold')}, membership {thr.get('member_threshold', thr.get('threshold'))}; "
                     "docs/scores.md).")
    validate_report(report)
    return report


def render_html(report: dict[str, Any], build_dir: str | Path) -> str:
    """The self-contained HTML page of a report (images and plots embedded)."""
    from likeness.report.page import render

    return render(report, Path(build_dir))


def _marked_contact_sheet(build_dir: Path, report: dict[str, Any], out: Path) -> Path | None:
    """One PNG of the gallery grid, each image tagged kept or with its rejection reason (generation's drawer)."""
    g = report["gallery"]
    if not g or not any(i["zoom_index"] >= 0 for i in g["images"]):
        return None
    from likeness.generate.contact_sheet import contact_sheet
    from likeness.errors import LikenessError
    from likeness.generate.manifest import read_manifest

    marks = {i["id"]: ("kept" if i["kept"] else i["reason_code"]) for i in g["images"] if i["kept"] is not None}
    rows = [r for r in read_manifest(build_dir / layout.GALLERY_DIR) if r.zoom_index >= 0]
    per_cell = max(Counter((r.zoom_index, r.angle_index) for r in rows).values())
    try:
        return contact_sheet(rows, build_dir / layout.GALLERY_DIR, out, marks, thumb=320, max_per_cell=min(per_cell, 256),
                             title=f"{report['build']['character']}: kept / rejected (reason)")
    except LikenessError:
        return None  # the HTML's own marked grid still shows every image


def write_report(build_dir: str | Path, outcome: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``report/report.json`` and ``report/report.html`` atomically; return their paths."""
    build_dir = Path(build_dir)
    report = build_report(build_dir, outcome)
    out = build_dir / layout.REPORT_DIR
    sheet = _marked_contact_sheet(build_dir, report, out / layout.CONTACT_SHEET)
    if sheet is not None:
        report["gallery"]["contact_sheet"] = _rel(build_dir, sheet)
    html = render_html(report, build_dir)
    return {"json": atomic_write_json(out / layout.REPORT_JSON, report), "html": atomic_write_text(out / layout.REPORT_HTML, html)}
