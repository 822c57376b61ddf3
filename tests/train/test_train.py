"""Textual-inversion training on the tiny SD 1.5 / SDXL pipelines (CPU, 64x64, a few steps)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from likeness.errors import Cancelled, FailedPrecondition, InvalidInput
from likeness.progress import CancelToken
from likeness.spec import spec_from_dict
from likeness.train.data import DEFAULT_TEMPLATES, expand_token, fill_template, load_templates, read_dataset
from likeness.train.checkpoint_scoring import CheckpointScores, ValidationConfig, choose_best

SPEC = spec_from_dict({"name": "Emily", "token": "3m1ly", "class_word": "woman"})
NO_VAL = ValidationConfig(enabled=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine, two spinning OpenMP threads make tiny models ~50x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        if i < 2:  # img2 has no sidecar: empty filewords
            (root / f"img{i}.txt").write_text(f"3m1ly, wearing a {['red', 'blue'][i]} coat, gray background\n")
    return root


def _pipe(family: str = "sd15"):
    from likeness.backends.diffusion import load_pipeline
    from likeness.profiles import load_profile

    return load_pipeline(load_profile("cpu-tiny" if family == "sd15" else "cpu-tiny-sdxl"))


def _cfg(**kw):
    from likeness.train.trainer import TrainConfig

    base = dict(steps=6, learning_rate=0.05, batch_size=1, gradient_accumulation=2, resolution=64,
                checkpoint_every=3, validation=NO_VAL)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------- data and templates (no torch)


def test_templates_and_filewords(tmp_path, dataset):
    items = read_dataset(dataset)
    assert [i.path.name for i in items] == ["img0.png", "img1.png", "img2.png"]
    assert items[0].caption == "3m1ly, wearing a red coat, gray background" and items[2].caption == ""
    assert fill_template("a photo of [name], [filewords]", "3m1ly", "in a park") == "a photo of 3m1ly, in a park"
    assert fill_template("a photo of [name], [filewords]", "3m1ly", "") == "a photo of 3m1ly"
    # The caption's own token is expanded too (A1111 reads an embedding wherever its name appears).
    assert fill_template("[name] [filewords]", "3m1ly", "3m1ly, smiling", 3) == (
        "3m1ly 3m1ly_1 3m1ly_2 3m1ly 3m1ly_1 3m1ly_2, smiling")
    assert expand_token("3m1lyx 3m1ly_1 x3m1ly", "3m1ly", 2) == "3m1lyx 3m1ly_1 x3m1ly"
    assert load_templates(None) == DEFAULT_TEMPLATES and all("[name]" in t for t in DEFAULT_TEMPLATES)
    f = tmp_path / "t.txt"
    f.write_text("a [name] photo\n\n  an image of [name], [filewords]  \n")
    assert load_templates(f) == ("a [name] photo", "an image of [name], [filewords]")
    f.write_text("no token here\n")
    with pytest.raises(InvalidInput, match=r"\[name\]"):
        load_templates(f)


def test_config_is_checked_up_front():
    from likeness.config import from_dict
    from likeness.train.trainer import TrainConfig, check_train_config

    with pytest.raises(InvalidInput, match="after the previous"):
        check_train_config(TrainConfig(learning_rate="0.1:10, 0.2:5"))
    with pytest.raises(InvalidInput, match="flip_p"):
        check_train_config(TrainConfig(flip_p=2.0))
    with pytest.raises(InvalidInput, match="mixed_precision"):
        from_dict(TrainConfig, {"mixed_precision": "fp8"})
    cfg = from_dict(TrainConfig, {"learning_rate": "0.005:100, 1e-3", "validation": {"seeds": [1]}})
    assert cfg.learning_rate == "0.005:100, 1e-3" and cfg.validation.seeds == (1,)


# ---------------------------------------------------------------- the best-step rule (score tables)


def _row(step, ident, clip):
    return CheckpointScores(step=step, identity=ident, clip_t=clip)


def test_best_rule_balances_identity_and_clip_t():
    rows = [_row(250, 0.40, 0.30), _row(500, 0.60, 0.28), _row(750, 0.75, 0.20), _row(1000, 0.60, 0.29)]
    best = choose_best(rows, 0.1)
    # 750 has the best identity but lost editability (CLIP-T 0.20 < 0.27); 500 and 1000 tie on
    # identity, 1000 has the higher CLIP-T.
    assert best.step == 1000 and best.clip_t_floor == pytest.approx(0.27)
    assert choose_best(rows, 1.0).step == 750  # tolerance 100 %: identity alone
    assert choose_best(rows, 0.0).step == 250  # tolerance 0: CLIP-T alone


def test_best_rule_is_deterministic_without_faces_or_scores():
    # Tiny random models: no face anywhere -> identity 0 for all; CLIP-T decides, then the earlier step.
    rows = [_row(2, 0.0, 0.05), _row(4, 0.0, 0.07), _row(6, 0.0, 0.07)]
    assert choose_best(rows).step == 4
    # Negative CLIP-T (random CLIP): the floor is below the best, not above it.
    rows = [_row(2, 0.0, -0.10), _row(4, 0.3, -0.105), _row(6, 0.9, -0.5)]
    assert choose_best(rows, 0.1).step == 4
    nan = float("nan")
    assert choose_best([_row(2, nan, nan), _row(4, nan, nan)]).step == 4  # nothing measured: the last
    assert choose_best([_row(2, nan, 0.1), _row(4, 0.5, nan)]).step == 2  # unmeasured CLIP-T is no candidate
    with pytest.raises(InvalidInput):
        choose_best([])
    assert CheckpointScores.from_dict(_row(3, nan, 0.2).to_dict()).clip_t == pytest.approx(0.2)


# ---------------------------------------------------------------- training (tiny SD 1.5)


def test_loss_on_fixed_batch_drops(tiny_models, dataset):
    from likeness.train.trainer import Trainer

    trainer = Trainer(_pipe(), SPEC, read_dataset(dataset)[:2], _cfg(steps=5, batch_size=2, gradient_accumulation=1),
                      ["a photo of [name], [filewords]"])
    fixed = trainer.fixed_batch(seed=7)  # fixed images, flips, templates, VAE sample, noise, timesteps
    before = trainer.fixed_loss(seed=7)
    assert trainer.fixed_loss(seed=7) == before
    losses = []
    for step in range(1, 6):
        trainer.train_step(step, [fixed])
        losses.append(trainer.fixed_loss(seed=7))
    trainer.close()
    assert losses[-1] < before - 0.005, (before, losses)
    assert all(b < a for a, b in zip([before] + losses, losses)), (before, losses)


TABLE = {2: (0.9, 0.10), 3: (0.2, 0.30), 6: (0.5, 0.29)}


def _table_validator(calls):
    """A precomputed score table; also checks that validation renders with the checkpoint's rows."""
    import torch

    from likeness.embeddings import vectors_in_pipeline

    def validate(step, pipe, emb):
        rows = vectors_in_pipeline(pipe, emb.token, emb.n_vectors)
        for key, v in emb.vectors.items():
            assert torch.equal(rows[key], v.float())
        calls.append(step)
        ident, clip = TABLE[step]
        return CheckpointScores(step=step, identity=ident, clip_t=clip, n_images=1)

    return validate


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, dataset, tmp_path_factory):
    from likeness.train.trainer import train_embedding

    out = tmp_path_factory.mktemp("run-a")
    pipe, events, calls = _pipe(), [], []
    res = train_embedding(dataset, SPEC, out, _cfg(learning_rate="0.05:4, 0.01"), pipe=pipe,
                          progress=events.append, validator=_table_validator(calls))
    return res, out, pipe, events, calls


