"""The sampler loops, one plain function each, with ComfyUI's math for flow (``CONST``) models.

``denoiser(x, sigma)`` is the guided denoiser: it takes x and σ as a [B] tensor (k-diffusion's
``sigmas[i] * x.new_ones([B])``) and returns x0. Step coefficients are 0-d tensors of the
sigmas' dtype, computed in ComfyUI's order of operations so their float32 rounding is its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .model_sampling import FlowSampling
from .noise import (
    NoiseSampler,
    ancestral_noise_sampler,
    brownian_tree_noise_sampler,
    check_noise_device,
    check_seed,
)

Denoiser = Callable[[Tensor, Tensor], Tensor]
# callback(i, x, x0, sigma, sigma_next): x is the input of step i, x0 the denoiser's prediction.
Callback = Callable[[int, Tensor, Tensor, Tensor, Tensor], None]

# ComfyUI's offset_first_sigma_for_snr: σ = 1 has λ = −∞, so it starts a hair below instead.
FIRST_SIGMA_PERCENT = 1e-4


def _check_sigmas(sigmas: Tensor) -> None:
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D tensor, got shape {list(sigmas.shape)}")


def _check_options(eta: float, s_noise: float, r: float = 0.5) -> None:
    # `not v >= 0` also rejects NaN.
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if not s_noise >= 0:
        raise ValueError(f"s_noise must be >= 0, got {s_noise}")
    if not 0 < r <= 1:
        raise ValueError(f"r must be in (0, 1], got {r}")


def _sigma_in(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma * x.new_ones([x.shape[0]])


def sample_euler(
    denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None
) -> Tensor:
    """Plain Euler (s_churn = 0): d = (x − x0)/σ; x ← x + d·(σ_next − σ)."""
    _check_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, _sigma_in(sigma, x))
        if callback is not None:
            callback(i, x, x0, sigma, sigma_next)
        d = (x - x0) / sigma
        x = x + d * (sigma_next - sigma)
    return x


def euler_ancestral_rf_step_coefficients(
    sigma: Tensor | float, sigma_next: Tensor | float, eta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """One Euler-ancestral step of a flow model: (sigma_down, α_next/α_down, renoise).

    The step goes deterministically down to sigma_down, then rescales by α_next/α_down and adds
    renoise·ε to land back on σ_next's marginal. Floats become float32 tensors, like sigmas.
    """
    s = sigma if isinstance(sigma, Tensor) else torch.tensor(sigma, dtype=torch.float32)
    n = sigma_next if isinstance(sigma_next, Tensor) else torch.tensor(sigma_next, dtype=s.dtype)
    sigma_down = n * (1 + (n / s - 1) * eta)
    alpha_next = 1 - n
    alpha_down = 1 - sigma_down
    renoise = (n**2 - sigma_down**2 * alpha_next**2 / alpha_down**2) ** 0.5
    return sigma_down, alpha_next / alpha_down, renoise


def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    seed: int | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """ComfyUI's ``euler_ancestral`` on a flow model (its ``sample_euler_ancestral_RF``).

    Without ``noise_sampler`` the noise comes from ``ancestral_noise_sampler(x, seed)``. The
    last step to σ = 0 returns x0 and draws nothing; every other step draws once when eta > 0.
    """
    _check_sigmas(sigmas)
    _check_options(eta, s_noise)
    if noise_sampler is None and eta > 0:
        if seed is None:
            raise ValueError("euler_ancestral with eta > 0 needs a noise_sampler or a seed")
        noise_sampler = ancestral_noise_sampler(x, seed)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, _sigma_in(sigma, x))
        if callback is not None:
            callback(i, x, x0, sigma, sigma_next)
        if sigma_next == 0:
            x = x0
            continue
        sigma_down, alpha_ratio, renoise = euler_ancestral_rf_step_coefficients(
            sigma, sigma_next, eta
        )
        down_ratio = sigma_down / sigma
        x = down_ratio * x + (1 - down_ratio) * x0
        if eta > 0:
            assert noise_sampler is not None
            x = alpha_ratio * x + noise_sampler(sigma, sigma_next) * s_noise * renoise
    return x


def _half_log_snr(sigma: Tensor) -> Tensor:
    """λ = log(α/σ) = −logit(σ) for a flow model (α = 1 − σ)."""
    return sigma.logit().neg()


def _sigma_of_half_log_snr(lam: Tensor) -> Tensor:
    return lam.neg().sigmoid()


def _ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """(sigma_down, sigma_up) of an ancestral step between two EDM-style sigmas."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(
        sigma_to,
        eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5,
    )
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _offset_first_sigma(sigmas: Tensor, model_sampling: FlowSampling | None) -> Tensor:
    """ComfyUI's offset_first_sigma_for_snr: σ0 ≥ 1 → model_sampling.percent_to_sigma(1e-4)."""
    if len(sigmas) == 0 or sigmas[0] < 1:
        return sigmas
    if model_sampling is None:
        raise ValueError(
            f"sigmas[0] = {float(sigmas[0])} >= 1 has no finite log-SNR; pass model_sampling so "
            f"it can be replaced by model_sampling.percent_to_sigma({FIRST_SIGMA_PERCENT})"
        )
    sigmas = sigmas.clone()
    sigmas[0] = model_sampling.percent_to_sigma(FIRST_SIGMA_PERCENT)
    return sigmas


