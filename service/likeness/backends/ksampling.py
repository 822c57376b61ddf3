"""A1111's k-diffusion sampling: the discrete-eps denoiser, its schedules and the sampler steps.

A1111 runs most of its samplers through k-diffusion, on the model wrapped as a *discrete eps
denoiser*: the UNet, trained on ``T`` integer timesteps, becomes a function of a continuous
noise level ``sigma``. Written here from the published rules, not from either project's code:

* ``sigma_t = sqrt((1 - alphas_cumprod_t) / alphas_cumprod_t)`` for ``t = 0..T-1`` (the
  checkpoint's ``alphas_cumprod``, which CompVis computes in float64 and stores in float32);
* a ``sigma`` between two of them is a *fractional* timestep, interpolated linearly in
  ``log sigma`` between the neighbouring indices (:meth:`EpsSchedule.t_of`): the UNet gets ``t = 612.37``;
* ``denoised = x - sigma * eps(x / sqrt(sigma^2 + 1), t)``; classifier-free guidance combines the
  denoised halves, ``uncond + (cond - uncond) * scale`` (:class:`GuidedDenoiser`);
* schedules (:func:`sampler_sigmas`): the model's own ("Automatic" for the non-Karras names),
  ``t = linspace(T-1, 0, n)`` mapped back to sigmas, or Karras et al. 2022's ``rho = 7`` ramp
  between the model's smallest and largest sigma; a final 0 after both; DPM2 builds ``n + 1`` and
  drops the next-to-last (A1111's ``discard_next_to_last_sigma``);
* the first noise is ``noise * sigmas[0]``; ``eta = 1``, ``s_noise = 1``;
* per-step noise: ancestral steps take each image's next draw from its own noise stream
  (:class:`likeness.noise.ImageNoise`, A1111 continues each image's generator), DPM++ SDE and 2M SDE
  a torchsde Brownian tree per image seeded with the image's seed (:class:`BrownianNoise`), whose
  own draws follow the noise source as A1111's patched ``torchsde`` ones do.

The steps (:data:`STEPPERS`) follow Karras et al. 2022 (Euler, Heun, DPM2 = their Algorithm 2
variants, with ``s_churn = 0``), the ancestral split of a step into ``sigma_down``/``sigma_up``,
linear multistep of order 4 (the Lagrange basis integrated exactly), and Lu et al. 2022's
DPM-Solver++ (2M, the stochastic SDE variant with ``r = 1/2``, and 2M SDE with the midpoint
correction). ``tests/backends/test_ksampling.py`` runs k-diffusion itself on the same UNet.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from likeness.errors import InvalidInput

# A1111 name -> (stepper, schedule, discard the next-to-last sigma). DDIM and UniPC are not here:
# A1111 runs them on its own timestep samplers and Likeness keeps them on diffusers' schedulers.
KSAMPLERS: dict[str, tuple[str, str, bool]] = {
    "Euler": ("euler", "discrete", False),
    "Euler a": ("euler_ancestral", "discrete", False),
    "Heun": ("heun", "discrete", False),
    "DPM2": ("dpm2", "discrete", True),
    "LMS": ("lms", "discrete", False),
    "DPM++ 2M": ("dpmpp_2m", "discrete", False),
    "DPM++ 2M Karras": ("dpmpp_2m", "karras", False),
    "DPM++ SDE": ("dpmpp_sde", "discrete", False),
    "DPM++ SDE Karras": ("dpmpp_sde", "karras", False),
    "DPM++ 2M SDE Karras": ("dpmpp_2m_sde", "karras", False),
}
# Karras et al. 2022's schedule exponent (A1111's and k-diffusion's default).
KARRAS_RHO = 7.0
# Linear multistep order A1111 runs LMS with (k-diffusion's default).
LMS_ORDER = 4


def is_ksampler(sampler: str) -> bool:
    """True when A1111 runs ``sampler`` through k-diffusion (and Likeness through this module)."""
    return sampler in KSAMPLERS


# ---------------------------------------------------------------- the model's noise levels


def alphas_cumprod(config: Any) -> torch.Tensor:
    """The model's ``alphas_cumprod`` (float32) from a diffusers scheduler config, computed as the
    CompVis checkpoints store it: betas and their cumulative product in float64, then float32."""
    cfg = dict(config)
    n = int(cfg.get("num_train_timesteps", 1000))
    trained = cfg.get("trained_betas")
    b0, b1 = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    kind = cfg.get("beta_schedule", "linear")
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float64)
    elif kind == "scaled_linear":  # CompVis's "linear": linear in sqrt(beta)
        betas = np.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=np.float64) ** 2
    elif kind == "linear":
        betas = np.linspace(b0, b1, n, dtype=np.float64)
    else:
        raise InvalidInput(f"beta_schedule {kind!r} has no A1111 k-diffusion equivalent here; "
                           "use a model with a 'scaled_linear' or 'linear' schedule, or the DDIM/UniPC sampler")
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise InvalidInput(f"prediction_type {cfg.get('prediction_type')!r}: the A1111 k-diffusion samplers here "
                           "drive eps-prediction models only; use the DDIM or UniPC sampler")
    return torch.from_numpy(np.cumprod(1.0 - betas)).to(torch.float32)


class EpsSchedule:
    """The discrete sigmas of an eps-prediction model and the sigma <-> fractional-timestep maps."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        ac = alphas_cumprod.to(torch.float32)
        self.sigmas = ((1 - ac) / ac) ** 0.5  # increasing with t
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0].item())

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1].item())

    def t_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of ``sigma``: linear in log-sigma between the neighbouring indices,
        clamped to ``[0, T-1]``."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.log()
        last = log_sigmas.shape[0] - 2
        low = (torch.searchsorted(log_sigmas, log_sigma.reshape(-1).contiguous(), right=True) - 1).clamp(0, last)
        high = low + 1
        lo, hi = log_sigmas[low], log_sigmas[high]
        w = ((lo - log_sigma.reshape(-1)) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * high).reshape(sigma.shape)

    def sigma_of(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigmas = self.log_sigmas.to(t.device)
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    def discrete(self, n: int) -> torch.Tensor:
        """The model's own schedule: ``n`` sigmas at ``t = linspace(T-1, 0, n)``, then 0."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return _append_zero(self.sigma_of(t))


def _append_zero(s: torch.Tensor) -> torch.Tensor:
    return torch.cat([s, s.new_zeros([1])])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> torch.Tensor:
    """Karras et al. 2022's schedule: ``n`` sigmas even in ``sigma^(1/rho)`` from max to min, then 0."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def sampler_sigmas(sampler: str, steps: int, schedule: EpsSchedule) -> torch.Tensor:
    """A1111's default noise levels for ``sampler`` at ``steps`` (float32, CPU, ending in 0)."""
    if sampler not in KSAMPLERS:
        raise InvalidInput(f"sampler {sampler!r} is not a k-diffusion sampler; use one of {', '.join(KSAMPLERS)}")
    if steps < 1:
        raise InvalidInput(f"steps must be 1 or more, got {steps}")
    _, kind, discard = KSAMPLERS[sampler]
    n = steps + 1 if discard else steps
    sigmas = karras_sigmas(n, schedule.sigma_min, schedule.sigma_max) if kind == "karras" else schedule.discrete(n)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


# ---------------------------------------------------------------- the guided denoiser


@dataclass(frozen=True)
class CallConditioning:
    """The text conditioning of one model call for a batch of ``n`` images.

    ``cond`` / ``uncond``: [n, L, D] hidden states (their lengths may differ: then the UNet runs
    the halves as two calls, A1111's default without "Pad prompt/negative prompt");
    ``cond_added`` / ``uncond_added``: SDXL's ``added_cond_kwargs`` (pooled text embeds, time ids), else None.
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    cond_added: dict[str, torch.Tensor] | None = None
    uncond_added: dict[str, torch.Tensor] | None = None


class GuidedDenoiser:
    """``denoised = f(x, sigma)`` of a diffusers eps UNet under classifier-free guidance, as A1111's
    CFG denoiser around k-diffusion's discrete-eps wrapper computes it.

    ``conditioning(i)`` gives model call ``i``'s :class:`CallConditioning` (A1111 counts calls, so
    prompt editing switches at the call index); :attr:`calls` is the count so far.
    """

    def __init__(self, unet: Any, schedule: EpsSchedule, conditioning: Callable[[int], CallConditioning],
                 cfg_scale: float) -> None:
        self.unet, self.schedule, self.conditioning, self.cfg_scale = unet, schedule, conditioning, float(cfg_scale)
        self.calls = 0

    def _eps(self, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, added: dict[str, torch.Tensor] | None) -> torch.Tensor:
        kwargs: dict[str, Any] = {"encoder_hidden_states": hidden, "return_dict": False}
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        return self.unet(x, t, **kwargs)[0]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        c = self.conditioning(self.calls)
        sigma_b = sigma.reshape(1).to(x.device).expand(n)
        c_in = 1 / (sigma_b ** 2 + 1.0) ** 0.5
        t = self.schedule.t_of(sigma_b)
        dtype = getattr(self.unet, "dtype", x.dtype)
        x_in = (x * c_in[:, None, None, None]).to(dtype)
        if x.device.type == "cuda":
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        if c.cond.shape[1] == c.uncond.shape[1]:
            added = None
            if c.cond_added is not None and c.uncond_added is not None:
                added = {k: torch.cat([c.uncond_added[k], c.cond_added[k]]) for k in c.cond_added}
            eps = self._eps(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([c.uncond, c.cond]), added).float()
            eps_uncond, eps_cond = eps[:n], eps[n:]
        else:  # unpadded prompt and negative of different lengths: one UNet call per half
            eps_uncond = self._eps(x_in, t, c.uncond, c.uncond_added).float()
            eps_cond = self._eps(x_in, t, c.cond, c.cond_added).float()
        self.calls += 1
        s = sigma_b[:, None, None, None]
        den_uncond = x + eps_uncond * -s
        den_cond = x + eps_cond * -s
        return den_uncond + (den_cond - den_uncond) * self.cfg_scale


# ---------------------------------------------------------------- per-step noise


class AncestralNoise:
    """Each image's next draw from its own noise stream (A1111 continues every image's generator)."""

    def __init__(self, streams: Sequence[Any], shape: Sequence[int], device: Any) -> None:
        self.streams, self.shape, self.device = list(streams), tuple(shape), device

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return torch.stack([st.randn(self.shape) for st in self.streams]).to(self.device)


# The noise source the torchsde trees of the running sampler draw from (A1111 replaces torchsde's
# draws with its own per-seed noise of the chosen source); unset: torchsde's own generator.
_TREE_SOURCE: contextvars.ContextVar[str | None] = contextvars.ContextVar("likeness_tree_source", default=None)
_TREE_PATCHED = False


def _install_tree_noise() -> None:
    global _TREE_PATCHED
    if _TREE_PATCHED:
        return
    import torchsde._brownian.brownian_interval as bi

    original = bi._randn

    def randn(size: Any, dtype: Any, device: Any, seed: Any) -> torch.Tensor:
        source = _TREE_SOURCE.get()
        if source is None:
            return original(size, dtype, device, seed)
        from likeness.noise import randn as source_randn

        return source_randn(source, int(seed), tuple(size), device).to(dtype=dtype)

    bi._randn = randn
    _TREE_PATCHED = True


@contextlib.contextmanager
def tree_noise_source(source: str):
    """While active (in this thread/context), torchsde Brownian trees draw from A1111's ``source``."""
    _install_tree_noise()
    token = _TREE_SOURCE.set(source)
    try:
        yield
    finally:
        _TREE_SOURCE.reset(token)


