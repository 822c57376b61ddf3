"""Where and how a loaded pipeline runs: the worker's device, VAE upcasting, torch.compile (issue 14).

* :func:`worker_device`: each worker loads onto its own device (``"cuda:1"``),
  never onto GPU 0 and then moved; :func:`device_scope` makes that GPU the
  current one while loading.
* :func:`vae_force_upcast` / :func:`set_vae_upcast`: the profile's
  ``vae_upcast`` rule, so a single-file SDXL fp16-fix VAE is not decoded in
  float32 because it was loaded with the base model's config.
* torch.compile with fixed shapes. ``torch.compile`` specialises a graph on its
  input shapes: with ``dynamic=False`` every new batch size (a build's last
  partial batch, the validation and evaluation batches) is a fresh compile of
  tens of seconds, and after a few the compiled frame gives up and runs
  eagerly. :class:`FixedBatch` puts the compiled module behind one batch size
  per grad mode -- the first call's -- padding a smaller batch (with copies of
  its last row, cut off again from the output) and splitting a larger one into
  chunks of that size. Each image's result does not depend on its batch (every
  row is computed independently), so padding changes no image; it costs the
  padded rows' compute on partial batches only. :func:`compile_pipeline`
  compiles ``pipe.unet`` and ``pipe.vae.decoder`` this way;
  ``likeness.backends.diffusion.load_pipeline`` calls it for a profile whose
  ``compile`` option names a mode. A prompt longer than 75 tokens gives another
  sequence length, and so one more compile (text embeddings cannot be padded
  without changing the image).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from likeness.errors import FailedPrecondition, InvalidInput
from likeness.profiles import Profile

# ---------------------------------------------------------------- device


def worker_device(profile: Profile, device: str | torch.device | None,
                  default: tuple[torch.device, torch.dtype] | None = None) -> tuple[torch.device, torch.dtype]:
    """The device (CUDA with an explicit index) and dtype one worker runs ``profile`` on.

    ``device=None``: ``default`` (the profile's rule, ``diffusion.select_device``) on the
    current CUDA device (a Ray GPU actor sees only its own GPU); ``"cuda:N"``: GPU N, so
    several workers of one process each load onto their own GPU instead of all onto GPU 0;
    ``"cpu"``: for CPU/auto profiles.
    """
    if device is None:
        if default is None:
            raise ValueError("worker_device needs the profile's default device when device is None")
        dev, dtype = default
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return dev, dtype
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInput(f"device {device!r} is not a device; use 'cuda', 'cuda:N' or 'cpu'") from exc
    if dev.type not in ("cpu", "cuda"):
        raise InvalidInput(f"device {device!r}: only 'cuda', 'cuda:N' and 'cpu' are supported")
    if dev.type == "cpu":
        if profile.device == "cuda":
            raise InvalidInput(f"profile {profile.name!r} runs on CUDA (device = \"cuda\" in models/{profile.name}.toml); "
                               "load it on a GPU, or use a CPU profile such as cpu-tiny")
        return dev, torch.float32
    if profile.device == "cpu":
        raise InvalidInput(f"profile {profile.name!r} is a CPU profile (device = \"cpu\"); load it with device='cpu'")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = dev.index if dev.index is not None else (torch.cuda.current_device() if count else 0)
    if index >= count:
        raise FailedPrecondition(
            f"device {device!r} asks for CUDA GPU {index} but {count} are visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return torch.device("cuda", index), getattr(torch, profile.dtype)


def device_scope(device: torch.device) -> Any:
    """While loading, CUDA's current device is the worker's: nothing lands on GPU 0 by default."""
    from contextlib import nullcontext

    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


# ---------------------------------------------------------------- VAE upcast


def vae_force_upcast(profile: Profile, vae: Any) -> bool:
    """Whether ``vae`` must run in float32 under ``profile`` (see ``Profile.vae_upcast``).

    A single-file VAE brings no config, so it was loaded with the base model's: SDXL's says
    force_upcast, which would decode madebyollin's fp16-fix VAE in float32 for nothing.
    """
    if profile.vae_upcast != "auto":
        return profile.vae_upcast == "yes"
    if profile.vae:
        p = profile.resolve(profile.vae)
        name = p.name.lower()
        if p.is_file() and "fp16" in name and "fix" in name:
            return False
    return bool(getattr(vae.config, "force_upcast", False))


def set_vae_upcast(profile: Profile, pipe: Any) -> None:
    """Write the profile's upcast rule into ``pipe.vae``'s config (what diffusers' SDXL decode reads)."""
    want = vae_force_upcast(profile, pipe.vae)
    if bool(getattr(pipe.vae.config, "force_upcast", False)) != want:
        pipe.vae.register_to_config(force_upcast=want)


# ---------------------------------------------------------------- torch.compile


def compile_mode(profile: Profile, compile_unet: bool = False) -> str:
    """The torch.compile mode for ``profile``: its ``compile`` option; ``--compile`` alone means "default"."""
    if profile.compile != "off":
        return profile.compile
    return "default" if compile_unet else "off"


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _rows(value: Any, n: int, start: int, m: int, size: int) -> Any:
    """Rows ``start:start+m`` of every tensor whose first dimension is the batch ``n``, padded to ``size``."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
        part = value[start : start + m]
        if m < size:
            part = torch.cat([part, part[-1:].expand(size - m, *part.shape[1:])])
        return part
    if isinstance(value, dict):
        return {k: _rows(v, n, start, m, size) for k, v in value.items()}
    return value


def _cut(out: Any, m: int, size: int, copy: bool) -> Any:
    """The first ``m`` rows of each batch-sized tensor in ``out`` (a tensor, tuple or diffusers output)."""
    if isinstance(out, torch.Tensor):
        if out.ndim > 0 and out.shape[0] == size:
            out = out[:m]
        # A copy: with CUDA graphs (reduce-overhead) the output buffer is overwritten by the next call.
        return out.clone() if copy else out
    if isinstance(out, tuple):
        return tuple(_cut(v, m, size, copy) for v in out)
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):  # diffusers BaseOutput (UNet2DConditionOutput, ...)
        return type(out)(**{k: _cut(out[k], m, size, copy) for k in out.keys()})
    return out


def _join(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts) if first.ndim > 0 else first
    if isinstance(first, tuple):
        return tuple(_join([p[i] for p in parts]) for i in range(len(first)))
    if hasattr(first, "to_tuple") and hasattr(first, "keys"):
        return type(first)(**{k: _join([p[k] for p in parts]) for k in first.keys()})
    return first


class FixedBatch(torch.nn.Module):
    """A compiled module that sees one batch size per grad mode (see the module docstring).

    Attributes it does not have (``config``, ``dtype``, ``device``, ...) are the
    original module's, so pipelines and the trainer use it as the module itself.
    """

    def __init__(self, compiled: torch.nn.Module) -> None:
        super().__init__()
        self.compiled = compiled
        # The batch size per torch.is_grad_enabled(): training steps and inference calls are
        # separate graphs anyway, each with its own size.
        self.fixed: dict[bool, int] = {}

    @property
    def original(self) -> torch.nn.Module:
        return getattr(self.compiled, "_orig_mod", self.compiled)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            compiled = self._modules.get("compiled")
            if compiled is None:
                raise
            return getattr(getattr(compiled, "_orig_mod", compiled), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        sample = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if sample is None:
            sample = next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        n = int(sample.shape[0])
        size = self.fixed.setdefault(torch.is_grad_enabled(), n)
        if n == size:
            return self.compiled(*args, **kwargs)
        parts = []
        chunks = range(0, n, size)
        for start in chunks:
            m = min(size, n - start)
            out = self.compiled(*[_rows(a, n, start, m, size) for a in args],
                                **{k: _rows(v, n, start, m, size) for k, v in kwargs.items()})
            parts.append(_cut(out, m, size, copy=True))
        return parts[0] if len(parts) == 1 else _join(parts)


def compile_module(module: torch.nn.Module, mode: str = "default", *, backend: str = "inductor") -> FixedBatch:
    """``module`` compiled with ``dynamic=False`` behind :class:`FixedBatch`."""
    if mode not in COMPILE_MODES:
        raise InvalidInput(f"compile mode {mode!r} is unknown; use one of {', '.join(COMPILE_MODES)} (or 'off')")
    kwargs: dict[str, Any] = {"dynamic": False, "fullgraph": False, "backend": backend}
    if backend == "inductor":  # modes are inductor's; another backend takes none
        kwargs["mode"] = mode
    return FixedBatch(torch.compile(module, **kwargs))


def compile_pipeline(pipe: Any, mode: str = "default", *, backend: str = "inductor") -> Any:
    """Compile ``pipe.unet`` and ``pipe.vae.decoder`` (fixed shapes); returns ``pipe``. Idempotent."""
    if not isinstance(pipe.unet, FixedBatch):
        pipe.unet = compile_module(pipe.unet, mode, backend=backend)
    if not isinstance(pipe.vae.decoder, FixedBatch):
        pipe.vae.decoder = compile_module(pipe.vae.decoder, mode, backend=backend)
    pipe._likeness_compile = mode
    return pipe
