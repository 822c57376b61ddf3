"""What every stage function of a build gets (:class:`BuildContext`) and the stage signature."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from likeness import layout
from likeness.backends.protocols import Pipeline
from likeness.build.options import BuildOptions
from likeness.build.store import Store
from likeness.progress import CancelToken, ProgressFn
from likeness.spec import CharacterSpec

@dataclass
class BuildContext:
    """What every stage function gets: where to write, what to build, how to report."""

    store: Store
    build_id: str
    root: Path
    spec: CharacterSpec
    options: BuildOptions
    device: str
    cancel: CancelToken
    progress: ProgressFn
    # Loaded models shared across stages and builds (see likeness.backends.cache.ModelCache).
    models: Any = None
    # Results of finished stages, keyed "r<round>/<stage>" (filled from the store on resume).
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    round: int = 0
    # The build's one diffusion pipeline, loaded on first use and shared by generate, train and
    # evaluate (see likeness.build.stages.pipeline for why that is safe); dropped when the build ends.
    pipe: Pipeline | None = None
    # likeness.executor executor for generation and curation shards (None = in this process).
    executor: Any = None

    def round_dir(self, round_: int) -> Path:
        """Round 0 lives at the build root (the documented layout); refinements under rounds/<r>/."""
        return self.root if round_ == 0 else self.root / layout.ROUNDS_DIR / str(round_)

    def result(self, round_: int, stage: str) -> dict[str, Any]:
        return self.results.get(f"r{round_}/{stage}", {})


StageFn = Callable[[BuildContext, int], dict[str, Any]]
