"""One workflow stage, end to end around a model call: latent op → noise → sigmas → sampler.

This is ComfyUI's KSampler/SamplerCustom path (comfyui-semantics §1, §4.5, §7) with the network
left abstract: ``model`` is any ModelFn (an engine, the torch forward, or a synthetic model in
tests). Latents enter and leave in VAE space, so stages hand latents to each other as in ComfyUI.
A stage is given as plain parameters (``StageParams``); a workflow's ``Stage.params()`` makes
them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from zimage_trt.sampling.easycache import EasyCache
from zimage_trt.sampling.guider import CFGGuider, Cond, ModelFn
from zimage_trt.sampling.latents import (
    empty_latent,
    prepare_sampler_input,
    process_out,
    upscale_latent,
    upscale_latent_by,
)
from zimage_trt.sampling.model_sampling import FlowSampling, inverse_noise_scaling, noise_scaling
from zimage_trt.sampling.noise import initial_noise
from zimage_trt.sampling.samplers import Callback, sample

ImageEncoder = Callable[[str, int, int], Tensor]  # (path, width, height) → VAE-space latent


@dataclass(frozen=True)
class LatentInput:
    """Where a stage's latent comes from: ``empty`` (zeros of width×height px), ``upscale`` (the
    previous stage's latent to width×height px, or by ``scale``), or ``image`` (a picture
    VAE-encoded at width×height px)."""

    source: str
    width: int | None = None
    height: int | None = None
    scale: float | None = None
    method: str = "nearest-exact"
    crop: str = "disabled"
    image: str | None = None


@dataclass(frozen=True)
class CacheParams:
    """EasyCache's window and threshold; ``model_sampling`` turns the percents into sigmas."""

    threshold: float
    start_percent: float
    end_percent: float
    model_sampling: FlowSampling


@dataclass(frozen=True, eq=False)
class StageParams:
    """One stage, as the sampling loop needs it: its input latent, its sigmas (after denoise
    truncation), the sampler and its options, CFG, the seed, the noise device and EasyCache."""

    name: str
    latent: LatentInput
    sigmas: Tensor
    sampler: str
    model_sampling: FlowSampling = field(default_factory=FlowSampling)
    cfg: float = 1.0
    seed: int = 0
    add_noise: bool = True
    eta: float = 1.0
    s_noise: float = 1.0
    r: float = 0.5
    noise_device: str = "auto"
    cache: CacheParams | None = None

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


@dataclass
class StageResult:
    latent: Tensor  # VAE space, float32, on the CPU (ComfyUI's intermediate device)
    model_calls: int  # DiT calls actually run (EasyCache skips excluded)
    cache: EasyCache | None


def stage_input_latent(
    stage: StageParams, previous: Tensor | None, encode_image: ImageEncoder | None = None
) -> Tensor:
    """The VAE-space latent a stage starts from: empty, an upscale of ``previous``, or an image."""
    src = stage.latent
    if src.source == "empty":
        assert src.width is not None and src.height is not None
        return empty_latent(src.width, src.height)
    if src.source == "image":
        if encode_image is None:
            raise ValueError(
                f"stage {stage.name!r} starts from an image ({src.image}); that "
                "needs the VAE encoder, which this runner was not given"
            )
        assert src.image is not None and src.width is not None and src.height is not None
        return encode_image(src.image, src.width, src.height)
    if previous is None:
        raise ValueError(
            f"stage {stage.name!r} upscales the previous stage's latent, but there "
            "is no previous stage"
        )
    if src.scale is not None:
        return upscale_latent_by(previous, src.scale, src.method)
    assert src.width is not None and src.height is not None
    return upscale_latent(previous, src.width, src.height, src.method, src.crop)


def sample_stage(
    stage: StageParams,
    latent: Tensor,
    model: ModelFn,
    cond: Cond,
    uncond: Cond | None,
    *,
    device: torch.device | str = "cpu",
    model_dtype: torch.dtype = torch.bfloat16,
    callback: Callback | None = None,
) -> StageResult:
    """Sample one stage from its VAE-space input latent; returns the VAE-space output."""
    sigmas = stage.sigmas.to(device)
    if len(sigmas) <= 1:  # denoise 0: ComfyUI returns the latent untouched
        return StageResult(latent, 0, None)

    # Noise is drawn on the CPU from the stage seed, whatever the device (ComfyUI prepare_noise).
    noise = initial_noise(latent.shape, stage.seed) if stage.add_noise else torch.zeros_like(latent)
    x = noise_scaling(sigmas[0], noise.to(device), prepare_sampler_input(latent).to(device))

    cache = None
    if stage.cache is not None:
        c = stage.cache
        cache = EasyCache.from_percents(
            c.threshold, c.start_percent, c.end_percent, c.model_sampling
        )
        model = cache.wrap(model)
    guider = CFGGuider(model, cond, uncond, stage.cfg, model_dtype)

    def run() -> Tensor:
        return sample(
            stage.sampler,
            guider,
            x,
            sigmas,
            seed=stage.seed,
            eta=stage.eta,
            s_noise=stage.s_noise,
            r=stage.r,
            noise_device=stage.noise_device,
            model_sampling=stage.model_sampling,
            callback=callback,
        )

    if cache is not None:
        with cache.run(len(sigmas) - 1):
            out = run()
    else:
        out = run()
    out = process_out(inverse_noise_scaling(sigmas[-1], out).float())
    calls = guider.model_calls - (cache.calls_skipped if cache is not None else 0)
    return StageResult(out.cpu(), calls, cache)