class BrownianNoise:
    """Normalised Brownian increments ``(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)``,
    one torchsde tree per image over ``[sigma_min, sigma_max]``, seeded with that image's seed."""

    def __init__(self, x: torch.Tensor, sigma_min: torch.Tensor, sigma_max: torch.Tensor, seeds: Sequence[int]) -> None:
        import torchsde

        self.sign = 1 if sigma_min < sigma_max else -1
        lo, hi = (sigma_min, sigma_max) if self.sign == 1 else (sigma_max, sigma_min)
        w0 = torch.zeros_like(x[0])
        self.trees = [torchsde.BrownianTree(lo, w0, hi, entropy=int(s)) for s in seeds]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (a, b, 1) if a < b else (b, a, -1)
        w = torch.stack([tree(lo, hi) for tree in self.trees]) * (self.sign * sign)
        return w / (b - a).abs().sqrt()


# ---------------------------------------------------------------- the steps

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Noise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepEnd = Callable[[int], None]


def _d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative dx/dsigma (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0) -> tuple[Any, Any]:
    """(sigma_down, sigma_up): a step to ``sigma_to`` as a deterministic step to ``sigma_down`` plus
    fresh noise of ``sigma_up`` (``sigma_down^2 + sigma_up^2 = sigma_to^2``)."""
    if not eta:
        return sigma_to, 0.0
    up = torch.minimum(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - up ** 2) ** 0.5, up


def euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None, step_end: StepEnd) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        d = _d(x, sigmas[i], model(x, sigmas[i]))
        x = x + d * (sigmas[i + 1] - sigmas[i])
        step_end(i)
    return x


def euler_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None,
                    step_end: StepEnd) -> torch.Tensor:
    assert noise is not None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1])
        x = x + _d(x, sigmas[i], denoised) * (down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * up
        step_end(i)
    return x


def heun(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None, step_end: StepEnd) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        d = _d(x, sigmas[i], model(x, sigmas[i]))
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:  # the last step: Euler
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
        step_end(i)
    return x


def dpm2(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None, step_end: StepEnd) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        d = _d(x, sigmas[i], model(x, sigmas[i]))
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:  # a midpoint step, the midpoint geometric in sigma
            mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (mid - sigmas[i])
            d_2 = _d(x_2, mid, model(x_2, mid))
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
        step_end(i)
    return x


def lms_coefficient(order: int, t: np.ndarray, i: int, j: int) -> float:
    """Integral over ``[t_i, t_{i+1}]`` of the Lagrange basis polynomial of node ``t_{i-j}`` among
    ``t_i, ..., t_{i-order+1}`` (exact: the polynomial is integrated, not sampled)."""
    if order - 1 > i:
        raise InvalidInput(f"linear multistep order {order} is too high for step {i}")
    poly = np.poly1d([1.0])
    for k in range(order):
        if k != j:
            poly = poly * np.poly1d([1.0, -float(t[i - k])]) / (float(t[i - j]) - float(t[i - k]))
    integral = poly.integ()
    return float(integral(float(t[i + 1])) - integral(float(t[i])))


def lms(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None, step_end: StepEnd,
        order: int = LMS_ORDER) -> torch.Tensor:
    nodes = sigmas.detach().cpu().numpy()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        ds.append(_d(x, sigmas[i], model(x, sigmas[i])))
        if len(ds) > order:
            ds.pop(0)
        cur = min(i + 1, order)
        coeffs = [lms_coefficient(cur, nodes, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        step_end(i)
    return x


def _lam(sigma: torch.Tensor) -> torch.Tensor:
    """DPM-Solver's time variable: minus log sigma (half the log-SNR)."""
    return sigma.log().neg()


def _sig(lam: torch.Tensor) -> torch.Tensor:
    return lam.neg().exp()


def dpmpp_2m(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None, step_end: StepEnd) -> torch.Tensor:
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        t, t_next = _lam(sigmas[i]), _lam(sigmas[i + 1])
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            x = (_sig(t_next) / _sig(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - _lam(sigmas[i - 1])) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (_sig(t_next) / _sig(t)) * x - (-h).expm1() * d
        old = denoised
        step_end(i)
    return x


def dpmpp_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None, step_end: StepEnd,
              r: float = 0.5) -> torch.Tensor:
    assert noise is not None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + _d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next = _lam(sigmas[i]), _lam(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)
            down, up = ancestral_step(_sig(t), _sig(s))
            s_ = _lam(down)
            x_2 = (_sig(s_) / _sig(t)) * x - (t - s_).expm1() * denoised
            x_2 = x_2 + noise(_sig(t), _sig(s)) * up
            denoised_2 = model(x_2, _sig(s))
            down, up = ancestral_step(_sig(t), _sig(t_next))
            t_next_ = _lam(down)
            d = (1 - fac) * denoised + fac * denoised_2
            x = (_sig(t_next_) / _sig(t)) * x - (t - t_next_).expm1() * d
            x = x + noise(_sig(t), _sig(t_next)) * up
        step_end(i)
    return x


def dpmpp_2m_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None,
                 step_end: StepEnd, eta: float = 1.0) -> torch.Tensor:
    assert noise is not None
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        h = h_last
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old is not None:  # the midpoint correction from the previous denoised
                x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / (h_last / h)) * (denoised - old)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt()
        old, h_last = denoised, h
        step_end(i)
    return x


STEPPERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": euler, "euler_ancestral": euler_ancestral, "heun": heun, "dpm2": dpm2, "lms": lms,
    "dpmpp_2m": dpmpp_2m, "dpmpp_sde": dpmpp_sde, "dpmpp_2m_sde": dpmpp_2m_sde,
}
_ANCESTRAL = frozenset({"euler_ancestral"})
_BROWNIAN = frozenset({"dpmpp_sde", "dpmpp_2m_sde"})


