"""Where and how a pipeline runs (likeness.backends.tuning): devices, VAE upcast, compile with fixed shapes.

No GPU here: the device rules are checked on their CPU answers and their
errors, the compile wrapper with torch.compile's eager backend and a backend
that counts compilations (the thing fixed shapes must keep at one).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from likeness.backends import tuning
from likeness.errors import FailedPrecondition, InvalidInput
from likeness.profiles import Profile, load_profile


def _profile(**kw) -> Profile:
    return dataclasses.replace(load_profile("cpu-tiny"), **kw)


# ---------------------------------------------------------------- devices


def test_worker_device_on_cpu_and_its_errors(tiny_models: Path) -> None:
    cpu = _profile()
    assert tuning.worker_device(cpu, None, (torch.device("cpu"), torch.float32)) == (torch.device("cpu"), torch.float32)
    assert tuning.worker_device(cpu, "cpu") == (torch.device("cpu"), torch.float32)
    with pytest.raises(InvalidInput, match="CPU profile"):
        tuning.worker_device(cpu, "cuda:0")
    with pytest.raises(InvalidInput, match="runs on CUDA"):
        tuning.worker_device(_profile(device="cuda", dtype="float16"), "cpu")
    with pytest.raises(InvalidInput, match="not a device"):
        tuning.worker_device(cpu, "gpu-please")
    with pytest.raises(InvalidInput, match="only 'cuda'"):
        tuning.worker_device(cpu, "meta")
    if torch.cuda.device_count() < 4:
        with pytest.raises(FailedPrecondition, match="GPU 3 but"):
            tuning.worker_device(_profile(device="auto", dtype="float16"), "cuda:3")
    with pytest.raises(ValueError):
        tuning.worker_device(cpu, None)


def test_load_pipeline_takes_the_workers_device(tiny_models: Path) -> None:
    from likeness.backends.diffusion import load_pipeline

    pipe = load_pipeline(load_profile("cpu-tiny"), device="cpu")
    assert pipe.unet.device.type == "cpu" and pipe.vae.dtype == torch.float32
    with pytest.raises(InvalidInput, match="CPU profile"):
        load_pipeline(load_profile("cpu-tiny"), device="cuda:1")


def test_model_cache_keys_by_device(tiny_models: Path) -> None:
    from likeness.backends.cache import ModelCache

    cache, calls = ModelCache(), []
    a = cache.get("x", "p", lambda: calls.append("a") or object(), "cuda:0")
    b = cache.get("x", "p", lambda: calls.append("b") or object(), "cuda:1")
    assert a is not b and calls == ["a", "b"]
    assert cache.get("x", "p", lambda: calls.append("c"), "cuda:1") is b and calls == ["a", "b"]
    pipe = cache.pipeline(load_profile("cpu-tiny"), device="cpu")
    assert pipe is cache.pipeline(load_profile("cpu-tiny"), device="cpu") and pipe.unet.device.type == "cpu"


def test_face_and_clip_loaders_take_a_device(face_pack: Path, tiny_models: Path) -> None:
    from likeness.backends.cache import ModelCache
    from likeness.backends.faces import _gpu_index, _on_gpu

    assert _gpu_index("cuda:3") == 3 and _gpu_index("cuda") == 0 and _gpu_index("auto") == 0
    assert _on_gpu(["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda:2") == [
        ("CUDAExecutionProvider", {"device_id": 2}), "CPUExecutionProvider"]
    cache = ModelCache()
    faces = cache.faces(load_profile("cpu-tiny"), device="cpu")
    assert faces.providers == ["CPUExecutionProvider"]
    clip = cache.clip(load_profile("cpu-tiny"), device="cpu")
    assert clip.device.type == "cpu"


# ---------------------------------------------------------------- VAE upcast


class _Vae:
    def __init__(self, force_upcast: bool) -> None:
        self.config = type("C", (), {"force_upcast": force_upcast})()


def test_vae_upcast_rule(tmp_path: Path, tiny_models: Path) -> None:
    fix = tmp_path / "sdxl-vae-fp16-fix.safetensors"
    plain = tmp_path / "sdxl_vae.safetensors"
    for f in (fix, plain):
        f.write_bytes(b"")
    sdxl_base = _Vae(force_upcast=True)  # what a single file gets: the SDXL base config
    assert tuning.vae_force_upcast(_profile(vae=str(fix)), sdxl_base) is False
    assert tuning.vae_force_upcast(_profile(vae=str(plain)), sdxl_base) is True
    assert tuning.vae_force_upcast(_profile(vae=str(tmp_path)), _Vae(False)) is False  # a folder: its own config
    assert tuning.vae_force_upcast(_profile(vae=str(fix), vae_upcast="yes"), _Vae(False)) is True
    assert tuning.vae_force_upcast(_profile(vae_upcast="no"), sdxl_base) is False


def test_set_vae_upcast_writes_the_config_the_sdxl_decode_reads(tmp_path: Path, tiny_models: Path) -> None:
    from likeness.backends.diffusion import load_pipeline

    pipe = load_pipeline(load_profile("cpu-tiny-sdxl"))
    before = bool(pipe.vae.config.force_upcast)
    tuning.set_vae_upcast(_profile(vae_upcast="no" if before else "yes"), pipe)
    assert bool(pipe.vae.config.force_upcast) is (not before)


def test_profile_refuses_unknown_compile_and_upcast_values(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "bad.toml").write_text('base_model = "x"\ncompile = "fast"\n')
    (tmp_path / "bad2.toml").write_text('base_model = "x"\nvae_upcast = "maybe"\n')
    monkeypatch.setenv("LIKENESS_MODELS_DIR", str(tmp_path))
    with pytest.raises(InvalidInput, match="compile"):
        load_profile("bad")
    with pytest.raises(InvalidInput, match="vae_upcast"):
        load_profile("bad2")


def test_training_encodes_latents_in_float32_when_the_vae_says_force_upcast(tiny_models: Path, tmp_path: Path) -> None:
    """fp16 + force_upcast: the encode runs in float32 (as the fp32 VAE gives) and the VAE is fp16 again after."""
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    from likeness.train.data import encode_latents, read_dataset

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("3m1ly, gray background\n")
    items = read_dataset(tmp_path)
    # The fp16 weights in float32: what an upcast encode computes with.
    vae32 = AutoencoderKL.from_pretrained(tiny_models / "sd15" / "vae").half().float()
    want = encode_latents(vae32, items, 64).mean
    vae16 = AutoencoderKL.from_pretrained(tiny_models / "sd15" / "vae").half()
    vae16.register_to_config(force_upcast=True)
    seen = []
    hook = vae16.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    got = encode_latents(vae16, items, 64).mean
    hook.remove()
    assert seen and all(d == torch.float32 for d in seen)
    assert vae16.dtype == torch.float16
    assert torch.allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------- compile with fixed shapes


class _Counting:
    """A torch.compile backend that counts the graphs it is given and runs them eagerly."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_fixed_batch_pads_and_chunks_without_recompiling() -> None:
    torch._dynamo.reset()
    lin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.GELU()).eval()
    counter = _Counting()
    wrapped = tuning.compile_module(lin, backend=counter)
    x = torch.randn(7, 4)
    with torch.no_grad():
        first = wrapped(x[:3])  # fixes the inference batch at 3
        graphs = counter.graphs
        for n in (1, 2, 3, 5, 7):  # smaller: padded; larger: chunks of 3 (the last one padded)
            assert torch.allclose(wrapped(x[:n]), lin(x[:n]), atol=1e-6), n
        assert counter.graphs == graphs, "a new batch size recompiled"
    assert torch.allclose(first, lin(x[:3]))
    assert wrapped.fixed == {False: 3}
    y = wrapped(x[:2])  # grad mode: its own fixed size, one more graph at most
    y.sum().backward()
    assert wrapped.fixed[True] == 2 and lin[0].weight.grad is not None
    assert wrapped.original is lin


