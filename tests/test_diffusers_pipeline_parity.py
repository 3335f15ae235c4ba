"""The zimage-turbo preset end to end against diffusers' ``ZImagePipeline`` on the tiny weights.

Our runtime (tokenizer → text encoder → DiT sampling → VAE) and diffusers' pipeline run the same
tiny model folder from the same prompt embeddings and the same initial noise; the final latents
must agree to fp32 rounding. The prompt embeddings come from OUR text encoder so that the check
is about sampling (schedule, timestep convention, Euler update, latent format), not tokenizers.

The preset's ``diffusers_zimage`` schedule with steps 9 is diffusers' (0.42) default for
``num_inference_steps=9``: float32 ``linspace(1, 1/9, 9)`` shifted by 3, then 0, 9 DiT calls.
Older diffusers (before PR #13730, "Fix redundant Z-Image terminal timestep") spaced the steps
down to σ = 0 and spent the 9th call on a σ 0 → 0 step — the model card's "9 steps = 8 DiT
forwards"; ours reproduces that run with 8 steps and 8 calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from zimage_trt.models.tiny import make_tiny
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.runtime.requests import Generation
from zimage_trt.sampling.latents import process_out
from zimage_trt.sampling.noise import initial_noise
from zimage_trt.workflow import Workflow, load_workflow

PRESET = "zimage-turbo"
ATOL = 1e-4  # VAE space (model space × 1/0.3611); fp32 rounding gives ~2e-5 over 9 steps
CPU = torch.device("cpu")


def _require_current_diffusers() -> None:
    from diffusers.pipelines.z_image import pipeline_z_image

    assert hasattr(pipeline_z_image, "get_default_z_image_sigmas"), (
        "this check needs diffusers with the Z-Image terminal-timestep fix (PR #13730, 0.42+)"
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny")).root


@pytest.fixture(scope="module")
def ours(model_dir: Path) -> Pipeline:
    wf = load_workflow(PRESET)
    return Pipeline.open(
        model=model_dir, workflow=wf, device=CPU, dtype=torch.float32, log=lambda msg: None
    )


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> Any:
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(model_dir)  # the tiny weights are stored fp32
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.dtype == torch.float32 and pipe.vae.dtype == torch.float32
    return pipe


def _preset(side: int | None = None) -> Workflow:
    """The preset, optionally at side×side instead of its 1024×1024."""
    wf = load_workflow(PRESET)
    stage = wf.stages[0]
    # the preset is what this file pins: if it changes, these checks must be revisited
    assert len(wf.stages) == 1 and stage.sampler.name == "euler" and stage.cfg == 1.0
    assert stage.scheduler.name == "diffusers_zimage" and stage.scheduler.steps == 9
    assert stage.latent.source == "empty" and stage.seed == 42 and stage.shift == 3.0
    assert (stage.latent.width, stage.latent.height) == (1024, 1024)
    if side is not None:
        stage.latent.width = stage.latent.height = side
    return wf


@dataclass
class OracleRun:
    latent: Tensor  # diffusers' final latents, its model space (what output_type="latent" gives)
    images: Any  # whatever output_type asked for
    sigmas: Tensor  # the scheduler's sigmas for the run, terminal 0 included
    transformer_calls: int


@pytest.fixture
def count_calls(oracle: Any) -> Iterator[list[int]]:
    """Counts diffusers' transformer forwards (one per element of the returned list)."""
    calls = [0]
    forward = oracle.transformer.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return forward(*args, **kwargs)

    oracle.transformer.forward = counted
    try:
        yield calls
    finally:
        del oracle.transformer.forward  # back to the class's method


