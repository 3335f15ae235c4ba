"""A whole Workflow on one set of engines: prompts → captions → stages → VAE → images; and the
service API every entry point calls (the CLI, ``bench``, ``reproduce``, the server).

``Pipeline.open(model=…)`` / ``Pipeline.open(engines=DIR)`` loads and checks everything before
any work (``runtime.loading``); ``generate(GenerateRequest(…))`` checks the request against what
the pipeline holds (its LoRAs, the built profiles) and runs it; ``save`` writes the PNGs.

Free, exact reuse is claimed first: each prompt is encoded once (LRU by text) and its caption
path (embedder, pad tokens, context refiner) runs once per prompt for every step of every stage;
cfg = 1 runs no unconditional pass.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from zimage_trt.engines.manifest import Manifest
from zimage_trt.engines.protocol import Engines
from zimage_trt.engines.refit import LoraSwap, show_loras
from zimage_trt.errors import InputError, NonFiniteError
from zimage_trt.models.tokenizer import QwenTokenizer
from zimage_trt.runtime import loading
from zimage_trt.runtime.images import (
    check_inputs,
    check_outputs,
    open_image,
    png_metadata,
    save_new_image,
    to_uint8,
)
from zimage_trt.runtime.loras import LoraBank
from zimage_trt.runtime.preflight import TORCH_CAPTION_MAX, check_prompt_lengths, preflight
from zimage_trt.runtime.requests import (
    CacheStats,
    GenerateRequest,
    Generation,
    Progress,
    StageReport,
)
from zimage_trt.runtime.text import LRUCache, PromptEncoder
from zimage_trt.runtime.vae_tiles import VaeTiles, decode_tiled
from zimage_trt.sampling.guider import Cond, ModelFn
from zimage_trt.sampling.stage import sample_stage, stage_input_latent
from zimage_trt.workflow import Workflow

if TYPE_CHECKING:
    from zimage_trt.engines.tensorrt_engines import WeightBudget
    from zimage_trt.runtime.memory_plan import Budget


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


class Pipeline:
    """Runs Workflows on one set of engines; open it with `open` (or `from_model`), or wrap
    engines you built with `from_engines`.

    >>> pipe = Pipeline.open(model="Tongyi-MAI/Z-Image-Turbo", workflow="zimage-121101")
    >>> gen = pipe.generate(GenerateRequest(prompt="a red fox in snow", seed=[1, 2, 3]))
    >>> gen.image.shape, gen.seconds                                # uint8 [H, W, 3], timings
    """

    def __init__(
        self,
        engines: Engines,
        tokenizer: QwenTokenizer,
        cache_size: int = 16,
        *,
        workflow: Workflow | None = None,
        manifest: Manifest | None = None,
        lora_swap: LoraSwap | None = None,
    ) -> None:
        self.engines = engines
        self.prompts = PromptEncoder(tokenizer, self._encode_text, cache_size, engines.device)
        self._captions: LRUCache[tuple[Tensor, int]] = LRUCache(cache_size)
        self.caption_path_calls = 0
        self.workflow = workflow  # the workflow it was opened for: a request's default
        self.manifest = manifest  # an engine folder's manifest (None: the torch backend)
        self.lora_swap = lora_swap  # LoRAs swapped into a folder's engines when it loaded
        # runs side by side (runtime.batch) share the engines: one call at a time, besides the
        # denoiser's lockstep batches
        self.engine_lock = threading.RLock()
        self.loras: LoraBank | None = None  # LoRAs switched per request (runtime.loras)
        self.vae_tiles: VaeTiles | None = None  # decode in tiles as ComfyUI's VAEDecodeTiled
        self.budget: Budget | None = None  # the memory plan it follows (--max-vram)

    @classmethod
    def open(
        cls,
        *,
        model: str | Path | None = None,
        engines: str | Path | None = None,
        workflow: Workflow | str | Path | None = None,
        loras: Sequence[tuple[str, float]] | None = None,
        negative_prompt_file: str | Path | None = None,
        backend: str | None = None,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        compile: bool = False,
        compile_scope: str = "whole",
        cuda_graphs: bool = False,
        lora_ignore_unmatched: bool = False,
        gguf_in_memory: bool = False,
        resident_blocks: int | None = None,
        text_encoder: str = "resident",
        vae_tiles: VaeTiles | None = None,
        max_vram: int | None = None,
        side_by_side: int = 1,
        weight_budget: WeightBudget | None = None,
        strict_model: bool = False,
        search: Sequence[Path] | None = None,
        requests: Sequence[GenerateRequest] = (),
        output: str | Path | None = None,
        cache_size: int = 16,
        log: Callable[[str], None] = _stderr,
    ) -> Pipeline:
        """A pipeline for ``workflow`` (a preset name, a YAML path or a Workflow; default: the
        one ``engines`` was built for, else ``zimage-turbo``), every check made before any work.

        ``model`` (a folder, a Hugging Face repo id from the local cache, or ``"tiny"``) loads
        the torch backend (``compile``: ``torch.compile`` per stage shape, ``compile_scope``
        ``"whole"`` or ``"regional"``; ``gguf_in_memory``: a GGUF DiT kept quantized in memory,
        dequantized layer by layer; ``resident_blocks``: that many of the DiT's main blocks on
        the device, the others streamed from CPU memory; ``text_encoder``: ``resident``,
        ``released`` (taking turns with the DiT) or ``cpu``, see ``engines.placement``;
        ``max_vram``: a memory budget in bytes whose plan, ``runtime.memory_plan``, places the
        networks and tiles the decode, and which every request is checked against; planned for
        ``side_by_side`` runs sampled together, a server's ``--max-batch``);
        ``vae_tiles`` decodes in tiles as ComfyUI's VAEDecodeTiled; ``engines`` serves a built
        folder (``cuda_graphs``: TensorRT replays the denoiser; ``weight_budget``: what its
        engines built ``--weight-streaming`` keep of their weights on the GPU), with ``model``
        as the base DiT when its engines take other LoRAs (``strict_model``: refuse a
        ``model`` that no swap needs). ``loras``
        ((file, strength) pairs) replace the workflow's LoRAs, ``negative_prompt_file`` its
        negative prompt; relative LoRA paths are looked for in ``search`` (default: the
        workflow file's folder, then the current one). ``backend`` names the backend the
        caller expects (``torch`` or the folder's); a mismatch is refused.

        ``requests``: those the caller will make (a whole prompts file), each checked before any
        model loads — overrides, seeds, and the names it will save under ``output`` (default: the
        workflow's folder) — and against the loaded engines (LoRAs, profiles) before this
        returns, so that a bad one stops the batch before its first image.
        """
        if engines is not None and max_vram is not None:
            raise InputError(
                "--max-vram plans the torch backend (--model): an engine folder's memory is "
                "set when it is built (--weight-streaming, --vae-tiles) and loaded "
                "(--weight-streaming-budget, --vae-tiles)"
            )
        if engines is None and weight_budget is not None:
            raise InputError(
                "--weight-streaming-budget serves an engine folder built --weight-streaming "
                "(--engines DIR); the torch backend streams with --resident-blocks"
            )
        if max_vram is not None and vae_tiles is not None:
            raise InputError("--max-vram tiles the decode by its plan: pass it without "
                             "--vae-tiles")  # fmt: skip
        wf = loading.open_workflow(
            workflow, engines, loras=loras, negative_prompt_file=negative_prompt_file
        )
        if backend is not None and backend not in loading.BACKENDS:
            raise InputError(
                f"backend {backend!r} is not known; choose one of: {', '.join(loading.BACKENDS)}"
            )
        if engines is not None and compile:
            raise InputError(
                "--compile serves the torch backend (--model); an engine folder is compiled already"
            )
        if engines is None and backend not in (None, "torch"):
            raise InputError(
                f"the {backend} backend serves a built engine folder: pass --engines DIR "
                f"(make one with `zimage-trt build --backend {backend} --out DIR …`)"
            )
        for request in requests:
            with request.named():
                check_inputs(request.workflow_for(wf))
                check_outputs(request.workflow_for(wf), output)
        where = tuple(search) if search is not None else loading.lora_search(workflow)

        def check_prompts(tokenizer: QwenTokenizer, caption_max: int, backend: str) -> None:
            """Every prompt the caller will send, measured in tokens before any weight loads."""
            for request in requests:
                with request.named():
                    check_prompt_lengths(request.workflow_for(wf), tokenizer, caption_max, backend)
            if not requests:
                check_prompt_lengths(wf, tokenizer, caption_max, backend)

        if engines is not None:
            loaded = loading.load_folder(
                wf, engines, model=model, strict_model=strict_model, backend=backend,
                device=device, cuda_graphs=cuda_graphs, search=where,
                lora_ignore_unmatched=lora_ignore_unmatched, weight_budget=weight_budget,
                check_prompts=check_prompts, log=log,
            )  # fmt: skip
        else:
            loaded = loading.load_model(
                wf, model, device=device, dtype=dtype, search=where,
                lora_ignore_unmatched=lora_ignore_unmatched, compile=compile,
                compile_scope=compile_scope, gguf_in_memory=gguf_in_memory,
                resident_blocks=resident_blocks, text_encoder=text_encoder, max_vram=max_vram,
                side_by_side=side_by_side,
                workflows=[request.workflow_for(wf) for request in requests],
                check_prompts=check_prompts, log=log,
            )  # fmt: skip
        pipeline = cls(
            loaded.engines, loaded.tokenizer, cache_size, workflow=loaded.workflow,
            manifest=loaded.manifest, lora_swap=loaded.lora_swap,
        )  # fmt: skip
        pipeline.budget = loaded.budget
        pipeline.vae_tiles = vae_tiles
        if loaded.budget is not None:
            pipeline.vae_tiles = loaded.budget.plan.strategy.vae_tiles
        built_tiles = loaded.manifest.options.get("vae_tiles") if loaded.manifest else None
        if vae_tiles is None and built_tiles is not None:  # its decoder serves only those
            pipeline.vae_tiles = VaeTiles.parse(built_tiles)
            log(f"decoding in tiles {built_tiles} (the folder was built --vae-tiles)")
        pipeline.preflight(wf)
        for request in requests:
            pipeline.request_workflow(request)
        return pipeline

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
        engine per stage shape); ``open(model=…)`` with these options."""
        return cls.open(
            model=model, workflow=workflow, device=device, dtype=dtype,
            lora_ignore_unmatched=lora_ignore_unmatched, compile=compile,
        )  # fmt: skip

    def __call__(
        self,
        prompt: str | None = None,
        *,
        workflow: Workflow | str | None = None,
        negative_prompt: str | None = None,
        trigger_word: str | None = None,
        seed: int | list[int] | None = None,
        progress: Progress | None = None,
    ) -> Generation:
        """Run ``workflow`` (a preset name, a YAML path or a Workflow; default: the pipeline's)
        with these overrides."""
        request = GenerateRequest(workflow, prompt, negative_prompt, trigger_word, seed)
        return self.generate(request, progress)

    # -- the service ---------------------------------------------------------------------------
    def request_workflow(self, request: GenerateRequest) -> Workflow:
        """The workflow a request runs: its own (or the pipeline's), copied, overrides applied,
        checked against what the pipeline holds (its LoRAs, the built profiles)."""
        with request.named():
            wf = request.workflow_for(self.workflow)
            self.check(wf)
        return wf

    def check(self, wf: Workflow) -> None:
        """Refuse a workflow this pipeline cannot run: other LoRAs than it holds, a prompt too
        long or a shape outside the built profiles."""
        self._check_loras(wf)
        self.preflight(wf)

    def _check_loras(self, wf: Workflow) -> None:
        """A request must ask for the LoRAs the engines hold: they are fused (or swapped in)
        when the pipeline opens, not per request."""
        if self.loras is not None:  # switched between runs
            self.loras.check(wf)
            return
        if self.workflow is None:
            return
        held = [(lora.path, lora.strength) for lora in self.workflow.models.loras]
        wanted = [(lora.path, lora.strength) for lora in wf.models.loras]
        if wanted != held:
            raise InputError(
                f"this pipeline holds LoRAs {show_loras(held)}; the request asks for "
                f"{show_loras(wanted)}: open a pipeline with that workflow"
            )

    def generate(self, request: GenerateRequest, progress: Progress | None = None) -> Generation:
        """Run one request; the result names the workflow that ran."""
        return self.run(self.request_workflow(request), progress)

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

    def forget_captions(self) -> None:
        """The DiT's weights changed (a LoRA switch): its cached caption-path outputs are stale;
        the text encoder's stay."""
        with self.engine_lock:
            self._captions.clear()

    def _encode_first(self, texts: list[str]) -> None:
        """Every text whose caption is not cached encoded before any caption path runs, so that
        a text encoder taking turns with the DiT (``engines.placement``) takes one turn."""
        new = [text for text in texts if text not in self._captions]
        if len(new) > 1 and self.prompts.cache.size >= len(new):
            for text in new:
                self.prompts(text)

    def caption(self, text: str, name: str) -> Cond:
        """The prompt's caption tokens (after the context refiner), cached by text."""
        with self.engine_lock:
            tokens, length = self._captions.get_or_make(text, lambda: self._caption_path(text))
        return Cond(name, tokens, tokens=length)

    def _caption_path(self, text: str) -> tuple[Tensor, int]:
        hidden = self.prompts(text)
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        out = self.engines.caption_path(cap_feats=hidden.to(self.engines.dtype), cap_mask=mask)
        self.caption_path_calls += 1
        return out["cap_tokens"], hidden.shape[1]

    def model(
        self,
        x: Tensor,
        sigma: Tensor,
        context: Tensor,
        cond_names: tuple[str, ...] = (),
        valid: Tensor | None = None,
    ) -> Tensor:
        """One DiT call (the guider's ModelFn): v in the model dtype. ``valid`` masks caption
        padding (batched captions of different lengths); None: every token counts."""
        if valid is None:
            valid = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        v = self.engines.denoiser(latents=x, sigma=sigma, cap_tokens=context, cap_valid=valid)
        return v["v"].to(x.dtype)

    def decode(self, latent: Tensor) -> np.ndarray:
        with self.engine_lock:
            latent = latent.to(self.engines.device)
            if self.vae_tiles is None:
                return to_uint8(self.engines.vae_decoder(latents=latent)["image"])
            return to_uint8(decode_tiled(latent, self._decode_piece, self.vae_tiles))

    def _decode_piece(self, latent: Tensor) -> Tensor:
        return self.engines.vae_decoder(latents=latent)["image"]

    def encode_image(self, source: str | Image.Image, width: int, height: int) -> Tensor:
        """An image file (or a picture in memory) resized to ``width``×``height``, VAE-encoded."""
        if self.engines.vae_encoder is None:
            what = source if isinstance(source, str) else "an uploaded image"
            raise InputError(
                f"the {self.engines.backend} engines have no VAE encoder; an image "
                f"input ({what}) needs one"
            )
        picture = (open_image(source) if isinstance(source, str) else source).convert("RGB")
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)
        image = (pixels.permute(2, 0, 1)[None] * 2.0 - 1.0).to(self.engines.device)
        with self.engine_lock:
            return self.engines.vae_encoder(image=image)["latents"].float().cpu()

    # -- the workflow ------------------------------------------------------------------------
    def preflight(self, wf: Workflow) -> None:
        """Every engine call the workflow will make, checked against the built profiles before
        any work (compiled engines only; ProfileError names the engine, shape and ranges), and
        against the memory budget (``--max-vram``)."""
        cap = self.manifest.caption_max if self.manifest is not None else TORCH_CAPTION_MAX
        tokens = preflight(wf, self.engines.profiles, self.prompts.tokenizer,
                           self.engines.backend, cap, self.vae_tiles)  # fmt: skip
        if self.budget is not None:
            self.budget.check(wf, tokens)

    def run(
        self,
        wf: Workflow,
        progress: Progress | None = None,
        model: ModelFn | None = None,
        images: Mapping[str, Image.Image] | None = None,
    ) -> Generation:
        """Run ``wf``; ``model`` stands in for the denoiser (``runtime.batch`` batches the
        calls of workflows sampled side by side); ``images`` holds pictures in memory that the
        workflow's image latents name (an HTTP upload) in place of files."""
        self.preflight(wf)
        if self.loras is not None:
            self.loras.hold(wf)
        model = model if model is not None else self.model
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        needs_uncond = any(not math.isclose(s.cfg, 1.0) for s in wf.stages)
        # held over the whole text phase, so that the call counts are this run's alone when
        # runs go side by side (runtime.batch)
        with self.engine_lock:
            encoder_calls, caption_calls = self.prompts.encoder_calls, self.caption_path_calls
            texts = [wf.prompts.positive_text] + [wf.prompts.negative_text()] * needs_uncond
            self._encode_first(texts)
            positive = self.caption(wf.prompts.positive_text, "cond")
            negative = self.caption(wf.prompts.negative_text(), "uncond") if needs_uncond else None
            encoder_calls = self.prompts.encoder_calls - encoder_calls
            caption_calls = self.caption_path_calls - caption_calls
        seconds["text"] = time.perf_counter() - start

        def encode(ref: str, width: int, height: int) -> Tensor:
            return self.encode_image(images.get(ref, ref) if images else ref, width, height)

        reports: list[StageReport] = []
        latent: Tensor | None = None
        for i, spec in enumerate(wf.stages):
            stage = spec.params()
            name = stage.name or f"stage{i + 1}"
            t0 = time.perf_counter()
            latent_in = stage_input_latent(stage, latent, encode)
            steps = stage.steps

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
                    model,
                    positive,
                    uncond,
                    device=self.engines.device,
                    model_dtype=self.engines.dtype,
                    callback=step,
                )
            except FloatingPointError as exc:
                raise NonFiniteError(f"stage {name!r}, step {done[0] + 1}/{steps}: {exc}") from None
            latent = result.latent
            skipped = result.cache.calls_skipped if result.cache is not None else 0
            seconds[name] = time.perf_counter() - t0
            preview = self.decode(latent) if spec.preview else None
            reports.append(
                StageReport(
                    name,
                    tuple(latent.shape),
                    result.model_calls,
                    skipped,
                    seconds[name],
                    preview,
                    latent,
                )
            )
        assert latent is not None
        t0 = time.perf_counter()
        image = self.decode(latent)
        seconds["decode"] = time.perf_counter() - t0
        cache = CacheStats(
            text_encoder_calls=encoder_calls,
            caption_path_calls=caption_calls,
            dit_calls=sum(r.model_calls for r in reports),
            dit_calls_skipped=sum(r.calls_skipped for r in reports),
        )
        return Generation(image, latent, reports, seconds, cache=cache, workflow=wf)

    def save(self, wf: Workflow, generation: Generation, folder: Path | None = None) -> list[Path]:
        """The final image (and stage previews) under the workflow's output folder."""
        out = wf.output
        root = Path(folder if folder is not None else out.folder)
        prefix = out.render_prefix()
        metadata = png_metadata(wf, self.engines.backend)
        paths = []
        for report in generation.stages:
            if report.preview is not None:
                name = f"{prefix}_{report.name}_preview"
                paths.append(save_new_image(report.preview, root, name, out.format, metadata))
        paths.append(save_new_image(generation.image, root, prefix, out.format, metadata))
        generation.paths = paths
        return paths
