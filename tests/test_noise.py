"""likeness.noise: Philox 4x32-10 + curand Box-Muller (A1111's GPU / NV noise) on any device, and the CPU source."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from likeness.errors import InvalidInput
from likeness.noise import ImageNoise, PhiloxGenerator, box_muller, check_source, cuda_threads, philox4x32_10, randn

# Random123's published known-answer vectors for philox4x32-10 (its kat_vectors file; the same
# three appear in TensorFlow's and others' Philox tests): counter, key -> output.
KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# A1111's modules/rng_philox.py documents Generator(seed=0).randn((3, 4)) as this (also what
# torch.manual_seed(0); torch.randn(3, 4, device="cuda") prints).
A1111_NV_SEED0 = np.array([[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                           [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                           [-1.07454231, -0.36314407, -1.67105067, 2.26550497]])
# Measured: our float32 Box-Muller differs from A1111's printed values (its u, v in float64) by at
# most 3.5e-7 on these 12; 1e-6 is about 4 float32 ulps at |x| ~ 2.
A1111_ATOL = 1e-6


@pytest.mark.parametrize("counter,key,expected", KATS)
def test_philox_known_answers(counter, key, expected):
    out = philox4x32_10(np.array(counter, dtype=np.uint32).reshape(4, 1), np.array(key, dtype=np.uint32).reshape(2, 1))
    assert tuple(int(x) for x in out[:, 0]) == expected


def test_philox_vectorised_equals_one_by_one():
    counters = np.array([c for c, _, _ in KATS], dtype=np.uint32).T
    keys = np.array([k for _, k, _ in KATS], dtype=np.uint32).T
    assert philox4x32_10(counters, keys).T.tolist() == [list(e) for _, _, e in KATS]


def test_a1111_nv_published_output():
    np.testing.assert_allclose(PhiloxGenerator(0, "nv").randn((3, 4)), A1111_NV_SEED0, rtol=0, atol=A1111_ATOL)
    # A small CUDA draw is the same numbers (one thread per element, first output of each).
    np.testing.assert_array_equal(PhiloxGenerator(0, "cuda").randn((3, 4)), PhiloxGenerator(0, "nv").randn((3, 4)))


def test_box_muller_is_standard_normal():
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32) for _ in range(2))
    s, c = box_muller(x, y)
    both = np.concatenate([s, c])
    # 400k N(0,1) draws: the mean's standard error is 0.0016 and the variance's 0.0022; 0.01 is > 4 sigma.
    assert abs(both.mean()) < 0.01 and abs(both.var() - 1) < 0.01
    assert np.isfinite(both).all()  # u is never 0: the half-interval offset keeps log finite
    assert np.isfinite(box_muller(np.array([0], np.uint32), np.array([0], np.uint32))[0]).all()


def test_cuda_layout_wraps_threads_and_advances_the_offset():
    """Element t + T*k is output k % 4 of thread t's call k // 4; the offset grows by 4 per call."""
    g = PhiloxGenerator(123, "cuda", threads=256)
    a = g.randn((256 * 6,))  # 6 outputs per thread: calls 0 and 1
    assert g.offset == 8
    w0 = philox4x32_10(np.array([[0], [0], [5], [0]]), np.array([[123], [0]]))
    w1 = philox4x32_10(np.array([[1], [0], [5], [0]]), np.array([[123], [0]]))
    s0, c0 = box_muller(w0[0], w0[1])
    s1, c1 = box_muller(w0[2], w0[3])
    s2, c2 = box_muller(w1[0], w1[1])
    assert [a[5 + 256 * k] for k in range(6)] == [s0[0], c0[0], s1[0], c1[0], s2[0], c2[0]]
    # The next draw starts at call 2, as torch's next randn would.
    w2 = philox4x32_10(np.array([[2], [0], [0], [0]]), np.array([[123], [0]]))
    assert g.randn((1,))[0] == box_muller(w2[0], w2[1])[0][0]
    # A1111's NV: never wraps, one call per draw.
    nv = PhiloxGenerator(123, "nv")
    b = nv.randn((256 * 6,))
    assert nv.offset == 4 and b[5] == a[5] and b[256 + 5] != a[256 + 5]


def test_seed_halves_go_to_the_key():
    seed = (7 << 32) | 9
    w = philox4x32_10(np.array([[0], [0], [0], [0]]), np.array([[9], [7]]))
    assert PhiloxGenerator(seed, "nv").randn((1,))[0] == box_muller(w[0], w[1])[0][0]


def test_cuda_threads_formula():
    # H200: 132 SMs x 2048 threads; 16,384 elements fit (64 blocks), 10**6 are capped at 1056 blocks.
    assert cuda_threads(16_384, 132, 2048) == 16_384
    assert cuda_threads(10**6, 132, 2048) == 132 * 2048
    assert cuda_threads(12, 132, 2048) == 256


def test_cpu_source_is_what_generation_draws():
    from likeness.backends.diffusion import draw_latents

    latents, _ = draw_latents([11, 12], 64, 64)
    for i, seed in enumerate((11, 12)):
        assert torch.equal(randn("CPU", seed, (1, 4, 8, 8))[0], latents[i, None][0])