def test_run_writes_checkpoints_scores_and_best(uninterrupted):
    res, out, _pipe_, events, calls = uninterrupted
    assert res.checkpoints == (3, 6) and res.last_step == 6 and res.resumed_from == 0
    assert calls == [3, 6]
    for step in (3, 6):
        d = out / "checkpoints" / f"step-{step}"
        assert sorted(p.name for p in d.iterdir()) == ["3m1ly.safetensors", "meta.json", "state.pt"]
    assert not list((out / "checkpoints").glob(".*"))  # no temporaries left
    scores = json.loads((out / "checkpoint_scores.json").read_text())
    assert [r["step"] for r in scores["checkpoints"]] == [3, 6]
    assert all(r["loss"] > 0 for r in scores["checkpoints"])
    best = json.loads((out / "best.json").read_text())
    assert best["step"] == res.best_step == 6  # identity 0.5 > 0.2 with CLIP-T 0.29 >= 0.27
    assert best["embedding"] == "checkpoints/step-6/3m1ly.safetensors"
    # The A1111 schedule "0.05:4, 0.01": 0.05 for steps 1-4, 0.01 after.
    lrs = {e.done: e.metrics["lr"] for e in events if "lr" in e.metrics}
    assert lrs == {1: 0.05, 2: 0.05, 3: 0.05, 4: 0.05, 5: 0.01, 6: 0.01}
    assert all(math.isfinite(e.metrics["loss"]) for e in events if "loss" in e.metrics)


