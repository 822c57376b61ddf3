"""Whole builds through gRPC with the REAL stages: cpu-tiny weights, the real CPU face pack and
real photos from ../shared/realdata imported in place of generation (tiny random weights
cannot draw faces). Then a server subprocess killed with SIGKILL mid-training, restarted on
the same data directory, finishing with the same curated set and no duplicate or half file.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from likeness.serve.client import LikenessClient
from likeness.serve.pb import likeness_pb2 as pb
from likeness.spec import spec_from_dict

# Whole builds (tiny models, real photos): 6-34 s each on 2 cores.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SPEC = spec_from_dict({
    "name": "Jolie", "token": "j0l1e", "class_word": "woman", "traits": ["dark hair", "full lips"],
    "wardrobe": "black dress", "per_cell": 1, "zooms": ["closeup"], "angles": ["front shot"],
    "profile": "cpu-tiny", "sampling": {"steps": 2, "width": 64, "height": 64, "seed": 42},
})
OPTIONS = {"k": 5, "training_steps": 4, "checkpoint_every": 2, "train_resolution": 64,
           "eval_scenes": ["cooking in a kitchen"], "eval_steps": 2}


@pytest.fixture(scope="module")
def photos(jolie_photos, face_pack, tiny_models) -> Path:
    """9 photos of one person plus 2 others, downscaled (curation speed, not correctness)."""
    return jolie_photos


def _selected(build_dir: Path) -> list[str]:
    return sorted(json.loads((build_dir / "curated" / "curation.json").read_text())["selected"])


def _check_artifacts(build_dir: Path, token: str) -> None:
    from likeness.embeddings import load_embedding
    from likeness.generate.manifest import read_manifest

    for name in (f"{token}.pt", f"{token}.safetensors", f"diffusers/{token}.safetensors"):
        emb = load_embedding(build_dir / "embeddings" / name)  # the token comes back from the file name
        assert emb.token == token and emb.family == "sd15"
    assert (build_dir / "report" / "report.json").is_file() and (build_dir / "report" / "report.html").is_file()
    assert (build_dir / "eval" / "evaluation.json").is_file()
    leftovers = [p for p in build_dir.rglob("*") if ".tmp" in p.name]
    assert not leftovers, f"half-written files visible: {leftovers}"
    # Every gallery image exactly once (no image made or imported twice, none lost).
    lines = [json.loads(x) for x in (build_dir / "gallery" / "manifest.jsonl").read_text().splitlines() if x.strip()]
    ids = [r["id"] for r in lines]
    assert len(ids) == len(set(ids)) == len(read_manifest(build_dir / "gallery"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, photos) -> dict:
    """One whole build on an in-process server (port 0), followed to the end by WatchBuild."""
    from likeness.serve.runtime import Runtime
    from likeness.serve.servicer import create_server, mark_serving_when_ready

    data = tmp_path_factory.mktemp("data")
    rt = Runtime(data, devices=["cpu"], default_profile="cpu-tiny", import_roots=[photos.parent])
    server, port, health = create_server("127.0.0.1:0", rt)
    server.start()
    rt.start()
    mark_serving_when_ready(rt, health)
    client = LikenessClient(f"127.0.0.1:{port}", timeout=120)
    client.wait_ready(120)
    client.create_character(SPEC)
    b = client.start_build(character="Jolie", options=dict(OPTIONS, import_gallery=str(photos)))
    events = list(client.watch_build(b.id))
    final = client.get_build(b.id)
    yield {"client": client, "build": final, "events": events, "dir": rt.store.build_dir(b.id), "rt": rt}
    client.close()
    server.stop(0)
    rt.stop()


def test_whole_build_through_grpc(uninterrupted, photos):
    from PIL import Image

    c, b, events, build_dir = (uninterrupted[k] for k in ("client", "build", "events", "dir"))
    assert b.state == pb.SUCCEEDED, b.error
    assert [e.number for e in events] == list(range(1, len(events) + 1))
    stages = [e.stage for e in events if e.kind == "stage_done"]
    assert stages == ["generate", "curate", "caption", "train", "export", "evaluate", "report"]
    assert "eval_clip_t_token" in b.scores
    # The curated set's scores are in Build.scores too, under report.json's names (no GetReport needed).
    report = json.loads((build_dir / "report" / "report.json").read_text())
    for name in ("curated_overall", "curated_identity_consistency"):
        assert b.scores[name] == pytest.approx(report["summary"]["scores"][name], abs=1e-3), name
    selected = _selected(build_dir)
    # Imported in sorted file order: ids 0000-0008 are the 9 photos of Angelina Jolie.
    jolie_ids = {f"zx-ax-{i:04d}" for i in range(9)}
    assert len(selected) == 5 and set(selected) <= jolie_ids, selected
    _check_artifacts(build_dir, "j0l1e")
    # Every format over gRPC, byte-identical to the files.
    for fmt, rel in (("a1111-pt", "j0l1e.pt"), ("safetensors", "j0l1e.safetensors"),
                     ("diffusers", "diffusers/j0l1e.safetensors")):
        f = c.get_embedding(character="Jolie", format=fmt)
        assert f.filename == Path(rel).name and f.data == (build_dir / "embeddings" / rel).read_bytes()
        assert f.token == "j0l1e"
    rep = c.get_report(b.id)
    assert json.loads(rep.json)["schema_version"] and rep.html.startswith(b"<")
    # Any tool can check its panels against the character: same person high, another low.
    same = photos / "Angelina_Jolie_deepface_img4.jpg"
    other = photos / "Barack_Obama_fr_obama1.jpg"
    r = c.score_consistency([same, other], character="Jolie")
    assert r.images[0].face_found and r.images[0].same_identity and not r.images[1].same_identity
    # Curate over gRPC with image bytes.
    cur = c.curate([p for p in sorted(photos.iterdir())][:6], k=3)
    assert sum(d.kept for d in cur.decisions) == 3 and all(d.reasons for d in cur.decisions)
    # Generate with the trained token: PNG with A1111 infotext, the seed we asked for.
    imgs = list(c.generate("photo of j0l1e woman, cooking", characters=["Jolie"], steps=2, width=64, height=64,
                           seeds=[7]))
    assert len(imgs) == 1 and imgs[0].seed == 7 and "Seed: 7" in imgs[0].infotext
    assert Image.open(io.BytesIO(imgs[0].png)).size == (64, 64)


def _start_server(data: Path, photos: Path) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "likeness", "serve", "--listen", "127.0.0.1:0", "--data", str(data),
         "--import-root", str(photos.parent), "--profile", "cpu-tiny"],
        cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        if "likeness serving on" in line:
            port = int(line.split("serving on ")[1].split()[0].rsplit(":", 1)[1])
            # Keep draining stderr so the server never blocks on a full pipe.
            import threading

            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, port
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError("server did not report its port")


def test_sigkill_mid_training_resumes_to_the_same_result(tmp_path, photos, uninterrupted):
    data = tmp_path / "data"
    proc, port = _start_server(data, photos)
    try:
        with LikenessClient(f"127.0.0.1:{port}", timeout=120) as c:
            b = c.start_build(spec=SPEC, options=dict(OPTIONS, import_gallery=str(photos)))
            last = 0
            for ev in c.watch_build(b.id, reconnect=False):
                last = ev.number
                if ev.stage == "train" and ev.kind == "progress" and ev.done >= 2:
                    break
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    build_dir = data / "builds" / b.id
    assert not (build_dir / "embeddings").exists()  # killed before export
    proc, port = _start_server(data, photos)
    try:
        with LikenessClient(f"127.0.0.1:{port}", timeout=120) as c:
            rest = list(c.watch_build(b.id, after_event=last))
            final = c.get_build(b.id)
            assert final.state == pb.SUCCEEDED, final.error
            assert any("resuming" in e.message for e in rest)
            # Stages finished before the kill were not run again.
            started = [e.stage for e in rest if e.kind == "stage_started"]
            assert "generate" not in started and "curate" not in started and "caption" not in started
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert _selected(build_dir) == _selected(uninterrupted["dir"])
    _check_artifacts(build_dir, "j0l1e")
    train_result = json.loads((build_dir / "train" / "best.json").read_text())
    assert train_result


def test_build_with_ray_executor_curates_like_the_local_one(tmp_path, photos, uninterrupted, ray_cluster):
    """An embedded build whose curation shards run on Ray actors selects the same images."""
    from likeness.build.runner import run_build, start_build
    from likeness.executor import ExecutorConfig, make_executor
    from likeness.build.store import Store

    store = Store(tmp_path / "data")
    build_id = start_build(store, SPEC, dict(OPTIONS, import_gallery=str(photos)))
    store.claim(build_id, "embedded")
    executor = make_executor(ExecutorConfig(kind="ray", workers=2, cpus_per_worker=1))
    run_build(store, build_id, device="embedded", executor=executor)
    assert store.get_build(build_id).state == "succeeded", store.get_build(build_id).error
    build_dir = store.build_dir(build_id)
    assert _selected(build_dir) == _selected(uninterrupted["dir"])
    _check_artifacts(build_dir, SPEC.token)


def test_refinement_gallery_through_an_executor_loads_the_embedding_in_each_worker(tmp_path, tiny_models):
    """Galleries drawn with the trained token (refinement rounds) are the same through workers."""
    import numpy as np
    import torch
    from PIL import Image

    from likeness.backends.diffusion import load_pipeline
    from likeness.embeddings import TrainedEmbedding
    from likeness.executor import LocalExecutor
    from likeness.generate.gallery import generate_gallery
    from likeness.profiles import load_profile

    spec = spec_from_dict({
        "name": "Tok", "token": "t0k3n", "class_word": "woman", "template": "photo of t0k3n, {zoom}, {angle}",
        "per_cell": 2, "zooms": ["closeup"], "angles": ["front shot"], "profile": "cpu-tiny",
        "sampling": {"steps": 2, "width": 64, "height": 64, "seed": 5},
    })
    g = torch.Generator().manual_seed(0)
    emb = TrainedEmbedding(token="t0k3n", family="sd15", vectors={"clip_l": torch.randn(2, 32, generator=g) * 3},
                           step=1, base_model="sd15")
    pipe = load_pipeline(load_profile("cpu-tiny"))
    direct = generate_gallery(spec, tmp_path / "direct", "cpu-tiny", pipe=pipe, embedding=emb, batch_size=2)
    workers = generate_gallery(spec, tmp_path / "workers", "cpu-tiny", executor=LocalExecutor(), embedding=emb,
                               batch_size=2)
    plain = generate_gallery(spec, tmp_path / "plain", "cpu-tiny", batch_size=2)
    assert direct.generated == workers.generated == plain.generated == 2

    def px(folder):
        return [np.asarray(Image.open(p), dtype=np.int16) for p in sorted((folder / "images").glob("*.png"))]

    for a, b, c in zip(px(tmp_path / "direct"), px(tmp_path / "workers"), px(tmp_path / "plain")):
        assert abs(a - b).max() <= 2
        assert abs(a - c).max() > 2, "the embedding did not change the picture: it was not loaded"


def test_embedded_cli_build_runs_as_a_claimed_build(tmp_path, photos, uninterrupted, capsys):
    """`likeness build SPEC --import DIR` in-process: never queued (a server on the same data dir
    cannot take it), and it ends with the same curated set and every artifact."""
    from likeness.cli.main import main
    from likeness.build.store import Store

    spec = tmp_path / "jolie.toml"
    spec.write_text(
        'name = "Jolie"\ntoken = "j0l1e"\nclass_word = "woman"\ntraits = ["dark hair", "full lips"]\n'
        'wardrobe = "black dress"\nper_cell = 1\nzooms = ["closeup"]\nangles = ["front shot"]\nprofile = "cpu-tiny"\n'
        "[sampling]\nsteps = 2\nwidth = 64\nheight = 64\nseed = 42\n")
    argv = ["build", str(spec), "--data", str(tmp_path / "data"), "--import", str(photos), "--no-progress",
            "--k", "5", "--training-steps", "4", "--checkpoint-every", "2", "--train-resolution", "64",
            "--eval-scene", "cooking in a kitchen", "--eval-steps", "2"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["state"] == "succeeded" and out["device"] == "embedded"
    store = Store(tmp_path / "data")
    try:
        states = [e.state for e in store.events(out["id"]) if e.kind == "state"]
        assert states == ["queued", "running", "succeeded"]
        build_dir = store.build_dir(out["id"])
    finally:
        store.close()
    assert _selected(build_dir) == _selected(uninterrupted["dir"])
    _check_artifacts(build_dir, "j0l1e")
