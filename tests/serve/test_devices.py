"""Each worker loads its models on its own device (issue 14: everything was created on GPU 0).

The machine running the suite has no GPU, so the CUDA half is plumbing: the loaders are
replaced by recorders and the test checks the ``device`` that reaches them from each caller
(the server's build workers through the real WorkerPool, run_build and stage helpers; its
requests; a gallery worker). The real half loads the tiny pipeline and the real face pack on
a "cpu" worker through the same paths and checks where they landed.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from likeness.build.worker import loader_device
from likeness.profiles import resolve_profile
from likeness.serve.runtime import Runtime
from likeness.spec import spec_from_dict


def test_loader_device_names_the_workers_gpu_and_keeps_cpu_profiles_on_the_cpu():
    gpu, cpu = resolve_profile("sd15"), resolve_profile("cpu-tiny")
    auto = SimpleNamespace(name="auto", device="auto")
    assert loader_device(gpu, "cuda:1") == "cuda:1"
    assert loader_device(auto, "cuda:3") == "cuda:3"
    assert loader_device(cpu, "cuda:1") == "cpu"  # a CPU profile never moves to a worker's GPU
    assert loader_device(auto, "cpu") == "cpu" and loader_device(cpu, "cpu") == "cpu"
    assert loader_device(gpu, "cpu") == "cpu"  # the loader then refuses, naming the profile
    for not_a_device in ("embedded", "", None, "executor"):
        assert loader_device(gpu, not_a_device) is None  # the profile's own rule


@pytest.fixture()
def recorded(monkeypatch):
    """Replace the three loaders by recorders: (kind, profile, device) per load."""
    import likeness.backends.clip as clip
    import likeness.backends.diffusion as diffusion
    import likeness.backends.faces as faces

    calls: list[tuple[str, str, str | None]] = []
    lock = threading.Lock()

    def recorder(kind):
        def load(profile, *, device=None, **_):
            with lock:
                calls.append((kind, profile.name, device))
            time.sleep(0.05)  # both workers are loading at once, as on a server
            return SimpleNamespace(kind=kind, device=device, recognition_sha256=None)
        return load

    monkeypatch.setattr(diffusion, "load_pipeline", recorder("pipe"))
    monkeypatch.setattr(faces, "load_face_analyzer", recorder("faces"))
    monkeypatch.setattr(clip, "load_clip", recorder("clip"))
    return calls


def test_each_build_worker_loads_on_its_own_gpu(tmp_path, recorded, stand_in_stages, monkeypatch):
    from likeness.build import stages

    import likeness.backends.diffusion as diffusion

    monkeypatch.setattr(diffusion, "set_sampler", lambda *a: None)
    seen: dict[str, dict[str, str | None]] = {}

    def hook(name, ctx, round_):
        if name == "curate":  # what the real stages ask for: faces, CLIP, the build's pipeline
            seen[ctx.build_id] = {"worker": ctx.device, "faces": stages._faces(ctx).device,
                                  "clip": stages._clip(ctx).device, "pipe": stages._pipe(ctx).device}
            time.sleep(0.3)  # keep this worker busy so the other build goes to the other worker
        return None

    rt = Runtime(tmp_path / "data", devices=["cuda:0", "cuda:1"], default_profile="sd15",
                 stages=stand_in_stages(hook))
    rt.start(load_models=False)
    try:
        ids = [rt.start_build(spec=spec_from_dict({"name": f"Emily{i}", "token": f"3m1ly{i}", "profile": "sd15",
                                                   "per_cell": 1})).id for i in range(2)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(rt.get_build(b).state not in ("succeeded", "failed") for b in ids):
            time.sleep(0.1)
        assert [rt.get_build(b).state for b in ids] == ["succeeded", "succeeded"], [rt.get_build(b).error for b in ids]
    finally:
        rt.stop()
    assert {s["worker"] for s in seen.values()} == {"cuda:0", "cuda:1"}
    for s in seen.values():
        assert s["faces"] == s["clip"] == s["pipe"] == s["worker"]
    # Loaded once per device, never on GPU 0 by default, never moved afterwards.
    assert sorted(d for k, _, d in recorded if k == "faces") == ["cuda:0", "cuda:1"]
    assert sorted(d for k, _, d in recorded if k == "pipe") == ["cuda:0", "cuda:1"]


def test_embedded_builds_keep_the_profiles_rule(recorded):
    from likeness.build import stages

    ctx = SimpleNamespace(spec=SimpleNamespace(profile="cpu-tiny", sampling=SimpleNamespace(sampler="Euler")),
                          device="embedded", models=None, pipe=None)
    assert stages._faces(ctx).device is None and stages._clip(ctx).device is None


def test_requests_load_on_the_first_workers_device(tmp_path, recorded):
    rt = Runtime(tmp_path / "data", devices=["cuda:1", "cuda:0"], default_profile="sd15", start_workers=False)
    rt._load_models()
    assert recorded == [("faces", "sd15", "cuda:1"), ("clip", "sd15", "cuda:1")] and rt.ready.is_set()
    assert rt.device_for(resolve_profile("cpu-tiny")) == "cpu"


def test_gallery_worker_factory_passes_its_device(recorded, monkeypatch):
    import likeness.backends.diffusion as diffusion
    from likeness.generate.gallery import GalleryWorkerFactory
    from likeness.spec import SamplingConfig

    monkeypatch.setattr(diffusion, "model_hash", lambda p: "")
    worker = GalleryWorkerFactory(resolve_profile("sd15"), SamplingConfig(), device="cuda:2")()
    assert worker.pipe.device == "cuda:2" and recorded == [("pipe", "sd15", "cuda:2")]
    GalleryWorkerFactory(resolve_profile("sd15"), SamplingConfig())()  # a Ray actor: its own (current) GPU
    assert recorded[-1] == ("pipe", "sd15", None)


def test_a_cpu_worker_really_loads_on_the_cpu(tmp_path, tiny_models, face_pack):
    """The real loaders through the same helpers: tiny pipeline and real face pack on worker "cpu"."""
    from likeness.backends.cache import ModelCache
    from likeness.backends.diffusion import pipeline_device
    from likeness.build import stages

    models = ModelCache()
    ctx = SimpleNamespace(spec=SimpleNamespace(profile="cpu-tiny", sampling=SimpleNamespace(sampler="Euler")),
                          device="cpu", models=models, pipe=None)
    pipe = stages._pipe(ctx)
    assert pipeline_device(pipe).type == "cpu"
    faces = stages._faces(ctx)
    assert faces.providers == ["CPUExecutionProvider"]
    assert ("faces", "cpu-tiny", "cpu") in models._models
    rt = Runtime(tmp_path / "data", devices=["cpu"], default_profile="cpu-tiny", start_workers=False)
    rt.models = models  # a request on the same device reuses the build's copy
    assert rt.models.faces(resolve_profile("cpu-tiny"), rt.device_for(resolve_profile("cpu-tiny"))) is faces
