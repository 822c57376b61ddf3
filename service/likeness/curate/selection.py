"""Identity clustering (faiss) and the choice of K images over the zoom x angle grid.

Pure numpy + faiss + scipy; no model here. Both functions are deterministic
for the same input: ties are broken by index, never by hash order or time.

Clustering rule (docs/curation.md):

1. The main-face embeddings are L2-normalised, so inner product = cosine.
2. Clusters = **average linkage** (``scipy.cluster.hierarchy``, cosine
   distance) cut at the calibrated *set* threshold ``t`` (rule 5): two groups
   merge only when the *mean* cosine over all their cross pairs is at least
   ``t``. This is a set rule, not a pair rule: single linkage (connected
   components of pairs above ``t``) chained two brothers through 11 of 348
   cross pairs above ``t`` (issue 11) and a lookalike then scored 0.80 to the
   merged centroid, above every photo of the character. Under average
   linkage a few bridging pairs move the mean cross cosine by a few hundredths;
   a lookalike with several photos stays a cluster of its own
   (tests/curate/test_membership.py).
3. ``n_links`` (diagnostic only): pairs above ``t`` from a faiss range search
   (``faiss.IndexFlatIP``; exactly the brute-force pairs, tested).
4. The character's identity is the **largest** cluster; ties go to the most
   **cohesive** one, cohesion = mean cosine to the cluster's normalised mean
   (The Chosen One's "mean distance to the centroid", as a similarity); a
   remaining tie goes to the cluster holding the lowest image index.
5. Membership (:func:`identity_verdicts`) is a separate, calibrated rule: a
   face is the character when its cosine to the identity centroid reaches the
   *membership* threshold (calibrated on LFW devtrain photos against their own
   identity's leave-one-out centroid vs the nearest other identity's centroid)
   and it is in the identity cluster or alone in a cluster of its own; a face
   in another cluster of two or more faces is another person. The clustering
   cut (step 2) is the *set* threshold, calibrated on LFW as the mean cross
   cosine of two halves of one identity vs two different identities. Both
   differ from the pairwise same-person threshold that verification uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np

from likeness import scores


@dataclass(frozen=True)
class Clusters:
    """Average-linkage clusters of the main faces at the same-person threshold."""

    # Cluster label per embedding row (0..n_clusters-1, numbered by first member).
    labels: np.ndarray
    # Members per cluster, in row order.
    members: tuple[tuple[int, ...], ...]
    # Mean cosine of each cluster's members to its normalised mean.
    cohesion: tuple[float, ...]
    # Index into ``members`` of the identity cluster (-1 when there are no faces).
    identity: int
    # Normalised centroid of the identity cluster (None without faces).
    centroid: np.ndarray | None
    # Links found by the range search (undirected, i < j).
    n_links: int

    def summary(self) -> dict:
        """JSON-ready description for curation.json."""
        sizes = [len(m) for m in self.members]
        return {
            "n_clusters": len(self.members),
            "sizes": sizes,
            "cohesion": [round(c, 4) for c in self.cohesion],
            "identity_cluster": self.identity,
            "identity_size": sizes[self.identity] if self.identity >= 0 else 0,
            "identity_cohesion": round(self.cohesion[self.identity], 4) if self.identity >= 0 else None,
            "n_links": self.n_links,
        }


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def same_person_links(embeddings: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), i < j, whose cosine is above ``threshold``, via faiss range search.

    Exactly the pairs ``(E @ E.T)[i, j] > threshold`` of brute-force numpy
    (up to float32 rounding at the boundary; tested).
    """
    import faiss

    x = np.ascontiguousarray(_unit(embeddings))
    n = x.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, _dist, ids = index.range_search(x, float(threshold))
    rows = np.repeat(np.arange(n), np.diff(lims.astype(np.int64)))
    keep = rows < ids
    return rows[keep].astype(np.int64), ids[keep].astype(np.int64)


