"""Curation quality on labelled pools, Likeness vs the naive baselines, side by side in one run.

    python scripts/bench_curate_quality.py [--pools 31] [--families one,crowded,oversampled] [--profile cpu-tiny] [--json out.json]

Pools are built from LFW View-1's training split (../shared/realdata/lfw_view1_devtrain,
deep-funneled 250x250 photos; nothing here was tuned on them by eye). For each *target*
identity with at least 6 photos (31 people), one pool holds, as 512x512 PNGs with a
manifest giving each image's zoom and angle label the way a generated gallery does:

- **target** (correct): every photo of the target, each at one of the 5 zoom levels in
  turn: extreme closeup (a 140 px centre crop blown up: the face fills ~60-80% of the
  frame), closeup (the whole photo), medium closeup / medium shot / full body (the photo
  shrunk to 360 / 200 / 100 px on a canvas of its own mean border colour: faces down to ~40 px wide);
- **dup**: a mirrored copy, a JPEG q=35 re-encoding and a blurred copy of three target
  photos (kept beside their original, each is a mistake);
- **lookalike**: the photos of the identities whose mean face is nearest the target's
  (by the same face pack), 3 + 2 photos ("one" family) or 3 + 3 + 3 ("crowded");
- **other**: single photos of random other people (3, or 6 in "crowded");
- **group**: the target beside another person in one frame;
- **decoy**: two images without any face, labelled "rear angle" (a drawn cup and a
  hair/background corner of a target photo blown up).

K = the number of target photos (6-8), so a perfect curator keeps exactly the targets.
"crowded" pools have the target as a minority of the faces (no clear majority):
a curator should warn there, and the baselines show what happens when nobody checks.
"oversampled" pools are the "one" pools, file for file, with K one below the target count:
a gallery holding one good image more than K, as the workflow oversamples (400 images for
K = 25), so a curator that refuses a bad target photo can still fill K with good ones.

Methods, on the same files and the same face pack (CPU: SCRFD-500M + MobileFaceNet):

- **likeness**: ``likeness.curate.decide.curate_with_profile`` end to end (the profile's
  face pack and CLIP; K = the pool's K);
- **nearest-mean**: main (largest) face of every image, the K faces nearest the
  normalised mean face;
- **chosen-one**: The Chosen One's rule (Avrahami et al. 2024): k-means++ on the face
  embeddings with k = max(1, round(N / 20)) (N = faces), the most cohesive cluster (smallest
  mean distance to its centroid) among clusters of at least K/2 faces, its K faces nearest
  its centroid.

Printed: per family and method, precision (kept images that are correct target photos; a
kept dup counts as correct only when its original was not kept), recall (correct kept / K),
K filled (kept / K), means and the worst pool; for likeness also the reason codes of wrong
rejections (a target rejected for anything but "not_selected", or as a near-duplicate of a copy
that was not kept; a non-target rejected for a reason that is not its own), how many pools warned and
how many images were kept only to fill K (``selected_drifted``); per pool, every wrong decision with its
reason (``per_pool.<family>.likeness[].wrong``). JSON on stdout, the table on stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "service"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import lfw_dir  # noqa: E402

ZOOMS = ("extreme closeup", "closeup", "medium closeup", "medium shot", "full body")
# Reason codes a non-target may rightly be rejected with, per label.
EXPECTED = {
    "dup": {"near_duplicate", "blurry"},
    "lookalike": {"identity_outlier"},
    "other": {"identity_outlier"},
    "group": {"several_faces", "identity_outlier"},
    "decoy": {"no_face", "rear_rejected"},
}
GREY = (128, 128, 128)
FAMILIES = ("one", "crowded", "oversampled")


@dataclass
class PoolImage:
    id: str
    label: str
    zoom: str
    angle: str
    # For dups: the id of the target photo it copies.
    source: str = ""


def _frame(img, zoom: str):
    """A 250x250 LFW photo framed at ``zoom`` on a 512x512 canvas."""
    from PIL import Image

    img = img.convert("RGB").resize((250, 250))
    if zoom == "extreme closeup":
        return img.crop((55, 55, 195, 195)).resize((512, 512), Image.LANCZOS)
    if zoom == "closeup":
        return img.resize((512, 512), Image.LANCZOS)
    side = {"medium closeup": 360, "medium shot": 200, "full body": 100}[zoom]
    # The canvas takes the photo's own mean border colour: backdrops vary from image to image as
    # LFW's do, so no zoom level is singled out by its background.
    a = np.asarray(img, np.float32)
    border = np.concatenate([a[:10].reshape(-1, 3), a[-10:].reshape(-1, 3), a[:, :10].reshape(-1, 3),
                             a[:, -10:].reshape(-1, 3)])
    canvas = Image.new("RGB", (512, 512), tuple(int(v) for v in border.mean(axis=0)))
    small = img.resize((side, side), Image.LANCZOS)
    # Full body: the head sits in the upper part of the frame, as in a standing figure.
    top = (512 - side) // 2 if zoom != "full body" else 60
    canvas.paste(small, ((512 - side) // 2, top))
    return canvas


def _cup():
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (512, 512), (214, 200, 178))
    d = ImageDraw.Draw(im)
    d.rectangle((170, 200, 330, 400), fill=(245, 245, 240), outline=(90, 90, 90), width=4)
    d.ellipse((170, 180, 330, 220), fill=(110, 70, 40), outline=(90, 90, 90), width=4)
    d.arc((300, 240, 380, 340), -90, 90, fill=(90, 90, 90), width=10)
    return im


def _corner(img):
    from PIL import Image

    return img.convert("RGB").resize((250, 250)).crop((0, 0, 60, 60)).resize((512, 512), Image.BICUBIC)


def _save(im, path: Path, jpeg_quality: int | None = None) -> None:
    from PIL import Image

    if jpeg_quality is not None:  # a re-encoding: JPEG round trip, stored as PNG like the rest
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=jpeg_quality)
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    im.save(path, format="PNG", compress_level=1)


def identity_centroids(analyzer, root: Path, min_photos: int) -> dict[str, np.ndarray]:
    """Normalised mean main face of every identity with at least ``min_photos`` photos."""
    from PIL import Image

    from likeness.identity import main_embeddings
    from likeness.scores import identity_centroid

    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(d.glob("*.jpg"))
        if len(files) < min_photos:
            continue
        embs = [e for e in main_embeddings(analyzer, [Image.open(f) for f in files]) if e is not None]
        if embs:
            out[d.name] = identity_centroid(np.stack(embs))
    return out


def pool_family(family: str) -> str:
    """The family whose pool a family's pools are (``oversampled`` reuses ``one``'s files)."""
    return "one" if family == "oversampled" else family


def build_pool(root: Path, target: str, family: str, centroids: dict[str, np.ndarray],
               singles: list[str], dest: Path, rng: random.Random) -> tuple[list[PoolImage], int]:
    """Write one labelled pool (PNGs + manifest.jsonl) into ``dest``; returns its images and K."""
    family = pool_family(family)
    from PIL import Image, ImageFilter, ImageOps

    from likeness.generate.manifest import GalleryImage, write_manifest

    dest.mkdir(parents=True)
    images: list[PoolImage] = []
    rows: list[GalleryImage] = []

    def add(im, label: str, zoom: str, angle: str = "front shot", source: str = "", jpeg: int | None = None) -> str:
        iid = f"{len(images):03d}_{label}"
        _save(im, dest / f"{iid}.png", jpeg)
        images.append(PoolImage(iid, label, zoom, angle, source))
        zi = ZOOMS.index(zoom) if zoom in ZOOMS else -1
        ai = {"front shot": 0, "rear angle": 1, "side angle": 2}.get(angle, -1)
        rows.append(GalleryImage(id=iid, file=f"{iid}.png", zoom=zoom, angle=angle, zoom_index=zi, angle_index=ai,
                                 index_in_cell=len(images), seed=len(images), width=512, height=512,
                                 source="imported"))
        return iid

    photos = sorted((root / target).glob("*.jpg"))
    framed = []
    for i, f in enumerate(photos):
        zoom = ZOOMS[i % len(ZOOMS)]
        im = _frame(Image.open(f), zoom)
        framed.append((add(im, "target", zoom), im, zoom))
    k = len(photos)
    # Copies of three target photos: mirror, re-encoding, blur.
    (m_id, m_im, m_z), (r_id, r_im, r_z), (b_id, b_im, b_z) = framed[1], framed[2], framed[3]
    add(ImageOps.mirror(m_im), "dup", m_z, source=m_id)
    add(r_im, "dup", r_z, source=r_id, jpeg=35)
    add(b_im.filter(ImageFilter.GaussianBlur(4)), "dup", b_z, source=b_id)
    # Lookalikes: the identities whose mean face is nearest the target's.
    c = centroids[target]
    near = sorted((n for n in centroids if n != target), key=lambda n: -float(centroids[n] @ c))
    counts = (3, 2) if family == "one" else (3, 3, 3)
    for name, n in zip(near, counts):
        for j, f in enumerate(sorted((root / name).glob("*.jpg"))[:n]):
            add(_frame(Image.open(f), ZOOMS[(j + 1) % len(ZOOMS)]), "lookalike", ZOOMS[(j + 1) % len(ZOOMS)])
    others = rng.sample([s for s in singles if s != target and s not in near[:3]], 3 if family == "one" else 6)
    for j, name in enumerate(others):
        f = sorted((root / name).glob("*.jpg"))[0]
        add(_frame(Image.open(f), ZOOMS[j % len(ZOOMS)]), "other", ZOOMS[j % len(ZOOMS)])
    # A group: the target beside another person, faces of equal size.
    group = Image.new("RGB", (512, 512), GREY)
    group.paste(Image.open(photos[0]).convert("RGB").resize((256, 256)), (0, 128))
    group.paste(Image.open(sorted((root / others[0]).glob("*.jpg"))[0]).convert("RGB").resize((256, 256)), (256, 128))
    add(group, "group", "medium shot")
    add(_cup(), "decoy", "medium shot", angle="rear angle")
    add(_corner(Image.open(photos[-1])), "decoy", "closeup", angle="rear angle")
    write_manifest(dest, rows)
    return images, k


# ---------------------------------------------------------------- baselines

def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_mean(ids: list[str], embs: list[np.ndarray | None], k: int) -> list[str]:
    have = [(i, e) for i, e in zip(ids, embs) if e is not None]
    if not have:
        return []
    x = _unit(np.stack([e for _, e in have]))
    c = _unit(x.mean(axis=0))
    order = np.argsort(-(x @ c), kind="stable")[:k]
    return [have[j][0] for j in order]


def chosen_one(ids: list[str], embs: list[np.ndarray | None], k: int, seed: int = 0) -> list[str]:
    from sklearn.cluster import KMeans

    have = [(i, e) for i, e in zip(ids, embs) if e is not None]
    if not have:
        return []
    x = _unit(np.stack([e for _, e in have]))
    n_clusters = max(1, round(len(have) / 20))
    km = KMeans(n_clusters=n_clusters, init="k-means++", n_init=10, random_state=seed).fit(x)
    best, best_spread = None, float("inf")
    for c in range(n_clusters):
        m = np.flatnonzero(km.labels_ == c)
        if len(m) < max(1, k // 2) and n_clusters > 1:
            continue
        spread = float(np.linalg.norm(x[m] - km.cluster_centers_[c], axis=1).mean())
        if spread < best_spread:
            best, best_spread = c, spread
    if best is None:
        best = int(np.bincount(km.labels_).argmax())
    m = np.flatnonzero(km.labels_ == best)
    order = m[np.argsort(np.linalg.norm(x[m] - km.cluster_centers_[best], axis=1), kind="stable")][:k]
    return [have[j][0] for j in order]


# ---------------------------------------------------------------- scoring

def score(kept: list[str], images: list[PoolImage], k: int) -> dict[str, float]:
    by_id = {im.id: im for im in images}
    kept_set = set(kept)
    correct = 0
    for i in kept:
        im = by_id[i]
        if im.label == "target" or (im.label == "dup" and im.source not in kept_set):
            correct += 1
    n = len(kept)
    return {"precision": correct / n if n else 0.0, "recall": min(correct, k) / k, "k_filled": min(n, k) / k,
            "kept": n, "correct": correct}


def wrong_reasons(decisions, images: list[PoolImage]) -> Counter:
    """``label:reason_code`` of each rejection whose reason is not the image's own."""
    by_id = {im.id: im for im in images}
    kept = {d.id for d in decisions if d.decision == "kept"}
    copied = {im.source for im in images if im.label == "dup" and im.id in kept}
    out: Counter = Counter()
    for d in decisions:
        im = by_id.get(d.id)
        if im is None or d.decision == "kept":
            continue
        if im.label == "target":
            # One of a photo and its copy has to go: the original losing to its kept copy is right.
            if d.reason_code != "not_selected" and not (d.reason_code == "near_duplicate" and im.id in copied):
                out[f"target:{d.reason_code}"] += 1
        elif d.reason_code not in EXPECTED[im.label]:
            out[f"{im.label}:{d.reason_code}"] += 1
    return out


