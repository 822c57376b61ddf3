"""Initial noise from any of A1111's three sources, drawn on any device.

A1111 records where an image's noise came from in its infotext:

- ``RNG: CPU`` — ``torch.randn`` on a CPU generator seeded with the seed (Likeness's default;
  ``[sampling] rng`` chooses, :func:`likeness.backends.diffusion.draw_latents` draws).
- ``RNG: GPU`` or no field (A1111's default) — ``torch.randn`` on the CUDA device: NVIDIA's
  Philox 4x32-10 counter-based generator followed by curand's Box-Muller transform.
- ``RNG: NV`` — A1111's CPU re-creation of that CUDA generator, so a CUDA image can be redrawn
  on a CPU or a Mac.

This module implements Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as
1, 2, 3", SC 2011; constants below) and curand's Box-Muller in numpy, with the counter layout
torch's CUDA ``normal_`` kernel uses, so ``GPU`` and ``NV`` noise can be drawn on any device.

How torch maps a draw to counters (its ``distribution_nullary_kernel`` with ``curand_normal4``):
thread ``t`` of ``T`` threads (``T`` = 256 per block x blocks, the blocks capped at what the
device keeps resident) runs ``curand_init(seed, subsequence=t, offset)``: key = the seed's two
32-bit halves, counter = ``(offset/4 + call, 0, t, 0)`` (64-bit halves). Each call yields four
32-bit words; Box-Muller turns ``(w0, w1)`` into ``(r sin, r cos)`` and ``(w2, w3)`` into the next
two normals. Element ``t + T*k`` takes output ``k % 4`` of call ``k // 4``. The generator's offset
then grows by 4 per call each thread made. A1111's ``NV`` takes element ``i`` as the first output
of thread ``i`` (never wrapping) and advances the offset by one call per draw: the same numbers
as CUDA while a draw has at most ``T`` elements (``T`` = 270,336 on an H200: 132 SMs x 2048
threads; an SD 1.5 latent has 16,384, SDXL's 65,536).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from likeness.errors import InvalidInput

# Philox 4x32 multipliers and Weyl key increments (Random123's PHILOX_M4x32_0/1, PHILOX_W32_0/1).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
# curand's Box-Muller constants (float32): 2**-32 and 2*pi*2**-32; half of each centres a
# 32-bit word in its interval so u is never 0.
_TWO_POW32_INV = np.float32(2.3283064e-10)
_TWO_POW32_INV_2PI = np.float32(2.3283064e-10 * 6.2831855)
# torch's CUDA normal_ kernel: 256 threads per block, 4 normals per curand call.
CUDA_BLOCK = 256
CUDA_UNROLL = 4

SOURCES = ("GPU", "CPU", "NV")
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter: Any, key: Any) -> np.ndarray:
    """Philox 4x32-10 of ``counter`` (4 x N uint32 words) under ``key`` (2 x N): 4 x N uint32 words.

    One round: ``(hi0, lo0) = M0 * c0``, ``(hi1, lo1) = M1 * c2`` (64-bit products), then
    ``c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)``; the key grows by ``(W0, W1)`` between rounds.
    """
    c = np.array(counter, dtype=np.uint64).reshape(4, -1) & _MASK32
    k = np.array(key, dtype=np.uint64).reshape(2, -1) & _MASK32
    c0, c1, c2, c3 = c
    k0, k1 = np.broadcast_to(k[0], c0.shape).copy(), np.broadcast_to(k[1], c0.shape).copy()
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + np.uint64(PHILOX_W0)) & _MASK32
            k1 = (k1 + np.uint64(PHILOX_W1)) & _MASK32
        p0, p1 = c0 * m0, c2 * m1  # < 2**64: exact in uint64
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK32
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


def box_muller(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """curand's Box-Muller in float32: two independent N(0, 1) arrays from two arrays of 32-bit words."""
    u = x.astype(np.float32) * _TWO_POW32_INV + _TWO_POW32_INV / np.float32(2)
    v = y.astype(np.float32) * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / np.float32(2)
    s = np.sqrt(np.float32(-2) * np.log(u))
    return (s * np.sin(v)).astype(np.float32), (s * np.cos(v)).astype(np.float32)


