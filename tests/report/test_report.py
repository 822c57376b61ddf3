"""Build reports: JSON against its schema, HTML in headless Chromium, graceful degradation, CLI.

The build folder is made by the real stages where they run on the CPU in
seconds: a gallery of real photos (zoom x angle rows in the manifest), real
curation with the real face pack and tiny CLIP, real captions, real
evaluation with the tiny pipeline. Training's files are written with
train/validation's own row class (training itself is covered by its tests).
"""

from __future__ import annotations

import base64
import html as _html
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from likeness.errors import FailedPrecondition, NotFound
from likeness.report.document import SCHEMA_VERSION, build_report, render_html, report_schema, validate_report, write_report
from likeness.spec import spec_from_dict

CHROMIUM = Path("/usr/bin/chromium")
SPEC = spec_from_dict({
    "name": "Angie", "token": "4ng13", "class_word": "woman", "traits": ["dark long hair", "full lips"],
    "zooms": ["closeup", "medium shot"], "angles": ["front shot", "side angle"], "per_cell": 3,
    "sampling": {"steps": 2, "width": 64, "height": 64, "seed": 5},
})


@pytest.fixture(scope="module")
def build(tmp_path_factory, tiny_models, face_pack, realdata) -> Path:
    """A build folder with every stage's artifacts."""
    import torch
    from PIL import Image

    from likeness.backends.clip import load_clip
    from likeness.backends.diffusion import load_pipeline
    from likeness.backends.faces import load_face_analyzer
    from likeness.caption import caption_dataset
    from likeness.curate.decide import curate
    from likeness.curate.checks import CurateConfig
    from likeness.embeddings import TrainedEmbedding, pipeline_dims
    from likeness.evaluate import EvalConfig, evaluate
    from likeness.files import atomic_write_json
    from likeness.generate.manifest import GalleryImage, write_manifest
    from likeness.profiles import load_profile
    from likeness.train.checkpoint_scoring import CheckpointScores

    root = tmp_path_factory.mktemp("data") / "builds" / "b-20260101-000000-abcd1234"
    atomic_write_json(root / "spec.json", {"spec": SPEC.to_dict(), "options": {"k": 4}})
    faces_dir = realdata / "faces"
    photos = (sorted((faces_dir / "Angelina_Jolie").glob("*"))[:8] + sorted((faces_dir / "Katy_Perry").glob("*"))[:2]
              + sorted((faces_dir / "_negative_no_face").glob("*"))[:2])
    rows = []
    for i, src in enumerate(photos):
        zi, ai, k = i // 6, (i // 3) % 2, i % 3
        rid = f"z{zi}-a{ai}-{k:04d}"
        with Image.open(src) as im:
            im = im.convert("RGB")
            im.thumbnail((320, 320))
            (root / "gallery" / "images").mkdir(parents=True, exist_ok=True)
            im.save(root / "gallery" / "images" / f"{rid}.png")
        rows.append(GalleryImage(id=rid, file=f"images/{rid}.png", zoom=SPEC.zooms[zi], angle=SPEC.angles[ai],
                                 zoom_index=zi, angle_index=ai, index_in_cell=k, seed=100 + i, prompt="p"))
    write_manifest(root / "gallery", rows)

    prof = load_profile("cpu-tiny")
    faces, clip = load_face_analyzer(prof), load_clip(prof)
    curate(root / "gallery", SPEC, root / "curated", CurateConfig(k=4), faces=faces, clip=clip)
    caption_dataset(root / "curated", SPEC)

    pipe = load_pipeline(prof, sampler="DPM++ 2M Karras")
    dim = pipeline_dims(pipe)["clip_l"]
    emb = TrainedEmbedding(token=SPEC.token, family="sd15", vectors={"clip_l": torch.randn(2, dim) * 0.01},
                           step=20, base_model="tiny/sd15")
    rows = [CheckpointScores(step=s, identity=i, clip_t=c, faces_found=3, n_images=4, loss=l).to_dict()
            for s, i, c, l in ((10, 0.31, 0.24, 0.4), (20, 0.42, 0.23, 0.3), (30, 0.47, 0.17, 0.25))]
    atomic_write_json(root / "train" / "checkpoint_scores.json", {"rule": {"clip_t_tolerance": 0.05}, "checkpoints": rows})
    atomic_write_json(root / "train" / "best.json", {"step": 20, "reason": "highest identity with CLIP-T within 0.05 of the best",
                                                     "checkpoint": "checkpoints/step-20", "embedding": "x", "scores": rows[1]})
    evaluate(root, SPEC, emb, EvalConfig(scenes=("cooking in a kitchen", "tending a garden"), seeds=(3,)),
             pipe=pipe, faces=faces, clip=clip)
    return root


