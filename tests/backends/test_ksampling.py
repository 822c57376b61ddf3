"""A1111's k-diffusion samplers: Likeness's sampling loop against k-diffusion itself, driven the way
A1111 drives it, on the tiny UNet (issue 12, item 4 "Timesteps and scaling").

The reference here is k-diffusion 0.1.1.post1's own ``sample_*`` functions on its
``DiscreteEpsDDPMDenoiser`` (``CompVisDenoiser``) wrapping of the same diffusers UNet, with what
A1111 adds around them restated as rules: its CFG denoiser (cond and uncond batched, or separate
calls when their lengths differ; ``uncond + (cond - uncond) * scale`` on the denoised outputs;
prompt schedule by call count), its sigma schedules (the model's ``get_sigmas(n)``, Karras between
the model's sigma_min/max, DPM2's discarded next-to-last sigma), ``x = noise * sigmas[0]``,
k-diffusion's ``torch.randn_like`` replaced by each image's next draw (A1111's TorchHijack), and
Brownian trees seeded with the image seeds whose draws come from the noise source (A1111's
replacement of torchsde's ``_randn``).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from likeness.errors import Cancelled, InvalidInput
from likeness.noise import ImageNoise, randn
from likeness.spec import SamplingConfig

# A1111 name -> (k-diffusion function, A1111's schedule, discard_next_to_last_sigma).
A1111_KDIFFUSION = {
    "Euler": ("sample_euler", "automatic", False),
    "Euler a": ("sample_euler_ancestral", "automatic", False),
    "Heun": ("sample_heun", "automatic", False),
    "DPM2": ("sample_dpm_2", "automatic", True),
    "LMS": ("sample_lms", "automatic", False),
    "DPM++ 2M": ("sample_dpmpp_2m", "automatic", False),
    "DPM++ 2M Karras": ("sample_dpmpp_2m", "karras", False),
    "DPM++ SDE": ("sample_dpmpp_sde", "automatic", False),
    "DPM++ SDE Karras": ("sample_dpmpp_sde", "karras", False),
    "DPM++ 2M SDE Karras": ("sample_dpmpp_2m_sde", "karras", False),
}
# A1111's settings defaults for the k-diffusion keyword arguments (eta_ancestral, s_churn, s_tmin,
# s_tmax, s_noise); passed only to the functions that take them, as A1111 does.
A1111_EXTRA = {"eta": 1.0, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}
# The acceptance bound of issue 12: final latents within 1e-4 relative (L2) of k-diffusion's.
# Measured on this machine (CPU, float32, 8 steps, 2 images, 64x64): every sampler below 1e-6
# except LMS at 3.6e-7 (k-diffusion integrates its coefficients in float32 under numpy 2).
REL_TOL = 1e-4


def _kdiffusion():
    """k_diffusion.sampling and .external, imported without the package's __init__ (which imports its
    training/evaluation helpers: clip, clean-fid, dctorch; dctorch pins numpy<2)."""
    spec = sys.modules["k_diffusion"].__spec__ if "k_diffusion" in sys.modules else importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1.post1 torchdiffeq==0.2.5")
    if "k_diffusion" not in sys.modules:
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules["k_diffusion"] = pkg
    import k_diffusion.external as external
    import k_diffusion.sampling as sampling

    return sampling, external


def compvis_alphas_cumprod(config) -> torch.Tensor:
    """What a CompVis checkpoint stores: ldm's make_beta_schedule("linear") in float64, as float32."""
    assert config["beta_schedule"] == "scaled_linear"
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, config["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).to(torch.float32)


class CompVisModel(torch.nn.Module):
    """The diffusers UNet behind the interface CompVisDenoiser wraps (alphas_cumprod, apply_model)."""

    def __init__(self, unet, alphas_cumprod, width, height):
        super().__init__()
        self.unet = unet
        self.alphas_cumprod = alphas_cumprod
        self.size = (height, width)

    def apply_model(self, x, t, cond):
        kwargs = {"encoder_hidden_states": cond["crossattn"]}
        if "vector" in cond:
            h, w = self.size
            ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=x.dtype).repeat(x.shape[0], 1)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["vector"], "time_ids": ids}
        return self.unet(x, t, **kwargs).sample


