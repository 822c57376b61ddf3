"""The Ray executor on a local CPU cluster: same gallery as local, dead workers' shards re-run."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ray_helpers import DieOnceFactory

from likeness.executor import ExecutorConfig, LocalExecutor, make_executor
from likeness.generate.manifest import read_manifest
from likeness.spec import spec_from_dict

ray = pytest.importorskip("ray", reason="the Ray extra is not installed (pip install -e '.[ray]')")
# Ship this module's helper classes by value: workers cannot import tests/.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(sys.modules["ray_helpers"])


def _spec():
    return spec_from_dict({
        "name": "Tiny", "token": "t1ny", "profile": "cpu-tiny",
        "zooms": ["closeup", "full body"], "angles": ["front shot", "side angle"], "per_cell": 2,
        "sampling": {"sampler": "Euler a", "steps": 2, "width": 64, "height": 64, "seed": 1234},
    })


def _pixels_and_infotext(gallery: Path) -> dict[str, tuple[Any, str]]:
    import numpy as np
    from PIL import Image

    out = {}
    for r in read_manifest(gallery):
        with Image.open(gallery / r.file) as im:
            out[r.id] = (np.asarray(im.convert("RGB"), dtype=np.int16), im.text.get("parameters", ""))
    return out


def test_ray_gallery_equals_local_and_dead_worker_shard_is_rerun(tmp_path, tiny_models, ray_cluster, monkeypatch):
    import likeness.generate.gallery as gen

    spec = _spec()
    local = gen.generate_gallery(spec, tmp_path / "local", batch_size=2, executor=LocalExecutor())
    assert local.generated == 8

    # Same seeds through two Ray actors, one of which dies on its first shard.
    real_factory = gen.GalleryWorkerFactory
    marker = tmp_path / "died-once"

    def dying_factory(*args, **kwargs):
        return DieOnceFactory(real_factory(*args, **kwargs), str(marker))

    monkeypatch.setattr(gen, "GalleryWorkerFactory", dying_factory)
    executor = make_executor(ExecutorConfig(kind="ray", workers=2, cpus_per_worker=1, max_attempts=3))
    result = gen.generate_gallery(spec, tmp_path / "ray", batch_size=2, executor=executor)

    assert marker.exists(), "the test worker never died: the retry path was not exercised"
    assert result.generated == 8
    rows = read_manifest(tmp_path / "ray")
    assert len(rows) == 8 and len({r.id for r in rows}) == 8
    manifest_lines = (tmp_path / "ray" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest_lines) == 8, "a re-run shard must not append duplicate rows"
    assert sorted(r.seed for r in rows) == sorted(r.seed for r in read_manifest(tmp_path / "local"))
    # The same images and infotext for the same seeds, whichever process drew them.
    # Ray actors run torch with 1 thread (num_cpus=1), the driver with 2: float
    # summation order differs, so pixels may differ by a rounding step, no more.
    ray_imgs, local_imgs = _pixels_and_infotext(tmp_path / "ray"), _pixels_and_infotext(tmp_path / "local")
    assert ray_imgs.keys() == local_imgs.keys()
    for key, (pixels, info) in ray_imgs.items():
        assert info == local_imgs[key][1]
        assert abs(pixels - local_imgs[key][0]).max() <= 2, key
    assert not list((tmp_path / "ray" / "images").glob(".*tmp*"))


def test_ray_shard_that_keeps_dying_fails_with_a_clear_error(tmp_path, ray_cluster):
    from likeness.errors import FailedPrecondition

    @dataclass(frozen=True)
    class AlwaysDie:
        def __call__(self):
            class W:
                def run(self, shard):
                    os._exit(1)
            return W()

    executor = make_executor(ExecutorConfig(kind="ray", workers=1, max_attempts=2))
    with pytest.raises(FailedPrecondition, match="failed 2 times"):
        executor.map_shards(AlwaysDie(), [1], lambda i, r: None)


def test_unknown_executor_lists_valid_ones():
    from likeness.errors import InvalidInput

    with pytest.raises(InvalidInput, match="'local', 'ray'"):
        make_executor(ExecutorConfig(kind="dask"))  # type: ignore[arg-type]


def test_a_worker_that_cannot_load_its_model_fails_at_once_with_the_original_error(ray_cluster):
    from likeness.errors import ModelMissing

    @dataclass(frozen=True)
    class MissingModel:
        def __call__(self):
            raise ModelMissing("face pack /nodes/gpu7/models/buffalo_l has no .onnx models")

    executor = make_executor(ExecutorConfig(kind="ray", workers=1, max_attempts=3))
    with pytest.raises(ModelMissing, match="gpu7"):
        executor.map_shards(MissingModel(), [1, 2], lambda i, r: None)


def test_gpu_actors_get_their_share_of_the_nodes_cores():
    from likeness.executor import auto_cpus_per_worker

    assert auto_cpus_per_worker([{"CPU": 16.0, "GPU": 1.0}], 1.0) == 16.0  # the lent H200 machine
    assert auto_cpus_per_worker([{"CPU": 96.0, "GPU": 8.0}], 1.0) == 12.0
    assert auto_cpus_per_worker([{"CPU": 96.0, "GPU": 8.0}], 0.5) == 6.0
    # Mixed nodes: the tightest GPU node decides, so every GPU actor fits anywhere; CPU-only nodes don't count.
    assert auto_cpus_per_worker([{"CPU": 96.0, "GPU": 8.0}, {"CPU": 16.0, "GPU": 4.0}, {"CPU": 64.0}], 1.0) == 4.0
    assert auto_cpus_per_worker([{"CPU": 2.0, "GPU": 4.0}], 1.0) == 1.0  # never 0
    assert auto_cpus_per_worker([{"CPU": 16.0, "GPU": 1.0}], 0.0) == 1.0  # CPU actors run side by side
    assert auto_cpus_per_worker([{"CPU": 2.0}], 1.0) == 1.0
    assert ExecutorConfig().cpus_per_worker == 0.0  # chosen, unless set


@dataclass(frozen=True)
class ThreadsFactory:
    """A worker that reports how many threads torch and the PNG encoder have inside its actor."""

    def __call__(self):
        class _Threads:
            def run(self, shard):
                import torch

                from likeness.generate.gallery import encode_threads

                return torch.get_num_threads(), encode_threads()

        return _Threads()


def test_an_actor_with_two_cpus_encodes_on_two_threads(ray_cluster):
    executor = make_executor(ExecutorConfig(kind="ray", workers=1, cpus_per_worker=2))
    assert executor.cpus_per_worker == 2
    got = []
    executor.map_shards(ThreadsFactory(), [0], lambda i, r: got.append(r))
    assert got == [(2, 2)]
    # Chosen on this CPU-only cluster: CPU actors get 1 CPU each, as before.
    assert make_executor(ExecutorConfig(kind="ray", workers=1)).cpus_per_worker == 1.0
