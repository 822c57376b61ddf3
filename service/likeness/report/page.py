"""One self-contained HTML page of a build report, for people.

Every image is a ``data:`` URI (JPEG thumbnails, PNG plots), styles are inline
and there is no script: the page makes no network request and opens the same
from a file, an e-mail attachment or the service. Numbers always come with a
sentence saying what they mean.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from likeness.report import plots
from likeness.errors import InvalidInput
from likeness.files import safe_join

# What each score means, shown beside it (the formulas live in service/likeness/scores.py).
EXPLAIN = {
    "overall": "weighted mean of identity, background, quality and coverage, 0-1",
    "identity_consistency": "how surely all faces are one person (pairwise cosine mapped to 0-1, faceless images count as 0)",
    "identity_mean_to_centroid": "mean cosine of each face to the set's mean face",
    "identity_min_to_centroid": "the least similar face's cosine to the mean face",
    "identity_mean_pairwise": "mean cosine over all face pairs (same person is typically 0.5-0.8)",
    "background_consistency": "how alike the backgrounds are (border colours), 0-1",
    "quality": "face detection confidence x face size for the zoom x sharpness, 0-1",
    "grid_coverage": "share of zoom x angle cells represented, 0-1",
    "n_images": "images in the set",
    "n_faces": "images where a face was found",
    "curated_overall": "overall consistency of the curated training set (0-1)",
    "curated_identity_consistency": "identity consistency of the curated set (0-1)",
    "curated_identity_mean_to_centroid": "mean cosine of curated faces to their mean face",
    "curated_background_consistency": "background consistency of the curated set (0-1)",
    "curation_gain_overall_vs_random_k": "overall score of the curated set minus that of random images of the same count",
    "train_best_score": "selection score of the chosen training checkpoint",
    "eval_identity_token": "identity similarity (cosine to the curated faces) of new scenes made with the token",
    "eval_clip_t_token": "CLIP-T: how well new scenes made with the token match their scene text",
    "eval_face_rate_token": "share of token images in which a face was found",
    "eval_identity_gain_vs_baseline": "identity similarity with the token minus without it (full description, no embedding)",
}

# curation's reason codes in words (likeness.curate.checks.REASON_CODES).
REASONS = {
    "undecodable": "not a readable image",
    "image_too_small": "too few pixels to hold a face",
    "no_face": "no face found",
    "rear_rejected": "rear shot without a face, unlike the character's images",
    "several_faces": "more than one face",
    "low_detection_score": "the detector is unsure it is a face",
    "face_too_small": "face too small for the zoom level",
    "blurry": "face not sharp",
    "identity_outlier": "not the same person (far from the identity centroid)",
    "off_background": "background unlike the spec and the set",
    "off_hair": "hair colours unlike the character's images",
    "off_wardrobe": "clothes colours unlike the character's images",
    "rear_kept": "rear shot without a face, kept on a real CLIP's evidence",
    "selected_drifted": "kept to fill K: the same person, but its background, hair or clothes drifted",
    "near_duplicate": "a copy, crop or mirror of a kept image",
    "not_selected": "passed every check; K images were chosen before it",
    "not_curated": "missing from curation.json",
}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1180px;padding:1em 2em;color:#222;line-height:1.4}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #0072B2;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;vertical-align:top;text-align:left}
th{background:#f2f5f8}td.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#666;font-size:.9em}.ok{color:#009E73;font-weight:bold}.no{color:#D55E00;font-weight:bold}
.bad{background:#fde8e0;border-left:4px solid #D55E00;padding:.4em .8em}
.pos{color:#007a55}.neg{color:#c0392b}
.sheet td{padding:3px}.cell{display:grid;grid-template-columns:repeat(4,44px);gap:3px}
.th{position:relative;width:40px;height:40px;border:2px solid #ccc}.th img{width:40px;height:40px;display:block}
.th.kept{border-color:#009E73}.th.rej{border-color:#D55E00;opacity:.75}
.th span{position:absolute;right:0;bottom:0;background:rgba(0,0,0,.7);color:#fff;font-size:9px;line-height:11px;padding:0 2px}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.card{width:180px;font-size:.8em}.card img{width:180px;height:180px;object-fit:cover}
.pair{display:flex;gap:12px;flex-wrap:wrap}.pair figure{margin:0;width:200px;font-size:.8em}.pair img{width:200px;height:200px;object-fit:cover}
img.plot{max-width:100%;height:auto}details pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em}
.warn{background:#fff4e0;border-left:4px solid #E69F00;padding:.4em .8em}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    return _e(v)


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _plot(data: bytes, alt: str) -> str:
    return f'<img class="plot" alt="{_e(alt)}" src="{_png_uri(data)}">'


class _Thumbs:
    """JPEG thumbnails of build images as data URIs (cached: an image may appear twice)."""

    def __init__(self, build_dir: Path) -> None:
        self.build_dir = build_dir
        self._cache: dict[tuple[str, int], str] = {}

    def uri(self, rel: str, size: int) -> str | None:
        key = (rel, size)
        if key not in self._cache:
            from PIL import Image

            try:
                path = safe_join(self.build_dir, rel)
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    im.thumbnail((size, size))
                    buf = io.BytesIO()
                    im.save(buf, format="JPEG", quality=80)
                self._cache[key] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
            except (OSError, InvalidInput, ValueError):
                self._cache[key] = ""
        return self._cache[key] or None

    def img(self, rel: str, size: int, alt: str) -> str:
        uri = self.uri(rel, size)
        if uri is None:
            return f'<span class="muted">[{_e(alt)}: image missing]</span>'
        return f'<img alt="{_e(alt)}" src="{uri}">'


def _scores_table(scores: dict[str, Any], keys: list[str] | None = None) -> str:
    rows = []
    for k in keys or list(scores):
        if k in scores and not isinstance(scores[k], dict):
            rows.append(f"<tr><th>{_e(k)}</th><td class=n>{_fmt(scores[k])}</td>"
                        f"<td class=muted>{_e(EXPLAIN.get(k, ''))}</td></tr>")
    return "<table>" + "".join(rows) + "</table>" if rows else '<p class="muted">no scores</p>'


def _header(r: dict[str, Any]) -> str:
    b = r["build"]
    state = b.get("state", "unknown")
    prof = b.get("profile") or {}
    out = [f"<h1>{_e(b['character'] or 'Build')} <span class=muted>token <code>{_e(b['token'])}</code></span></h1>",
           f"<p class=muted>build {_e(b['id'])} · state <b>{_e(state)}</b> · profile {_e(prof.get('name') or '?')} · "
           f"report generated {_e(r['generated_at'])} · schema {_e(r['schema_version'])}</p>"]
    if state in ("failed", "cancelled"):
        out.append(f'<p class="bad">This build <b>{_e(state.upper())}</b>'
                   + (f": {_e(b.get('error'))}" if b.get("error") else "") + "</p>")
    if prof.get("random_weights"):
        out.append(f'<p class="warn">Profile <code>{_e(prof.get("name"))}</code> has tiny <b>random weights</b>: '
                   "the images are noise, not the character. These numbers test the pipeline only.</p>")
    emb = b.get("embeddings") or []
    if emb:
        out.append("<p>Embeddings (in the build folder): " + ", ".join(
            f"<code>{_e(e['file'])}</code>" for e in emb) + ". A1111 and ComfyUI name an embedding after its "
            "file: use the file named after the token.</p>")
    elif state != "running":
        out.append('<p class="warn">No embedding was exported.</p>')
    out.append("<h2>Stages</h2><table><tr><th>stage</th><th>ran</th><th>what it left</th></tr>")
    for s in r["stages"]:
        mark = '<span class=ok>✓</span>' if s["ran"] else '<span class=no>✗</span>'
        out.append(f"<tr><td>{_e(s['name'])}</td><td>{mark}</td><td>{_e(s['detail'])}</td></tr>")
    out.append("</table>")
    out.append("<h2>Summary</h2>")
    for n in r["summary"]["notes"]:
        out.append(f"<p>{_e(n)}</p>")
    out.append(_scores_table(r["summary"]["scores"]))
    return "".join(out)


def _spec(spec: dict[str, Any] | None) -> str:
    if not spec:
        return '<h2>Spec</h2><p class="warn">spec.json is missing from the build folder.</p>'
    keys = ["name", "token", "class_word", "traits", "wardrobe", "background", "template", "negative_prompt",
            "zooms", "angles", "per_cell", "sampling", "profile"]
    rows = []
    for k in keys:
        if k in spec:
            v = spec[k]
            v = ", ".join(map(str, v)) if isinstance(v, list) else (
                ", ".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict) else v)
            rows.append(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>")
    return ("<h2>Spec</h2><table>" + "".join(rows) + "</table><details><summary>full spec.json</summary><pre>"
            + _e(json.dumps(spec, indent=2)) + "</pre></details>")


def _contact_sheet(g: dict[str, Any] | None, th: _Thumbs) -> str:
    out = ["<h2>Generated gallery</h2>"]
    if not g:
        return out[0] + '<p class="warn">Generation did not run: no gallery images.</p>'
    curated = any(i["kept"] is not None for i in g["images"])
    codes = {reason: chr(ord("A") + i) if i < 26 else str(i) for i, reason in enumerate(g["rejections"])}
    n_kept = sum(1 for i in g["images"] if i["kept"])
    if curated:
        out.append(f"<p>{g['n_images']} images; <span class=ok>{n_kept} kept</span> (green frame, ✓), "
                   f"<span class=no>{g['n_images'] - n_kept} rejected</span> (orange frame, letter = reason). "
                   "Hover an image for its id, seed and reason.</p>")
        out.append("<table><tr><th>mark</th><th>reason for rejection</th><th>meaning</th><th>images</th></tr>")
        for reason, n in g["rejections"].items():
            out.append(f"<tr><td>{_e(codes[reason])}</td><td><code>{_e(reason)}</code></td>"
                       f"<td>{_e(REASONS.get(reason, ''))}</td><td class=n>{n}</td></tr>")
        out.append("</table>")
    else:
        out.append(f"<p>{g['n_images']} images. Curation did not run, so none is marked kept or rejected.</p>")
    if g.get("contact_sheet"):
        out.append(f"<p class=muted>The same grid as one picture: <code>{_e(g['contact_sheet'])}</code> in the "
                   "build folder.</p>")
    cells: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for img in g["images"]:
        cells.setdefault((img["zoom_index"], img["angle_index"]), []).append(img)
    placed = {(zi, ai) for zi in range(len(g["zooms"])) for ai in range(len(g["angles"]))}
    outside = [img for key, imgs in cells.items() if key not in placed for img in imgs]

    def thumb(img: dict[str, Any]) -> str:
        cls = "kept" if img["kept"] else ("rej" if img["kept"] is False else "")
        mark = "✓" if img["kept"] else codes.get(img["reason_code"], "")
        title = f"{img['id']} seed {img['seed']}" + (
            " — kept" if img["kept"] else f" — rejected: {img['reason']}" if img["kept"] is False else "")
        return (f'<div class="th {cls}" title="{_e(title)}">{th.img(img["file"], 80, img["id"])}'
                + (f"<span>{_e(mark)}</span>" if mark else "") + "</div>")

    if outside:
        out.append(f"<p>{len(outside)} images carry no zoom/angle (imported, not generated from the grid):</p>"
                   '<div class="cell" style="grid-template-columns:repeat(16,44px)">'
                   + "".join(thumb(img) for img in outside) + "</div>")
    rejected = [img for img in g["images"] if img["kept"] is False]
    if rejected:
        # Every reason in words, not only on hover (a contact sheet is read on paper and on phones too).
        out.append(f"<details open><summary>{len(rejected)} rejected images and why</summary><table>"
                   "<tr><th>mark</th><th>image</th><th>reason</th></tr>" + "".join(
                       f"<tr><td>{_e(codes.get(img['reason_code'], ''))}</td><td><code>{_e(img['id'])}</code></td>"
                       f"<td>{_e(img['reason'])}</td></tr>" for img in rejected[:1000]) + "</table>"
                   + (f"<p class=muted>{len(rejected) - 1000} more in report.json</p>" if len(rejected) > 1000 else "")
                   + "</details>")
    if len(outside) == len(g["images"]):
        return "".join(out)
    out.append('<table class="sheet"><tr><th></th>' + "".join(f"<th>{_e(a)}</th>" for a in g["angles"]) + "</tr>")
    for zi, zoom in enumerate(g["zooms"]):
        out.append(f"<tr><th>{_e(zoom)}</th>")
        for ai in range(len(g["angles"])):
            out.append('<td><div class="cell">')
            for img in cells.get((zi, ai), []):
                out.append(thumb(img))
            out.append("</div></td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _curation(c: dict[str, Any] | None, th: _Thumbs) -> str:
    if not c:
        return '<h2>Curated set</h2><p class="warn">Curation did not run: no curated set, scores or heat map.</p>'
    out = ["<h2>Curated set</h2>", f"<p>{len(c['kept'])} images kept for training, each with its scores "
           "(identity = cosine of its face to the curated mean face; background, quality in 0-1; "
           "prompt adherence = CLIP-T) and the caption it is trained with.</p><div class=gallery>"]
    for k in c["kept"]:
        sc = " · ".join(f"{_e(n)} {_fmt(v)}" for n, v in k["scores"].items() if not isinstance(v, dict))
        cap = f"<br><i>{_e(k['caption'])}</i>" if k.get("caption") else ""
        out.append(f'<div class=card>{th.img(k["file"], 180, k["id"])}<br><b>{_e(k["id"])}</b><br>{sc}{cap}</div>')
    out.append("</div>")

    s = c["set_scores"]
    sets = {"curated": s["curated"]}
    if s.get("whole_pool"):
        sets["whole pool"] = s["whole_pool"]
    if s.get("random_k"):
        sets["random K (same size)"] = s["random_k"]
    out.append("<h2>Set scores beside the baselines</h2><p>The curated set against the whole generated pool and a "
               "random set of the same size: the difference is what curation gained. Higher is better.</p>")
    out.append("<table><tr><th>score</th>" + "".join(f"<th>{_e(n)}</th>" for n in sets)
               + "".join(f"<th>gain {_e(g.replace('vs_', 'vs ').replace('_', ' '))}</th>" for g in c["gain"])
               + "<th>meaning</th></tr>")
    metrics = [m for m in ("overall", "identity_consistency", "identity_mean_to_centroid", "identity_min_to_centroid",
                           "identity_mean_pairwise", "background_consistency", "quality", "grid_coverage",
                           "n_images", "n_faces") if any(m in v for v in sets.values())]
    for m in metrics:
        gains = ""
        for g in c["gain"].values():
            v = g.get(m)
            cls = "pos" if v is not None and v > 0 else ("neg" if v is not None and v < 0 else "")
            gains += f'<td class="n {cls}">' + ("—" if v is None else f"{v:+.3f}") + "</td>"
        out.append(f"<tr><th>{_e(m)}</th>" + "".join(f"<td class=n>{_fmt(v.get(m))}</td>" for v in sets.values())
                   + gains + f"<td class=muted>{_e(EXPLAIN.get(m, ''))}</td></tr>")
    out.append("</table>")
    bar_metrics = [m for m in ("overall", "identity_consistency", "background_consistency", "quality", "grid_coverage")
                   if any(isinstance(v.get(m), (int, float)) for v in sets.values())]
    if bar_metrics:
        out.append(_plot(plots.set_score_bars(sets, bar_metrics), "set scores beside the baselines"))

    i = c["identity"]
    out.append("<h2>Identity similarity</h2><p>How similar each image's face is to the curated identity "
               "(cosine to the mean face of the kept images). Kept images should sit right of the "
               "same-person threshold; the pool's left tail is what curation removed.</p>")
    out.append(_plot(plots.identity_histogram(i["pool"], i["kept"], i["threshold"]), "identity similarity histogram"))

    h = c["heatmap"]
    if not any(map(sum, h["generated"])):
        out.append("<h2>Kept images per zoom × angle</h2><p class=muted>No image carries a zoom and angle "
                   "(an imported gallery), so there is no heat map.</p>")
    elif h["zooms"] and h["angles"]:
        out.append("<h2>Kept images per zoom × angle</h2><p>Each cell: images kept / images generated. "
                   "Empty cells are framings the embedding will not see in training.</p>")
        out.append(_plot(plots.cell_heatmap(h["kept"], h["generated"], h["zooms"], h["angles"]), "zoom by angle heat map"))
    if c.get("details"):
        out.append("<details><summary>curation details</summary><pre>" + _e(json.dumps(c["details"], indent=2))
                   + "</pre></details>")
    return "".join(out)


def _training(t: dict[str, Any] | None, th: _Thumbs) -> str:
    if not t:
        return '<h2>Training curve</h2><p class="warn">Training did not run: no checkpoint scores.</p>'
    out = ["<h2>Training curve</h2>"]
    cps = t["checkpoints"]
    if not cps:
        return out[0] + '<p class="warn">No checkpoint was scored.</p>'
    names = [n for n in dict.fromkeys(k for c in cps for k, v in c["scores"].items() if isinstance(v, (int, float)))
             if n not in ("n_images", "n_faces", "faces_found", "loss")]
    losses = [c["scores"].get("loss") for c in cps]
    if t["metric"] in names:  # the selection metric first: it decides the chosen step
        names.remove(t["metric"])
        names.insert(0, t["metric"])
    names = names[:5]
    out.append("<p>Validation scores of each saved checkpoint: <b>identity</b> = mean cosine of the validation "
               "images' faces to the training set's mean face (no face counts 0), <b>clip_t</b> = how well they follow "
               "their prompts. Later steps can overfit: identity keeps rising while CLIP-T falls (the token starts "
               f"to carry the background or outfit). Chosen step: <b>{_fmt(t['best_step'])}</b>"
               + (f" — {_e(t['reason'])}" if t.get("reason") else "") + ".</p>")
    series = {n: [c["scores"].get(n) for c in cps] for n in names}
    steps = [c["step"] for c in cps]
    out.append(_plot(plots.training_curve(steps, series, t["best_step"]), "training curve"))
    if any(isinstance(v, (int, float)) for v in losses):
        # The loss is an MSE, not a 0-1 score: its own plot and axis.
        out.append(_plot(plots.training_curve(steps, {"training loss (MSE)": losses}, t["best_step"],
                                              ylabel="training loss (mean squared error)"), "training loss"))
    cols = names + (["loss"] if any(isinstance(v, (int, float)) for v in losses) else [])
    out.append("<table><tr><th>step</th>" + "".join(f"<th>{_e(n)}</th>" for n in cols) + "</tr>")
    for c in cps:
        star = " ★" if c["step"] == t["best_step"] else ""
        out.append(f"<tr><td class=n>{c['step']}{star}</td>" + "".join(f"<td class=n>{_fmt(c['scores'].get(n))}</td>"
                                                                  for n in cols) + "</tr>")
    out.append("</table>")
    best = next((c for c in cps if c["step"] == t["best_step"]), None)
    if best and best.get("images"):
        out.append(f"<h3>Validation images of the chosen step {best['step']}</h3><div class=pair>")
        for img in best["images"][:16]:
            out.append(f'<figure title="{_e(img["prompt"])}">{th.img(img["file"], 160, "validation " + img["prompt"])}'
                       f"<figcaption>identity {_fmt(img.get('identity'))} · CLIP-T {_fmt(img.get('clip_t'))}"
                       "</figcaption></figure>")
        out.append("</div>")
    return "".join(out)


def _evaluation(ev: dict[str, Any] | None, th: _Thumbs) -> str:
    if not ev:
        return '<h2>Evaluation in new scenes</h2><p class="warn">Evaluation did not run.</p>'
    out = ["<h2>Evaluation in new scenes</h2><p>The token in scenes it was not trained on, beside a baseline: "
           "the same scenes and seeds prompted with the spec's full description and no embedding. "
           "Identity = cosine of the face to the curated faces' mean (higher = more like the character); "
           "CLIP-T = how well the image matches the scene text (editability).</p>"]
    s = ev["summary"]
    out.append("<table><tr><th></th><th>images</th><th>faces found</th><th>identity (mean)</th><th>identity (min)</th>"
               "<th>CLIP-T (mean)</th></tr>")
    for arm, label in (("token", "with the token"), ("baseline", "baseline (no embedding)")):
        a = s.get(arm) or {}
        out.append(f"<tr><th>{label}</th><td class=n>{_fmt(a.get('n_images'))}</td><td class=n>{_fmt(a.get('face_rate'))}"
                   f"</td><td class=n>{_fmt(a.get('identity_mean'))}</td><td class=n>{_fmt(a.get('identity_min'))}</td>"
                   f"<td class=n>{_fmt(a.get('clip_t_mean'))}</td></tr>")
    out.append("</table>")
    for key, label in (("identity_gain", "identity gain from the embedding"), ("clip_t_gain", "CLIP-T change")):
        if s.get(key) is not None:
            out.append(f"<p><b>{label}:</b> {s[key]:+.3f}</p>")
    per: dict[str, dict[str, list[Any]]] = {}
    for img in ev["images"]:
        per.setdefault(img["scene"], {"token": [], "baseline": []})[img["arm"]].append(img)
    scenes = [sc for sc in ev["scenes"] if sc in per] or list(per)

    def mean(vals: list[Any]) -> float | None:
        v = [x for x in vals if isinstance(x, (int, float))]
        return sum(v) / len(v) if v else None

    tok = {m: [mean([i[m] for i in per[sc]["token"]]) for sc in scenes] for m in ("identity", "clip_t")}
    base = {m: [mean([i[m] for i in per[sc]["baseline"]]) for sc in scenes] for m in ("identity", "clip_t")}
    if scenes:
        out.append(_plot(plots.evaluation_bars(scenes, tok, base), "evaluation scores per scene"))
    for sc in scenes:
        out.append(f"<h3>{_e(sc)}</h3><div class=pair>")
        for img in per[sc]["token"] + per[sc]["baseline"]:
            label = "token" if img["arm"] == "token" else "baseline"
            out.append(f'<figure title="{_e(img["prompt"])}">{th.img(img["file"], 200, sc + " " + label)}'
                       f"<figcaption><b>{label}</b> seed {img['seed']}<br>identity {_fmt(img['identity'])}"
                       f"{'' if img['face_found'] else ' (no face)'} · CLIP-T {_fmt(img['clip_t'])}</figcaption></figure>")
        out.append("</div>")
    return "".join(out)


def render(report: dict[str, Any], build_dir: Path) -> str:
    """The HTML page of ``report`` (a build_report dict); images are read from ``build_dir``."""
    th = _Thumbs(build_dir)
    title = f"Likeness report — {report['build']['character'] or report['build']['id']}"
    body = "".join([
        _header(report), _spec(report["spec"]), _contact_sheet(report["gallery"], th),
        _curation(report["curation"], th), _training(report["training"], th), _evaluation(report["evaluation"], th),
        "<h2>Raw data</h2><details><summary>report.json</summary><pre>"
        + _e(json.dumps(report, indent=2)) + "</pre></details>",
    ])
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            # No request may leave the page: images are data URIs and nothing else is loaded.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>\n")