def test_only_new_rows_change(uninterrupted):
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from likeness.embeddings import load_embedding, vectors_in_pipeline

    res, out, pipe, _events, _calls = uninterrupted
    fresh_te = CLIPTextModel.from_pretrained(_tiny("sd15"), subfolder="text_encoder")
    before = fresh_te.get_input_embeddings().weight
    after = pipe.text_encoder.get_input_embeddings().weight
    n_old = before.shape[0]
    assert after.shape[0] == n_old + 8
    assert torch.equal(after[:n_old], before)  # bit-identical
    for name, p in fresh_te.named_parameters():
        if "token_embedding" not in name:
            assert torch.equal(p, dict(pipe.text_encoder.named_parameters())[name]), name
    fresh_unet = UNet2DConditionModel.from_pretrained(_tiny("sd15"), subfolder="unet")
    trained = dict(pipe.unet.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in fresh_unet.named_parameters())
    # The new rows moved away from the class word's vector and hold the best checkpoint.
    woman = before[pipe.tokenizer("woman", add_special_tokens=False).input_ids[0]]
    rows = vectors_in_pipeline(pipe, "3m1ly", 8)["clip_l"]
    assert not torch.allclose(rows, woman.expand_as(rows))
    best = load_embedding(out / "checkpoints" / "step-6" / "3m1ly.safetensors")
    assert best.token == "3m1ly" and best.step == 6 and best.family == "sd15"
    assert torch.equal(rows, best.vectors["clip_l"]) and torch.equal(res.best.vectors["clip_l"], rows)


def _tiny(family):
    from likeness.profiles import models_dir

    return str(models_dir() / "tiny" / family)


