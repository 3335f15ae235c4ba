"""A whole Workflow on one set of engines: prompts → captions → stages → VAE → images.

Free, exact reuse is claimed first: each prompt is encoded once (LRU by text) and its caption
path (embedder, pad tokens, context refiner) runs once per prompt for every step of every stage;
cfg = 1 runs no unconditional pass.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
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
from zimage_trt.runtime.stages import sample_stage, stage_input_latent
from zimage_trt.runtime.text import PromptEncoder
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
    def __init__(self, engines: Engines, tokenizer: QwenTokenizer, cache_size: int = 16) -> None:
        self.engines = engines
        self.prompts = PromptEncoder(tokenizer, self._encode_text, cache_size, engines.device)
        self.cache_size = cache_size
        self._captions: OrderedDict[str, tuple[Tensor, int]] = OrderedDict()
        self.caption_path_calls = 0

    # -- engines behind the runtime's callables ------------------------------------------------
    def _encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.engines.text_encoder(input_ids=input_ids, attention_mask=attention_mask)[
            "hidden"
        ]

    def caption(self, text: str, name: str) -> Cond:
        """The prompt's caption tokens (after the context refiner), cached by text."""
        hit = self._captions.get(text)
        if hit is None:
            hidden = self.prompts(text)
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            out = self.engines.caption_path(cap_feats=hidden.to(self.engines.dtype), cap_mask=mask)
            self.caption_path_calls += 1
            hit = (out["cap_tokens"], hidden.shape[1])
            if self.cache_size:
                self._captions[text] = hit
                while len(self._captions) > self.cache_size:
                    self._captions.popitem(last=False)
        else:
            self._captions.move_to_end(text)
        return Cond(name, hit[0], tokens=hit[1])

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
    def run(self, wf: Workflow, progress: Progress | None = None) -> Generation:
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

            def step(i: int, *_: object, name: str = name, steps: int = steps) -> None:
                if progress is not None:
                    progress(name, i + 1, steps)

            uncond = None if math.isclose(stage.cfg, 1.0) else negative
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
        metadata = {
            "software": f"zimage-trt {__version__}",
            "workflow": wf.to_yaml(),
            "backend": self.engines.backend,
        }
        paths = []
        for report in generation.stages:
            if report.preview is not None:
                path = next_path(root, f"{prefix}_{report.name}_preview", out.format)
                paths.append(save_image(report.preview, path, metadata))
        paths.append(save_image(generation.image, next_path(root, prefix, out.format), metadata))
        generation.paths = paths
        return paths
