"""Helpers that travel to Ray actors in tests (pickled by value: workers cannot import tests/)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DieOnceFactory:
    """Wraps a real worker factory; the worker kills its own process on its first shard.

    A marker file makes it die only once across restarts, as a crashed GPU
    worker would (OOM-killed, node lost), after which the shard must be re-run.
    """

    inner: Any
    marker: str

    def __call__(self):
        worker = self.inner()
        marker = self.marker

        class _Dying:
            def run(self, shard):
                if not os.path.exists(marker):
                    Path(marker).write_text(str(os.getpid()))
                    os._exit(1)
                return worker.run(shard)

        return _Dying()

