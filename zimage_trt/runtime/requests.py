"""What a caller asks a pipeline for and what it gets back: typed requests and results.

A ``GenerateRequest`` names a workflow (or takes the pipeline's) and what to change in it —
prompt, negative prompt, trigger word, seeds; a ``Generation`` holds the final image, the last
latent, a report per stage, the seconds of each part and what the caches saved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import Tensor

from zimage_trt.workflow import Workflow

Progress = Callable[[str, int, int], None]  # (stage name, step, steps)


@dataclass
class GenerateRequest:
    """One generation: ``workflow`` (a preset name, a YAML path or a Workflow; None: the
    pipeline's own) with these overrides; ``seed`` as a list sets the first stages' seeds."""

    workflow: Workflow | str | Path | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    trigger_word: str | None = None
    seed: int | list[int] | None = None


@dataclass
class StageReport:
    name: str
    latent_shape: tuple[int, ...]
    model_calls: int
    calls_skipped: int
    seconds: float
    preview: np.ndarray | None = None


@dataclass
class CacheStats:
    """What one generation ran and what the caches saved it: text-encoder and caption-path runs
    (0 when the prompt cache held both prompts) and DiT calls EasyCache skipped."""

    text_encoder_calls: int
    caption_path_calls: int
    dit_calls: int
    dit_calls_skipped: int


@dataclass
class Generation:
    image: np.ndarray  # [H, W, 3] uint8
    latent: Tensor  # the last stage's VAE-space latent
    stages: list[StageReport]
    seconds: dict[str, float] = field(default_factory=dict)  # text, stages, decode
    paths: list[Path] = field(default_factory=list)
    cache: CacheStats | None = None
    workflow: Workflow | None = None  # the workflow that ran, overrides applied


def apply_overrides(
    wf: Workflow,
    *,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    trigger_word: str | None = None,
    seed: int | list[int] | None = None,
) -> Workflow:
    """Replace prompts and seeds in place (a ``seed`` list sets the first stages' seeds)."""
    if prompt is not None:
        wf.prompts.positive = prompt
    if trigger_word is not None:
        wf.prompts.trigger = trigger_word or None
    if negative_prompt is not None:
        wf.prompts.negative_file, wf.prompts.negative = None, negative_prompt
    seeds = [seed] if isinstance(seed, int) else list(seed or [])
    if len(seeds) > len(wf.stages):
        raise ValueError(f"{len(seeds)} seeds given for a workflow of {len(wf.stages)} stage(s)")
    for stage, value in zip(wf.stages, seeds, strict=False):
        stage.seed = value
    return wf
