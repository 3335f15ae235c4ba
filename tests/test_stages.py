"""A stage end to end around a synthetic model: latent op, noise, sigmas, sampler, cache."""

from __future__ import annotations

import torch
from comfy_reference import STAGE2_SIGMAS
from torch import Tensor

from zimage_trt.sampling.guider import Cond
from zimage_trt.sampling.latents import process_in, process_out
from zimage_trt.sampling.noise import initial_noise
from zimage_trt.sampling.samplers import evaluated_sigmas
from zimage_trt.sampling.stage import sample_stage, stage_input_latent
from zimage_trt.workflow import Workflow, load_workflow

COND = Cond("cond", torch.zeros(1, 12, 8))
UNCOND = Cond("uncond", torch.zeros(1, 40, 8))


class TargetModel:
    """Returns the velocity that makes x0 equal a fixed target (model space)."""

    def __init__(self, target: Tensor) -> None:
        self.target = target
        self.sigmas: list[float] = []

    def __call__(self, x: Tensor, sigma: Tensor, context: Tensor, names: tuple[str, ...]) -> Tensor:
        self.sigmas.append(float(sigma[0]))
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        return ((x - self.target.to(x.dtype)) / s).to(x.dtype)


class SmoothModel:
    """v = a(σ)·x + b(σ)·ramp: output changes slowly and predictably with σ."""

    def __call__(self, x: Tensor, sigma: Tensor, context: Tensor, names: tuple[str, ...]) -> Tensor:
        s = sigma.reshape(-1, 1, 1, 1).float()
        ramp = torch.linspace(-1, 1, x.shape[-1]).expand_as(x)
        return (0.1 * x.float() + (1.0 + 0.05 * s) * ramp).to(x.dtype)


def single_stage(**stage: object) -> Workflow:
    base: dict = {
        "latent": {"source": "empty", "width": 64, "height": 48},
        "sampler": {"name": "euler"},
        "scheduler": {"name": "simple", "steps": 6},
        "seed": 7,
    }
    base.update(stage)
    return Workflow.from_dict({"stages": [base]})


def test_empty_latent_starts_from_pure_noise_and_lands_on_target() -> None:
    stage = single_stage().stages[0].params()
    latent = stage_input_latent(stage, None)
    assert latent.shape == (1, 16, 6, 8) and not latent.any()
    target = torch.linspace(-1, 1, 16 * 6 * 8).reshape(1, 16, 6, 8)
    starts: list[Tensor] = []
    result = sample_stage(
        stage,
        latent,
        TargetModel(target),
        COND,
        None,
        model_dtype=torch.float32,
        callback=lambda i, x, x0, s, sn: starts.append(x) if i == 0 else None,
    )
    # σ0 = 1 and an all-zero latent is not process_in'd: x starts as the seed's noise exactly.
    torch.testing.assert_close(starts[0], initial_noise((1, 16, 6, 8), 7), atol=0, rtol=0)
    torch.testing.assert_close(result.latent, process_out(target), atol=1e-5, rtol=0)
    assert result.model_calls == 6 and result.cache is None


def test_partial_denoise_mixes_noise_and_process_in_latent() -> None:
    stage = (
        single_stage(scheduler={"name": "flow_match_linear", "steps": 16, "denoise": 0.7})
        .stages[0]
        .params()
    )
    latent = torch.full((1, 16, 6, 8), 0.5)
    starts: list[Tensor] = []
    sample_stage(
        stage,
        latent,
        TargetModel(torch.zeros(1, 16, 6, 8)),
        COND,
        None,
        model_dtype=torch.float32,
        callback=lambda i, x, x0, s, sn: starts.append(x) if i == 0 else None,
    )
    sigma0 = STAGE2_SIGMAS[0]
    expected = sigma0 * initial_noise((1, 16, 6, 8), 7) + (1 - sigma0) * process_in(latent)
    torch.testing.assert_close(starts[0], expected, atol=1e-6, rtol=0)


def test_denoise_zero_returns_the_latent_untouched() -> None:
    stage = (
        single_stage(scheduler={"name": "simple", "steps": 4, "denoise": 0.0}).stages[0].params()
    )
    latent = torch.randn(1, 16, 6, 8)
    result = sample_stage(stage, latent, SmoothModel(), COND, None)
    assert result.latent is latent and result.model_calls == 0


def test_image_stage_without_encoder_is_a_clear_error() -> None:
    stage = (
        single_stage(latent={"source": "image", "image": "in.png", "width": 64, "height": 48})
        .stages[0]
        .params()
    )
    try:
        stage_input_latent(stage, None)
    except ValueError as exc:
        assert str(exc) == (
            "stage '' starts from an image (in.png); that needs the VAE encoder, "
            "which this runner was not given"
        )
    else:
        raise AssertionError("expected a ValueError")


def test_reference_workflow_runs_all_three_stages() -> None:
    wf = load_workflow("zimage-121101")
    model = SmoothModel()
    latent = None
    shapes, calls, skips = [], [], []
    for spec in wf.stages:
        stage = spec.params()
        latent_in = stage_input_latent(stage, latent)
        uncond = UNCOND if stage.cfg != 1.0 else None
        result = sample_stage(stage, latent_in, model, COND, uncond)
        latent = result.latent
        evaluations = len(evaluated_sigmas(stage.sampler, stage.sigmas))
        passes = 2 if uncond is not None else 1
        skipped = result.cache.calls_skipped if result.cache else 0
        assert result.model_calls + skipped == evaluations * passes
        if result.cache is not None:
            # Skips only inside the window and never on its first two calls (§9.3, §16).
            first_in_window = {"refine": 0, "upscale": 14}[stage.name]
            last_in_window = {"refine": 12, "upscale": 26}[stage.name]
            skip_at = [i for i, a in enumerate(result.cache.actions) if a == "skip"]
            assert all(first_in_window + 2 <= i <= last_in_window for i in skip_at)
        shapes.append(tuple(latent.shape))
        calls.append(result.model_calls)
        skips.append(skipped)
        assert torch.isfinite(latent).all() and latent.dtype == torch.float32
    assert shapes == [(1, 16, 28, 22), (1, 16, 54, 42), (1, 16, 108, 84)]
    assert calls[0] == 18  # 9 steps × (cond + uncond), separate calls (caption lengths differ)
    assert skips[1] > 0 and skips[2] > 0  # this slowly-changing model is cacheable