class A1111CFG:
    """A1111's CFG denoiser around k-diffusion's denoiser (cond first, then uncond, as A1111 batches)."""

    def __init__(self, inner, embeds, scale, sdxl=False):
        self.inner, self.embeds, self.scale, self.sdxl, self.step = inner, embeds, scale, sdxl, 0

    def __call__(self, x, sigma):
        kw = self.embeds.at(self.step) if getattr(self.embeds, "scheduled", False) else dict(self.embeds)
        cond, uncond = kw["prompt_embeds"], kw["negative_prompt_embeds"]
        n = x.shape[0]

        def c(hidden, vector):
            return {"crossattn": hidden, "vector": vector} if self.sdxl else {"crossattn": hidden}

        pooled, neg_pooled = kw.get("pooled_prompt_embeds"), kw.get("negative_pooled_prompt_embeds")
        if cond.shape[1] == uncond.shape[1]:
            vec = torch.cat([pooled, neg_pooled]) if self.sdxl else None
            out = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=c(torch.cat([cond, uncond]), vec))
            den_cond, den_uncond = out[:n], out[n:]
        else:
            den_cond = self.inner(x, sigma, cond=c(cond, pooled))
            den_uncond = self.inner(x, sigma, cond=c(uncond, neg_pooled))
        self.step += 1
        return den_uncond + (den_cond - den_uncond) * (1.0 * self.scale)


class TorchHijack:
    """A1111's replacement of k-diffusion's ``torch``: ``randn_like`` is each image's next draw."""

    def __init__(self, streams):
        self.streams = streams

    def __getattr__(self, item):
        if item == "randn_like":
            return lambda x: torch.stack([st.randn(x.shape[1:]) for st in self.streams])
        return getattr(torch, item)


def a1111_reference(pipe, embeds, seeds, sampling, monkeypatch, sdxl=False):
    """Final latents of k-diffusion's sampler for ``sampling``, driven as A1111 drives it."""
    import torchsde._brownian.brownian_interval as bi

    K, E = _kdiffusion()
    fn_name, schedule, discard = A1111_KDIFFUSION[sampling.sampler]
    model = CompVisModel(pipe.unet, compvis_alphas_cumprod(pipe.scheduler.config), sampling.width, sampling.height)
    wrap = E.CompVisDenoiser(model, quantize=False)  # A1111's enable_quantization default: off
    steps = sampling.steps + (1 if discard else 0)
    if schedule == "karras":
        sigmas = K.get_sigmas_karras(n=steps, sigma_min=wrap.sigmas[0].item(), sigma_max=wrap.sigmas[-1].item())
    else:
        sigmas = wrap.get_sigmas(steps)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    streams = [ImageNoise(sampling.rng, s) for s in seeds]
    shape = (pipe.unet.config.in_channels, sampling.height // 8, sampling.width // 8)
    x = torch.stack([st.randn(shape) for st in streams]) * sigmas[0]
    fn = getattr(K, fn_name)
    params = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    extra = {k: v for k, v in A1111_EXTRA.items() if k in params}
    # A1111's torchsde_randn: the tree's draws are devices.randn_local(seed, size) of the noise source.
    monkeypatch.setattr(bi, "_randn", lambda size, dtype, device, seed: randn(sampling.rng, int(seed), tuple(size),
                                                                              device).to(dtype))
    if sampling.sampler in ("DPM++ SDE", "DPM++ SDE Karras", "DPM++ 2M SDE Karras"):  # A1111's brownian_noise
        extra["noise_sampler"] = K.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=list(seeds))
    monkeypatch.setattr(K, "torch", TorchHijack(streams))
    try:
        with torch.inference_mode():
            return fn(A1111CFG(wrap, embeds, sampling.cfg_scale, sdxl), x, sigmas, disable=True, **extra)
    finally:
        monkeypatch.undo()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


MEASURED: dict[str, float] = {}


@pytest.mark.parametrize("sampler", list(A1111_KDIFFUSION))
def test_final_latents_match_kdiffusion_as_a1111_runs_it(sd15, sampler, monkeypatch):
    from likeness.backends.diffusion import denoise_latents
    from likeness.prompts import encode_prompts

    sampling = SamplingConfig(sampler=sampler, steps=8, cfg_scale=7.0, width=64, height=64)
    seeds = [11, 4_000_000_123]
    embeds = encode_prompts(sd15, ["a photo of a red fox", "a (blue:1.2) house"], ["blurry, lowres"])
    ours = denoise_latents(sd15, embeds, seeds, sampling)
    ref = a1111_reference(sd15, embeds, seeds, sampling, monkeypatch)
    err = rel_error(ours, ref)
    MEASURED[sampler] = err
    print(f"\n{sampler}: relative error {err:.3e}")
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert err < REL_TOL, (sampler, err)
    # Each image's result is its own: the second image alone gives the same latents.
    alone = denoise_latents(sd15, embeds.select(1), seeds[1:], sampling)
    assert rel_error(alone[0], ours[1]) < REL_TOL


