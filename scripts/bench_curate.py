"""Benchmark: images/s to curate a 400-image gallery, ours vs a naive baseline, in one run.

    python scripts/bench_curate.py [--n 400] [--k 25] [--profile NAME] [--json out.json]

No 400-image gallery of generated faces exists on a fresh machine, so the
pool is built by **cycling the real photos** of ../shared/realdata/faces
(every identity, negative and group photo, in labels.csv order) until ``--n``
images: copy ``c`` of a photo is resized to a longest side of ``512 + 64*c``
pixels (SD-sized, and no two files byte-identical) and saved as PNG in a
temporary folder. Same-photo copies are then near-duplicates, as in a
gallery with repeated seeds: both pipelines see the same files.

- **ours**: ``likeness.curate.decide.curate`` end to end (decode once, batched face
  analysis and CLIP, faiss clustering, checks, near-duplicates, selection,
  set scores, PNG + curation.json output) with the profile's face pack and
  CLIP (CPU: the real CPU pack + tiny CLIP; CUDA: buffalo_l + its CLIP).
- **naive**: insightface ``FaceAnalysis`` with all its default modules,
  ``app.get`` one image at a time (``cv2.imread``), then scikit-learn
  agglomerative clustering (cosine, average linkage, the same calibrated
  threshold), the largest cluster, and the K faces nearest its centroid.

Prints both images/s and the ratio on stderr, and a JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_pool(realdata: Path, n: int, dest: Path) -> list[Path]:
    """``n`` PNGs made by cycling the labelled real photos (see the module doc)."""
    from likeness.images import load_image

    with open(realdata / "labels.csv", newline="", encoding="utf-8") as fh:
        files = [realdata / r["file"] for r in csv.DictReader(fh)]
    decoded = []
    for f in files:
        img, _ = load_image(f)
        decoded.append((f.stem, img))
    out = []
    for i in range(n):
        cycle, j = divmod(i, len(decoded))
        stem, img = decoded[j]
        side = 512 + 64 * cycle
        s = side / max(img.size)
        im = img.resize((max(1, round(img.size[0] * s)), max(1, round(img.size[1] * s))))
        p = dest / f"{i:04d}_{stem}.png"
        im.save(p, format="PNG", compress_level=1)
        out.append(p)
    return out


def naive(files: list[Path], pack: Path, threshold: float, k: int, gpu: bool) -> dict:
    """insightface FaceAnalysis.get per image + scikit-learn clustering."""
    import cv2
    from insightface.app import FaceAnalysis
    from sklearn.cluster import AgglomerativeClustering

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
    t0 = time.perf_counter()
    app = FaceAnalysis(name=str(pack), providers=providers)  # all default modules of the pack
    app.prepare(ctx_id=0 if gpu else -1, det_size=(640, 640))
    t_load = time.perf_counter() - t0
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
        names.append(f.name)
    x = np.stack(embs)
    labels = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                     distance_threshold=1.0 - threshold).fit_predict(x)
    big = np.bincount(labels).argmax()
    members = np.flatnonzero(labels == big)
    c = x[members].mean(axis=0)
    c /= np.linalg.norm(c)
    keep = members[np.argsort(-(x[members] @ c))[:k]]
    secs = time.perf_counter() - t0
    return {"seconds": secs, "load_seconds": t_load, "images_per_s": len(files) / secs, "faces": len(embs),
            "selected": [names[i] for i in keep]}


def main(argv: list[str] | None = None) -> int:
    from likeness.backends.faces import load_face_analyzer
    from likeness.curate.decide import CurateConfig, curate
    from likeness.profiles import best_profile, load_profile, realdata_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=400, help="pool size (default 400)")
    ap.add_argument("--k", type=int, default=25)
    ap.add_argument("--profile", default="", help="model profile (default: the best available)")
    ap.add_argument("--no-clip", action="store_true", help="curate without CLIP")
    ap.add_argument("--json", default="", help="also write the summary here")
    args = ap.parse_args(argv)

    realdata = realdata_dir()
    if not (realdata / "faces").is_dir():
        print(f"real photos not found at {realdata}; set LIKENESS_REALDATA", file=sys.stderr)
        return 2
    profile = load_profile(args.profile) if args.profile else best_profile()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench_curate_"))
    try:
        (tmp / "pool").mkdir()
        files = build_pool(realdata, args.n, tmp / "pool")
        t0 = time.perf_counter()
        faces = load_face_analyzer(profile)
        clip = None
        if not args.no_clip:
            from likeness.backends.clip import load_clip

            clip = load_clip(profile)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = curate(tmp / "pool", None, tmp / "out", CurateConfig(k=args.k), faces=faces, clip=clip)
        ours_s = time.perf_counter() - t0
        threshold = float(res.clusters["threshold"])
        gpu = "CUDAExecutionProvider" in getattr(faces, "providers", [])
        base = naive(files, profile.face_pack_path, threshold, args.k, gpu)
        ours = {"seconds": ours_s, "load_seconds": t_load, "images_per_s": len(files) / ours_s,
                "selected": len(res.selected), "reason_counts": res.summary["reason_counts"],
                "seconds_analyse": res.summary["seconds_analyse"]}
        summary = {"n_images": len(files), "k": args.k, "profile": profile.name, "gpu_faces": gpu,
                   "clip": getattr(clip, "name", None), "ours": ours, "naive": {k: v for k, v in base.items() if k != "selected"},
                   "speedup": ours["images_per_s"] / base["images_per_s"],
                   "pool": "realdata photos cycled to n, copy c resized to 512+64c px (see module doc)"}
        print(f"ours : {ours['images_per_s']:.2f} images/s ({ours_s:.1f} s for {len(files)} images, full curation)",
              file=sys.stderr)
        print(f"naive: {base['images_per_s']:.2f} images/s ({base['seconds']:.1f} s: FaceAnalysis.get per image + "
              "sklearn clustering)", file=sys.stderr)
        print(f"ratio: {summary['speedup']:.2f}x", file=sys.stderr)
        text = json.dumps(summary, indent=2)
        print(text)
        if args.json:
            Path(args.json).write_text(text + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
