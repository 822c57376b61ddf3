"""Shared fixtures: offline hub, the tiny models, the real photos and face pack."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

# Markers follow from what a test uses, so they cannot be forgotten: `pytest -m "not slow"` is the
# fast tier (under a minute on 2 cores), `-m "not realdata"` runs without ../shared/realdata.
REALDATA_FIXTURES = {"realdata", "face_pack"}
RAY_FIXTURES = {"ray_cluster"}
# Starting a Ray cluster costs ~5 s and its tests 20-25 s each (measured on the 2-core CI machine).
SLOW_FIXTURES = RAY_FIXTURES


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Set the realdata / ray / slow markers from each test's fixture closure."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & REALDATA_FIXTURES:
            item.add_marker(pytest.mark.realdata)
        if used & RAY_FIXTURES:
            item.add_marker(pytest.mark.ray)
        if used & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """The tiny random models (built once, offline, if missing)."""
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from build_tiny_models import build_all

    return build_all(REPO / "models" / "tiny")


# The tiny pipelines, loaded once per test module (a test may change their scheduler or weights).
@pytest.fixture(scope="module")
def sd15(tiny_models: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_models / "sd15"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl(tiny_models: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_models / "sdxl"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def realdata() -> Path:
    """../shared/realdata (or $LIKENESS_REALDATA); skipped with the reason if absent."""
    from likeness.profiles import realdata_dir

    root = realdata_dir()
    if not (root / "faces").is_dir():
        pytest.skip(f"real data not found at {root}; set LIKENESS_REALDATA to the shared realdata folder")
    return root


@pytest.fixture(scope="session")
def jolie_photos(tmp_path_factory: pytest.TempPathFactory, realdata: Path) -> Path:
    """9 real photos of one person plus 2 others, downscaled to 320 px (curation speed, not correctness)."""
    from PIL import Image

    gallery = tmp_path_factory.mktemp("imports") / "jolie"
    gallery.mkdir()
    faces = realdata / "faces"
    files = sorted((faces / "Angelina_Jolie").glob("*.jpg")) + [faces / "Barack_Obama" / "fr_obama1.jpg",
                                                               sorted((faces / "Katy_Perry").glob("*.jpg"))[0]]
    for p in files:
        img = Image.open(p).convert("RGB")
        img.thumbnail((320, 320))
        img.save(gallery / f"{p.parent.name}_{p.stem}.jpg", quality=92)
    return gallery


@pytest.fixture(scope="session")
def face_pack(realdata: Path) -> Path:
    pack = realdata / "models"
    if not (pack / "det_500m.onnx").is_file():
        pytest.skip(f"real face pack missing in {pack}")
    return pack


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster on 2 CPUs for every Ray test module (starting one costs seconds).

    Test modules whose helper classes travel to actors register themselves with
    ``ray.cloudpickle.register_pickle_by_value`` (workers cannot import tests/).
    """
    ray = pytest.importorskip("ray", reason="the Ray extra is not installed (pip install -e '.[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture()
def stand_in_stages():
    """Stand-in stage functions that isolate build plumbing (store, worker, servicer) from the real stages.

    ``stand_in_stages(hook)`` returns one function per real stage name (taken from
    ``likeness.build.stages.STAGE_FUNCTIONS``, so the names cannot drift). Each reports one progress
    event; ``hook(name, ctx, round_)`` may do more and return the stage's result (None = the default:
    ``{"files": {}}`` for export, ``{"scores": {}}`` otherwise). Plumbing tests only: the real stages
    are tested with the tiny models and real photos beside them.
    """
    from likeness.build.stages import STAGE_FUNCTIONS
    from likeness.progress import report

    def make_all(hook=None):
        def make(name):
            def run(ctx, round_):
                report(ctx.progress, name, 1, 1, f"{name} (stand-in)")
                result = hook(name, ctx, round_) if hook is not None else None
                if result is None:
                    result = {"files": {}} if name == "export" else {"scores": {}}
                return result
            return run

        return {name: make(name) for name in STAGE_FUNCTIONS}

    return make_all