@pytest.mark.slow  # dynamo traces the tiny UNet: ~30 s on 2 cores
def test_fixed_batch_passes_kwargs_dicts_and_diffusers_outputs(tiny_models: Path) -> None:
    from diffusers import UNet2DConditionModel

    torch._dynamo.reset()
    unet = UNet2DConditionModel.from_pretrained(tiny_models / "sd15" / "unet").eval()
    wrapped = tuning.compile_module(unet, backend="eager")
    assert wrapped.config.in_channels == unet.config.in_channels and wrapped.dtype == unet.dtype
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    e = torch.randn(3, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 500, 900])
    with torch.no_grad():
        wrapped(x[:2], t[:2], encoder_hidden_states=e[:2])  # fixes 2
        got = wrapped(x, t, encoder_hidden_states=e).sample  # 3: a chunk of 2 and a padded chunk of 1
        tup = wrapped(x[:1], t[:1], encoder_hidden_states=e[:1], return_dict=False)
        want = unet(x, t, encoder_hidden_states=e).sample
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    assert isinstance(tup, tuple) and torch.allclose(tup[0], want[:1], atol=1e-5)


@pytest.mark.slow  # dynamo traces the tiny UNet and VAE decoder: ~30 s on 2 cores
def test_compiled_pipeline_draws_the_same_images(tiny_models: Path) -> None:
    """The gallery path through a compiled UNet and VAE decoder: same pixels as eager, one fixed batch."""
    import io

    import numpy as np
    from PIL import Image

    from likeness.backends.diffusion import load_pipeline
    from likeness.generate.gallery import render_images
    from likeness.generate.plan import plan_gallery
    from likeness.spec import spec_from_dict

    torch._dynamo.reset()
    spec = spec_from_dict({"name": "T", "token": "t0k3n", "class_word": "woman", "zooms": ["closeup"],
                           "angles": ["front shot"], "per_cell": 3,
                           "sampling": {"steps": 2, "width": 64, "height": 64, "seed": 7}})
    plan = plan_gallery(spec, 7)
    eager = load_pipeline(load_profile("cpu-tiny"))
    want = [np.asarray(Image.open(io.BytesIO(r.png))) for r in render_images(eager, plan, spec.sampling)]
    counter = _Counting()
    pipe = tuning.compile_pipeline(load_pipeline(load_profile("cpu-tiny")), backend=counter)
    assert isinstance(pipe.unet, tuning.FixedBatch) and isinstance(pipe.vae.decoder, tuning.FixedBatch)
    render_images(pipe, plan[:2], spec.sampling, batch_size=2)  # fixes the batch (UNet 4 with CFG, decoder 2)
    graphs = counter.graphs
    got = [np.asarray(Image.open(io.BytesIO(r.png)))
           for r in render_images(pipe, plan, spec.sampling, batch_size=3)]  # 3: chunked and padded
    assert pipe.unet.fixed == {False: 4} and pipe.vae.decoder.fixed == {False: 2}
    assert counter.graphs == graphs, "the batch of 3 recompiled"
    for a, b in zip(got, want):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert tuning.compile_pipeline(pipe, backend=counter) is pipe and not isinstance(pipe.unet.compiled, tuning.FixedBatch)


def test_load_pipeline_compiles_when_the_profile_says_so(tiny_models: Path, monkeypatch) -> None:
    from likeness.backends.diffusion import load_pipeline

    seen = []
    monkeypatch.setattr(tuning, "compile_pipeline", lambda pipe, mode: seen.append(mode) or pipe)
    load_pipeline(_profile(compile="max-autotune-no-cudagraphs"))
    load_pipeline(_profile(), compile_unet=True)
    load_pipeline(_profile())
    assert seen == ["max-autotune-no-cudagraphs", "default"]
    assert tuning.compile_mode(_profile(compile="reduce-overhead"), compile_unet=True) == "reduce-overhead"
    with pytest.raises(InvalidInput, match="compile mode"):
        tuning.compile_module(torch.nn.Linear(2, 2), "fastest")
