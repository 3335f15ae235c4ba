"""Flow-matching model sampling: ComfyUI's ``ModelSamplingDiscreteFlow`` + ``CONST``.

Z-Image is a rectified-flow model: x_σ = σ·ε + (1−σ)·x0 and the network predicts the velocity
v = ε − x0, so x0 = x − σ·v. ``ModelSamplingAuraFlow(shift)`` is this object with another shift
and multiplier 1.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

NUM_TIMESTEPS = 1000


def time_snr_shift(shift: float, t: Tensor | float) -> Tensor | float:
    """σ = shift·t / (1 + (shift−1)·t); the identity for shift 1 (ComfyUI skips the arithmetic)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def _per_sample(sigma: Tensor, like: Tensor) -> Tensor:
    """Reshape σ[B] (or a 0-d σ) so it broadcasts over a [B, C, H, W] tensor."""
    return sigma.reshape(sigma.shape[:1] + (1,) * (like.ndim - 1)) if sigma.ndim else sigma


@dataclass(frozen=True)
class FlowSampling:
    """Shift and multiplier of a flow model; Z-Image's own are 3.0 and 1.0."""

    shift: float = 3.0
    multiplier: float = 1.0

    def __post_init__(self) -> None:
        for name in ("shift", "multiplier"):
            value = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

    def sigma(self, timestep: Tensor) -> Tensor:
        out = time_snr_shift(self.shift, timestep / self.multiplier)
        assert isinstance(out, Tensor)
        return out

    def timestep(self, sigma: Tensor) -> Tensor:
        return sigma * self.multiplier

    @cached_property
    def sigmas(self) -> Tensor:
        """The 1000-entry float32 table: sigmas[i] = sigma((i+1)/1000 · multiplier)."""
        steps = torch.arange(1, NUM_TIMESTEPS + 1, 1) / NUM_TIMESTEPS
        return self.sigma(steps * self.multiplier)

    @property
    def sigma_min(self) -> Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> Tensor:
        return self.sigmas[-1]

    def percent_to_sigma(self, percent: float) -> float:
        """Sampling progress (0 = start, 1 = end) → σ, as a Python float (EasyCache's windows)."""
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(time_snr_shift(self.shift, 1.0 - percent))


def noise_scaling(sigma: Tensor, noise: Tensor, latent: Tensor) -> Tensor:
    """The sampler's starting point: σ·noise + (1−σ)·latent."""
    s = _per_sample(sigma, noise)
    return s * noise + (1.0 - s) * latent


def inverse_noise_scaling(sigma: Tensor, latent: Tensor) -> Tensor:
    """latent / (1−σ); applied with the last σ (0), so the identity for full schedules."""
    return latent / (1.0 - _per_sample(sigma, latent))


def calculate_denoised(sigma: Tensor, model_output: Tensor, model_input: Tensor) -> Tensor:
    """x0 = x − σ·v."""
    return model_input - model_output * _per_sample(sigma, model_input)