def _midpoint(sigma: Tensor, sigma_next: Tensor, r: float) -> tuple[Tensor, Tensor, Tensor]:
    """(λ_s, λ_t, λ_1) of a DPM-Solver++ step, λ_1 = λ_s + r·h."""
    lambda_s, lambda_t = _half_log_snr(sigma), _half_log_snr(sigma_next)
    return lambda_s, lambda_t, lambda_s + r * (lambda_t - lambda_s)


def midpoint_sigmas_dpmpp_sde(
    sigmas: Tensor, r: float = 0.5, model_sampling: FlowSampling | None = None
) -> Tensor:
    """The substep σ1 that dpmpp_sde evaluates in each step not ending at σ = 0."""
    _check_sigmas(sigmas)
    _check_options(0.0, 0.0, r)
    sigmas = _offset_first_sigma(sigmas, model_sampling)
    mids = [
        _sigma_of_half_log_snr(_midpoint(sigmas[i], sigmas[i + 1], r)[2])
        for i in range(len(sigmas) - 1)
        if sigmas[i + 1] != 0
    ]
    return torch.stack(mids) if mids else sigmas.new_empty([0])


def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    noise_sampler: NoiseSampler | None = None,
    seed: int | None = None,
    model_sampling: FlowSampling | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """ComfyUI's ``dpmpp_sde`` (DPM-Solver++ SDE, two model calls per step) on a flow model.

    Without ``noise_sampler`` the noise is a CPU Brownian tree over (min positive σ, max σ) of
    the sigmas as passed, seeded with ``seed``. ``model_sampling`` is needed only when
    sigmas[0] >= 1: ComfyUI then starts from ``percent_to_sigma(1e-4)`` of the model's sampling.
    Both Brownian increments of a step start at σ_i, as in ComfyUI.
    """
    _check_sigmas(sigmas)
    _check_options(eta, s_noise, r)
    if len(sigmas) <= 1:
        return x
    add_noise = eta > 0 and s_noise > 0
    if noise_sampler is None and add_noise:
        if seed is None:
            raise ValueError("dpmpp_sde with eta, s_noise > 0 needs a noise_sampler or a seed")
        sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
        noise_sampler = brownian_tree_noise_sampler(x, sigma_min, sigma_max, seed, cpu=True)
    sigmas = _offset_first_sigma(sigmas, model_sampling)
    fac = 1 / (2 * r)

    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, _sigma_in(sigma, x))
        if callback is not None:
            callback(i, x, x0, sigma, sigma_next)
        if sigma_next == 0:
            x = x0
            continue

        lambda_s, lambda_t, lambda_1 = _midpoint(sigma, sigma_next, r)
        sigma_1 = _sigma_of_half_log_snr(lambda_1)
        alpha_s = sigma * lambda_s.exp()
        alpha_1 = sigma_1 * lambda_1.exp()
        alpha_t = sigma_next * lambda_t.exp()

        # Substep to σ1.
        sd, su = _ancestral_step(lambda_s.neg().exp(), lambda_1.neg().exp(), eta)
        h = sd.log().neg() - lambda_s
        x_1 = (alpha_1 / alpha_s) * (-h).exp() * x - alpha_1 * (-h).expm1() * x0
        if add_noise:
            assert noise_sampler is not None
            x_1 = x_1 + alpha_1 * noise_sampler(sigma, sigma_1) * s_noise * su
        x0_1 = denoiser(x_1, _sigma_in(sigma_1, x_1))

        # Full step to σ_{i+1} from the mix of both predictions (r = 1/2 → x0_1 alone).
        sd, su = _ancestral_step(lambda_s.neg().exp(), lambda_t.neg().exp(), eta)
        h = sd.log().neg() - lambda_s
        x0_mix = (1 - fac) * x0 + fac * x0_1
        x = (alpha_t / alpha_s) * (-h).exp() * x - alpha_t * (-h).expm1() * x0_mix
        if add_noise:
            assert noise_sampler is not None
            x = x + alpha_t * noise_sampler(sigma, sigma_next) * s_noise * su
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
}


