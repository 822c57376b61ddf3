"""Stage 1 with the real diffusers pipeline and tiny random weights on the CPU.

The pipeline is loaded once for the module; images are 64 px, 2 steps, 2 zooms
x 2 angles, so the whole file stays within a few tens of seconds on 2 cores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import get_args

import numpy as np
import pytest
from PIL import Image

from likeness.errors import Cancelled, FailedPrecondition, InvalidInput, ModelMissing
from likeness.generate.plan import plan_gallery
from likeness.generate.manifest import read_manifest
from likeness.profiles import REPO_ROOT, Profile, load_profile
from likeness.spec import SamplerName, spec_from_dict

TINY_SPEC = {
    "name": "Tiny",
    "token": "t1ny",
    "class_word": "woman",
    "traits": ["red curly hair", "freckles"],
    "zooms": ["extreme closeup", "full body"],
    "angles": ["front shot", "side angle"],
    "per_cell": 1,
    "negative_prompt": "(blurry:1.3), lowres",
    "sampling": {"steps": 2, "width": 64, "height": 64, "seed": 1234, "sampler": "DPM++ 2M Karras"},
}


def tiny_spec(**changes):
    data = json.loads(json.dumps(TINY_SPEC))
    sampling = {k: changes.pop(k) for k in list(changes) if k in data["sampling"]}
    data["sampling"].update(sampling)
    data.update(changes)
    return spec_from_dict(data)


def pixels(path_or_png) -> np.ndarray:
    if isinstance(path_or_png, (bytes, bytearray)):
        import io

        path_or_png = io.BytesIO(path_or_png)
    return np.asarray(Image.open(path_or_png).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def pipe(tiny_models):
    from likeness.backends.diffusion import load_pipeline

    return load_pipeline(load_profile("cpu-tiny"))


@pytest.fixture(scope="module")
def gallery(pipe, tmp_path_factory):
    from likeness.generate.gallery import generate_gallery

    out = tmp_path_factory.mktemp("gallery")
    events = []
    result = generate_gallery(tiny_spec(), out, "cpu-tiny", pipe=pipe, batch_size=4, progress=events.append)
    return out, result, events


# ---------------------------------------------------------------- plan


def test_grid_counts_and_overrides():
    from likeness.generate.gallery import effective_spec

    spec = tiny_spec()
    assert spec.grid_size == 4
    big = effective_spec(spec, per_cell=3, zooms=["closeup", "medium shot", "full body"])
    plan = plan_gallery(big, 10)
    assert len(plan) == big.grid_size == 3 * 2 * 3
    assert len({p.id for p in plan}) == len(plan)
    assert [p.seed for p in plan] == list(range(10, 10 + len(plan)))
    assert {(p.zoom, p.angle) for p in plan} == {(z, a) for z in big.zooms for a in big.angles}
    # The defaults reproduce the 400-image workflow.
    assert spec_from_dict({"name": "E", "token": "3m1ly"}).grid_size == 400
    with pytest.raises(InvalidInput):
        effective_spec(spec, per_cell=0)


# ---------------------------------------------------------------- end to end


def test_small_grid_end_to_end(gallery):
    from likeness.generate.infotext import parse_infotext, read_parameters

    out, result, events = gallery
    assert result.planned == result.generated == 4 and result.already_done == 0
    assert result.base_seed == 1234 and result.images_per_second > 0
    rows = read_manifest(out)
    assert sorted(r.id for r in rows) == ["z0-a0-0000", "z0-a1-0000", "z1-a0-0000", "z1-a1-0000"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["base_seed"] == 1234 and len(plan["images"]) == 4
    for row in rows:
        png = (out / row.file).read_bytes()
        assert Image.open(out / row.file).size == (64, 64)
        info = parse_infotext(read_parameters(png))
        assert (info.prompt, info.negative_prompt, info.seed) == (row.prompt, row.negative_prompt, row.seed)
        assert (info.steps, info.sampler, info.cfg_scale, info.width, info.height) == (2, "DPM++ 2M Karras", 7.0, 64, 64)
        assert info.model == row.model == "sd15"
        assert row.zoom in row.prompt and row.angle in row.prompt and row.source == "generated"
    assert sorted(r.seed for r in rows) == [1234, 1235, 1236, 1237]
    sheet = Image.open(result.contact_sheet)
    assert sheet.width > 2 * 160 and sheet.height > 2 * 160
    assert events[-1].done == events[-1].total == 4


def test_cli_on_a_finished_gallery_generates_nothing(gallery, tmp_path, capsys):
    from likeness.cli.main import main

    out, _, _ = gallery
    spec_file = tmp_path / "tiny.toml"
    s = TINY_SPEC
    spec_file.write_text(
        f'name = "Tiny"\ntoken = "t1ny"\nclass_word = "woman"\ntraits = {json.dumps(s["traits"])}\n'
        f'zooms = {json.dumps(s["zooms"])}\nangles = {json.dumps(s["angles"])}\nper_cell = 1\n'
        f'negative_prompt = "{s["negative_prompt"]}"\n'
        '[sampling]\nsteps = 2\nwidth = 64\nheight = 64\nseed = 1234\n'
    )
    assert main(["generate", str(spec_file), "--out", str(out), "--profile", "cpu-tiny", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["generated"] == 0 and result["already_done"] == 4
    # A changed grid on the same folder is refused, with how to fix it.
    assert main(["generate", str(spec_file), "--out", str(out), "--profile", "cpu-tiny", "--per-cell", "2", "-q"]) == 2
    assert "new --out folder" in capsys.readouterr().err


def test_seed_reproducible_alone_or_in_batch(pipe, gallery):
    from likeness.generate.gallery import render_images
    from likeness.generate.plan import PlannedImage

    out, _, _ = gallery
    plan = [PlannedImage(**p) for p in json.loads((out / "plan.json").read_text())["images"]]
    spec = tiny_spec()
    item = plan[3]  # rendered as the 4th image of a batch of 4
    alone = render_images(pipe, [item], spec.sampling, model="sd15")[0]
    again = render_images(pipe, [item], spec.sampling, model="sd15")[0]
    assert np.array_equal(pixels(alone.png), pixels(again.png))
    assert np.abs(pixels(alone.png) - pixels(out / f"images/{item.id}.png")).max() <= 2


# DDIM and UniPC run on diffusers' schedulers (backends.diffusion._denoise_diffusers), the rest on
# the k-diffusion path: both paths are checked here.
@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ SDE Karras", "DDIM", "UniPC"])
def test_stochastic_samplers_are_per_image(pipe, sampler):
    from likeness.generate.gallery import render_images

    spec = tiny_spec(sampler=sampler)
    plan = plan_gallery(spec, 77)
    batch = render_images(pipe, plan[:2], spec.sampling)
    alone = render_images(pipe, plan[1:2], spec.sampling)
    assert np.abs(pixels(batch[1].png) - pixels(alone[0].png)).max() <= 2
    assert not np.array_equal(pixels(batch[0].png), pixels(batch[1].png))


def test_resume_after_interruption(pipe, tmp_path, monkeypatch):
    import likeness.backends.diffusion as diffusion
    from likeness.generate.gallery import generate_gallery
    from likeness.progress import CancelToken

    spec = tiny_spec(seed=-1)
    cancel = CancelToken()
    denoise, calls = diffusion.denoise, []

    def stop_in_the_second_batch(*args, **kwargs):
        # Interrupted while the second batch denoises (the first one's PNGs are being written
        # meanwhile, issue 14): the first batch is kept, the second is not.
        calls.append(1)
        if len(calls) == 2:
            cancel.cancel("simulated interruption")
        return denoise(*args, **kwargs)

    monkeypatch.setattr(diffusion, "denoise", stop_in_the_second_batch)
    with pytest.raises(Cancelled):
        generate_gallery(spec, tmp_path, "cpu-tiny", pipe=pipe, batch_size=2, cancel=cancel)
    monkeypatch.setattr(diffusion, "denoise", denoise)
    first = {r.id: r for r in read_manifest(tmp_path)}
    assert len(first) == 2
    base_seed = json.loads((tmp_path / "plan.json").read_text())["base_seed"]
    kept = {i: (tmp_path / first[i].file).read_bytes() for i in first}
    # A kill mid-write leaves a torn manifest line and a temporary file; both are harmless.
    with open(tmp_path / "manifest.jsonl", "a") as fh:
        fh.write('{"id": "z1-a1-0000", "file": "images/z1-a1')
    (tmp_path / "images" / ".z1-a1-0000.png.x1y2.tmp").write_bytes(b"\x89PNG half")

    result = generate_gallery(spec, tmp_path, "cpu-tiny", pipe=pipe, batch_size=2)
    assert (result.generated, result.already_done, result.base_seed) == (2, 2, base_seed)
    rows = read_manifest(tmp_path)
    plan = plan_gallery(spec, base_seed)
    assert sorted(r.id for r in rows) == sorted(p.id for p in plan)
    assert {r.id: r.seed for r in rows} == {p.id: p.seed for p in plan}
    files = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert files == sorted(f"{p.id}.png" for p in plan)  # no duplicates, no temporaries
    assert all((tmp_path / first[i].file).read_bytes() == kept[i] for i in first)  # finished images untouched
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines if line.endswith("}") and line.startswith("{") and '"seed"' in line]
    assert len(ids) == len(set(ids)) == 4


# ---------------------------------------------------------------- backend


def test_every_a1111_sampler_maps_to_a_scheduler():
    from likeness.backends.diffusion import SAMPLERS, make_scheduler

    config = json.loads((REPO_ROOT / "models/tiny/sd15/scheduler/scheduler_config.json").read_text())
    assert set(SAMPLERS) == set(get_args(SamplerName))
    for name in get_args(SamplerName):
        sched = make_scheduler(name, config)
        assert type(sched).__name__ == SAMPLERS[name][0]
        assert bool(getattr(sched.config, "use_karras_sigmas", False)) == ("Karras" in name)
    assert type(make_scheduler("Euler a", config)).__name__ == "EulerAncestralDiscreteScheduler"
    assert make_scheduler("DPM++ 2M SDE Karras", config).config.algorithm_type == "sde-dpmsolver++"
    with pytest.raises(InvalidInput, match="DPM\\+\\+ 2M Karras"):
        make_scheduler("Euler b", config)


def test_cuda_profile_refuses_without_gpu():
    import torch

    from likeness.backends.diffusion import select_device

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(FailedPrecondition, match="cpu-tiny"):
        select_device(load_profile("sd15"))
    device, dtype = select_device(dataclasses.replace(load_profile("cpu-tiny"), device="auto", dtype="float16"))
    assert (device.type, dtype) == ("cpu", torch.float32)


def test_missing_models_fail_fast_with_the_fix(tmp_path, monkeypatch):
    from likeness.backends.diffusion import load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = tmp_path / "v1-5-pruned-emaonly.safetensors"
    ckpt.write_bytes(b"not loaded: the config check comes first")
    monkeypatch.setenv("LIKENESS_SD_CONFIG", str(tmp_path / "no-config"))
    single = Profile(name="mine", device="cpu", base_model=str(ckpt))
    with pytest.raises(ModelMissing, match="config folder.*huggingface-cli download"):
        load_pipeline(single)
    with pytest.raises(ModelMissing, match="HF_HUB_OFFLINE"):
        load_pipeline(Profile(name="hub", device="cpu", base_model="someone/some-model"))
    with pytest.raises(ModelMissing, match="is missing"):
        load_pipeline(Profile(name="gone", device="cpu", base_model=str(tmp_path / "gone.safetensors"), how_to_get="Copy it."))
    with pytest.raises(InvalidInput, match="'diffusers'"):
        load_pipeline(load_profile("cpu-tiny"), backend="onnx")
    # No base_model at all was taken for an (empty) hub id.
    with pytest.raises(ModelMissing, match="names no base_model"):
        load_pipeline(Profile(name="none", device="cpu"))


def test_a_broken_profile_file_is_named_and_does_not_hide_the_others(tmp_path, monkeypatch, capsys):
    from likeness.cli.main import main

    for p in (REPO_ROOT / "models").glob("*.toml"):
        (tmp_path / p.name).write_text(p.read_text())
    (tmp_path / "broken.toml").write_text('name = "x\n')
    monkeypatch.setenv("LIKENESS_MODELS_DIR", str(tmp_path))
    with pytest.raises(InvalidInput, match="broken.toml: not valid TOML"):
        load_profile("broken")
    assert main(["profiles"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["profiles"]}
    assert "not valid TOML" in rows["broken"]["error"] and "cpu-tiny" in rows


def test_model_name_and_cheap_hash(tmp_path):
    from likeness.backends.diffusion import model_hash, model_name

    ckpt = tmp_path / "myModel_v2.safetensors"
    ckpt.write_bytes(b"weights" * 100)
    prof = Profile(name="m", base_model=str(ckpt))
    assert model_name(prof) == "myModel_v2"
    assert model_hash(prof) == hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10]
    assert (tmp_path / "myModel_v2.safetensors.sha256").is_file()  # cached for the next run
    assert model_hash(load_profile("cpu-tiny")) == ""  # diffusers folders have no A1111 hash


@pytest.mark.parametrize("error", [
    InvalidInput("cannot write: permission denied"),  # what likeness.files raises for a refused write
    PermissionError(13, "Permission denied"),  # a read-only volume seen by the OS
], ids=["invalid-input", "permission-error"])
def test_model_hash_on_a_read_only_models_folder(tmp_path, monkeypatch, error):
    """The sidecar cache is optional: an unwritable models/ volume must not fail generation."""
    import likeness.files
    from likeness.backends.diffusion import model_hash

    ckpt = tmp_path / "small.safetensors"
    ckpt.write_bytes(b"weights")
    tried = []

    def read_only(path, text):
        tried.append(path)  # root ignores chmod, so the refusal is simulated where the write happens
        raise error

    monkeypatch.setattr(likeness.files, "atomic_write_text", read_only)
    assert model_hash(Profile(name="m", base_model=str(ckpt))) == hashlib.sha256(b"weights").hexdigest()[:10]
    assert tried == [tmp_path / "small.safetensors.sha256"], "the cache write was never attempted"
    assert not (tmp_path / "small.safetensors.sha256").exists()


def test_contact_sheet_marks(gallery, tmp_path):
    from likeness.generate.contact_sheet import contact_sheet

    out, _, _ = gallery
    rows = read_manifest(out)
    marks = {rows[0].id: "kept", rows[1].id: "rejected"}
    path = contact_sheet(rows, out, tmp_path / "sheet.png", marks, thumb=96, max_per_cell=4)
    img = Image.open(path).convert("RGB")
    assert img.width > 2 * 96 and img.height > 2 * 96
    colours = {tuple(c) for c in np.asarray(img).reshape(-1, 3)[::7]}
    assert (46, 160, 67) in colours and (207, 34, 46) in colours
    with pytest.raises(InvalidInput):
        contact_sheet([], out, tmp_path / "empty.png")


def test_sd15_config_folder_for_single_file_checkpoints(tmp_path, monkeypatch, tiny_models):
    from likeness.backends.diffusion import single_file_config
    from likeness.backends.sd15_config import PARAMS, parameter_counts, write_config_folder

    assert parameter_counts() == PARAMS  # the configs are the real SD 1.5 architecture
    folder = write_config_folder(tmp_path / "configs" / "sd15")
    assert json.loads((folder / "unet" / "config.json").read_text())["cross_attention_dim"] == 768
    assert (folder / "tokenizer" / "tokenizer_config.json").is_file()
    monkeypatch.setenv("LIKENESS_SD_CONFIG", str(folder))
    assert single_file_config(load_profile("sd15")) == folder.resolve()


def test_cli_overrides_sampling_for_a_quick_try(tiny_models, tmp_path, capsys):
    """The example spec (512 px, 30 steps) shrinks from the command line, no spec copy needed."""
    from PIL import Image as PILImage

    from likeness.cli.main import main
    from likeness.generate.infotext import parse_infotext

    out = tmp_path / "quick"
    args = ["generate", str(REPO_ROOT / "examples" / "emily.toml"), "--out", str(out), "--profile", "cpu-tiny",
            "--per-cell", "1", "--zooms", "closeup", "--angles", "front shot", "--steps", "2",
            "--width", "64", "--height", "96", "--cfg", "5", "--sampler", "Euler a", "--seed", "7", "-q"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["generated"] == 1
    png = next((out / "images").glob("*.png"))
    info = parse_infotext(PILImage.open(png).text["parameters"])
    assert (info.steps, info.width, info.height, info.cfg_scale, info.sampler, info.seed) == (2, 64, 96, 5.0, "Euler a", 7)
    # A bad override is a clear error naming the field, not a traceback.
    assert main(args[:-1] + ["--width", "65", "-q"]) == 2
    assert "sampling.width" in capsys.readouterr().err


def test_two_runs_on_one_gallery_folder_are_refused(tmp_path):
    from likeness.files import folder_lock
    from likeness.generate.gallery import generate_gallery

    with folder_lock(tmp_path / "g", "generation"):
        with pytest.raises(FailedPrecondition, match="another generation is writing"):
            generate_gallery(tiny_spec(), tmp_path / "g", "cpu-tiny")


def test_an_output_path_that_is_a_file_is_invalid_input(tmp_path):
    from likeness.generate.gallery import generate_gallery

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InvalidInput, match="in the way"):
        generate_gallery(tiny_spec(), blocker, "cpu-tiny")


def test_cancel_stops_inside_a_batch_within_one_step(pipe):
    """A cancelled call (or a passed deadline) stops after the current denoising step."""
    from likeness.backends.diffusion import denoise, set_sampler
    from likeness.progress import CancelToken
    from likeness.prompts import encode_prompts

    spec = tiny_spec(steps=20)
    set_sampler(pipe, spec.sampling.sampler)
    embeds = encode_prompts(pipe, ["a photo"], [""])
    steps_seen = []
    token = CancelToken()
    # Count UNet calls (one per step for DPM++ 2M, with cond and uncond in one batch): the k-diffusion
    # loop and diffusers' schedulers both call the UNet once per step.
    original = pipe.unet.forward

    def counting_forward(*args, **kwargs):
        steps_seen.append(1)
        if len(steps_seen) == 3:
            token.cancel("deadline passed")
        return original(*args, **kwargs)

    pipe.unet.forward = counting_forward
    try:
        with pytest.raises(Cancelled, match="deadline passed"):
            denoise(pipe, embeds, [1], spec.sampling, cancel=token)
    finally:
        del pipe.unet.forward
    assert len(steps_seen) == 3, "denoising went on after the cancel"


def test_generating_into_an_imported_gallery_is_refused(tmp_path):
    """Imported rows share the planned ids (z0-a0-0000): they were counted as done and mixed in."""
    from likeness.generate.gallery import generate_gallery
    from likeness.generate.importer import import_gallery
    from likeness.generate.infotext import InfoText, format_infotext, png_bytes

    src = tmp_path / "src"
    src.mkdir()
    text = format_infotext(InfoText("photo, extreme closeup, front shot", "", 30, "Euler", 7.0, 5, 32, 32))
    (src / "a.png").write_bytes(png_bytes(Image.new("RGB", (32, 32), (200, 0, 0)), text))
    import_gallery(src, tmp_path / "g")
    with pytest.raises(InvalidInput, match="without a plan"):
        generate_gallery(tiny_spec(), tmp_path / "g", "cpu-tiny")
    assert [r.source for r in read_manifest(tmp_path / "g")] == ["imported"]


@pytest.mark.parametrize("size", [-1, 257])
def test_a_bad_batch_size_is_invalid_input(tmp_path, size):
    """A negative --batch-size made every shard empty: 'success' with nothing drawn."""
    from likeness.generate.gallery import generate_gallery

    with pytest.raises(InvalidInput, match="batch size"):
        generate_gallery(tiny_spec(), tmp_path / "g", "cpu-tiny", batch_size=size)
