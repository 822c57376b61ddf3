"""Curation on the Ray executor (local CPU cluster): the same decisions as in-process, dead worker's shard re-run.

Real photos from ../shared/realdata are copied into tmp_path (never into the
repository); the face pack is the real CPU one, CLIP the tiny open_clip model
of the ``cpu-tiny`` profile.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from ray_helpers import DieOnceFactory

from likeness.curate.decide import CURATION_NAME, CurateConfig, curate, curate_with_profile
from likeness.executor import ExecutorConfig, LocalExecutor, make_executor
from likeness.spec import spec_from_dict

ray = pytest.importorskip("ray", reason="the Ray extra is not installed (pip install -e '.[ray]')")
# Ship this module's helper classes by value: workers cannot import tests/.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(sys.modules["ray_helpers"])

# One identity (7 photos and a mirrored copy), two other people, a photo without a face, a corrupt file.
POOL = [
    *(f"Angelina_Jolie/deepface_img{n}.jpg" for n in (1, 2, 4, 5, 6, 7, 11)),
    "Angelina_Jolie/deepface_img11_reflection.jpg",
    "Katy_Perry/deepface_img26.jpg", "Katy_Perry/deepface_img27.jpg",
    "Barack_Obama/fr_obama.jpg", "Barack_Obama/fr_obama2.jpg",
    "_negative_no_face/skimage_coffee.png",
]
# 4 images a shard: 4 shards over 2 actors, so one actor runs several.
CONFIG = CurateConfig(k=5, batch_size=4)
SPEC = spec_from_dict({"name": "Angelina", "token": "4ng3l", "profile": "cpu-tiny",
                       "background": "neutral gray background"})


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, realdata: Path, face_pack: Path, tiny_models: Path) -> Path:
    root = tmp_path_factory.mktemp("pool")
    for rel in POOL:
        shutil.copyfile(realdata / "faces" / rel, root / rel.replace("/", "__"))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    return root


def _comparable(result) -> dict[str, Any]:
    doc = result.to_dict()
    doc.pop("out_dir")
    for key in ("seconds_analyse", "seconds_total"):
        doc["summary"].pop(key)
    return doc


def test_ray_curation_equals_local_and_dead_worker_shard_is_rerun(pool: Path, tmp_path: Path, ray_cluster,
                                                                  monkeypatch) -> None:
    import likeness.curate.decide as cur

    local = curate_with_profile(pool, SPEC, tmp_path / "local", CONFIG, profile="cpu-tiny")
    assert len(local.images) == len(POOL) + 1 and len(local.selected) == 5
    assert all(s.startswith("Angelina_Jolie") for s in local.selected)

    # The same pool through two Ray actors, one of which dies on its first shard.
    real_factory = cur.CurationWorkerFactory
    marker = tmp_path / "died-once"
    monkeypatch.setattr(cur, "CurationWorkerFactory",
                        lambda *a, **kw: DieOnceFactory(real_factory(*a, **kw), str(marker)))
    executor = make_executor(ExecutorConfig(kind="ray", workers=2, cpus_per_worker=1, max_attempts=3))
    remote = curate_with_profile(pool, SPEC, tmp_path / "ray", CONFIG, profile="cpu-tiny", executor=executor)

    assert marker.exists(), "the test worker never died: the retry path was not exercised"
    ids = [d.id for d in remote.images]
    assert len(ids) == len(set(ids)) == len(POOL) + 1, "a re-run shard must not duplicate images"
    # Decisions, reasons, scores, measures, clusters and set scores: all the same.
    assert _comparable(remote) == _comparable(local)
    assert sorted(p.stem for p in (tmp_path / "ray").glob("*.png")) == sorted(local.selected)
    assert (tmp_path / "ray" / CURATION_NAME).is_file()
    assert not list((tmp_path / "ray").glob(".*tmp*"))


def test_local_executor_with_worker_factory_equals_in_process(pool: Path, tmp_path: Path) -> None:
    from likeness.backends.clip import load_clip
    from likeness.backends.faces import load_face_analyzer
    from likeness.curate.analysis import CurationWorkerFactory
    from likeness.profiles import load_profile

    profile = load_profile("cpu-tiny")
    clip = load_clip(profile)
    plain = curate(pool, SPEC, tmp_path / "a", CONFIG, faces=load_face_analyzer(profile), clip=clip)
    sharded = curate(pool, SPEC, tmp_path / "b", CONFIG, clip=clip, executor=LocalExecutor(),
                     worker_factory=CurationWorkerFactory(profile, use_clip=True))
    assert _comparable(sharded) == _comparable(plain)


# --- command-line executor options -------------------------------------------------


def _args(*argv: str):
    from likeness.cli.main import build_parser

    return build_parser().parse_args(["curate", "g", "--out", "o", *argv])


def test_executor_options_build_the_config() -> None:
    from likeness.cli.commands.executor_options import executor_config_from_args

    assert executor_config_from_args(_args()) == ExecutorConfig(kind="local")
    cfg = executor_config_from_args(_args("--executor", "ray", "--ray-address", "auto", "--workers", "8",
                                          "--gpus-per-worker", "1"))
    assert cfg == ExecutorConfig(kind="ray", ray_address="auto", workers=8, gpus_per_worker=1.0)
    assert executor_config_from_args(_args("--executor", "ray")) == ExecutorConfig(kind="ray")


@pytest.mark.parametrize("command", ["curate", "generate"])
@pytest.mark.parametrize("argv, message", [
    (["--ray-address", "auto"], "--ray-address only apply to the Ray executor"),
    (["--executor", "local", "--workers", "2", "--gpus-per-worker", "1"], "--workers, --gpus-per-worker only apply"),
    (["--executor", "ray", "--workers", "0"], "--workers 0: must be at least 1"),
    (["--executor", "ray", "--gpus-per-worker", "-1"], "must not be negative"),
    (["--executor", "ray", "--ray-address", " "], "--ray-address is empty"),
], ids=["address-without-ray", "workers-without-ray", "zero-workers", "negative-gpus", "empty-address"])
def test_bad_executor_options_are_invalid_input(command: str, argv: list[str], message: str, tmp_path: Path,
                                                capsys) -> None:
    from likeness.cli.main import main

    spec = tmp_path / "s.toml"
    spec.write_text('name = "Tiny"\ntoken = "t1ny"\n')
    target = [str(tmp_path), "--spec", str(spec)] if command == "curate" else [str(spec)]
    assert main([command, *target, "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "nothing is written before the options are checked"