def sample(
    name: str,
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    seed: int,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    noise_device: str = "auto",
    model_sampling: FlowSampling | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Run sampler ``name`` with the noise ComfyUI gives it for sampler seed ``seed``.

    euler_ancestral draws from ``ancestral_noise_sampler(x, seed, noise_device)``; dpmpp_sde from
    a Brownian tree over (min positive σ, max σ), on the CPU as ComfyUI's dpmpp_sde ("auto",
    "cpu") or on x's device as its dpmpp_sde_gpu ("cuda"). Each sampler gets only its options.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; supported: {', '.join(SAMPLERS)}")
    check_seed(seed)
    _check_options(eta, s_noise, r)
    _check_sigmas(sigmas)
    check_noise_device(noise_device)
    if name == "euler":
        return sample_euler(denoiser, x, sigmas, callback=callback)
    if name == "euler_ancestral":
        return sample_euler_ancestral(
            denoiser,
            x,
            sigmas,
            eta=eta,
            s_noise=s_noise,
            noise_sampler=ancestral_noise_sampler(x, seed, noise_device),
            callback=callback,
        )
    tree = None
    if noise_device == "cuda" and len(sigmas) > 1:
        # ComfyUI's dpmpp_sde_gpu: the Brownian tree lives on the GPU (not reproducible on CPU).
        positive = sigmas[sigmas > 0]
        tree = brownian_tree_noise_sampler(x, positive.min(), sigmas.max(), seed, cpu=False)
    return sample_dpmpp_sde(
        denoiser,
        x,
        sigmas,
        eta=eta,
        s_noise=s_noise,
        r=r,
        noise_sampler=tree,
        seed=seed,
        model_sampling=model_sampling,
        callback=callback,
    )


def evaluated_sigmas(
    name: str, sigmas: Tensor, r: float = 0.5, model_sampling: FlowSampling | None = None
) -> Tensor:
    """σ of every denoiser call sampler ``name`` makes on ``sigmas``, in call order.

    One call per step, plus dpmpp_sde's midpoint in each step that does not end at σ = 0.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; supported: {', '.join(SAMPLERS)}")
    steps = sigmas[:-1]
    if name != "dpmpp_sde" or len(steps) == 0:
        return steps
    steps = _offset_first_sigma(sigmas, model_sampling)[:-1]
    mids = iter(midpoint_sigmas_dpmpp_sde(sigmas, r, model_sampling).tolist())
    calls: list[float] = []
    for i, sigma in enumerate(steps.tolist()):
        calls.append(sigma)
        if sigmas[i + 1] != 0:
            calls.append(next(mids))
    return torch.tensor(calls, dtype=sigmas.dtype)
