"""What a workflow will do, stage by stage: shapes, tokens, schedules, DiT calls, cache windows.

Computed without any network, so ``zimage-trt workflow validate`` can show it before a build.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from zimage_trt.sampling.easycache import easycache_window
from zimage_trt.sampling.latents import VAE_SCALE
from zimage_trt.sampling.samplers import evaluated_sigmas
from zimage_trt.text_table import text_table
from zimage_trt.workflow.spec import Stage, Workflow

PATCH = 2
TOKEN_MULTIPLE = 32


def padded(n: int, multiple: int = TOKEN_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class StagePlan:
    name: str
    latent_hw: tuple[int, int]
    image_tokens: int
    sigmas: list[float]
    evaluations: list[float]  # σ of every guided denoiser call, in order
    window: list[str] | None  # EasyCache class of each evaluation: before / window / after

    @property
    def pixel_wh(self) -> tuple[int, int]:
        return self.latent_hw[1] * VAE_SCALE, self.latent_hw[0] * VAE_SCALE


def plan_stage(stage: Stage, latent_hw: tuple[int, int]) -> StagePlan:
    sigmas = stage.sigmas()
    # the stage's model sampling, as the run passes it: dpmpp_sde needs it where sigmas[0] >= 1
    calls = evaluated_sigmas(stage.sampler.name, sigmas, stage.sampler.r, stage.model_sampling)
    evaluations = [float(s) for s in calls]
    cache_ms = stage.cache_sampling()
    window = None
    if stage.cache is not None and cache_ms is not None:
        start = cache_ms.percent_to_sigma(stage.cache.start_percent)
        end = cache_ms.percent_to_sigma(stage.cache.end_percent)
        window = easycache_window(evaluations, start, end)
    h, w = latent_hw
    return StagePlan(
        stage.name,
        latent_hw,
        (h // PATCH) * (w // PATCH),
        [float(s) for s in sigmas],
        evaluations,
        window,
    )


def plan_workflow(wf: Workflow) -> list[StagePlan]:
    return [plan_stage(s, hw) for s, hw in zip(wf.stages, wf.latent_sizes(), strict=True)]


def stage_table(wf: Workflow) -> str:
    rows = [
        (
            "stage",
            "pixels",
            "latent",
            "img tokens",
            "sampler",
            "schedule",
            "sigmas",
            "DiT calls",
            "EasyCache window",
        )
    ]
    for stage, plan in zip(wf.stages, plan_workflow(wf), strict=True):
        passes = 1 if math.isclose(stage.cfg, 1.0) else 2  # ComfyUI's cfg-1 rule
        calls = len(plan.evaluations) * passes
        sched = stage.scheduler
        window = "-"
        if plan.window is not None:
            inside = [i for i, w in enumerate(plan.window) if w == "window"]
            window = f"calls {inside[0]}-{inside[-1]} of {len(plan.window)}" if inside else "empty"
        sig = plan.sigmas
        rows.append(
            (
                stage.name or "-",
                "{}×{}".format(*plan.pixel_wh),
                "16×{}×{}".format(*plan.latent_hw),
                f"{plan.image_tokens}→{padded(plan.image_tokens)}",
                f"{stage.sampler.name} cfg {stage.cfg:g}",
                f"{sched.name} {sched.steps}@{sched.denoise:g} shift {stage.shift:g}",
                f"{len(sig)}: {sig[0]:.4f}…{sig[-1]:.4f}" if sig else "0",
                f"{calls}" + (" (cond+uncond)" if passes == 2 else ""),
                window,
            )
        )
    return text_table(rows)