@pytest.mark.parametrize("sampler,source", [("Euler a", "NV"), ("DPM++ SDE Karras", "NV"), ("DPM++ 2M SDE Karras", "NV")])
def test_stochastic_samplers_follow_the_noise_source(sd15, sampler, source, monkeypatch):
    """Ancestral draws continue each image's NV stream; the SDE trees draw NV noise, as A1111's
    patched torchsde does; both differ from the CPU source."""
    from likeness.backends.diffusion import denoise_latents
    from likeness.prompts import encode_prompts

    sampling = SamplingConfig(sampler=sampler, steps=6, cfg_scale=5.0, width=64, height=64, rng=source)
    embeds = encode_prompts(sd15, ["a photo of a red fox"], ["blurry"])
    ours = denoise_latents(sd15, embeds, [5], sampling)
    ref = a1111_reference(sd15, embeds, [5], sampling, monkeypatch)
    assert rel_error(ours, ref) < REL_TOL
    cpu = denoise_latents(sd15, embeds, [5], SamplingConfig(sampler=sampler, steps=6, cfg_scale=5.0, width=64, height=64))
    assert rel_error(cpu, ours) > 1e-3


def test_unpadded_prompt_and_prompt_editing_match_kdiffusion(sd15, monkeypatch):
    """A 2-chunk prompt with a 1-chunk negative (separate UNet calls) and [from:to:when] on a
    second-order sampler (scheduled over twice the steps, switched by call count)."""
    from likeness.backends.diffusion import denoise_latents, schedule_steps
    from likeness.prompts import encode_prompts

    long = ", ".join(["red curly hair"] * 37) + ", [cat:dog:0.4]"
    for sampler in ("DPM++ SDE Karras", "DPM2", "Euler a"):
        sampling = SamplingConfig(sampler=sampler, steps=5, cfg_scale=6.0, width=64, height=64)
        embeds = encode_prompts(sd15, [long], ["blurry"], steps=schedule_steps(sampling))
        assert embeds.scheduled and not embeds.padded
        ours = denoise_latents(sd15, embeds, [21], sampling)
        ref = a1111_reference(sd15, embeds, [21], sampling, monkeypatch)
        assert rel_error(ours, ref) < REL_TOL, sampler


def test_sdxl_matches_kdiffusion(sdxl, monkeypatch):
    """SDXL: pooled text embeds and size ids as added conditioning, on the same loop."""
    from likeness.backends.diffusion import denoise_latents
    from likeness.prompts import encode_prompts

    for sampler in ("DPM++ 2M Karras", "Euler a"):
        sampling = SamplingConfig(sampler=sampler, steps=5, cfg_scale=5.0, width=64, height=64)
        embeds = encode_prompts(sdxl, ["a photo of a red fox"], ["blurry"])
        ours = denoise_latents(sdxl, embeds, [3], sampling)
        ref = a1111_reference(sdxl, embeds, [3], sampling, monkeypatch, sdxl=True)
        assert rel_error(ours, ref) < REL_TOL, sampler


