"""Refinement rounds: the stop rule as a pure function, the loop's bookkeeping, and a real build.

The real build runs every stage for real on cpu-tiny with the real CPU face pack: round 0
imports real photos (tiny random weights cannot draw faces), so round 1's freshly generated
gallery has no face, its curation finds no identity, and refining stops there with that
reason; round 0's embedding and report are the ones exported.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from likeness.build.refine import refine_decision
from likeness.build.runner import run_build, start_build
from likeness.errors import Cancelled, InvalidInput
from likeness.progress import report
from likeness.spec import spec_from_dict
from likeness.build.store import Store

SPEC = spec_from_dict({
    "name": "Jolie", "token": "j0l1e", "class_word": "woman", "traits": ["dark hair", "full lips"],
    "wardrobe": "black dress", "per_cell": 1, "zooms": ["closeup"], "angles": ["front shot"],
    "profile": "cpu-tiny", "sampling": {"steps": 2, "width": 64, "height": 64, "seed": 42},
})


# ------------------------------------------------------------------ (b) the margin rule alone
def test_refine_decision_margin_rule():
    d = refine_decision([0.5], 0.02, 0)
    assert d.stop and d.best_round == 0 and d.train and "no refinement" in d.reason
    d = refine_decision([0.5], 0.02, 2)
    assert not d.stop and d.train
    # Improved by at least the margin: the round is the new best, train it, refine again.
    d = refine_decision([0.5, 0.6], 0.02, 2)
    assert (d.best_round, d.stop, d.train) == (1, False, True) and d.gain == pytest.approx(0.1)
    # ... unless it was the last round asked for.
    d = refine_decision([0.5, 0.6, 0.7], 0.02, 2)
    assert (d.best_round, d.stop, d.train) == (2, True, True) and "reached the 2" in d.reason
    # Better, but by less than the margin: stop; the round is still the best, so it is trained.
    d = refine_decision([0.5, 0.51], 0.02, 5)
    assert (d.best_round, d.stop, d.train) == (1, True, True) and "less than the margin 0.020" in d.reason
    # Worse: stop, keep the earlier best, no need to train the round.
    d = refine_decision([0.5, 0.45], 0.02, 5)
    assert (d.best_round, d.stop, d.train) == (0, True, False) and d.gain == pytest.approx(-0.05)
    # Compared with the best earlier round, not merely the previous one.
    d = refine_decision([0.5, 0.6, 0.58], 0.0, 5)
    assert (d.best_round, d.stop, d.train) == (1, True, False)
    # No improvement at all stops even with margin 0; a tie keeps the earlier round.
    d = refine_decision([0.5, 0.5], 0.0, 5)
    assert (d.best_round, d.stop, d.train) == (0, True, False)
    # A round whose curation found no identity stops, keeping the best earlier round.
    d = refine_decision([0.5, 0.7, None], 0.02, 5)
    assert (d.best_round, d.stop, d.train, d.gain) == (1, True, False, None) and "found no identity" in d.reason
    with pytest.raises(InvalidInput):
        refine_decision([None], 0.02, 1)


# ------------------------------------------------------------------ the loop's bookkeeping
@pytest.fixture()
def recorded_stages(stand_in_stages):
    """Plumbing only: stages that record their calls; curate reports the given consistency per round."""
    def make(consistency: list[float], calls: list[str]):
        def hook(name, ctx, round_):
            calls.append(f"{name}{round_}")
            if name == "curate":
                return {"selected": ["a"], "scores": {"identity_consistency": consistency[round_], "n_faces": 1.0}}
            if name == "export":
                return {"files": {}, "round": round_}
            return None
        return stand_in_stages(hook)
    return make


def test_refinement_loop_stops_on_margin_and_exports_the_best(tmp_path, recorded_stages):
    store = Store(tmp_path)
    calls: list[str] = []
    bid = start_build(store, SPEC, {"refinement_rounds": 5, "refinement_margin": 0.05})
    store.claim(bid, "cpu")
    result = run_build(store, bid, stages=recorded_stages([0.5, 0.6, 0.62, 0.9], calls))
    # Round 2 gained 0.02 < 0.05: stop there; it is still the best, so it was trained and exported.
    assert result["best_round"] == 2
    assert result["refinement"]["rounds_run"] == 3 and "less than the margin" in result["refinement"]["stop_reason"]
    assert calls == ["generate0", "curate0", "caption0", "train0", "generate1", "curate1", "caption1", "train1",
                     "generate2", "curate2", "caption2", "train2", "export2", "evaluate2", "report2"]
    refine = [e for e in store.events(bid) if e.stage == "refine" and e.kind == "stage_done"]
    assert [e.round for e in refine] == [1, 2]
    assert "refining again" in refine[0].message and "less than the margin" in refine[1].message
    assert refine[1].metrics["best_round"] == 2.0 and refine[1].metrics["gain"] == pytest.approx(0.02)
    # A worse round is not trained and the earlier round is exported.
    calls.clear()
    bid = start_build(store, SPEC, {"refinement_rounds": 3})
    store.claim(bid, "cpu")
    result = run_build(store, bid, stages=recorded_stages([0.5, 0.4], calls))
    assert result["best_round"] == 0 and "caption1" not in calls and calls[-3:] == ["export0", "evaluate0", "report0"]


def test_cancel_requested_before_the_worker_holds_a_token_still_stops_the_build(tmp_path, recorded_stages):
    """CancelBuild can land after a worker claimed the build but before it registered its token
    (or come from another process): the store's flag alone must stop the build at the next stage."""
    store = Store(tmp_path)
    calls: list[str] = []
    bid = start_build(store, SPEC, {})
    store.claim(bid, "cpu")
    store.request_cancel(bid)  # the worker's token (below, a fresh one) never hears of it
    with pytest.raises(Cancelled):
        run_build(store, bid, stages=recorded_stages([0.5], calls))
    assert calls == [] and store.get_build(bid).state == "cancelled"