def test_report_json_validates_and_has_every_section(build: Path) -> None:
    import jsonschema

    report = build_report(build)
    jsonschema.Draft202012Validator(report_schema()).validate(report)
    assert report["schema_version"] == SCHEMA_VERSION
    assert [s["name"] for s in report["stages"]] == ["generate", "curate", "caption", "train", "evaluate"]
    assert all(s["ran"] for s in report["stages"]), report["stages"]
    g = report["gallery"]
    assert g["n_images"] == 12 and g["zooms"] == list(SPEC.zooms)
    kept = [i for i in g["images"] if i["kept"]]
    rejected = [i for i in g["images"] if i["kept"] is False]
    assert len(kept) == len(report["curation"]["kept"]) and rejected
    assert all(i["reason"] and i["reason_code"] for i in rejected)
    assert sum(g["rejections"].values()) == len(rejected)
    # the no-face photos are rejected for that reason
    assert g["rejections"].get("no_face", 0) >= 1
    c = report["curation"]
    assert c["set_scores"]["whole_pool"] and c["set_scores"]["random_k"]
    assert set(c["gain"]) == {"vs_whole_pool", "vs_random_k"}
    assert sum(map(sum, c["heatmap"]["generated"])) == 12 and sum(map(sum, c["heatmap"]["kept"])) == len(kept)
    assert all(k["caption"] and k["caption"].startswith(SPEC.token) for k in c["kept"])
    assert all(isinstance(k["scores"].get("identity"), float) for k in c["kept"] if k["scores"].get("identity") is not None)
    t = report["training"]
    assert t["best_step"] == 20 and [x["step"] for x in t["checkpoints"]] == [10, 20, 30]
    ev = report["evaluation"]
    assert len(ev["images"]) == 4 and {i["arm"] for i in ev["images"]} == {"token", "baseline"}
    s = report["summary"]["scores"]
    assert s["train_best_score"] == pytest.approx(0.42)
    assert "curated_overall" in s and "eval_clip_t_token" in s
    # the schema rejects what it must
    broken = json.loads(json.dumps(report))
    del broken["schema_version"]
    with pytest.raises(FailedPrecondition, match="schema_version"):
        validate_report(broken)
    broken = json.loads(json.dumps(report))
    broken["gallery"]["images"][0]["file"] = "../../etc/passwd"
    with pytest.raises(FailedPrecondition, match="gallery/images/0/file"):
        validate_report(broken)


def test_report_of_a_build_cancelled_after_curation(build: Path, tmp_path: Path) -> None:
    partial = tmp_path / "b-partial"
    shutil.copytree(build, partial, ignore=shutil.ignore_patterns("train", "eval", "report"))
    for cap in (partial / "curated").glob("*.txt"):
        cap.unlink()
    report = build_report(partial)
    ran = {s["name"]: s for s in report["stages"]}
    assert ran["generate"]["ran"] and ran["curate"]["ran"]
    for name in ("caption", "train", "evaluate"):
        assert not ran[name]["ran"] and ran[name]["detail"].startswith("did not run")
    assert report["training"] is None and report["evaluation"] is None
    assert any("did not run: caption, train, evaluate" in n for n in report["summary"]["notes"])
    html = render_html(report, partial)
    assert "Training did not run" in html and "Evaluation did not run" in html

    empty = tmp_path / "b-empty"
    empty.mkdir()
    report = build_report(empty)
    assert not any(s["ran"] for s in report["stages"]) and report["spec"] is None
    assert "Generation did not run" in render_html(report, empty)
    with pytest.raises(NotFound):
        build_report(tmp_path / "missing")


def test_html_is_self_contained(build: Path) -> None:
    paths = write_report(build)
    html = paths["html"].read_text(encoding="utf-8")
    written = json.loads(paths["json"].read_text())
    assert written["schema_version"] == SCHEMA_VERSION
    # the marked contact sheet PNG (generation's drawer) lands beside the report
    from PIL import Image

    assert written["gallery"]["contact_sheet"] == "report/contact_sheet.png"
    with Image.open(build / "report" / "contact_sheet.png") as sheet:
        assert sheet.size[0] > 640
    # no external reference of any kind: every src is a data: URI, no scripts, no links out
    srcs = re.findall(r'\ssrc="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert "<script" not in html and "http://" not in html.replace("http-equiv", "") and "https://" not in html
    assert html.count('class="th kept"') == sum(1 for _ in (build / "curated").glob("*.png"))
    for text in ("Set scores beside the baselines", "Identity similarity", "Kept images per zoom", "Training curve",
                 "Evaluation in new scenes", "no_face"):
        assert text in html


# ------------------------------------------------------------------ headless Chromium

def _chromium_check(html_path: Path, screenshot: Path) -> dict:
    """Load the page in headless Chromium over the DevTools protocol.

    Returns image counts, console errors/exceptions, every requested URL, and
    writes a full-page screenshot.
    """
    import websocket

    profile = tempfile.mkdtemp(prefix="likeness-chromium-")
    proc = subprocess.Popen(
        [str(CHROMIUM), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1280,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            url = m.group(1) if m else None
        assert url, "chromium did not start its DevTools endpoint"
        port = re.search(r":(\d+)/", url).group(1)
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30))
        page = next(p for p in pages if p["type"] == "page")
        ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        events: list[dict] = []
        counter = [0]

        def call(method: str, **params):
            counter[0] += 1
            ws.send(json.dumps({"id": counter[0], "method": method, "params": params}))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("id") == counter[0]:
                    assert "error" not in msg, msg
                    return msg["result"]
                events.append(msg)

        for m in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
            call(m)
        call("Page.navigate", url=html_path.resolve().as_uri())
        while not any(e.get("method") == "Page.loadEventFired" for e in events):
            events.append(json.loads(ws.recv()))
        js = ("JSON.stringify({n: document.images.length, loaded: Array.from(document.images)"
              ".filter(i => i.complete && i.naturalWidth > 0).length, h: document.body.scrollHeight,"
              " title: document.title})")
        info = json.loads(call("Runtime.evaluate", expression=js, returnByValue=True)["result"]["value"])
        shot = call("Page.captureScreenshot", format="png")
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
    info["errors"] = [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"
                      or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
                      or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    info["requests"] = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    return info


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium); "
                    "run scripts/install_chromium.sh")
