"""A whole Workflow on one set of engines: prompts → captions → stages → VAE → images.

Free, exact reuse is claimed first: each prompt is encoded once (LRU by text) and its caption
path (embedder, pad tokens, context refiner) runs once per prompt for every step of every stage;
cfg = 1 runs no unconditional pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from zimage_trt import __version__
from zimage_trt.runtime.engines import Engines
from zimage_trt.runtime.guider import Cond
from zimage_trt.runtime.images import next_path, save_image, to_uint8
from zimage_trt.runtime.manifest import ProfileError, select_profile
from zimage_trt.runtime.stages import sample_stage, stage_input_latent
from zimage_trt.runtime.text import LRUCache, PromptEncoder
from zimage_trt.runtime.tokenizer import QwenTokenizer
from zimage_trt.workflow import Workflow

Progress = Callable[[str, int, int], None]  # (stage name, step, steps)


@dataclass
class StageReport:
    name: str
    latent_shape: tuple[int, ...]
    model_calls: int
    calls_skipped: int
    seconds: float
    preview: np.ndarray | None = None


@dataclass
class Generation:
    image: np.ndarray  # [H, W, 3] uint8
    latent: Tensor  # the last stage's VAE-space latent
    stages: list[StageReport]
    seconds: dict[str, float] = field(default_factory=dict)  # text, stages, decode
    paths: list[Path] = field(default_factory=list)


class Pipeline:
    """Runs Workflows on one set of engines; build it with `from_model` or `from_engines`.

    >>> pipe = Pipeline.from_model("Tongyi-MAI/Z-Image-Turbo")     # or a folder, or "tiny"
    >>> gen = pipe("a red fox in snow", workflow="zimage-121101", seed=[1, 2, 3])
    >>> gen.image.shape, gen.seconds                                # uint8 [H, W, 3], timings
    """

    def __init__(self, engines: Engines, tokenizer: QwenTokenizer, cache_size: int = 16) -> None:
        self.engines = engines
        self.prompts = PromptEncoder(tokenizer, self._encode_text, cache_size, engines.device)
        self._captions: LRUCache[tuple[Tensor, int]] = LRUCache(cache_size)
        self.caption_path_calls = 0

    @classmethod
    def from_engines(
        cls, engines: Engines, tokenizer: QwenTokenizer, cache_size: int = 16
    ) -> Pipeline:
        return cls(engines, tokenizer, cache_size)

    @classmethod
    def from_model(
        cls,
        model: str | Path,
        *,
        workflow: Workflow | str = "zimage-turbo",
        device: str = "auto",
        dtype: str = "auto",
        lora_ignore_unmatched: bool = False,
        compile: bool = False,
    ) -> Pipeline:
        """Load a model (folder, Hugging Face repo id from the local cache, or ``"tiny"``) on the
        torch backend, with the LoRAs of ``workflow`` fused in (``compile``: torch.compile each
        engine per stage shape)."""
        from zimage_trt.runtime.backends import load_torch_pipeline, pick_device, pick_dtype
        from zimage_trt.workflow import load_workflow

        wf = load_workflow(workflow) if isinstance(workflow, str) else workflow
        torch_device = pick_device(device)
        return load_torch_pipeline(
            wf,
            str(model),
            device=torch_device,
            dtype=pick_dtype(dtype, torch_device),
            lora_ignore_unmatched=lora_ignore_unmatched,
            compile=compile,
        )

    def __call__(
        self,
        prompt: str | None = None,
        *,
        workflow: Workflow | str = "zimage-turbo",
        negative_prompt: str | None = None,
        trigger_word: str | None = None,
        seed: int | list[int] | None = None,
        progress: Progress | None = None,
    ) -> Generation:
        """Run ``workflow`` (a preset name, a YAML path or a Workflow) with these overrides."""
        from zimage_trt.workflow import load_workflow

        if isinstance(workflow, str):
            wf = load_workflow(workflow)
        else:
            wf = workflow.model_copy(deep=True)
        apply_overrides(
            wf, prompt=prompt, negative_prompt=negative_prompt, trigger_word=trigger_word, seed=seed
        )
        return self.run(wf, progress)

    # -- engines behind the runtime's callables ------------------------------------------------
    def _encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.engines.text_encoder(input_ids=input_ids, attention_mask=attention_mask)[
            "hidden"
        ]

    def clear_caches(self) -> None:
        """Forget every cached prompt encoding and caption path output, so that the next request
        pays for its text in full (as a first request would); the call counters keep counting."""
        self.prompts.cache.clear()
        self._captions.clear()

    def caption(self, text: str, name: str) -> Cond:
        """The prompt's caption tokens (after the context refiner), cached by text."""
        tokens, length = self._captions.get_or_make(text, lambda: self._caption_path(text))
        return Cond(name, tokens, tokens=length)

    def _caption_path(self, text: str) -> tuple[Tensor, int]:
        hidden = self.prompts(text)
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        out = self.engines.caption_path(cap_feats=hidden.to(self.engines.dtype), cap_mask=mask)
        self.caption_path_calls += 1
        return out["cap_tokens"], hidden.shape[1]

    def model(
        self, x: Tensor, sigma: Tensor, context: Tensor, cond_names: tuple[str, ...]
    ) -> Tensor:
        """One DiT call (the guider's ModelFn): v in the model dtype."""
        valid = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        v = self.engines.denoiser(latents=x, sigma=sigma, cap_tokens=context, cap_valid=valid)
        return v["v"].to(x.dtype)

    def decode(self, latent: Tensor) -> np.ndarray:
        image = self.engines.vae_decoder(latents=latent.to(self.engines.device))["image"]
        return to_uint8(image)

    def encode_image(self, path: str, width: int, height: int) -> Tensor:
        if self.engines.vae_encoder is None:
            raise ValueError(
                f"the {self.engines.backend} engines have no VAE encoder; an image "
                f"input ({path}) needs one"
            )
        picture = Image.open(path).convert("RGB")
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)
        image = (pixels.permute(2, 0, 1)[None] * 2.0 - 1.0).to(self.engines.device)
        return self.engines.vae_encoder(image=image)["latents"].float().cpu()

    # -- the workflow ------------------------------------------------------------------------
    def preflight(self, wf: Workflow) -> None:
        """Every engine call the workflow will make, checked against the built profiles before
        any work (compiled engines only; ProfileError names the engine, shape and ranges)."""
        profiles = self.engines.profiles
        if not profiles:
            return
        needs_uncond = any(not math.isclose(s.cfg, 1.0) for s in wf.stages)
        texts = [wf.prompts.positive_text] + ([wf.prompts.negative_text()] if needs_uncond else [])
        tokens = [len(self.prompts.tokenizer.encode_prompt(t)) for t in texts]
        slots = [-(-n // 32) * 32 for n in tokens]
        hint = (
            f"zimage-trt build --model MODEL --workflow {wf.name}.yaml --backend "
            f"{self.engines.backend} --caption-max {max(max(tokens), 4096)} --out DIR"
        )
        calls: list[tuple[str, dict[str, tuple[int, ...]]]] = []
        for n in tokens:
            calls += [
                ("text_encoder", {"input_ids": (1, n)}),
                ("caption_path", {"cap_mask": (1, n)}),
            ]
        for i, (stage, (h, w)) in enumerate(zip(wf.stages, wf.latent_sizes(), strict=True)):
            uses = slots if not math.isclose(stage.cfg, 1.0) else slots[:1]
            batched = len(uses) == 2 and uses[0] == uses[1] and tokens[0] == tokens[1]
            for lc in uses[:1] if batched else uses:
                b = 2 if batched else 1
                calls.append(("denoiser", {"latents": (b, 16, h, w), "cap_valid": (b, lc)}))
            if stage.preview or i == len(wf.stages) - 1:
                calls.append(("vae_decoder", {"latents": (1, 16, h, w)}))
            if stage.latent.source == "image":
                calls.append(("vae_encoder", {"image": (1, 3, 8 * h, 8 * w)}))
        for engine, shapes in calls:
            if engine not in profiles:
                raise ProfileError(f"engine {engine!r} was not built; build it with: {hint}")
            select_profile(engine, profiles[engine], shapes, hint)

    def run(self, wf: Workflow, progress: Progress | None = None) -> Generation:
        self.preflight(wf)
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        positive = self.caption(wf.prompts.positive_text, "cond")
        needs_uncond = any(not math.isclose(s.cfg, 1.0) for s in wf.stages)
        negative = self.caption(wf.prompts.negative_text(), "uncond") if needs_uncond else None
        seconds["text"] = time.perf_counter() - start

        reports: list[StageReport] = []
        latent: Tensor | None = None
        for i, stage in enumerate(wf.stages):
            name = stage.name or f"stage{i + 1}"
            t0 = time.perf_counter()
            latent_in = stage_input_latent(stage, latent, self.encode_image)
            steps = len(stage.sigmas()) - 1

            uncond = None if math.isclose(stage.cfg, 1.0) else negative
            done = [0]

            def step(
                i: int, *_: object, name: str = name, steps: int = steps, done: list[int] = done
            ) -> None:
                done[0] = i + 1
                if progress is not None:
                    progress(name, i + 1, steps)

            try:
                result = sample_stage(
                    stage,
                    latent_in,
                    self.model,
                    positive,
                    uncond,
                    device=self.engines.device,
                    model_dtype=self.engines.dtype,
                    callback=step,
                )
            except FloatingPointError as exc:
                raise FloatingPointError(
                    f"stage {name!r}, step {done[0] + 1}/{steps}: {exc}"
                ) from None
            latent = result.latent
            skipped = result.cache.calls_skipped if result.cache is not None else 0
            seconds[name] = time.perf_counter() - t0
            preview = self.decode(latent) if stage.preview else None
            reports.append(
                StageReport(
                    name, tuple(latent.shape), result.model_calls, skipped, seconds[name], preview
                )
            )
        assert latent is not None
        t0 = time.perf_counter()
        image = self.decode(latent)
        seconds["decode"] = time.perf_counter() - t0
        return Generation(image, latent, reports, seconds)

    def save(self, wf: Workflow, generation: Generation, folder: Path | None = None) -> list[Path]:
        """The final image (and stage previews) under the workflow's output folder."""
        out = wf.output
        root = Path(folder if folder is not None else out.folder)
        prefix = out.render_prefix()
        metadata = png_metadata(wf, self.engines.backend)
        paths = []
        for report in generation.stages:
            if report.preview is not None:
                path = next_path(root, f"{prefix}_{report.name}_preview", out.format)
                paths.append(save_image(report.preview, path, metadata))
        paths.append(save_image(generation.image, next_path(root, prefix, out.format), metadata))
        generation.paths = paths
        return paths


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


METADATA_WORKFLOW = "zimage-trt.workflow"  # not ComfyUI's "workflow"/"prompt" (JSON graphs)


def png_metadata(wf: Workflow, backend: str) -> dict[str, str]:
    """Text chunks: the whole workflow (negative prompt inlined, so it travels with the image),
    the prompts and the seeds."""
    portable = wf.model_copy(deep=True)
    portable.prompts.negative_file = None
    portable.prompts.negative = wf.prompts.negative_text() or None
    return {
        "software": f"zimage-trt {__version__} ({backend})",
        METADATA_WORKFLOW: portable.to_yaml(),
        "zimage-trt.prompt": wf.prompts.positive_text,
        "zimage-trt.negative_prompt": portable.prompts.negative or "",
        "zimage-trt.seeds": ",".join(str(stage.seed) for stage in wf.stages),
    }