def _unet_calls(pipe):
    seen = []

    def hook(_module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"].detach().clone())

    return pipe.unet.register_forward_pre_hook(hook, with_kwargs=True), seen


@pytest.mark.parametrize("sampler,steps,calls", [("DPM2", 4, 7), ("DPM++ SDE Karras", 4, 7), ("LMS", 5, 5)])
def test_prompt_editing_switches_at_a1111s_model_call(sd15, sampler, steps, calls):
    from likeness.backends.diffusion import denoise, schedule_steps
    from likeness.backends.ksampling import model_calls
    from likeness.prompt_schedule import texts_per_call
    from likeness.prompts import encode_prompts

    sampling = SamplingConfig(sampler=sampler, steps=steps, cfg_scale=7.0, width=64, height=64)
    prompt = "a [cat:dog:0.5] photo"
    total = schedule_steps(sampling)
    cond = encode_prompts(sd15, [prompt], ["blurry"], steps=total)
    static = {t: encode_prompts(sd15, [t], ["blurry"]) for t in ("a cat photo", "a dog photo")}
    handle, seen = _unet_calls(sd15)
    try:
        (img,) = denoise(sd15, cond, [7], sampling)
    finally:
        handle.remove()
    assert img.size == (64, 64) and len(seen) == calls == model_calls(sampler, steps)
    want = texts_per_call(prompt, total)
    for i, hidden in enumerate(seen):
        expect = torch.cat([static[want[i]]["negative_prompt_embeds"], static[want[i]]["prompt_embeds"]])
        assert torch.equal(hidden, expect), (i, want[i])
    assert {"a cat photo", "a dog photo"} <= set(want[:calls])


def test_cancel_stops_within_one_step(sd15):
    from likeness.backends.diffusion import denoise
    from likeness.progress import CancelToken
    from likeness.prompts import encode_prompts

    sampling = SamplingConfig(sampler="Heun", steps=20, cfg_scale=7.0, width=64, height=64)
    embeds = encode_prompts(sd15, ["a photo"], [""])
    token = CancelToken()
    handle, seen = _unet_calls(sd15)
    handle2 = sd15.unet.register_forward_hook(lambda *a: token.cancel("deadline passed") if len(seen) == 5 else None)
    try:
        with pytest.raises(Cancelled, match="deadline passed"):
            denoise(sd15, embeds, [1], sampling, cancel=token)
    finally:
        handle.remove()
        handle2.remove()
    # Cancelled during step 2's second call (calls 4-5 are step 2 of Heun): the step finishes, no more.
    assert len(seen) == 6


def test_denoise_gives_images_of_the_kdiffusion_latents(sd15):
    """denoise() decodes denoise_latents()'s result as diffusers' pipeline decodes its own."""
    from likeness.backends.diffusion import _decode, denoise, denoise_latents
    from likeness.prompts import encode_prompts

    sampling = SamplingConfig(sampler="DPM++ 2M Karras", steps=3, cfg_scale=7.0, width=64, height=64)
    embeds = encode_prompts(sd15, ["a photo"], ["blurry"])
    (img,) = denoise(sd15, embeds, [9], sampling)
    latents = denoise_latents(sd15, embeds, [9], sampling)
    with torch.inference_mode():
        image = sd15.vae.decode(latents / sd15.vae.config.scaling_factor).sample
    want = sd15.image_processor.postprocess(image, output_type="np")[0]
    assert np.abs(np.asarray(img, dtype=np.float32) / 255 - want).max() <= 1 / 255 + 1e-6
    assert _decode(sd15, latents, False)[0].tobytes() == img.tobytes()


def test_schedules_and_timesteps_follow_a1111():
    """Sigma schedules per sampler and the fractional timesteps, against k-diffusion's own."""
    import json

    from likeness.backends.ksampling import EpsSchedule, alphas_cumprod, sampler_sigmas

    K, E = _kdiffusion()
    config = json.loads((Path(__file__).resolve().parents[2] / "models/tiny/sd15/scheduler/scheduler_config.json").read_text())
    ac = alphas_cumprod(config)
    assert torch.equal(ac, compvis_alphas_cumprod(config))
    ours = EpsSchedule(ac)
    wrap = E.DiscreteEpsDDPMDenoiser(None, ac, quantize=False)
    assert torch.equal(sampler_sigmas("Euler", 10, ours), wrap.get_sigmas(10))
    karras = K.get_sigmas_karras(10, wrap.sigmas[0].item(), wrap.sigmas[-1].item())
    assert torch.equal(sampler_sigmas("DPM++ 2M Karras", 10, ours), karras)
    dpm2 = sampler_sigmas("DPM2", 10, ours)
    assert len(dpm2) == 11 and torch.equal(dpm2, torch.cat([wrap.get_sigmas(11)[:-2], wrap.get_sigmas(11)[-1:]]))
    sig = torch.tensor([0.02, 0.0292, 0.5, 1.0, 3.3, 14.6, 20.0])  # beyond both ends too
    assert torch.allclose(ours.t_of(sig), wrap.sigma_to_t(sig), rtol=0, atol=1e-4)
    t = ours.t_of(torch.tensor([1.0]))
    assert t.item() != round(t.item())  # fractional: what the UNet gets
    with pytest.raises(InvalidInput, match="beta_schedule"):
        alphas_cumprod({**config, "beta_schedule": "squaredcos_cap_v2"})
    with pytest.raises(InvalidInput, match="prediction_type"):
        alphas_cumprod({**config, "prediction_type": "v_prediction"})


def test_lms_coefficients_are_the_exact_integrals():
    from scipy import integrate

    from likeness.backends.ksampling import lms_coefficient

    t = np.array([14.6, 8.1, 4.2, 2.0, 0.9, 0.3, 0.0], dtype=np.float32)
    t64 = t.astype(np.float64)  # numpy 1.x (A1111's) promoted float32 scalars with Python floats to float64
    for i in range(3, 6):
        for j in range(4):
            def basis(tau):
                return np.prod([(tau - t64[i - k]) / (t64[i - j] - t64[i - k]) for k in range(4) if k != j])
            # quad on a cubic is exact to rounding; measured agreement 1e-15 relative, 1e-12 allowed.
            # (Under numpy 2, k-diffusion's own quad runs the basis in float32: 1.4e-9 apart, which
            # is the 3.6e-7 LMS difference measured in the latents test.)
            assert lms_coefficient(4, t, i, j) == pytest.approx(integrate.quad(basis, t64[i], t64[i + 1])[0], rel=1e-12)