def test_html_renders_in_headless_chromium(build: Path, tmp_path: Path) -> None:
    pytest.importorskip("websocket", reason="websocket-client (dev extra) is needed to drive Chromium")
    html_path = write_report(build)["html"]
    shot = tmp_path / "report.png"
    info = _chromium_check(html_path, shot)
    assert info["errors"] == [], info["errors"]
    assert info["n"] >= 12 + 4 + 4 and info["loaded"] == info["n"], info
    assert info["title"].startswith("Likeness report")
    # the page itself is the only request that is not a data: URI
    assert [u for u in info["requests"] if not u.startswith("data:")] == [html_path.resolve().as_uri()]
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("LIKENESS_KEEP_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["LIKENESS_KEEP_SCREENSHOT"])


def test_cli_report(build: Path, tmp_path: Path, capsys) -> None:
    from likeness.cli.main import main

    out = tmp_path / "r.json"
    assert main(["report", str(build), "--format", "json", "--out", str(out)]) == 0
    validate_report(json.loads(out.read_text()))
    res = json.loads(capsys.readouterr().out)
    assert res["path"] == str(out) and res["stages_missing"] == []
    # by build id under --data
    out = tmp_path / "r.html"
    assert main(["report", build.name, "--data", str(build.parent.parent), "--format", "html", "--out", str(out)]) == 0
    assert out.read_text().startswith("<!doctype html>")
    assert main(["report", "b-nope", "--data", str(tmp_path)]) == 3


def test_report_says_what_a_new_user_needs(build: Path, tmp_path: Path) -> None:
    """The page says a failed build failed (first), that tiny random weights were used, where the
    embeddings are, whether the face model is calibrated; lists every rejection reason in words
    (not only on hover); draws the loss on its own axis; shows the chosen step's validation images."""
    from PIL import Image

    from likeness.files import atomic_write_json, read_json

    b = tmp_path / "b-20260101-000001-feedbeef"
    shutil.copytree(build, b, ignore=shutil.ignore_patterns("report"))
    atomic_write_json(b / "gallery" / "plan.json", {"settings": {"profile": "cpu-tiny"}, "images": []})
    (b / "embeddings").mkdir()
    (b / "embeddings" / "4ng13.safetensors").write_bytes(b"x" * 10)
    scores = read_json(b / "train" / "checkpoint_scores.json")
    (b / "train" / "validation" / "step-20").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(b / "train" / "validation" / "step-20" / "00-seed7.png")
    scores["checkpoints"][1]["images"] = [{"prompt": "4ng13 woman in a park", "seed": 7, "identity": 0.5,
                                           "clip_t": 0.2, "file": "validation/step-20/00-seed7.png"}]
    atomic_write_json(b / "train" / "checkpoint_scores.json", scores)

    report = build_report(b, {"state": "failed", "error": "ResourceExhausted: out of memory at train"})
    notes = report["summary"]["notes"]
    assert notes[0].startswith("This build FAILED: ResourceExhausted") and "RANDOM weights" in notes[1]
    assert report["build"]["profile"] == {"name": "cpu-tiny", "random_weights": True,
                                          "description": report["build"]["profile"]["description"]}
    assert report["build"]["embeddings"] == [{"file": "embeddings/4ng13.safetensors", "bytes": 10}]
    assert any("face model is calibrated" in n for n in notes)
    assert not any("raised the overall consistency score by -" in n for n in notes)
    assert report["training"]["checkpoints"][1]["images"][0]["file"] == "train/validation/step-20/00-seed7.png"
    html = render_html(report, b)
    assert 'class="bad">This build <b>FAILED</b>' in html and "random weights</b>" in html
    assert "<code>embeddings/4ng13.safetensors</code>" in html
    rejected = [i for i in report["gallery"]["images"] if i["kept"] is False]
    assert f"{len(rejected)} rejected images and why" in html
    assert all(html.count(_html.escape(i["reason"])) >= 2 for i in rejected)  # on hover AND in the table
    assert 'alt="training loss"' in html and "Validation images of the chosen step 20" in html
    assert 'alt="validation 4ng13 woman in a park"' in html
    # A succeeded build on a real profile says neither.
    ok = build_report(build)
    assert ok["build"]["state"] == "succeeded" and not any("FAILED" in n or "RANDOM" in n for n in ok["summary"]["notes"])