def test_sources_on_cpu():
    gpu = randn("gpu", 5, (4, 8, 8))  # no CUDA device asked for: the Philox emulation
    nv = randn("NV", 5, (4, 8, 8))
    assert gpu.dtype == torch.float32 and gpu.device.type == "cpu" and torch.equal(gpu, nv)
    assert not torch.equal(randn("CPU", 5, (4, 8, 8)), gpu)
    with pytest.raises(InvalidInput, match="GPU, CPU, NV"):
        check_source("quantum")
    with pytest.raises(InvalidInput, match="seed"):
        randn("NV", -1, (2,))
    with pytest.raises(InvalidInput, match="multiple of 256"):
        PhiloxGenerator(0, threads=100)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: compares with torch.randn on CUDA")
@pytest.mark.parametrize("shape", [(3, 4), (4, 64, 64), (4, 128, 128), (2, 4, 128, 128), (16, 4, 96, 96)])
def test_matches_torch_randn_on_cuda(shape):
    """Our Philox + Box-Muller against torch's CUDA kernel, including the thread wrap of big draws
    and a second draw from the same generator (the offset)."""
    props = torch.cuda.get_device_properties(0)
    n = int(np.prod(shape))
    threads = cuda_threads(n, props.multi_processor_count, props.max_threads_per_multi_processor)
    tg = torch.Generator("cuda").manual_seed(1234)
    ours = PhiloxGenerator(1234, "cuda", threads)
    for _ in range(2):
        ref = torch.randn(shape, generator=tg, device="cuda").cpu().numpy()
        got = ours.randn(shape)
        # float32 sin/cos/log on the GPU vs numpy differ by a few ulps; 1e-5 absolute is ~40 ulps at |x|~4.
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert torch.equal(randn("GPU", 7, shape, "cuda").cpu(), torch.randn(shape, generator=torch.Generator("cuda").manual_seed(7), device="cuda").cpu())


# ---------------------------------------------------------------- the source in generation


def test_image_noise_streams_continue_each_source():
    """ImageNoise's first draw is randn's; later draws continue the same generator (the per-step noise)."""
    for source in ("CPU", "GPU", "NV"):
        st = ImageNoise(source, 9)
        first, second = st.randn((4, 8, 8)), st.randn((4, 8, 8))
        assert torch.equal(first, randn(source, 9, (4, 8, 8))), source
        assert not torch.equal(first, second), source
    cpu = ImageNoise("CPU", 9)
    g = torch.Generator("cpu").manual_seed(9)
    for _ in range(3):
        assert torch.equal(cpu.randn((2, 3)), torch.randn((2, 3), generator=g))
    assert cpu.torch_generator is not None and ImageNoise("NV", 9).torch_generator is None


def test_draw_latents_follows_the_sampling_source():
    from likeness.backends.diffusion import draw_latents

    for source in ("CPU", "GPU", "NV"):
        latents, streams = draw_latents([3, 4], 64, 64, source=source)
        assert latents.shape == (2, 4, 8, 8) and len(streams) == 2
        for i, seed in enumerate((3, 4)):
            assert torch.equal(latents[i], randn(source, seed, (4, 8, 8))), source


def test_spec_infotext_plan_and_proto_carry_the_source(tmp_path, tiny_models):
    """[sampling] rng: checked at load, written as A1111 writes it (no field for GPU), recorded in the
    plan (a resume cannot mix sources), carried over gRPC; a tiny-UNet gallery drawn from NV noise
    differs from CPU noise and says RNG: NV."""
    import numpy as np
    from PIL import Image

    from likeness.generate.gallery import generate_gallery, infotext_for
    from likeness.generate.infotext import parse_infotext, read_parameters, rng_source
    from likeness.generate.plan import PlannedImage
    from likeness.serve.servicer import spec_from_pb, spec_to_pb
    from likeness.config import to_dict
    from likeness.spec import SamplingConfig, spec_from_dict

    item = PlannedImage(id="g0", zoom_index=-1, angle_index=-1, index_in_cell=0, zoom="", angle="",
                        prompt="a cat", negative_prompt="", seed=7)
    texts = {s: parse_infotext(infotext_for(item, SamplingConfig(rng=s), "m")) for s in ("CPU", "GPU", "NV")}
    assert texts["CPU"].extra["RNG"] == "CPU" and texts["NV"].extra["RNG"] == "NV"
    assert "RNG" not in texts["GPU"].extra and rng_source(texts["GPU"]) == "GPU"

    base = {"name": "Rng", "token": "r4ng", "template": "photo of r4ng, {zoom}, {angle}", "per_cell": 1,
            "zooms": ["closeup"], "angles": ["front shot"], "profile": "cpu-tiny",
            "sampling": {"steps": 2, "width": 64, "height": 64, "seed": 5}}
    with pytest.raises(InvalidInput, match="rng"):
        spec_from_dict({**base, "sampling": {**base["sampling"], "rng": "quantum"}})
    nv = spec_from_dict({**base, "sampling": {**base["sampling"], "rng": "NV"}})
    assert spec_from_pb(spec_to_pb(to_dict(nv))).sampling.rng == "NV"

    generate_gallery(spec_from_dict(base), tmp_path / "cpu", "cpu-tiny", batch_size=1)
    generate_gallery(nv, tmp_path / "nv", "cpu-tiny", batch_size=1)
    (a,), (b,) = (sorted((tmp_path / d / "images").glob("*.png")) for d in ("cpu", "nv"))
    assert rng_source(parse_infotext(read_parameters(b.read_bytes()))) == "NV"
    assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    with pytest.raises(InvalidInput, match="rng"):
        generate_gallery(spec_from_dict(base), tmp_path / "nv", "cpu-tiny", batch_size=1)
