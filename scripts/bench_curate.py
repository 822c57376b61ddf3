#!/usr/bin/env python
"""Images/s to curate a labelled one-character gallery, ours vs a naive insightface loop: interleaved pairs.

    python scripts/bench_curate.py [--n 400] [--k 25] [--pairs 5] [--profile NAME] [--json out.json]
    python scripts/bench_curate.py --smoke          # 25 images, 1 pair: checks the benchmark runs

**The pool** is a gallery laid out like a generated one -- 5 zoom levels x
5 camera angles x ``ceil(n / 25)`` images per cell, each with its zoom and
angle in ``manifest.jsonl`` -- built from LFW View-1's training split
(../shared/realdata/lfw_view1_devtrain, deep-funneled 250x250 photos) as
512x512 PNGs, every image labelled (``labels.json``):

- **target** (12 of every 16 in the front/side/above/low cells): photos of ONE
  person (the identity with the most photos there), framed at the cell's zoom
  the way scripts/bench_curate_quality.py frames them (extreme closeup = a
  centre crop blown up ... full body = a 90 px face on a grey canvas), each
  copy shifted and scaled by a few pixels (so no two files are identical;
  copies of one photo at one zoom are near-duplicates, as repeated seeds are);
- **other** (4 of every 16 there): single photos of other people, same framing;
- **rear** (the "rear angle" cells): a hair/background corner of a target photo
  blown up -- a rear shot without a face.

Methods, on the same files and the same face pack:

- **ours**: ``likeness.curate.decide.curate`` end to end (decode, face analysis,
  CLIP, checks, clustering, near-duplicates, selection, scores, PNG +
  curation.json output) with the profile's face pack and CLIP;
- **naive**: insightface ``FaceAnalysis`` with all its default modules,
  ``app.get`` one image at a time (``cv2.imread``), then scikit-learn
  agglomerative clustering (cosine, average linkage, the same calibrated
  threshold), the largest cluster, and the K faces nearest its centroid.

- **floor** (not a method: a bound): what ours cannot skip at its quality -- each PNG
  decoded as ours decodes it (two in flight) and ``FaceAnalyzer.analyze`` at ours'
  per-zoom detection sizes (``ZOOM_DET_SIDE``, with its retries), nothing else. No
  curation that analyses faces as ours does can beat naive by more than naive/floor.

Each method runs in **its own process** (scripts/bench_common.py), models
loaded once (load time reported, not timed); then ``--pairs`` interleaved runs
(naive, ours, floor, naive, ours, floor, ...). Printed: the median and spread of each
side's images/s and of the per-pair ratio, how many of each side's K are
target photos, the machine and its load; a JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_common import (  # noqa: E402
    SideProcess, add_pair_args, check_pairs, fmt_spread, interleave, lfw_dir, machine, machine_line, pairs_summary,
    side_main,
)

ZOOMS = ("extreme closeup", "medium closeup", "closeup", "medium shot", "full body")
ANGLES = ("front shot", "rear angle", "side angle", "shot from above", "low angle shot")
# Of every 16 images in a face cell, this many are the target (the rest other people): a clear
# majority, as a gallery of one character drawn from one prompt has.
TARGET_PER_16 = 12


def _jitter(im, j: int):
    """Copy ``j`` of a framed image: shifted by up to 12 px and scaled by up to 4%, back to 512x512."""
    from PIL import Image

    rng = random.Random(j)
    s = 1.0 + rng.uniform(-0.04, 0.04)
    side = round(512 / s)
    dx, dy = rng.randint(-12, 12), rng.randint(-12, 12)
    left, top = (512 - side) // 2 + dx, (512 - side) // 2 + dy
    grey = Image.new("RGB", (side, side), (128, 128, 128))
    grey.paste(im, (-left, -top))
    return grey.resize((512, 512), Image.BICUBIC)


def build_pool(realdata: Path, n: int, dest: Path) -> dict[str, str]:
    """Write the labelled pool (PNGs, manifest.jsonl, labels.json) into ``dest``; returns id -> label."""
    from PIL import Image

    from bench_curate_quality import _corner, _frame
    from likeness.generate.manifest import GalleryImage, write_manifest

    root = lfw_dir(realdata)
    people = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: (-len(list(p.glob("*.jpg"))), p.name))
    target = people[0]
    photos = [Image.open(f).convert("RGB") for f in sorted(target.glob("*.jpg"))]
    others = [sorted(p.glob("*.jpg"))[0] for p in random.Random(0).sample(people[1:], min(200, len(people) - 1))]
    per_cell = math.ceil(n / (len(ZOOMS) * len(ANGLES)))
    dest.mkdir(parents=True, exist_ok=True)
    rows, labels, n_other = [], {}, 0
    # Round-robin over the cells (image j of every cell before image j + 1 of any): every cell
    # gets floor or ceil of n / 25 images, whatever n is.
    for j in range(per_cell):
        for zi, zoom in enumerate(ZOOMS):
            for ai, angle in enumerate(ANGLES):
                k = len(rows)
                if k == n:
                    break
                if angle == "rear angle":
                    im, label = _jitter(_corner(photos[k % len(photos)]), k), "rear"
                elif j % 16 < TARGET_PER_16:
                    im, label = _jitter(_frame(photos[k % len(photos)], zoom), k), "target"
                else:
                    im, label = _frame(Image.open(others[n_other % len(others)]), zoom), "other"
                    n_other += 1
                iid = f"z{zi}-a{ai}-{j:04d}"
                im.save(dest / f"{iid}.png", format="PNG", compress_level=1)
                labels[iid] = label
                rows.append(GalleryImage(id=iid, file=f"{iid}.png", zoom=zoom, angle=angle, zoom_index=zi,
                                         angle_index=ai, index_in_cell=j, seed=k, width=512, height=512,
                                         source="imported"))
    write_manifest(dest, rows)
    (dest / "labels.json").write_text(json.dumps({"target": target.name, "labels": labels}, indent=1), encoding="utf-8")
    return labels


def _labels(pool: Path) -> dict[str, str]:
    return json.loads((pool / "labels.json").read_text(encoding="utf-8"))["labels"]


def naive_side(args):
    """insightface FaceAnalysis.get per image + scikit-learn clustering; run(i) -> result."""
    import cv2
    from insightface.app import FaceAnalysis
    from sklearn.cluster import AgglomerativeClustering

    from likeness.profiles import load_profile

    profile = load_profile(args.profile)
    pool = Path(args.work)
    files = sorted(pool.glob("*.png"))
    labels = _labels(pool)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.gpu else ["CPUExecutionProvider"]
    app = FaceAnalysis(name=str(profile.face_pack_path), providers=providers)  # all default modules of the pack
    app.prepare(ctx_id=0 if args.gpu else -1, det_size=(640, 640))

    def run(i: int) -> dict:
        t0 = time.perf_counter()
        embs, names = [], []
        for f in files:
            img = cv2.imread(str(f))
            if img is None:
                continue
            faces = app.get(img)
            if not faces:
                continue
            main = max(faces, key=lambda x: (x.bbox[2] - x.bbox[0]) * (x.bbox[3] - x.bbox[1]))
            embs.append(main.normed_embedding)
            names.append(f.stem)
        x = np.stack(embs)
        if len(x) > 1:
            cl = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                         distance_threshold=1.0 - args.threshold).fit_predict(x)
        else:
            cl = np.zeros(len(x), dtype=int)
        members = np.flatnonzero(cl == np.bincount(cl).argmax())
        c = x[members].mean(axis=0)
        c /= np.linalg.norm(c)
        keep = members[np.argsort(-(x[members] @ c))[: args.k]]
        secs = time.perf_counter() - t0
        return {"seconds": secs, "faces": len(embs), "selected": len(keep),
                "selected_target": sum(labels.get(names[j]) == "target" for j in keep)}

    return run, {"images": len(files)}


def ours_side(args):
    """likeness.curate.decide.curate end to end; run(i) -> result (a fresh output folder each time)."""
    from likeness.backends.faces import load_face_analyzer
    from likeness.curate.decide import CurateConfig, curate
    from likeness.profiles import load_profile

    profile = load_profile(args.profile)
    pool = Path(args.work)
    labels = _labels(pool)
    faces = load_face_analyzer(profile)
    clip = None
    if not args.no_clip:
        from likeness.backends.clip import load_clip

        clip = load_clip(profile)
    out_root = Path(tempfile.mkdtemp(prefix="bench-curate-out-"))

    def run(i: int) -> dict:
        out = out_root / f"run-{i}"
        t0 = time.perf_counter()
        res = curate(pool, None, out, CurateConfig(k=args.k), faces=faces, clip=clip)
        secs = time.perf_counter() - t0
        shutil.rmtree(out, ignore_errors=True)
        return {"seconds": secs, "selected": len(res.selected),
                "selected_target": sum(labels.get(Path(s).stem) == "target" for s in res.selected),
                "threshold": float(res.clusters["threshold"]), "reason_counts": res.summary["reason_counts"],
                "seconds_analyse": res.summary.get("seconds_analyse"), "warnings": list(res.warnings)}

    return run, {"images": len(labels), "gpu_faces": "CUDAExecutionProvider" in getattr(faces, "providers", []),
                 "clip": getattr(clip, "name", None)}


def floor_side(args):
    """Decode + face analysis at ours' detection sizes only (no CLIP, checks or output); run(i) -> result."""
    from concurrent.futures import ThreadPoolExecutor

    from likeness.backends.faces import load_face_analyzer
    from likeness.curate.analysis import ZOOM_DET_SIDE
    from likeness.curate.decide import gallery_rows
    from likeness.images import load_image
    from likeness.profiles import load_profile

    pool = Path(args.work)
    faces = load_face_analyzer(load_profile(args.profile))
    rows = gallery_rows(pool)
    decode = ThreadPoolExecutor(max_workers=2)

    def run(i: int) -> dict:
        t0 = time.perf_counter()
        found = 0
        for start in range(0, len(rows), 32):  # ours' shard size on one machine
            chunk = rows[start:start + 32]
            arrays = list(decode.map(lambda r: np.asarray(load_image(pool / r.file)[0]), chunk))
            found += sum(bool(f) for f in faces.analyze(arrays, det_sides=[ZOOM_DET_SIDE.get(r.zoom) for r in chunk]))
        return {"seconds": time.perf_counter() - t0, "faces": found}

    return run, {"images": len(rows)}