def test_resume_equals_uninterrupted(uninterrupted, dataset, tmp_path):
    import torch

    from likeness.train.trainer import load_checkpoint_embedding, train_embedding

    res_a, out_a, _pipe_a, _events, _calls = uninterrupted
    out_b, calls = tmp_path / "run-b", []
    cancel = CancelToken()

    def stop_at_2(ev):
        if ev.done == 2:
            cancel.cancel("simulated stop")

    # Stop after step 2 (a checkpoint is saved on the way out), then continue in a fresh "process".
    with pytest.raises(Cancelled):
        train_embedding(dataset, SPEC, out_b, _cfg(learning_rate="0.05:4, 0.01"), pipe=_pipe(),
                        progress=stop_at_2, cancel=cancel, validator=_table_validator(calls))
    assert [p.name for p in (out_b / "checkpoints").iterdir()] == ["step-2"]
    res_b = train_embedding(dataset, SPEC, out_b, _cfg(learning_rate="0.05:4, 0.01"), pipe=_pipe(),
                            validator=_table_validator(calls))
    assert res_b.resumed_from == 2 and res_b.checkpoints == (2, 3, 6)
    assert sorted(calls) == [2, 3, 6]  # the checkpoint saved on cancel is scored too
    for step in (3, 6):
        a = load_checkpoint_embedding(out_a, step, "3m1ly").vectors["clip_l"]
        b = load_checkpoint_embedding(out_b, step, "3m1ly").vectors["clip_l"]
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    sa = torch.load(out_a / "checkpoints/step-6/state.pt", weights_only=True)["optimizer"]["state"][0]
    sb = torch.load(out_b / "checkpoints/step-6/state.pt", weights_only=True)["optimizer"]["state"][0]
    torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=1e-5, atol=1e-12)
    assert res_b.best_step == 6  # step 2's identity 0.9 comes with CLIP-T 0.10: not editable enough
    # A different run in the same folder is refused instead of being mixed in.
    with pytest.raises(FailedPrecondition, match="seed"):
        train_embedding(dataset, SPEC, out_b, _cfg(learning_rate="0.05:4, 0.01", seed=5, steps=9), pipe=_pipe(),
                        validator=_table_validator([]))


def test_kill_during_validation_keeps_the_checkpoints_loss(uninterrupted, dataset, tmp_path):
    """A process killed while validating a checkpoint (saved, not yet scored) resumes and scores it with
    the loss recorded in its meta.json, not null (issue 13: checkpoint_scores.json had loss null)."""
    from likeness.train.trainer import train_embedding

    _res_a, out_a, _pipe_a, _events, _calls = uninterrupted
    out = tmp_path / "run-kill"
    calls: list[int] = []
    table = _table_validator(calls)

    class Killed(BaseException):  # not an Exception: nothing in the trainer may swallow it, like SIGKILL
        pass

    def dies_at_3(step, pipe, emb):
        if step == 3:
            raise Killed()
        return table(step, pipe, emb)

    with pytest.raises(Killed):
        train_embedding(dataset, SPEC, out, _cfg(learning_rate="0.05:4, 0.01"), pipe=_pipe(), validator=dies_at_3)
    assert (out / "checkpoints" / "step-3" / "meta.json").is_file() and not (out / "checkpoint_scores.json").exists()
    train_embedding(dataset, SPEC, out, _cfg(learning_rate="0.05:4, 0.01"), pipe=_pipe(), validator=table)
    rows = {r["step"]: r for r in json.loads((out / "checkpoint_scores.json").read_text())["checkpoints"]}
    meta3 = json.loads((out / "checkpoints" / "step-3" / "meta.json").read_text())
    assert rows[3]["loss"] is not None and rows[3]["loss"] == pytest.approx(meta3["loss"], rel=1e-5)
    uninterrupted_rows = {r["step"]: r for r in json.loads((out_a / "checkpoint_scores.json").read_text())["checkpoints"]}
    assert rows[3]["loss"] == pytest.approx(uninterrupted_rows[3]["loss"], rel=1e-4)
    assert rows[6]["loss"] is not None


# ---------------------------------------------------------------- SDXL: rows in both encoders


def test_sdxl_trains_rows_in_both_encoders(tiny_models, dataset, tmp_path):
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from likeness.train.trainer import Trainer

    pipe = _pipe("sdxl")
    trainer = Trainer(pipe, SPEC, read_dataset(dataset)[:2], _cfg(steps=5, batch_size=2, gradient_accumulation=1),
                      ["a photo of [name], [filewords]"])
    assert trainer.latents.time_ids.shape == (2, 2, 6)
    assert trainer.latents.time_ids[0, 0].tolist() == [80.0, 64.0, 8.0, 0.0, 64.0, 64.0]  # orig h,w; crop; target
    init = trainer.vectors()
    fixed = trainer.fixed_batch(seed=7)
    before = trainer.fixed_loss(seed=7)
    for step in range(1, 6):
        trainer.train_step(step, [fixed])
    after = trainer.fixed_loss(seed=7)
    trainer.close()
    assert after < before - 0.005, (before, after)
    fresh = {
        "clip_l": CLIPTextModel.from_pretrained(_tiny("sdxl"), subfolder="text_encoder"),
        "clip_g": CLIPTextModelWithProjection.from_pretrained(_tiny("sdxl"), subfolder="text_encoder_2"),
    }
    for key, enc in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
        old = fresh[key].get_input_embeddings().weight
        new = enc.get_input_embeddings().weight
        assert torch.equal(new[: old.shape[0]], old), key
        assert not torch.equal(new[old.shape[0]:].float(), init[key]), f"{key} rows did not train"
    assert len(pipe.tokenizer) == len(pipe.tokenizer_2)