def _run_oracle(
    oracle: Any, wf: Workflow, hidden: Tensor, calls: list[int], **kwargs: Any
) -> OracleRun:
    """diffusers on our prompt embeddings and our initial noise, no CFG."""
    stage = wf.stages[0]
    assert stage.latent.width is not None and stage.latent.height is not None
    width, height = stage.latent.width, stage.latent.height
    # σ0 = 1 and an empty latent: our sampler starts from the noise itself (noise_scaling)
    noise = initial_noise((1, 16, height // 8, width // 8), stage.seed)
    final: list[Tensor] = []

    def keep_latents(pipe: Any, i: int, t: Tensor, tensors: dict[str, Tensor]) -> dict[str, Any]:
        final[:] = [tensors["latents"].clone()]  # after the step: the last one is the result
        return {}

    calls[0] = 0
    out = oracle(
        prompt_embeds=[hidden[0]],  # a list of [L, C] per image, padding already removed
        guidance_scale=0.0,  # cfg 1: diffusers skips the unconditional pass only at 0
        latents=noise.clone(),  # prepare_latents only checks the shape and moves it
        height=height,
        width=width,
        callback_on_step_end=keep_latents,
        **kwargs,
    )
    return OracleRun(final[0], out.images, oracle.scheduler.sigmas.clone(), calls[0])


def _max_diff(ours_vae_space: Tensor, diffusers_model_space: Tensor) -> float:
    # output_type="latent" returns the model-space latents, before the pipeline's own
    # `latents / scaling_factor + shift_factor`: that is our process_out (Flux 0.3611, 0.1159)
    reference = process_out(diffusers_model_space.float())
    assert ours_vae_space.shape == reference.shape
    return float((ours_vae_space - reference).abs().max())


def _check_schedule(wf: Workflow, ref: OracleRun, steps: int) -> None:
    """diffusers ran our sigmas bit for bit, one transformer call per step."""
    _require_current_diffusers()
    assert ref.transformer_calls == steps == len(ref.sigmas) - 1
    assert torch.equal(ref.sigmas, wf.stages[0].sigmas())


@pytest.fixture(scope="module")
def run_256(ours: Pipeline) -> tuple[Workflow, Generation, Tensor]:
    wf = _preset(256)
    gen = ours.run(wf)
    return wf, gen, ours.prompts(wf.prompts.positive_text)


def test_oracle_uses_the_flux_latent_format(oracle: Any) -> None:
    assert oracle.vae.config.scaling_factor == pytest.approx(0.3611)
    assert oracle.vae.config.shift_factor == pytest.approx(0.1159)


def test_default_schedule_latents_and_image_256(
    run_256: tuple[Workflow, Generation, Tensor], oracle: Any, count_calls: list[int]
) -> None:
    """diffusers' default 9 steps = ours: sigmas, latents and pixels."""
    wf, gen, hidden = run_256
    steps = 9
    ref = _run_oracle(oracle, wf, hidden, count_calls, num_inference_steps=steps, output_type="np")

    _check_schedule(wf, ref, steps)
    assert gen.stages[0].model_calls == 9
    assert gen.latent.shape == (1, 16, 32, 32)
    assert _max_diff(gen.latent, ref.latent) <= ATOL

    # diffusers' "np" image is the VAE output mapped to [0, 1]; ours truncates ×255 to uint8
    theirs = (255.0 * ref.images[0]).clip(0, 255).astype(np.uint8)
    assert theirs.shape == gen.image.shape == (256, 256, 3)
    levels = np.abs(theirs.astype(np.int16) - gen.image.astype(np.int16))
    assert levels.max() <= 1  # a truncation boundary crossed by fp32 rounding, rarely
    assert (levels > 0).mean() < 1e-3


def test_model_card_nine_steps_256(ours: Pipeline, oracle: Any, count_calls: list[int]) -> None:
    """The card's "9 steps" as older diffusers ran them (σ spaced down to 0): 9 diffusers
    forwards, the 9th a σ 0 → 0 no-op; ours runs the same schedule as 8 steps, 8 calls."""
    wf = _preset(256)
    wf.stages[0].scheduler.steps = 8
    gen = ours.run(wf)
    hidden = ours.prompts(wf.prompts.positive_text)
    # diffusers shifts the sigmas it is given, so this is the unshifted linspace(1, 0, 9)
    card = torch.linspace(1.0, 0.0, 9).tolist()
    ref = _run_oracle(
        oracle, wf, hidden, count_calls, num_inference_steps=9, sigmas=card, output_type="latent"
    )

    assert ref.transformer_calls == 9
    assert gen.stages[0].model_calls == 8
    assert ref.sigmas.tolist()[-2:] == [0.0, 0.0]  # the 9th step goes from σ 0 to σ 0
    torch.testing.assert_close(ref.sigmas[:-1], wf.stages[0].sigmas(), rtol=0.0, atol=1e-7)
    assert torch.equal(ref.latent, ref.images)  # the callback saw the returned latents
    assert _max_diff(gen.latent, ref.latent) <= ATOL


def test_preset_size_1024(ours: Pipeline, oracle: Any, count_calls: list[int]) -> None:
    """The preset as it stands, 1024×1024: final latents [1, 16, 128, 128]."""
    wf = _preset()
    gen = ours.run(wf)
    hidden = ours.prompts(wf.prompts.positive_text)
    ref = _run_oracle(oracle, wf, hidden, count_calls, num_inference_steps=9, output_type="latent")
    _check_schedule(wf, ref, 9)
    assert gen.latent.shape == (1, 16, 128, 128)
    assert gen.stages[0].model_calls == 9
    assert _max_diff(gen.latent, ref.latent) <= ATOL
