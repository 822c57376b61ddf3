"""Identity-threshold calibration on real labelled pairs, and the per-pack table.

Method (docs/scores.md): embed the main face of every image of a labelled
pair list, take the cosine of each pair, and choose the threshold that
maximises accuracy of ``same = cosine >= t``. Accuracy is constant between
two consecutive observed cosines, so the candidates are those gaps; the
widest run of best-accuracy gaps wins and the threshold is its midpoint (the
"ties -> midpoint" rule: the most margin on both sides). We also report ROC
AUC (sklearn), the class means (anchors of ``scores.identity_score``) and a
5-fold cross-validated accuracy (threshold fitted on 4/5, tested on 1/5) so
the in-sample accuracy is not the only number.

The result is stored in ``service/likeness/curate/calibration_table.json`` keyed by the
recognition model file's sha256: a different pack is never judged with
another pack's threshold.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from likeness.backends.protocols import FaceAnalyzer
from likeness.errors import InvalidInput, NotFound
from likeness.files import atomic_write_json
from likeness.scores import (
    DIFFERENT_PERSON_COSINE,
    IDENTITY_THRESHOLD,
    SAME_PERSON_COSINE,
    IdentityScale,
)

TABLE_PATH = Path(__file__).resolve().parent / "calibration_table.json"
_YES = {"yes", "y", "true", "1", "same"}
_NO = {"no", "n", "false", "0", "different"}


@dataclass(frozen=True)
class Calibration:
    """A calibrated identity threshold for one recognition model."""

    # Same person iff cosine >= threshold.
    threshold: float
    # Mean cosine of labelled same-person / different-person pairs.
    same_mean: float
    different_mean: float
    # Accuracy at the threshold on the calibration pairs (in-sample).
    accuracy: float
    # 5-fold cross-validated accuracy (threshold fitted on the other folds).
    cv_accuracy: float
    # ROC AUC of the cosine as a same-person score.
    auc: float
    n_pairs: int
    n_same: int
    # Pairs where an image had no detectable face (counted as "different").
    n_missing: int
    # Recognition model file name and where the pairs came from.
    model: str = ""
    pairs: str = ""
    # False when no calibration exists for this model and defaults are used.
    calibrated: bool = True
    # A second, independent labelled set scored at this threshold (the threshold is not refitted):
    # its file name, pair count and accuracy. None when no check set was given.
    check_pairs: str = ""
    check_n_pairs: int = 0
    check_accuracy: float | None = None
    # Membership (curation), calibrated on labelled identities (calibrate_membership), not on pairs:
    # - member_threshold: a face is the character when its cosine to the character's centroid reaches it
    #   (own identity's leave-one-out centroid vs the nearest other identity's centroid);
    # - cluster_threshold: the average-linkage cut (mean cross cosine of two halves of one identity vs
    #   the most similar other identity's photos);
    # with each rule's accuracy on its calibration data. None: not calibrated, the pairwise threshold is used.
    member_threshold: float | None = None
    member_accuracy: float | None = None
    cluster_threshold: float | None = None
    cluster_accuracy: float | None = None
    membership_identities: int = 0
    membership_source: str = ""

    @property
    def member_t(self) -> float:
        """The membership threshold curation uses (the pairwise one when membership is uncalibrated)."""
        return float(self.member_threshold if self.member_threshold is not None else self.threshold)

    @property
    def cluster_t(self) -> float:
        """The average-linkage cut curation uses (the pairwise threshold when uncalibrated)."""
        return float(self.cluster_threshold if self.cluster_threshold is not None else self.threshold)

    @property
    def scale(self) -> IdentityScale:
        """The cosine -> [0, 1] map for scores.identity_score."""
        return IdentityScale(self.threshold, self.different_mean, self.same_mean)

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


DEFAULT_CALIBRATION = Calibration(
    threshold=IDENTITY_THRESHOLD, same_mean=SAME_PERSON_COSINE, different_mean=DIFFERENT_PERSON_COSINE,
    accuracy=float("nan"), cv_accuracy=float("nan"), auc=float("nan"), n_pairs=0, n_same=0, n_missing=0,
    model="", pairs="", calibrated=False,
)


def best_threshold(cosines: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of ``cos >= t``; ties -> midpoint of the widest best run."""
    x = np.asarray(cosines, np.float64)
    y = np.asarray(same, bool)
    if x.size == 0:
        raise InvalidInput("no pairs to calibrate on")
    u = np.unique(x)
    # Candidate gaps: below all, between consecutive values, above all.
    edges = np.concatenate([[u[0] - 1.0], u, [u[-1] + 1.0]])
    # accuracy for t in (edges[k], edges[k+1]]: predicted same iff x >= edges[k+1]
    accs = np.array([np.mean((x >= t) == y) for t in edges[1:]])
    best = accs.max()
    is_best = np.isclose(accs, best)
    # Runs of consecutive best gaps; width measured in cosine.
    runs: list[tuple[int, int]] = []
    k = 0
    while k < len(is_best):
        if is_best[k]:
            j = k
            while j + 1 < len(is_best) and is_best[j + 1]:
                j += 1
            runs.append((k, j))
            k = j + 1
        else:
            k += 1
    lo_k, hi_k = max(runs, key=lambda r: edges[r[1] + 1] - edges[r[0]])
    lo, hi = edges[lo_k], edges[hi_k + 1]
    # Open-ended runs (everything same / different) keep a finite midpoint.
    lo, hi = max(lo, u[0] - 0.05), min(hi, u[-1] + 0.05)
    t = float((lo + hi) / 2.0)
    return t, float(np.mean((x >= t) == y))