# ---------------------------------------------------------------- CLI with the real scorers


def test_cli_trains_and_validates_with_real_scorers(tiny_models, face_pack, dataset, tmp_path, capsys):
    """`likeness train` end to end: tiny SD 1.5, the real face pack and the tiny CLIP score each checkpoint."""
    from likeness.cli.main import main

    spec = tmp_path / "emily.toml"
    spec.write_text('name = "Emily"\ntoken = "3m1ly"\nclass_word = "woman"\nprofile = "cpu-tiny"\n'
                    '[sampling]\nsampler = "Euler"\n')
    out = tmp_path / "train"
    rc = main(["train", str(dataset), "--spec", str(spec), "--steps", "2", "--out", str(out), "--resolution", "64",
               "--batch-size", "1", "--checkpoint-every", "1", "--lr", "0.05:1, 0.01", "--val-steps", "2",
               "--val-seeds", "5", "--quiet"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoints"] == [1, 2] and result["best_step"] in (1, 2)
    scores = json.loads((out / "checkpoint_scores.json").read_text())
    rows = scores["checkpoints"]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["n_images"] == 3 and len(r["images"]) == 3  # three scenes x one seed
        # Noise from tiny random weights has no face: identity counts 0, CLIP-T is still measured.
        assert r["faces_found"] == 0 and r["identity"] == 0.0
        assert all(img["identity"] is None for img in r["images"])
        assert isinstance(r["clip_t"], float) and -1.0 <= r["clip_t"] <= 1.0
        assert {img["prompt"] for img in r["images"]} == {
            "a photo of 3m1ly, cooking in a kitchen", "a photo of 3m1ly, tending a garden",
            "a photo of 3m1ly, conducting a choir"}
        assert all((out / img["file"]).is_file() for img in r["images"])
    best = json.loads((out / "best.json").read_text())
    expect = choose_best([CheckpointScores.from_dict(r) for r in rows]).step
    assert best["step"] == expect == result["best_step"]
    # Running the same command again resumes: nothing left to train, same choice.
    assert main(["train", str(dataset), "--spec", str(spec), "--steps", "2", "--out", str(out), "--resolution", "64",
                 "--batch-size", "1", "--checkpoint-every", "1", "--lr", "0.05:1, 0.01", "--val-steps", "2",
                 "--val-seeds", "5", "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["resumed_from"] == 2 and again["best_step"] == expect


def test_cli_ctrl_c_stops_after_the_step_and_bad_seeds_are_input_errors(tmp_path):
    import os
    import signal

    from likeness.cli.main import build_parser
    from likeness.cli.commands.train import _config, stop_after_step_on_signal

    # Ctrl-C / SIGTERM cancel the token (training saves the finished step), a second Ctrl-C interrupts.
    token = CancelToken()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stop_after_step_on_signal(token):
        os.kill(os.getpid(), signal.SIGTERM)
        assert token.cancelled and "SIGTERM" in token.reason
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    args = build_parser().parse_args(["train", str(tmp_path), "--spec", "s.toml", "--out", str(tmp_path / "o"),
                                      "--val-seeds", "1,two"])
    with pytest.raises(InvalidInput, match="val-seeds"):
        _config(args)