def cuda_threads(numel: int, sm_count: int, max_threads_per_sm: int) -> int:
    """Threads torch's CUDA ``normal_`` launches for ``numel`` elements on a device with these properties."""
    blocks = -(-numel // CUDA_BLOCK)
    return CUDA_BLOCK * max(1, min(blocks, sm_count * (max_threads_per_sm // CUDA_BLOCK)))


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise InvalidInput(f"seed {seed} is outside 0..2**64-1 (what a torch generator takes); pass a seed in range")
    return seed


class PhiloxGenerator:
    """``torch.randn`` of a CUDA generator seeded with ``seed``, drawn with numpy on any device.

    ``mode="cuda"`` follows torch's kernel (threads: :func:`cuda_threads` of the device; None =
    one thread per element, which is what any device launches up to its resident-thread limit).
    ``mode="nv"`` is A1111's ``RNG: NV``: one thread per element and one call per draw.
    Successive :meth:`randn` calls continue the sequence as successive ``torch.randn`` calls do.
    """

    def __init__(self, seed: int, mode: str = "cuda", threads: int | None = None) -> None:
        if mode not in ("cuda", "nv"):
            raise InvalidInput(f"Philox mode {mode!r} is not one of 'cuda', 'nv'")
        if threads is not None and (threads < 1 or threads % CUDA_BLOCK):
            raise InvalidInput(f"threads {threads} must be a positive multiple of {CUDA_BLOCK} (torch's block size)")
        self.seed, self.mode, self.threads = _check_seed(seed), mode, threads
        # torch's philox offset (a multiple of 4: 32-bit words per thread so far).
        self.offset = 0

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        n = int(math.prod(shape))
        if n == 0:
            return np.zeros(tuple(shape), dtype=np.float32)
        stride = n if self.mode == "nv" else (self.threads or -(-n // CUDA_BLOCK) * CUDA_BLOCK)
        idx = np.arange(n, dtype=np.uint64)
        thread, k = idx % np.uint64(stride), idx // np.uint64(stride)
        call = k // np.uint64(CUDA_UNROLL) + np.uint64(self.offset // 4)
        counter = np.stack([call & _MASK32, call >> np.uint64(32), thread & _MASK32, thread >> np.uint64(32)])
        key = np.array([[self.seed & 0xFFFFFFFF], [self.seed >> 32]], dtype=np.uint64)
        w = philox4x32_10(counter, key)
        s0, c0 = box_muller(w[0], w[1])
        s1, c1 = box_muller(w[2], w[3])
        out = np.choose((k % np.uint64(CUDA_UNROLL)).astype(np.intp), [s0, c0, s1, c1])
        self.offset += CUDA_UNROLL * ((n - 1) // (stride * CUDA_UNROLL) + 1)
        return out.astype(np.float32).reshape(tuple(shape))


def check_source(source: str) -> str:
    """A1111's noise source name, normalised (``"gpu"`` -> ``"GPU"``); InvalidInput names the three."""
    name = str(source or "").strip().upper()
    if name not in SOURCES:
        raise InvalidInput(f"noise source {source!r} is not one of {', '.join(SOURCES)} (A1111's 'RNG' setting: "
                           "GPU is its default, CPU is what Likeness draws, NV is GPU noise re-created on the CPU)")
    return name


def randn(source: str, seed: int, shape: Sequence[int], device: Any = "cpu", *, threads: int | None = None) -> Any:
    """One image's noise (float32 torch tensor of ``shape`` on ``device``) from A1111's ``source``.

    ``CPU``: torch's CPU generator. ``GPU``: torch's CUDA generator when ``device`` is CUDA, else
    :class:`PhiloxGenerator` (the same numbers; ``threads`` as there). ``NV``: A1111's re-creation.
    """
    import torch

    name = check_source(source)
    seed = _check_seed(seed)
    dev = torch.device(device)
    if name == "CPU":
        return torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32).to(dev)
    if name == "GPU" and dev.type == "cuda":
        return torch.randn(tuple(shape), generator=torch.Generator(dev).manual_seed(seed), device=dev, dtype=torch.float32)
    gen = PhiloxGenerator(seed, "cuda" if name == "GPU" else "nv", threads)
    return torch.from_numpy(gen.randn(shape)).to(dev)


class ImageNoise:
    """One image's noise stream from A1111's ``source``, as A1111's per-image RNG draws it.

    The first :meth:`randn` is the image's initial noise (equal to :func:`randn`); later calls
    continue the same generator, which is where A1111's ancestral and SDE samplers take their
    per-step noise from (its ``ImageRNG.next``). ``CPU``: a CPU ``torch.Generator`` seeded with
    the seed. ``GPU``: a CUDA generator on a CUDA ``device``, else :class:`PhiloxGenerator`
    (``mode="cuda"``). ``NV``: :class:`PhiloxGenerator` in ``mode="nv"``. Values are float32
    tensors on ``device``.
    """

    def __init__(self, source: str, seed: int, device: Any = "cpu", *, threads: int | None = None) -> None:
        import torch

        self.source, self.seed = check_source(source), _check_seed(seed)
        self.device = torch.device(device)
        self._torch_gen: Any = None
        self._philox: PhiloxGenerator | None = None
        if self.source == "CPU":
            self._torch_gen = torch.Generator("cpu").manual_seed(self.seed)
        elif self.source == "GPU" and self.device.type == "cuda":
            self._torch_gen = torch.Generator(self.device).manual_seed(self.seed)
        else:
            self._philox = PhiloxGenerator(self.seed, "cuda" if self.source == "GPU" else "nv", threads)

    @property
    def torch_generator(self) -> Any:
        """The torch generator behind a ``CPU`` (or ``GPU`` on CUDA) stream; None for Philox re-creations."""
        return self._torch_gen

    def randn(self, shape: Sequence[int]) -> Any:
        import torch

        if self._philox is not None:
            return torch.from_numpy(self._philox.randn(shape)).to(self.device)
        gen = self._torch_gen
        out = torch.randn(tuple(shape), generator=gen, device=gen.device, dtype=torch.float32)
        return out.to(self.device)