def average_linkage_labels(x: np.ndarray, threshold: float) -> np.ndarray:
    """Raw average-linkage cluster ids of unit rows ``x``: groups merge while their mean cross cosine >= ``threshold``."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    n = x.shape[0]
    if n < 2:
        return np.zeros(n, np.int64)
    dist = np.clip(pdist(x.astype(np.float64), "cosine"), 0.0, 2.0)
    tree = linkage(dist, method="average")
    # Cophenetic distance <= 1 - t  <=>  mean cross cosine >= t (average linkage is monotone).
    return fcluster(tree, t=1.0 - float(threshold) + 1e-9, criterion="distance").astype(np.int64)


def cluster_identities(embeddings: np.ndarray, threshold: float) -> Clusters:
    """Cluster main-face embeddings and choose the identity cluster (rule in the module doc)."""
    x = _unit(embeddings) if len(embeddings) else np.zeros((0, 1), np.float32)
    n = x.shape[0]
    if n == 0:
        return Clusters(np.zeros(0, np.int64), (), (), -1, None, 0)
    i, _j = same_person_links(x, threshold)
    raw = average_linkage_labels(x, threshold)
    # Renumber by first member so labels do not depend on scipy internals.
    order: dict[int, int] = {}
    labels = np.array([order.setdefault(int(r), len(order)) for r in raw], np.int64)
    members = tuple(tuple(int(k) for k in np.flatnonzero(labels == c)) for c in range(len(order)))
    centroids, cohesion = [], []
    for m in members:
        c = x[list(m)].mean(axis=0)
        c = c / max(float(np.linalg.norm(c)), 1e-12)
        centroids.append(c)
        cohesion.append(float((x[list(m)] @ c).mean()))
    best = min(range(len(members)), key=lambda c: (-len(members[c]), -round(cohesion[c], 6), members[c][0]))
    return Clusters(labels, members, tuple(cohesion), best, centroids[best].astype(np.float32), len(i))


def identity_verdicts(embeddings: np.ndarray, clusters: Clusters, threshold: float) -> list[tuple[float, str]]:
    """Per row: (cosine to the identity centroid, "" if the row is the character else why not).

    ``threshold`` is the *membership* threshold (a face against the character's
    centroid; :attr:`likeness.curate.calibration.Calibration.member_threshold`),
    not the pairwise one. A row is the character when its cosine to the centroid
    is at least ``threshold`` and it is in the identity cluster, or alone in a
    cluster of its own (a face that average linkage left unmerged but that the
    averaged identity accepts). A row in *another* cluster of two or more faces
    stays out even above ``threshold``: those faces are closer to one another than
    to the character, i.e. another person who resembles it (a lookalike with
    several photos). No faces: no rows.
    """
    if clusters.centroid is None or len(embeddings) == 0:
        return []
    # The one definition of the per-image identity score, so the decision and the reported score agree.
    cos = scores.identity_similarities(embeddings, clusters.centroid)
    members = set(clusters.members[clusters.identity])
    size = {r: len(m) for m in clusters.members for r in m}
    out: list[tuple[float, str]] = []
    for n, c in enumerate(cos.tolist()):
        if c < threshold:
            why = (f"face is a different person: cosine {c:.2f} to the character's identity is below "
                   f"the membership threshold {threshold:.2f}")
        elif n not in members and size.get(n, 1) > 1:
            why = (f"face is another person who resembles the character: it and {size[n] - 1} other face(s) form a "
                   f"group of their own (average linkage), although its cosine {c:.2f} to the character reaches "
                   f"{threshold:.2f}")
        else:
            why = ""
        out.append((float(c), why))
    return out


@dataclass(frozen=True)
class Candidate:
    """An image that passed every check, competing for one of the K places."""

    # Position in the caller's image list (returned by select_k).
    index: int
    # Stable id: the final tie-breaker, so the choice never depends on order.
    id: str
    # Grid cell, e.g. (zoom_index, angle_index); None = unknown cell.
    cell: Hashable
    # Weighted identity/background/quality utility; higher is better.
    utility: float


def select_k(candidates: Sequence[Candidate], k: int, *, spread_over_cells: bool = True) -> list[int]:
    """Choose up to ``k`` candidates; returns their indices in choice order.

    Without spreading: the ``k`` highest utilities. With spreading (the
    default): cells take turns, so every cell gets its first image before any
    cell gets a second: at each step, among the cells holding the fewest
    chosen images that still have candidates, take the highest-utility
    remaining candidate. Ties: higher utility, then smaller id.
    """
    if k <= 0 or not candidates:
        return []
    ranked = sorted(candidates, key=lambda c: (-c.utility, c.id))
    if not spread_over_cells:
        return [c.index for c in ranked[:k]]
    queues: dict[Hashable, list[Candidate]] = {}
    for c in ranked:
        queues.setdefault(c.cell, []).append(c)
    taken: dict[Hashable, int] = {cell: 0 for cell in queues}
    heads = {cell: 0 for cell in queues}
    chosen: list[int] = []
    while len(chosen) < k:
        open_cells = [cell for cell, q in queues.items() if heads[cell] < len(q)]
        if not open_cells:
            break
        fewest = min(taken[cell] for cell in open_cells)
        best_cell = min(
            (cell for cell in open_cells if taken[cell] == fewest),
            key=lambda cell: (-queues[cell][heads[cell]].utility, queues[cell][heads[cell]].id),
        )
        chosen.append(queues[best_cell][heads[best_cell]].index)
        heads[best_cell] += 1
        taken[best_cell] += 1
    return chosen


def random_subset(n: int, k: int, seed: int) -> list[int]:
    """A fixed-seed random K-subset of ``range(n)`` (the random baseline), sorted."""
    rng = np.random.default_rng(seed)
    if n <= k:
        return list(range(n))
    return sorted(int(v) for v in rng.choice(n, size=k, replace=False))
