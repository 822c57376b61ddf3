"""Plots of a build report and of the nightly summary, as PNG bytes.

matplotlib's object API (``Figure`` + Agg canvas), never ``pyplot``: no global
state, so the gRPC server can render reports from several threads. Every
function takes plain numbers (what report.json holds) and returns PNG bytes
that the HTML embeds as a ``data:`` URI, so a report opens offline.
"""

from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

# Colours that stay distinguishable for the common colour-vision deficiencies
# (Okabe-Ito): curated/token = blue, pool/baseline = orange, random = grey.
BLUE, ORANGE, GREY, GREEN, RED = "#0072B2", "#E69F00", "#999999", "#009E73", "#D55E00"


def _figure(width: float, height: float):  # -> matplotlib.figure.Figure
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    fig.set_layout_engine("constrained")
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # No timestamps/metadata: the same numbers give the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def identity_histogram(
    pool: Sequence[float | None], kept: Sequence[float | None], threshold: float | None = None
) -> bytes:
    """Histogram of identity similarity (cosine to the curated centroid): whole pool vs kept."""
    fig = _figure(6.4, 3.2)
    ax = fig.add_subplot()
    pool_v, kept_v = _finite(pool), _finite(kept)
    lo = min(pool_v + kept_v + [0.0])
    bins = [lo + (1.0 - lo) * i / 30 for i in range(31)]
    if pool_v:
        ax.hist(pool_v, bins=bins, color=ORANGE, alpha=0.7, label=f"whole pool (faces: {len(pool_v)})")
    if kept_v:
        ax.hist(kept_v, bins=bins, color=BLUE, alpha=0.8, label=f"kept ({len(kept_v)})")
    if threshold is not None:
        ax.axvline(threshold, color=RED, linestyle="--", label=f"same-person threshold {threshold:.2f}")
    ax.set_xlabel("cosine similarity of the main face to the curated identity centroid")
    ax.set_ylabel("images")
    if pool_v or kept_v or threshold is not None:
        ax.legend(loc="upper left", fontsize=8)
    if not pool_v and not kept_v:
        ax.text(0.5, 0.5, "no faces were found", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


def cell_heatmap(
    kept: Sequence[Sequence[int]], generated: Sequence[Sequence[int]], zooms: Sequence[str], angles: Sequence[str]
) -> bytes:
    """Zoom x angle heat map: how many images each grid cell kept (annotated kept/generated)."""
    fig = _figure(1.6 + 1.2 * max(len(angles), 1), 1.0 + 0.55 * max(len(zooms), 1))
    ax = fig.add_subplot()
    data = [[float(v) for v in row] for row in kept] or [[0.0]]
    im = ax.imshow(data, cmap="Blues", vmin=0, vmax=max(1.0, max(max(r) for r in data)), aspect="auto")
    ax.set_xticks(range(len(angles)), labels=list(angles), rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(len(zooms)), labels=list(zooms), fontsize=8)
    peak = max(1.0, max(max(r) for r in data))
    for zi, row in enumerate(kept):
        for ai, v in enumerate(row):
            total = generated[zi][ai] if zi < len(generated) and ai < len(generated[zi]) else 0
            ax.text(ai, zi, f"{v}/{total}", ha="center", va="center", fontsize=8,
                    color="white" if v > 0.6 * peak else "black")
    fig.colorbar(im, ax=ax, label="images kept")
    ax.set_xlabel("camera angle")
    ax.set_ylabel("zoom")
    return _png(fig)


def set_score_bars(sets: Mapping[str, Mapping[str, float | None]], metrics: Sequence[str]) -> bytes:
    """Grouped bars: each metric for each set (curated, whole pool, random K)."""
    fig = _figure(6.4, 3.0)
    ax = fig.add_subplot()
    names = list(sets)
    width = 0.8 / max(len(names), 1)
    colours = [BLUE, ORANGE, GREY, GREEN, RED]
    for i, name in enumerate(names):
        xs = [m + (i - (len(names) - 1) / 2) * width for m in range(len(metrics))]
        ys = [float(sets[name].get(k) or 0.0) for k in metrics]
        ax.bar(xs, ys, width=width, color=colours[i % len(colours)], label=name)
    ax.set_xticks(range(len(metrics)), labels=[m.replace("_", " ") for m in metrics], fontsize=8, rotation=10)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (higher is better)")
    ax.legend(fontsize=8, ncols=max(len(names), 1), loc="upper left")
    return _png(fig)


def training_curve(steps: Sequence[int], series: Mapping[str, Sequence[float | None]], best_step: int | None,
                   ylabel: str = "score") -> bytes:
    """Values per checkpoint step, one line per series, the chosen step marked (one axis: one kind of value)."""
    fig = _figure(6.4, 3.2)
    ax = fig.add_subplot()
    colours = [BLUE, ORANGE, GREEN, GREY, RED]
    for i, (name, values) in enumerate(series.items()):
        pts = [(s, float(v)) for s, v in zip(steps, values) if v is not None and math.isfinite(float(v))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colours[i % len(colours)], label=name)
    if best_step is not None:
        ax.axvline(best_step, color=RED, linestyle="--", label=f"chosen step {best_step}")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def evaluation_bars(
    scenes: Sequence[str], token: Mapping[str, Sequence[float | None]], baseline: Mapping[str, Sequence[float | None]]
) -> bytes:
    """Per scene: identity similarity and CLIP-T with the token vs the no-embedding baseline."""
    metrics = [m for m in ("identity", "clip_t") if m in token or m in baseline]
    fig = _figure(6.4, 2.8 * max(len(metrics), 1) / 1.3)
    axes = fig.subplots(len(metrics) or 1, 1, squeeze=False)[:, 0]
    titles = {"identity": "identity similarity to the curated set (cosine)", "clip_t": "CLIP-T (image vs scene text)"}
    for ax, m in zip(axes, metrics):
        xs = range(len(scenes))
        tv = [float(v) if v is not None else 0.0 for v in token.get(m, [])]
        bv = [float(v) if v is not None else 0.0 for v in baseline.get(m, [])]
        ax.bar([x - 0.2 for x in xs][: len(tv)], tv, width=0.4, color=BLUE, label="with the token")
        ax.bar([x + 0.2 for x in xs][: len(bv)], bv, width=0.4, color=ORANGE, label="baseline: full description, no embedding")
        ax.set_xticks(list(xs), labels=list(scenes), fontsize=8)
        ax.set_title(titles[m], fontsize=9)
        if not any(v is not None for v in list(token.get(m, [])) + list(baseline.get(m, []))):
            ax.text(0.5, 0.5, "not measured: no face was found in these images" if m == "identity" else "not measured",
                    ha="center", va="center", transform=ax.transAxes)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.legend(fontsize=7, loc="upper right")
    return _png(fig)


def trend_plot(nights: Sequence[str], series: Mapping[str, Sequence[float | None]], title: str) -> bytes:
    """Nightly trend of one character's scores (one line per score)."""
    fig = _figure(6.4, 3.0)
    ax = fig.add_subplot()
    colours = [BLUE, ORANGE, GREEN, GREY, RED, "#CC79A7", "#56B4E9", "#F0E442"]
    xs = list(range(len(nights)))
    for i, (name, values) in enumerate(series.items()):
        pts = [(x, float(v)) for x, v in zip(xs, values) if v is not None and math.isfinite(float(v))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colours[i % len(colours)], label=name)
    ax.set_xticks(xs, labels=list(nights), rotation=20, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("score")
    if series:
        ax.legend(fontsize=7, loc="best")
    return _png(fig)
