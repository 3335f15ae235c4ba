"""Noise exactly as ComfyUI draws it: the initial latent noise and the samplers' per-step noise.

A noise sampler is a callable ``(sigma, sigma_next) -> Tensor`` shaped like x (k-diffusion's
convention). Every draw uses its own ``torch.Generator`` (or torchsde tree), so nothing here
touches torch's global RNG state.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torchsde
from torch import Tensor

NoiseSampler = Callable[[Tensor | float, Tensor | float], Tensor]

SEED_MAX = 0xFFFF_FFFF_FFFF_FFFF  # ComfyUI's seed widgets accept 0 .. 2**64 − 1
NOISE_DEVICES = ("auto", "cpu", "cuda")


def check_seed(seed: int) -> int:
    """Return ``seed`` if it is an int in ComfyUI's range 0 .. 2**64 − 1, else raise ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an integer in [0, 2**64 - 1 = {SEED_MAX}], got {seed!r}")
    return seed


def check_noise_device(device: str) -> str:
    """Return ``device`` if it is one of ``NOISE_DEVICES``, else raise ValueError."""
    if device not in NOISE_DEVICES:
        raise ValueError(f"noise device must be one of {', '.join(NOISE_DEVICES)}, got {device!r}")
    return device


def _generator(device: torch.device | str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def initial_noise(shape: Sequence[int], seed: int) -> Tensor:
    """ComfyUI's ``prepare_noise``: float32 randn on CPU from a generator seeded with ``seed``.

    ComfyUI seeds the global CPU generator; a fresh CPU generator with the same seed yields the
    same values, so the noise does not depend on the GPU.
    """
    gen = _generator("cpu", check_seed(seed))
    return torch.randn(tuple(shape), dtype=torch.float32, device="cpu", generator=gen)


def ancestral_noise_sampler(x: Tensor, seed: int, device: str = "auto") -> NoiseSampler:
    """ComfyUI's ``default_noise_sampler``: one fresh randn draw shaped like x per call.

    ComfyUI seeds its generator with ``seed + 1`` when x is on CPU and with ``seed`` on any other
    device. ``device`` picks where to draw:

    - ``"auto"``: on x's device (ComfyUI's behaviour);
    - ``"cpu"``: always on CPU with ``seed + 1``, then moved to x's device — the same numbers on
      every machine, equal to a CPU ComfyUI run;
    - ``"cuda"``: on CUDA with ``seed`` — the CUDA Philox stream of a GPU ComfyUI run.
    """
    check_seed(seed)
    if check_noise_device(device) == "auto":
        draw_device = x.device
    elif device == "cuda":
        draw_device = x.device if x.device.type == "cuda" else torch.device("cuda")
    else:
        draw_device = torch.device("cpu")
    # seed + 1 wraps for the one seed where ComfyUI itself fails (2**64 − 1 overflows torch).
    draw_seed = (seed + 1) & SEED_MAX if draw_device.type == "cpu" else seed
    gen = _generator(draw_device, draw_seed)

    def sample(sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
        noise = torch.randn(x.shape, dtype=torch.float32, device=draw_device, generator=gen)
        return noise.to(device=x.device, dtype=x.dtype)

    return sample


def brownian_tree_noise_sampler(
    x: Tensor,
    sigma_min: Tensor | float,
    sigma_max: Tensor | float,
    seed: int,
    cpu: bool = True,
) -> NoiseSampler:
    """ComfyUI's ``BrownianTreeNoiseSampler`` (identity transform, one tree, ``entropy=seed``).

    A call ``ns(a, b)`` returns the Brownian increment ``(W(b) − W(a)) / sqrt(|b − a|)``, a unit
    normal whose values depend only on the seed and the two times, not on the query order.
    Times are float32, as ComfyUI hands torchsde float32 tensors. ``cpu=True`` (dpmpp_sde) builds
    the tree on CPU, which makes GPU runs reproducible on any machine; ``cpu=False``
    (dpmpp_sde_gpu) builds it on x's device.
    """
    check_seed(seed)
    tree_device = torch.device("cpu") if cpu else x.device

    def as_time(t: Tensor | float) -> Tensor:
        return torch.as_tensor(t).detach().to(device=tree_device, dtype=torch.float32)

    t0, t1 = as_time(sigma_min), as_time(sigma_max)
    # torchsde needs t0 < t1; a reversed range flips the sign of every increment.
    tree_sign = 1.0 if t0 < t1 else -1.0
    t0, t1 = torch.minimum(t0, t1), torch.maximum(t0, t1)
    w0 = torch.zeros(x.shape, dtype=torch.float32, device=tree_device)
    tree = torchsde.BrownianTree(t0, w0, t1, entropy=seed, tol=1e-6, pool_size=24)

    def sample(sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
        a, b = as_time(sigma), as_time(sigma_next)
        sign = tree_sign if a < b else -tree_sign
        with warnings.catch_warnings():
            # torchsde rounds the tree's ends to tol's digits, so a query at σ_max lands a hair
            # past the end and is clamped back with a warning; ComfyUI gets the same clamp.
            warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
            w = tree(torch.minimum(a, b), torch.maximum(a, b)) * sign
        return (w / (b - a).abs().sqrt()).to(device=x.device, dtype=x.dtype)

    return sample
