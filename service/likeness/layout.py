"""The build folder's names, written once: every stage, the runner, the service and the report use these.

::

    <data_dir>/builds/<build_id>/
      spec.json                      the effective spec and options
      gallery/   manifest.jsonl, plan.json, images/<id>.png, contact_sheet.png
      curated/   curation.json, face_embeddings.safetensors, <id>.png + <id>.txt (captions)
      train/     checkpoints/step-<n>/, checkpoint_scores.json, best.json, validation/
      embeddings/<token>.pt, <token>.safetensors, diffusers/<token>.safetensors
      eval/      evaluation.json, images/*.png
      report/    report.json, report.html, contact_sheet.png
      rounds/<r>/...                 refinement round r (gallery/ curated/ train/ as above)

A stage module that owns a file format keeps its file's name next to its reader
(``curation.json`` in ``likeness.curate``); this module is for the folders that join
stages together and for the names that several layers read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPEC_FILE = "spec.json"
GALLERY_DIR = "gallery"
CURATED_DIR = "curated"
TRAIN_DIR = "train"
EMBEDDINGS_DIR = "embeddings"
EVAL_DIR = "eval"
REPORT_DIR = "report"
ROUNDS_DIR = "rounds"
CURATION_FILE = "curation.json"
# Beside curation.json: each selected image's main-face embedding as curation decided with it, keyed by
# the sha256 of the PNG written, so training and evaluation reuse it instead of analysing the faces again
# (likeness.identity.curated_centroid; written by likeness.curate.decide).
FACE_EMBEDDINGS_FILE = "face_embeddings.safetensors"
EVALUATION_FILE = "evaluation.json"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
CONTACT_SHEET = "contact_sheet.png"
# Where the build's chosen embedding of a round is kept before export (train/ of that round).
BEST_EMBEDDING = "best_embedding.safetensors"


@dataclass(frozen=True)
class BuildLayout:
    """The paths of one build (or of one refinement round: ``BuildLayout(root).round(r)``)."""

    root: Path

    def round(self, round_: int) -> BuildLayout:
        """Round 0 lives at the build root (the documented layout); refinements under rounds/<r>/."""
        return self if round_ == 0 else BuildLayout(self.root / ROUNDS_DIR / str(round_))

    @property
    def spec(self) -> Path:
        return self.root / SPEC_FILE

    @property
    def gallery(self) -> Path:
        return self.root / GALLERY_DIR

    @property
    def curated(self) -> Path:
        return self.root / CURATED_DIR

    @property
    def train(self) -> Path:
        return self.root / TRAIN_DIR

    @property
    def embeddings(self) -> Path:
        return self.root / EMBEDDINGS_DIR

    @property
    def eval(self) -> Path:
        return self.root / EVAL_DIR

    @property
    def report(self) -> Path:
        return self.root / REPORT_DIR

    @property
    def report_json(self) -> Path:
        return self.report / REPORT_JSON

    @property
    def report_html(self) -> Path:
        return self.report / REPORT_HTML