def wrong_decisions(decisions, images: list[PoolImage]) -> list[dict]:
    """Every wrong rejection and every wrongly kept image: id, label, zoom, reason code and sentence, scores."""
    by_id = {im.id: im for im in images}
    kept = {d.id for d in decisions if d.decision == "kept"}
    copied = {im.source for im in images if im.label == "dup" and im.id in kept}
    out = []
    for d in decisions:
        im = by_id.get(d.id)
        if im is None:
            continue
        if d.decision == "kept":
            wrong = not (im.label == "target" or (im.label == "dup" and im.source not in kept))
        elif im.label == "target":
            wrong = d.reason_code != "not_selected" and not (d.reason_code == "near_duplicate" and im.id in copied)
        else:
            wrong = d.reason_code not in EXPECTED[im.label]
        if wrong:
            out.append({"id": d.id, "label": im.label, "zoom": im.zoom, "decision": d.decision,
                        "reason_code": d.reason_code, "reason": d.reason, "scores": d.scores})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pools", type=int, default=0, help="pools per family (0: every target with >= 6 photos)")
    ap.add_argument("--families", default="one,crowded,oversampled")
    ap.add_argument("--profile", default="cpu-tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the JSON summary here")
    args = ap.parse_args(argv)
    families = args.families.split(",")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown --families {','.join(unknown)}: choose from {','.join(FAMILIES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from PIL import Image

    from likeness.backends.faces import load_face_analyzer
    from likeness.curate.decide import CurateConfig, curate_with_profile
    from likeness.identity import main_embeddings
    from likeness.profiles import realdata_dir, resolve_profile

    root = lfw_dir(realdata_dir())
    prof = resolve_profile(args.profile)
    analyzer = load_face_analyzer(prof)
    t0 = time.perf_counter()
    centroids = identity_centroids(analyzer, root, min_photos=3)
    singles = sorted(p.name for p in root.iterdir() if p.is_dir())
    targets = [n for n in sorted(centroids) if len(list((root / n).glob("*.jpg"))) >= 6]
    if args.pools:
        targets = targets[:args.pools]
    print(f"{len(targets)} targets, {len(centroids)} identities with >= 3 photos embedded in "
          f"{time.perf_counter() - t0:.0f} s; machine {platform.node()} ({os.cpu_count()} CPUs), "
          f"load {os.getloadavg()[0]:.2f}", file=sys.stderr)

    methods = ("likeness", "nearest-mean", "chosen-one")
    results: dict[str, dict[str, list]] = {}
    reasons: dict[str, Counter] = {}
    warned: Counter = Counter()
    drift_filled: Counter = Counter()
    for family in families:
        results[family] = {m: [] for m in methods}
        reasons[family] = Counter()
        for n, target in enumerate(targets):
            rng = random.Random(f"{args.seed}:{pool_family(family)}:{target}")
            with tempfile.TemporaryDirectory() as tmp:
                pool_dir = Path(tmp) / "pool"
                images, k = build_pool(root, target, family, centroids, singles, pool_dir, rng)
                if family == "oversampled":
                    k -= 1
                ids = [im.id for im in images]
                embs = main_embeddings(analyzer, [Image.open(pool_dir / f"{i}.png") for i in ids])
                res = curate_with_profile(pool_dir, None, Path(tmp) / "out", CurateConfig(k=k), profile=prof)
                kept = {"likeness": list(res.selected), "nearest-mean": nearest_mean(ids, embs, k),
                        "chosen-one": chosen_one(ids, embs, k, seed=args.seed)}
                for m in methods:
                    results[family][m].append(dict(score(kept[m], images, k), target=target, k=k))
                reasons[family].update(wrong_reasons(res.images, images))
                # Each wrong decision in full (what a user would read in curation.json), to see why.
                results[family]["likeness"][-1]["wrong"] = wrong_decisions(res.images, images)
                # Kept only to fill K (a drift rule rejected them: CurateConfig.fill_from_drift).
                drift_filled[family] += sum(d.reason_code == "selected_drifted" for d in res.images)
                warned[family] += bool(res.warnings)
                results[family]["likeness"][-1]["warnings"] = list(res.warnings)
            print(f"  {family} {n + 1}/{len(targets)} {target}: " + ", ".join(
                f"{m} P={results[family][m][-1]['precision']:.2f} R={results[family][m][-1]['recall']:.2f}"
                for m in methods), file=sys.stderr)

    summary: dict[str, dict] = {}
    print("\nfamily      method        precision (worst)   recall (worst)   K filled (worst)", file=sys.stderr)
    for family, per in results.items():
        summary[family] = {"pools": len(targets), "likeness_warned": warned[family],
                           "likeness_drift_filled": drift_filled[family],
                           "likeness_wrong_reasons": dict(reasons[family].most_common())}
        for m, rows in per.items():
            agg = {f: (float(np.mean([r[f] for r in rows])), float(np.min([r[f] for r in rows])))
                   for f in ("precision", "recall", "k_filled")}
            summary[family][m] = {f: {"mean": round(a, 4), "worst": round(w, 4)} for f, (a, w) in agg.items()}
            print(f"{family:11} {m:13} {agg['precision'][0]:.3f} ({agg['precision'][1]:.2f})      "
                  f"{agg['recall'][0]:.3f} ({agg['recall'][1]:.2f})    {agg['k_filled'][0]:.3f} ({agg['k_filled'][1]:.2f})",
                  file=sys.stderr)
        print(f"{family:11} likeness warned in {warned[family]}/{len(targets)} pools; {drift_filled[family]} images "
              f"kept to fill K although a drift rule rejected them (selected_drifted); wrong rejection reasons: "
              f"{dict(reasons[family].most_common()) or 'none'}", file=sys.stderr)
    doc = {"profile": prof.name, "seconds": round(time.perf_counter() - t0, 1), "families": summary,
           "per_pool": results}
    text = json.dumps(doc, indent=2)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
