"""Latent tensors: the Flux latent format and ComfyUI's latent nodes.

Between stages latents live in VAE space ([B, 16, H/8, W/8], float32); the sampler works in
model space. ``prepare_sampler_input`` / ``process_out`` convert at the sampler's edges, as
ComfyUI's ``CFGGuider.inner_sample`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LATENT_CHANNELS = 16
VAE_SCALE = 8  # pixels per latent element along each side

# Flux latent format (comfy/latent_formats.py, class Flux)
SCALE_FACTOR = 0.3611
SHIFT_FACTOR = 0.1159

MIN_SIDE = 16
MAX_SIDE = 16384  # ComfyUI's MAX_RESOLUTION
SIDE_MULTIPLE = 16  # this project's rule: 2×2 patches of 8× latents

UPSCALE_METHODS: tuple[str, ...] = ("nearest-exact", "bilinear", "area", "bicubic")
CROP_MODES: tuple[str, ...] = ("disabled", "center")


def process_in(z: Tensor) -> Tensor:
    """VAE space → model space."""
    return (z - SHIFT_FACTOR) * SCALE_FACTOR


def process_out(z: Tensor) -> Tensor:
    """Model space → VAE space."""
    return z / SCALE_FACTOR + SHIFT_FACTOR


def prepare_sampler_input(latent: Tensor) -> Tensor:
    """The latent the sampler starts from: process_in, except that an all-zero latent stays zero.

    ComfyUI skips the shift for an empty latent, so text-to-image starts from pure noise rather
    than noise plus a constant −0.1159·0.3611 offset.
    """
    if torch.count_nonzero(latent) > 0:
        return process_in(latent)
    return latent


def _check_side(name: str, value: int) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not MIN_SIDE <= value <= MAX_SIDE
        or value % SIDE_MULTIPLE
    ):
        raise ValueError(
            f"{name} must be a multiple of {SIDE_MULTIPLE} in [{MIN_SIDE}, {MAX_SIDE}] pixels, "
            f"got {value!r}"
        )


def empty_latent(width: int, height: int, batch: int = 1) -> Tensor:
    """EmptySD3LatentImage: zeros [batch, 16, height//8, width//8], float32."""
    _check_side("width", width)
    _check_side("height", height)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    shape = (batch, LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE)
    return torch.zeros(shape, dtype=torch.float32)


def _check_latent(samples: Tensor) -> None:
    if samples.ndim != 4:
        raise ValueError(f"expected a [B, C, H, W] latent, got shape {list(samples.shape)}")


def _center_crop_to_aspect(samples: Tensor, width: int, height: int) -> Tensor:
    """Crop equal margins from the source so its aspect ratio matches width:height."""
    old_h, old_w = samples.shape[-2:]
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:  # too wide: trim left and right
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:  # too tall: trim top and bottom
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return samples[..., y : old_h - y, x : old_w - x]


def common_upscale(
    samples: Tensor, width: int, height: int, method: str = "nearest-exact", crop: str = "disabled"
) -> Tensor:
    """Resize a [B, C, H, W] latent to [B, C, height, width] (latent units).

    "nearest-exact" copies elements (source index min(floor((dst + 0.5)·in/out), in − 1)), so it
    commutes with the per-element latent format maps. crop="center" first trims the source to
    the target aspect ratio.
    """
    _check_latent(samples)
    if method not in UPSCALE_METHODS:
        raise ValueError(
            f"upscale method {method!r} is not supported; choose one of: "
            + ", ".join(UPSCALE_METHODS)
        )
    if crop not in CROP_MODES:
        raise ValueError(f"unknown crop {crop!r}; choose one of: {', '.join(CROP_MODES)}")
    if width < 1 or height < 1:
        raise ValueError(f"target latent size must be >= 1, got {width}×{height}")
    source = _center_crop_to_aspect(samples, width, height) if crop == "center" else samples
    return F.interpolate(source, size=(height, width), mode=method)


def upscale_latent(
    samples: Tensor,
    width: int,
    height: int,
    method: str = "nearest-exact",
    crop: str = "disabled",
) -> Tensor:
    """LatentUpscale: resize to width×height *pixels* (each clamped to >= 64).

    A side given as 0 follows the source aspect ratio; both 0 returns the latent unchanged.
    """
    _check_latent(samples)
    for name, value in (("width", width), ("height", height)):
        if not 0 <= value <= MAX_SIDE:
            raise ValueError(f"{name} must be in [0, {MAX_SIDE}] pixels, got {value!r}")
    if width == 0 and height == 0:
        return samples
    lat_h, lat_w = samples.shape[-2:]
    if width == 0:
        height = max(64, height)
        width = max(64, round(lat_w * height / lat_h))
    elif height == 0:
        width = max(64, width)
        height = max(64, round(lat_h * width / lat_w))
    else:
        width, height = max(64, width), max(64, height)
    return common_upscale(samples, width // VAE_SCALE, height // VAE_SCALE, method, crop)


def upscale_latent_by(samples: Tensor, scale_by: float, method: str = "nearest-exact") -> Tensor:
    """LatentUpscaleBy: new size round(W·scale_by) × round(H·scale_by) in latent units."""
    _check_latent(samples)
    if not scale_by > 0:
        raise ValueError(f"scale_by must be > 0, got {scale_by!r}")
    lat_h, lat_w = samples.shape[-2:]
    return common_upscale(samples, round(lat_w * scale_by), round(lat_h * scale_by), method)
