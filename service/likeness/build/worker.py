"""One worker thread per device; builds queue in the store and run one at a time per device.

The queue *is* the store: a worker claims the oldest queued build in one
transaction, so two workers never take the same build and a restart finds the
queue intact. On start, builds that were running when the process died go
back to the queue and resume from their last completed unit.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from likeness.errors import LikenessError
from likeness.progress import CancelToken
from likeness.build.store import Store

log = logging.getLogger(__name__)

# run(build_id, device, cancel) runs a whole build to a final state (or until cancelled).
BuildRunner = Callable[[str, str, CancelToken], None]


def detect_devices() -> list[str]:
    """``cuda:0`` ... ``cuda:N-1`` when GPUs are present, else ``["cpu"]``."""
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover - torch is a hard dependency
        n = 0
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


def loader_device(profile: Any, device: str | None) -> str | None:
    """The device a worker on ``device`` loads ``profile``'s models on (the loaders' ``device=``).

    One worker thread per GPU shares one process, so each must name its GPU: ``"cuda:N"``
    for a CUDA or auto profile on worker ``cuda:N`` (without it every worker's models landed
    on GPU 0, the current device). A CPU profile stays on the CPU on any worker, and a
    ``"cpu"`` worker loads on the CPU (a CUDA profile there fails in the loader, saying so).
    ``None`` -- the profile's own rule -- for anything that is not a device: an embedded
    build's ``"embedded"``, or no worker at all.
    """
    if not device or not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        return None
    if device == "cpu" or getattr(profile, "device", "auto") == "cpu":
        return "cpu"
    return device


class WorkerPool:
    """Threads that take queued builds from the store and run them."""

    def __init__(self, store: Store, runner: BuildRunner, devices: list[str] | None = None) -> None:
        self.store = store
        self.runner = runner
        self.devices = devices or detect_devices()
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._running: dict[str, CancelToken] = {}
        self._lock = threading.Lock()

    def start(self) -> list[str]:
        """Requeue interrupted builds and start one thread per device; returns resumed ids."""
        resumed = self.store.requeue_interrupted()
        for device in self.devices:
            t = threading.Thread(target=self._loop, args=(device,), name=f"likeness-worker-{device}", daemon=True)
            t.start()
            self._threads.append(t)
        return resumed

    def wake(self) -> None:
        """Tell idle workers that a build was queued."""
        with self._wake:
            self._wake.notify_all()

    def cancel(self, build_id: str) -> None:
        """Stop a running build within one unit of work (the store records the request)."""
        with self._lock:
            token = self._running.get(build_id)
        if token is not None:
            token.cancel("cancelled on request")

    def running(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking work; running builds stop after their current unit and stay resumable."""
        self._stopping.set()
        with self._lock:
            for token in self._running.values():
                token.cancel("server stopping")
        self.wake()
        for t in self._threads:
            t.join(timeout)

    def _loop(self, device: str) -> None:
        while not self._stopping.is_set():
            try:
                row = self.store.claim_next(device)
            except Exception:  # noqa: BLE001 - a broken DB row must not kill the worker
                log.exception("claiming a build failed")
                row = None
            if row is None:
                with self._wake:
                    self._wake.wait(1.0)
                continue
            token = CancelToken()
            with self._lock:
                self._running[row.id] = token
            try:
                self.runner(row.id, device, token)
            except LikenessError as exc:  # recorded in the store by the runner
                log.info("build %s stopped: %s", row.id, exc)
            except Exception:  # noqa: BLE001 - the runner records failures; this is a last resort
                log.exception("build %s crashed its worker", row.id)
            finally:
                with self._lock:
                    self._running.pop(row.id, None)
