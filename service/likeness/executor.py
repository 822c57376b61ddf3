"""Executors: where shards of work run. Local (in-process, the default) or Ray.

A *worker* is an object built once per process/actor by a picklable factory
(so a loaded diffusion pipeline or face pack is reused across shards), with a
``run(shard)`` method. The executor hands out shards and passes each result to
``on_result`` **in the driver**, which alone writes artifacts and manifest
rows — so a shard that runs twice (a worker died after finishing) is
harmless: the driver skips what already landed. A shard whose worker dies is
re-run on a fresh worker, up to ``max_attempts`` times.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, Sequence

from likeness.errors import FailedPrecondition, InvalidInput
from likeness.progress import CancelToken

log = logging.getLogger(__name__)


class Worker(Protocol):
    def run(self, shard: Any) -> Any: ...


WorkerFactory = Callable[[], Worker]
ResultFn = Callable[[int, Any], None]


@dataclass(frozen=True)
class ExecutorConfig:
    # "local" runs in this process; "ray" spreads shards over Ray actors.
    kind: Literal["local", "ray"] = "local"
    # Ray cluster address: "" starts/attaches a local cluster, "auto" joins the
    # running one (`ray start --head` on the head node), "ray://host:10001" a remote one.
    ray_address: str = ""
    # Actors to start; each keeps one loaded model (one per GPU on GPU nodes).
    workers: int = 2
    # GPUs per actor: 1 pins one actor per GPU; 0 for CPU-only clusters.
    gpus_per_worker: float = 0.0
    # CPUs reserved per actor: Ray schedules by it, and torch and the PNG encoder in the actor use
    # that many threads. 0 = chosen (:func:`auto_cpus_per_worker`): a GPU actor gets its share of
    # its node's cores (cores / GPUs x gpus_per_worker; 16 cores, 1 GPU -> 16), so PNG encoding and
    # face pre/post-processing are not single-threaded; a CPU actor gets 1 (actors run side by side).
    cpus_per_worker: float = 0.0
    # A shard whose worker died is retried this many times in all before the stage fails.
    max_attempts: int = 3


def auto_cpus_per_worker(nodes: Sequence[dict[str, float]], gpus_per_worker: float) -> float:
    """CPUs for one actor from the alive nodes' resources (``ray.nodes()`` 'Resources' dicts).

    GPU actors: the smallest cores-per-GPU of the nodes that have GPUs, times
    ``gpus_per_worker``, whole and at least 1 -- every GPU actor fits on any GPU node.
    CPU actors (``gpus_per_worker == 0``) and clusters without GPUs: 1.
    """
    if gpus_per_worker <= 0:
        return 1.0
    per_gpu = [n.get("CPU", 0.0) / n["GPU"] for n in nodes if n.get("GPU", 0.0) > 0]
    if not per_gpu:
        return 1.0
    return float(max(1, int(min(per_gpu) * gpus_per_worker)))


class LocalExecutor:
    """Runs every shard in this process with one worker."""

    def __init__(self, config: ExecutorConfig | None = None) -> None:
        self.config = config or ExecutorConfig()

    def map_shards(
        self, factory: WorkerFactory, shards: Sequence[Any], on_result: ResultFn, cancel: CancelToken | None = None
    ) -> None:
        """Run every shard in order on one worker; ``on_result(i, result)`` after each; cancel between shards."""
        if not shards:
            return
        worker = factory()
        for i, shard in enumerate(shards):
            if cancel is not None:
                cancel.check()
            on_result(i, worker.run(shard))


class _RayWorkerHost:
    """The Ray actor body: builds the worker once, then runs shards.

    A factory that raises (a model missing on this node) is not a dead worker:
    the error is kept and raised by ``run``, so the driver gets the original
    error (e.g. ModelMissing with the path) at once instead of three restarts.
    """

    def __init__(self, factory: WorkerFactory, threads: int = 0) -> None:
        self._error: BaseException | None = None
        if threads > 0:
            # The actor's CPUs, for torch and the PNG encoder (likeness.generate.gallery.encode_threads);
            # Ray's own OMP_NUM_THREADS does the same only if torch is imported after it is set.
            try:
                import torch

                torch.set_num_threads(threads)
            except ImportError:  # pragma: no cover - torch is a hard dependency
                pass
        try:
            self._worker = factory()
        except Exception as exc:  # noqa: BLE001 - handed to the driver by run()
            self._error = exc

    def run(self, shard: Any) -> Any:
        if self._error is not None:
            raise self._error
        return self._worker.run(shard)

    def pid(self) -> int:
        import os

        return os.getpid()


class RayExecutor:
    """Spreads shards over Ray actors; a dead actor's shard is re-run elsewhere."""

    def __init__(self, config: ExecutorConfig) -> None:
        try:
            import ray
        except ImportError as exc:
            raise FailedPrecondition(
                "the Ray executor needs the 'ray' extra: pip install -e '.[ray]'"
            ) from exc
        self.config = config
        self._ray = ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if config.ray_address:
                kwargs["address"] = config.ray_address
            ray.init(**kwargs)
        self.actors: list[Any] = []
        self.cpus_per_worker = config.cpus_per_worker or auto_cpus_per_worker(
            [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")], config.gpus_per_worker)

    def _start_actor(self, factory: WorkerFactory) -> Any:
        cls = self._ray.remote(
            num_cpus=self.cpus_per_worker, num_gpus=self.config.gpus_per_worker, max_restarts=0
        )(_RayWorkerHost)
        return cls.remote(factory, int(self.cpus_per_worker))

    def map_shards(
        self, factory: WorkerFactory, shards: Sequence[Any], on_result: ResultFn, cancel: CancelToken | None = None
    ) -> None:
        """Run the shards on ``config.workers`` actors; ``on_result(i, result)`` in the driver, in finishing order.

        A shard whose actor dies goes back in the queue on a fresh actor (up to
        ``max_attempts``); an exception raised by the worker is re-raised as is.
        """
        ray = self._ray
        if not shards:
            return
        n = max(1, min(self.config.workers, len(shards)))
        self.actors = [self._start_actor(factory) for _ in range(n)]
        pending = list(range(len(shards)))
        attempts = [0] * len(shards)
        in_flight: dict[Any, tuple[int, int]] = {}  # object ref -> (shard index, actor slot)
        free = list(range(n))
        try:
            while pending or in_flight:
                if cancel is not None:
                    cancel.check()
                while pending and free:
                    slot = free.pop()
                    i = pending.pop(0)
                    attempts[i] += 1
                    in_flight[self.actors[slot].run.remote(shards[i])] = (i, slot)
                done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                for ref in done:
                    i, slot = in_flight.pop(ref)
                    try:
                        result = ray.get(ref)
                    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                        if attempts[i] >= self.config.max_attempts:
                            raise FailedPrecondition(
                                f"shard {i} failed {attempts[i]} times (its worker died: {exc}); "
                                "check the workers' logs and resources"
                            ) from exc
                        log.warning("worker died on shard %d (attempt %d); re-running it", i, attempts[i])
                        # Replace the dead actor; the shard goes back in the queue.
                        self.actors[slot] = self._start_actor(factory)
                        pending.insert(0, i)
                        free.append(slot)
                        continue
                    except ray.exceptions.RayTaskError as exc:
                        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                        raise cause from None
                    on_result(i, result)
                    free.append(slot)
        finally:
            for actor in self.actors:
                try:
                    ray.kill(actor)
                except Exception:  # noqa: BLE001 - already dead
                    pass
            self.actors = []


def make_executor(config: ExecutorConfig | None = None) -> LocalExecutor | RayExecutor:
    """The executor named by ``config.kind``; unknown kinds list the valid ones."""
    config = config or ExecutorConfig()
    if config.kind == "local":
        return LocalExecutor(config)
    if config.kind == "ray":
        return RayExecutor(config)
    raise InvalidInput(f"executor {config.kind!r} is unknown; use one of 'local', 'ray'")