def _side_argv(args, name: str, threshold: float, gpu: bool) -> list[str]:
    argv = [str(Path(__file__).resolve()), "--side", name, "--work", args.work, "--profile", args.profile,
            "--k", str(args.k), "--threshold", repr(threshold)]
    if args.no_clip:
        argv.append("--no-clip")
    if gpu:
        argv.append("--gpu")
    return argv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=None, help="pool size (default 400; smoke 25)")
    ap.add_argument("--k", type=int, default=25)
    ap.add_argument("--profile", default="", help="model profile (default: the best available)")
    ap.add_argument("--no-clip", action="store_true", help="curate without CLIP")
    ap.add_argument("--json", default="", help="also write the summary here")
    ap.add_argument("--work", default="", help=argparse.SUPPRESS)
    ap.add_argument("--threshold", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--gpu", action="store_true", help=argparse.SUPPRESS)
    add_pair_args(ap)
    raw = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(raw)
    if args.side:
        return side_main(lambda: {"ours": ours_side, "naive": naive_side, "floor": floor_side}[args.side](args))
    pairs_given = any(a == "--pairs" or a.startswith("--pairs=") for a in raw)
    if args.smoke:
        args.n = args.n or 25
        args.pairs = min(args.pairs, 2) if pairs_given else 1
    args.n = args.n or 400
    check_pairs(args.pairs)
    if not 1 <= args.n <= 10000:
        raise SystemExit(f"error: --n {args.n} must be 1..10000")

    from likeness.backends.faces import load_face_analyzer
    from likeness.curate.calibration import calibration_for
    from likeness.profiles import best_profile, load_profile, realdata_dir

    realdata = realdata_dir()
    if not (realdata / "lfw_view1_devtrain").is_dir():
        print(f"real photos not found at {realdata}; set LIKENESS_REALDATA", file=sys.stderr)
        return 2
    profile = load_profile(args.profile) if args.profile else best_profile()[0]
    args.profile = profile.name
    # The naive side clusters at the same calibrated threshold ours uses (read here, in a process that times nothing).
    analyzer = load_face_analyzer(profile)
    threshold = float(calibration_for(analyzer.recognition_sha256).threshold)
    gpu = "CUDAExecutionProvider" in getattr(analyzer, "providers", [])
    del analyzer
    info = machine("cuda" if gpu else "cpu")
    print(machine_line(info), file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="bench_curate_"))
    sides: list[SideProcess] = []
    try:
        t0 = time.perf_counter()
        labels = build_pool(realdata, args.n, tmp / "pool")
        print(f"pool: {len(labels)} images in {time.perf_counter() - t0:.1f} s "
              f"({sum(v == 'target' for v in labels.values())} target)", file=sys.stderr)
        args.work = str(tmp / "pool")
        sides = [SideProcess(name, _side_argv(args, name, threshold, gpu)) for name in ("naive", "ours", "floor")]
        runs = interleave(sides, args.pairs, log=lambda s: print(s, file=sys.stderr))
    finally:
        for s in sides:
            s.close()
        shutil.rmtree(tmp, ignore_errors=True)
    n = len(labels)
    summary = pairs_summary([r["seconds"] for r in runs["ours"]], [r["seconds"] for r in runs["naive"]], n)
    # The bound: naive / floor per pair is the most any curation analysing faces as ours does could reach.
    bound = pairs_summary([r["seconds"] for r in runs["floor"]], [r["seconds"] for r in runs["naive"]], n)
    counts = {k: sum(v == k for v in labels.values()) for k in ("target", "other", "rear")}
    last = {name: {k: v for k, v in rs[-1].items() if k != "seconds"} for name, rs in runs.items()}
    settings = (f"{n}-image labelled one-character LFW gallery ({counts['target']} target, {counts['other']} other, "
                f"{counts['rear']} rear), k={args.k}, profile {profile.name}")
    doc = {"stage": "curate", "unit": "images/s", "ours_name": "likeness curate (end to end)",
           "alternative_name": "FaceAnalysis.get per image + sklearn clustering", "settings": settings,
           "n_images": n, "k": args.k, "profile": profile.name, "pool_counts": counts, "threshold": threshold,
           "smoke": args.smoke, "machine": info, "setup": {s.name: s.ready for s in sides}, "last_run": last, **summary,
           "floor_name": "decode + face analysis at ours' detection sizes", "floor_rate": bound["ours_rate"],
           "floor_ratio": bound["ratio"], "floor_seconds": bound["ours_seconds"]}
    print(f"{settings}; {args.pairs} interleaved pairs, median [min-max]", file=sys.stderr)
    print(f"naive: {fmt_spread(summary['alternative_rate'])} images/s; kept {last['naive']['selected_target']}/"
          f"{last['naive']['selected']} target", file=sys.stderr)
    print(f"ours : {fmt_spread(summary['ours_rate'])} images/s; kept {last['ours']['selected_target']}/"
          f"{last['ours']['selected']} target", file=sys.stderr)
    print(f"ratio ours/naive: {fmt_spread(summary['ratio'])}", file=sys.stderr)
    print(f"floor (decode + face analysis at ours' detection sizes, nothing else): {fmt_spread(bound['ours_rate'])} "
          f"images/s = {fmt_spread(bound['ratio'])} x naive, the most a curation analysing faces as ours does "
          f"could reach", file=sys.stderr)
    if "note" in summary:
        print(f"note: {summary['note']}", file=sys.stderr)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