def model_calls(sampler: str, steps: int) -> int:
    """How many times ``sampler`` calls the model in ``steps`` steps (second-order steps call it twice,
    except the last one, which steps to sigma 0 with one call)."""
    stepper = KSAMPLERS[sampler][0]
    return 2 * steps - 1 if stepper in ("heun", "dpm2", "dpmpp_sde") else steps


def sample(sampler: str, model: Model, noise: torch.Tensor, sigmas: torch.Tensor, *, streams: Sequence[Any] = (),
           seeds: Sequence[int] = (), source: str = "CPU", step_end: StepEnd | None = None) -> torch.Tensor:
    """Run A1111's ``sampler`` from the initial ``noise`` (float32 [n, C, H, W]) over ``sigmas``.

    ``x = noise * sigmas[0]``. ``streams`` (one :class:`likeness.noise.ImageNoise` per image, already
    past its initial draw) feed the ancestral steps; ``seeds`` seed the Brownian trees of the SDE
    samplers, whose draws follow ``source``. ``step_end(i)`` runs after step ``i`` (cancel checks).
    Returns the final latents (float32).
    """
    stepper = KSAMPLERS[sampler][0]
    sigmas = sigmas.to(noise.device)
    x = noise * sigmas[0]
    step_end = step_end or (lambda i: None)
    fn = STEPPERS[stepper]
    if stepper in _ANCESTRAL:
        if len(streams) != x.shape[0]:
            raise InvalidInput(f"{sampler!r} needs one noise stream per image, got {len(streams)} for {x.shape[0]}")
        return fn(model, x, sigmas, AncestralNoise(streams, x.shape[1:], x.device), step_end)
    if stepper in _BROWNIAN:
        if len(seeds) != x.shape[0]:
            raise InvalidInput(f"{sampler!r} needs one seed per image, got {len(seeds)} for {x.shape[0]}")
        positive = sigmas[sigmas > 0]
        with tree_noise_source(source):
            tree = BrownianNoise(x, positive.min(), sigmas.max(), seeds)
            return fn(model, x, sigmas, tree, step_end)
    return fn(model, x, sigmas, None, step_end)
