"""Progress reporting and cancellation shared by every long-running stage.

Stages take ``progress: ProgressFn | None`` and ``cancel: CancelToken | None``.
The CLI turns events into a tqdm bar on stderr, the service into WatchBuild
events. ``cancel.check()`` is called between units of work (a batch, a
training step), so cancelling stops within one unit and leaves a consistent
state on disk.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from likeness.errors import Cancelled


@dataclass(frozen=True)
class ProgressEvent:
    # Stage name: "generate", "curate", "caption", "train", "evaluate", "report".
    stage: str
    # Units done so far and in all (images, steps); total 0 = unknown.
    done: int
    total: int
    message: str = ""
    # Numbers worth showing live (loss, learning rate, scores).
    metrics: dict[str, float] = field(default_factory=dict)


ProgressFn = Callable[[ProgressEvent], None]


class CancelToken:
    """Thread-safe cancellation flag checked between units of work."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "cancelled on request") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled(self.reason)


def report(progress: ProgressFn | None, stage: str, done: int, total: int, message: str = "", **metrics: Any) -> None:
    """Send one event if anybody listens."""
    if progress is not None:
        progress(ProgressEvent(stage, done, total, message, {k: float(v) for k, v in metrics.items()}))


class TqdmProgress:
    """A ProgressFn that draws one tqdm bar per stage on stderr (for the CLI)."""

    def __init__(self, disable: bool = False) -> None:
        self._bars: dict[str, Any] = {}
        self._disable = disable

    def __call__(self, ev: ProgressEvent) -> None:
        from tqdm import tqdm

        bar = self._bars.get(ev.stage)
        if bar is None:
            bar = self._bars[ev.stage] = tqdm(total=ev.total or None, desc=ev.stage, unit="it", disable=self._disable, dynamic_ncols=True)
        if ev.total and bar.total != ev.total:
            bar.total = ev.total
        bar.n = ev.done
        post = {k: f"{v:.4g}" for k, v in ev.metrics.items()}
        if ev.message:
            post["msg"] = ev.message[:40]
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