# ------------------------------------------------------------------ (a) the real stages
@pytest.fixture(scope="module")
def photos(tmp_path_factory, realdata, face_pack, tiny_models) -> Path:
    """6 photos of one person and 1 of another, downscaled (curation speed, not correctness)."""
    from PIL import Image

    gallery = tmp_path_factory.mktemp("imports") / "jolie"
    gallery.mkdir()
    faces = realdata / "faces"
    for p in sorted((faces / "Angelina_Jolie").glob("*.jpg"))[:6] + [faces / "Barack_Obama" / "fr_obama1.jpg"]:
        img = Image.open(p).convert("RGB")
        img.thumbnail((256, 256))
        img.save(gallery / f"{p.parent.name}_{p.stem}.jpg", quality=92)
    return gallery


@pytest.mark.slow
def test_refinement_round_without_identity_keeps_round_zero(tmp_path, photos, monkeypatch):
    import torch

    import likeness.backends.diffusion as diffusion
    from likeness.embeddings import load_embedding
    from likeness.backends.cache import ModelCache

    loads = []
    real_load = diffusion.load_pipeline
    monkeypatch.setattr(diffusion, "load_pipeline", lambda *a, **k: loads.append(1) or real_load(*a, **k))

    store = Store(tmp_path / "data")
    options = {"k": 3, "training_steps": 2, "checkpoint_every": 2, "train_resolution": 64, "eval_steps": 1,
               "eval_scenes": ["cooking in a kitchen"], "refinement_rounds": 2, "refinement_margin": 0.02,
               "import_gallery": str(photos)}
    bid = start_build(store, SPEC, options)
    store.claim(bid, "cpu")
    result = run_build(store, bid, device="cpu", models=ModelCache())
    row = store.get_build(bid)
    assert row.state == "succeeded", row.error
    root = store.build_dir(bid)

    # Round 1 generated its gallery with the token, curated it, found no face, and stopped there.
    ref = result["refinement"]
    assert result["best_round"] == 0 and ref["rounds_run"] == 2
    assert ref["identity_consistency"][0] > 0.3 and ref["identity_consistency"][1] is None
    assert "round 1" in ref["stop_reason"] and "found no identity" in ref["stop_reason"]
    r1 = root / "rounds" / "1"
    manifest = (r1 / "gallery" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 1 and "j0l1e woman" in json.loads(manifest[0])["prompt"]
    assert json.loads((r1 / "curated" / "curation.json").read_text())["selected"] == []
    stages = {(s.round, s.stage) for s in store.stages(bid)}
    assert {(1, "generate"), (1, "curate"), (1, "refine")} <= stages
    assert not {(1, "caption"), (1, "train")} & stages and not any(r == 2 for r, _ in stages)
    # The stop rule and its reason are in the build's events.
    refine = [e for e in store.events(bid) if e.stage == "refine" and e.kind == "stage_done"]
    assert len(refine) == 1 and refine[0].round == 1 and "found no identity" in refine[0].message
    assert refine[0].metrics["best_round"] == 0.0

    # Round 0's best embedding is what was exported (every format), evaluated and reported.
    best0 = load_embedding(root / "train" / "best_embedding.safetensors", token="j0l1e")
    for name in ("j0l1e.pt", "j0l1e.safetensors", "diffusers/j0l1e.safetensors"):
        emb = load_embedding(root / "embeddings" / name, token="j0l1e")
        assert all(torch.equal(emb.vectors[k], best0.vectors[k]) for k in best0.vectors)
    assert (root / "eval" / "evaluation.json").is_file() and not (r1 / "eval").exists()
    rep = json.loads((root / "report" / "report.json").read_text())
    assert rep["build"]["id"] == bid  # the build root's report, not "<build> round <r>"
    assert "eval_clip_t_token" in row.result["scores"]
    # One pipeline served training, round 1's generation and evaluation ...
    assert len(loads) == 1
    # ... and sharing it was clean: a fresh pipeline with round 0's embedding loaded draws the same
    # round-1 image, pixel for pixel.
    import types

    import numpy as np
    from PIL import Image

    from likeness.build.stages import _refinement_spec
    from likeness.embeddings import load_into_pipeline
    from likeness.generate.gallery import generate_gallery
    from likeness.profiles import load_profile

    fresh = real_load(load_profile("cpu-tiny"), sampler=SPEC.sampling.sampler)
    load_into_pipeline(fresh, best0)
    spec1 = _refinement_spec(types.SimpleNamespace(spec=SPEC), 1)
    generate_gallery(spec1, tmp_path / "fresh", load_profile("cpu-tiny"), pipe=fresh)
    (shared_png,) = (r1 / "gallery" / "images").glob("*.png")
    fresh_png = tmp_path / "fresh" / "images" / shared_png.name
    assert np.array_equal(np.asarray(Image.open(shared_png)), np.asarray(Image.open(fresh_png)))
    # Running it again (a resume after the end) changes nothing.
    assert run_build(store, bid) == row.result
