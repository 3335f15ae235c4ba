"""What a caller asks a pipeline for and what it gets back: typed requests and results.

A ``GenerateRequest`` names a workflow (or takes the pipeline's) and what to change in it —
prompt, negative prompt, trigger word, seeds; a ``Generation`` holds the final image, the last
latent, a report per stage, the seconds of each part and what the caches saved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import Tensor

from zimage_trt.errors import InputError
from zimage_trt.sampling.noise import SEED_MAX
from zimage_trt.workflow import Workflow, load_workflow

DEFAULT_WORKFLOW = "zimage-turbo"

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
    source: str = ""  # where it came from, named in its errors (e.g. "prompts.jsonl:3")

    @contextmanager
    def named(self) -> Iterator[None]:
        """Errors raised inside name the request's source."""
        try:
            yield
        except ValueError as exc:
            if self.source and exc.args and isinstance(exc.args[0], str):
                exc.args = (f"{self.source}: {exc.args[0]}", *exc.args[1:])
            raise

    def workflow_for(self, default: Workflow | None) -> Workflow:
        """The workflow this request runs: its own or ``default`` (else zimage-turbo), copied,
        with the overrides applied."""
        source = self.workflow if self.workflow is not None else default
        if source is None:
            source = DEFAULT_WORKFLOW
        wf = load_workflow(source) if isinstance(source, str | Path) else source
        return apply_overrides(
            wf.model_copy(deep=True), prompt=self.prompt, negative_prompt=self.negative_prompt,
            trigger_word=self.trigger_word, seed=self.seed,
        )  # fmt: skip


@dataclass
class StageReport:
    name: str
    latent_shape: tuple[int, ...]
    model_calls: int
    calls_skipped: int
    seconds: float
    preview: np.ndarray | None = None
    latent: Tensor | None = None  # the stage's result (VAE space)


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
    """Replace prompts and seeds in place (a ``seed`` list sets the first stages' seeds); a value
    of the wrong type or range is refused naming it."""
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt),
                       ("trigger_word", trigger_word)):  # fmt: skip
        if text is not None and not isinstance(text, str):
            raise InputError(f"{name} {text!r} must be a string")
    if prompt is not None:
        wf.prompts.positive = prompt
    if trigger_word is not None:
        wf.prompts.trigger = trigger_word or None
    if negative_prompt is not None:
        wf.prompts.negative_file, wf.prompts.negative = None, negative_prompt
    seeds = _seeds(seed)
    if len(seeds) > len(wf.stages):
        raise InputError(f"{len(seeds)} seeds given for a workflow of {len(wf.stages)} stage(s)")
    for stage, value in zip(wf.stages, seeds, strict=False):
        stage.seed = value
    return wf


def _seeds(seed: object) -> list[int]:
    values = [] if seed is None else list(seed) if isinstance(seed, list | tuple) else [seed]
    seeds = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"seed {seed!r} must be an integer or a list of integers")
        if not 0 <= value <= SEED_MAX:
            raise InputError(f"seed {value} is outside 0 … {SEED_MAX}")
        seeds.append(value)
    return seeds