def cv_accuracy(cosines: np.ndarray, same: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Stratified k-fold accuracy: threshold fitted on k-1 folds, applied to the held-out fold."""
    x = np.asarray(cosines, np.float64)
    y = np.asarray(same, bool)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(x), int)
    for cls in (True, False):
        idx = np.flatnonzero(y == cls)
        rng.shuffle(idx)
        fold[idx] = np.arange(len(idx)) % folds
    correct = 0
    for f in range(folds):
        test = fold == f
        if not test.any() or test.all():
            continue
        t, _ = best_threshold(x[~test], y[~test])
        correct += int(np.sum((x[test] >= t) == y[test]))
    return correct / len(x)


def calibrate_from_cosines(cosines: np.ndarray, same: np.ndarray, *, n_missing: int = 0,
                           model: str = "", pairs: str = "") -> Calibration:
    """The full calibration record from pair cosines and labels."""
    from sklearn.metrics import roc_auc_score

    x = np.asarray(cosines, np.float64)
    y = np.asarray(same, bool)
    if y.all() or not y.any():
        raise InvalidInput("calibration pairs need both same-person and different-person pairs")
    t, acc = best_threshold(x, y)
    return Calibration(
        threshold=round(t, 4), same_mean=float(x[y].mean()), different_mean=float(x[~y].mean()),
        accuracy=acc, cv_accuracy=cv_accuracy(x, y), auc=float(roc_auc_score(y, x)),
        n_pairs=int(x.size), n_same=int(y.sum()), n_missing=n_missing, model=model, pairs=pairs,
    )


# --- pair files --------------------------------------------------------------

LFW_IMAGES = "lfw-deepfunneled"


def _lfw_name(p: Path, n: int, name: str, num: str) -> str:
    try:
        k = int(num)
    except ValueError:
        raise InvalidInput(f"{p}:{n}: image number {num!r} is not an integer (LFW rows: name i j or name1 i name2 j)") from None
    if k < 1 or k > 9999 or not name or "/" in name or "\\" in name or name.startswith("."):
        raise InvalidInput(f"{p}:{n}: {name!r} {num!r} is not an LFW person name and image number 1..9999")
    return f"{LFW_IMAGES}/{name}/{name}_{k:04d}.jpg"


def read_lfw_pairs(path: str | os.PathLike[str]) -> list[tuple[str, str, bool | None]]:
    """Rows of an LFW pairs file (pairsDevTrain.txt / pairs.txt), as paths relative to its folder.

    Format (LFW README): a header line of counts (``1084\t1091``, or
    ``folds\tn``), then tab-separated ``name i j`` (same person) or
    ``name1 i name2 j`` (different people); image ``i`` of ``name`` is
    ``lfw-deepfunneled/name/name_000i.jpg`` beside the pairs file.
    """
    p = Path(path)
    if not p.is_file():
        raise NotFound(f"pairs file {p} not found")
    lines = p.read_text(encoding="utf-8-sig").splitlines()
    rows: list[tuple[str, str, bool | None]] = []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts:
            continue
        if len(parts) == 3:
            rows.append((_lfw_name(p, n, parts[0], parts[1]), _lfw_name(p, n, parts[0], parts[2]), True))
        elif len(parts) == 4:
            rows.append((_lfw_name(p, n, parts[0], parts[1]), _lfw_name(p, n, parts[2], parts[3]), False))
        else:
            raise InvalidInput(f"{p}:{n}: an LFW pair row has 3 fields (name i j) or 4 (name1 i name2 j); got {len(parts)}")
    if not rows:
        raise InvalidInput(f"{p}: no pair rows after the header")
    return rows


def is_lfw_pairs(path: str | os.PathLike[str]) -> bool:
    """True when the file starts with LFW's header line of integer counts (not a CSV header)."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            first = fh.readline().split()
    except (OSError, UnicodeDecodeError):
        return False
    return 1 <= len(first) <= 2 and all(f.isdigit() for f in first)


def read_pairs(path: str | os.PathLike[str]) -> list[tuple[str, str, bool | None]]:
    """Rows of a pairs file: CSV ``a,b[,same]``, deepface's ``file_x,file_y,Decision`` (Yes/No), or LFW's pairs format."""
    p = Path(path)
    if not p.is_file():
        raise NotFound(f"pairs file {p} not found")
    if is_lfw_pairs(p):
        return read_lfw_pairs(p)
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if {"a", "b"} <= set(cols):
            ka, kb = "a", "b"
            kl = next((c for c in ("same", "label", "decision") if c in cols), None)
        elif {"file_x", "file_y"} <= set(cols):
            ka, kb, kl = "file_x", "file_y", ("decision" if "decision" in cols else None)
        else:
            raise InvalidInput(f"{p}: expected CSV columns a,b (optionally same) or file_x,file_y,Decision; got {cols}")
        rows = []
        for n, raw in enumerate(reader, start=2):
            row = {str(k).strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
            if not row.get(ka) or not row.get(kb):
                raise InvalidInput(f"{p}:{n}: both {ka} and {kb} are needed")
            label: bool | None = None
            if kl and row.get(kl):
                v = row[kl].lower()
                if v not in _YES | _NO:
                    raise InvalidInput(f"{p}:{n}: label {row[kl]!r} is not Yes/No")
                label = v in _YES
            rows.append((row[ka], row[kb], label))
    return rows


def resolve_image(name: str, base: Path, realdata: Path | None = None) -> Path:
    """A pair entry -> file: absolute, relative to the CSV's folder, to the working directory, or (bare deepface names) found in realdata faces/."""
    p = Path(name)
    if p.is_absolute():
        if p.is_file():
            return p
        raise NotFound(f"pair image {p} not found")
    for cand in (base / p, Path.cwd() / p):
        if cand.is_file():
            return cand
    if realdata is not None and (realdata / "faces").is_dir() and p.name == name:
        for stem in (name, f"deepface_{name}"):
            hits = sorted((realdata / "faces").glob(f"*/{stem}"))
            if hits:
                return hits[0]
    raise NotFound(f"pair image {name!r} not found (looked in {base}, {Path.cwd()}" + (f" and {realdata}/faces" if realdata else "") + ")")


# --- the table ---------------------------------------------------------------

def load_table(path: Path = TABLE_PATH) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def calibration_for(sha256: str | None, path: Path = TABLE_PATH) -> Calibration:
    """The stored calibration of a recognition model (by file sha256), or the CPU-pack default flagged uncalibrated."""
    entry = load_table(path).get(sha256 or "")
    if not entry:
        return DEFAULT_CALIBRATION
    fields = Calibration.__dataclass_fields__
    return Calibration(**{k: v for k, v in entry.items() if k in fields})


def save_calibration(sha256: str, cal: Calibration, path: Path = TABLE_PATH) -> Path:
    """Store one model's calibration in the table (atomic write)."""
    table = load_table(path)
    table[sha256] = cal.to_dict()
    return atomic_write_json(path, dict(sorted(table.items())))


def calibrate_membership(embeddings: np.ndarray, identities: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Membership and clustering thresholds from faces labelled by identity (rows of unit embeddings).

    - member: for each face of an identity with >= 3 faces, its cosine to its own identity's
      leave-one-out centroid (the character's centroid without it: "same") and to the nearest
      *other* identity's centroid (the worst lookalike among all others: "different");
    - cluster: for each identity with >= 4 faces, the mean cross cosine between two random halves
      ("same"); for each identity with >= 3 faces, the highest mean cross cosine to another
      identity's faces ("different").
    Each threshold is :func:`best_threshold` of its two classes (the accuracy-maximising midpoint).
    """
    x = np.asarray(embeddings, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    who = np.asarray(list(identities))
    names = [n for n in dict.fromkeys(who.tolist()) if int((who == n).sum()) >= 3]
    if len(names) < 2:
        raise InvalidInput("membership calibration needs at least 2 identities with 3 or more faces each")
    rows = {n: np.flatnonzero(who == n) for n in names}
    cent = np.stack([x[rows[n]].mean(axis=0) for n in names])
    cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
    own, near = [], []
    for k, n in enumerate(names):
        r = rows[n]
        total = x[r].sum(axis=0)
        for i in r:
            loo = total - x[i]
            own.append(float(x[i] @ loo / max(np.linalg.norm(loo), 1e-12)))
            sims = cent @ x[i]
            sims[k] = -np.inf
            near.append(float(sims.max()))
    mx = np.array(own + near)
    my = np.array([True] * len(own) + [False] * len(near))
    member_t, member_acc = best_threshold(mx, my)
    rng = np.random.default_rng(seed)
    halves, cross = [], []
    sims_all = x @ x.T
    for n in names:
        r = rows[n]
        if len(r) >= 4:
            perm = rng.permutation(r)
            a, b = perm[:len(r) // 2], perm[len(r) // 2:]
            halves.append(float(sims_all[np.ix_(a, b)].mean()))
        cross.append(max(float(sims_all[np.ix_(r, rows[m])].mean()) for m in names if m != n))
    cx = np.array(halves + cross)
    cy = np.array([True] * len(halves) + [False] * len(cross))
    cluster_t, cluster_acc = best_threshold(cx, cy)
    return {"member_threshold": round(member_t, 4), "member_accuracy": member_acc,
            "cluster_threshold": round(cluster_t, 4), "cluster_accuracy": cluster_acc,
            "membership_identities": len(names)}


def identity_folder_embeddings(analyzer: FaceAnalyzer, folder: str | os.PathLike[str],
                               min_faces: int = 3) -> tuple[np.ndarray, list[str]]:
    """Main-face embeddings of a folder of identity folders (``<folder>/<Name>/*.jpg``, LFW's layout),
    for identities with at least ``min_faces`` images; (rows, identity per row)."""
    from likeness.images import list_images, load_image

    root = Path(folder)
    if not root.is_dir():
        raise NotFound(f"identities folder {root} not found (one sub-folder of photos per person, like LFW's)")
    embs, who = [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = list_images(d)
        if len(files) < min_faces:
            continue
        faces = analyzer.analyze([np.asarray(load_image(f)[0]) for f in files])
        for f in faces:
            if f:
                embs.append(np.asarray(f[0].embedding, np.float64))
                who.append(d.name)
    if not embs:
        raise InvalidInput(f"{root}: no identity folder with {min_faces}+ images where a face was found")
    return np.stack(embs), who


def pair_cosines(analyzer: FaceAnalyzer, pairs_file: str | os.PathLike[str], realdata: Path | None = None,
                 limit: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(cosines, same labels, images without a detected face) of a labelled pairs file.

    Every distinct image is embedded once, in chunks of 256 (LFW devtrain: 3,403
    images); its first (main) face is used. A pair with a faceless image gets
    cosine -1: it cannot be verified as the same person.
    ``limit``: the first ``limit`` same and first ``limit`` different pairs
    only (a deterministic subset, for tests).
    """
    from likeness.images import load_image

    rows = read_pairs(pairs_file)
    if limit is not None:
        rows = [r for r in rows if r[2]][:limit] + [r for r in rows if r[2] is False][:limit]
    if any(lab is None for _, _, lab in rows):
        raise InvalidInput(f"{pairs_file}: calibration needs a label (same / Decision) on every row")
    base = Path(pairs_file).resolve().parent
    files: dict[str, Path] = {}
    for a, b, _ in rows:
        for n in (a, b):
            if n not in files:
                files[n] = resolve_image(n, base, realdata)
    names = list(files)
    emb: dict[str, Any] = {}
    for start in range(0, len(names), 256):
        chunk = names[start:start + 256]
        faces = analyzer.analyze([np.asarray(load_image(files[n])[0]) for n in chunk])
        emb.update({n: (f[0].embedding if f else None) for n, f in zip(chunk, faces)})
    cos = [(-1.0 if emb[a] is None or emb[b] is None else float(np.dot(emb[a], emb[b]))) for a, b, _ in rows]
    return np.array(cos), np.array([bool(lab) for _, _, lab in rows]), [n for n in names if emb[n] is None]


def calibrate(analyzer: FaceAnalyzer, pairs_csv: str | os.PathLike[str], realdata: Path | None = None,
              limit: int | None = None, check: str | os.PathLike[str] | None = None,
              faceless: list[str] | None = None, identities: str | os.PathLike[str] | None = None) -> Calibration:
    """Fit the threshold on one labelled pairs file, then score a second one at it.

    ``pairs_csv``: any format :func:`read_pairs` reads (CSV, deepface, LFW).
    ``check``: an independent pairs file (the deepface pairs beside LFW), scored
    at the fitted threshold without refitting: a threshold that only fits its own
    data shows there. ``identities``: a folder of per-person folders (LFW's
    ``lfw-deepfunneled``) for :func:`calibrate_membership`. ``faceless``: a list that receives the pair images where no
    face was found (what ``n_missing`` counts), for the user to look at.
    """
    x, y, no_face = pair_cosines(analyzer, pairs_csv, realdata, limit)
    if faceless is not None:
        faceless.extend(no_face)
    missing = int(sum(1 for c in x if c == -1.0))
    model = getattr(analyzer, "recognition_model", None)
    cal = calibrate_from_cosines(x, y, n_missing=missing, model=Path(model).name if model else "",
                                 pairs=Path(pairs_csv).name)
    if identities is not None:
        emb, who = identity_folder_embeddings(analyzer, identities)
        cal = replace(cal, **calibrate_membership(emb, who), membership_source=Path(identities).name)
    if check is not None:
        cx, cy, _ = pair_cosines(analyzer, check, realdata)
        cal = replace(cal, check_pairs=Path(check).name, check_n_pairs=int(cx.size),
                      check_accuracy=float(np.mean((cx >= cal.threshold) == cy)))
    return cal


__all__: Sequence[str] = (
    "Calibration", "DEFAULT_CALIBRATION", "TABLE_PATH", "best_threshold", "calibrate", "calibrate_from_cosines",
    "calibrate_membership", "identity_folder_embeddings", "pair_cosines",
    "calibration_for", "cv_accuracy", "is_lfw_pairs", "load_table", "read_lfw_pairs", "read_pairs", "resolve_image", "save_calibration",
)
