"""``zimage-trt bench``: what a workflow costs on each backend, and why.

Figures: each engine at each stage shape (median and p90 after warm-up); the workflow end to end
with a per-part breakdown (text, each stage, decode) and images/s; baselines measured in the same
run on the same weights (diffusers' ``ZImagePipeline`` on a single stage, this project's eager
torch backend on the whole workflow); the effect of EasyCache and of the prompt cache; and the
roofline (DiT FLOPs per forward from the config and the token counts, achieved TFLOP/s, fraction
of the GPU's bf16 peak). Written as JSON, a markdown table and a PNG chart. Times come from CUDA
events on a GPU and ``perf_counter`` on a CPU. Nothing here asserts a time.

diffusers is imported only inside the baseline: the runtime never needs it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib.metadata
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from zimage_trt import __version__
from zimage_trt.models.dit import SEQ_MULTIPLE, DiTConfig
from zimage_trt.runtime.guider import Cond
from zimage_trt.runtime.latents import LATENT_CHANNELS, VAE_SCALE
from zimage_trt.runtime.pipeline import Generation, Pipeline
from zimage_trt.runtime.text import attention_mask
from zimage_trt.workflow import Workflow, load_workflow

BACKENDS = ("torch", "torch-compile", "onnxruntime", "tensorrt")
COMPILED_BACKENDS = ("onnxruntime", "tensorrt")
BUILD_PRECISION = {"onnxruntime": "fp32", "tensorrt": "bf16"}  # ORT's CPU provider has no bf16
SCHEMA = "zimage-trt-bench/1"
Log = Callable[[str], None]
T = TypeVar("T")

# Dense (no sparsity) bf16 tensor peaks, FLOP/s, matched against torch's device name.
GPU_BF16_PEAK: dict[str, float] = {
    "H100": 989.4e12,
    "H200": 989.4e12,
    "H800": 989.4e12,
    "A100": 312e12,
    "L40S": 362e12,
    "RTX 4090": 165.2e12,
}
GPU_PEAK_SOURCES: dict[str, str] = {
    "H100": "speed-anchors §5.1: H100 SXM5 dense bf16",
    "H200": "speed-anchors §5.1: same tensor peaks as H100 (same GH100 die)",
    "H800": "speed-anchors §5.1: assumed equal to H100 SXM (not verified)",
    "A100": "NVIDIA A100 datasheet: dense bf16",
    "L40S": "NVIDIA L40S datasheet: dense bf16",
    "RTX 4090": "NVIDIA Ada whitepaper: dense bf16, fp32 accumulate",
}
# H100 PCIe and NVL boards run lower clocks than the SXM5 peak above: left untabulated rather
# than overstated.
_H100_NOT_SXM = ("PCIE", "NVL")


# ---- roofline ---------------------------------------------------------------------------------
def _padded(n: int) -> int:
    return -(-n // SEQ_MULTIPLE) * SEQ_MULTIPLE


@dataclass(frozen=True)
class DiTFlops:
    """FLOPs of one DiT forward (batch 1) by part; multiply-add = 2 FLOPs."""

    main: float  # the n_layers joint blocks on image + caption tokens
    noise_refiner: float  # refiner blocks on the image tokens
    context_refiner: float  # refiner blocks on the caption slots (the caption path)
    image_embed: float  # patch embedder and final layer
    caption_embed: float  # caption embedder

    @property
    def total(self) -> float:
        """The whole forward as the reference model runs it (speed-anchors §5.2)."""
        return (
            self.main
            + self.noise_refiner
            + self.context_refiner
            + self.image_embed
            + self.caption_embed
        )

    @property
    def denoiser(self) -> float:
        """What the denoiser engine computes per call (the caption path runs once per prompt)."""
        return self.main + self.noise_refiner + self.image_embed

    @property
    def caption_path(self) -> float:
        return self.context_refiner + self.caption_embed


def dit_flops(cfg: DiTConfig, image_tokens: int, caption_tokens: int) -> DiTFlops:
    """FLOPs per DiT forward at these token counts, padded to 32 as the model runs them.

    Per block and token the linear layers cost 2·(4·D² + 3·D·F) (fused qkv, out, SwiGLU), and
    attention 4·L²·D over its L tokens (scores and weighted sum, all heads). The per-sample
    timestep and adaLN MLPs (< 1 GFLOP) are left out.
    """
    if image_tokens < 1:
        raise ValueError(f"image_tokens must be >= 1, got {image_tokens}")
    if caption_tokens < 1:
        raise ValueError(f"caption_tokens must be >= 1, got {caption_tokens}")
    d, f = cfg.dim, cfg.ffn_dim
    per_token = 2.0 * (4 * d * d + 3 * d * f)

    def blocks(count: int, n: int) -> float:
        return count * (per_token * n + 4.0 * n * n * d)

    image, caption = _padded(image_tokens), _padded(caption_tokens)
    return DiTFlops(
        main=blocks(cfg.n_layers, image + caption),
        noise_refiner=blocks(cfg.n_refiner_layers, image),
        context_refiner=blocks(cfg.n_refiner_layers, caption),
        # the patch embedder and the final layer see the real tokens only (padding comes after)
        image_embed=2.0 * 2 * cfg.patch_dim * d * image_tokens,
        caption_embed=2.0 * cfg.cap_feat_dim * d * caption,
    )


def roofline_flops(cfg: DiTConfig, image_tokens: int, caption_tokens: int) -> float:
    """FLOPs of one DiT forward (main and refiner blocks, attention, embedders), batch 1."""
    return dit_flops(cfg, image_tokens, caption_tokens).total


def image_tokens(cfg: DiTConfig, latent_h: int, latent_w: int) -> int:
    return (latent_h // cfg.patch_size) * (latent_w // cfg.patch_size)


def gpu_bf16_peak(name: str | None) -> tuple[float, str] | None:
    """(dense bf16 FLOP/s, source) of a GPU by its device name; None when not tabulated."""
    if not name:
        return None
    upper = name.upper()
    for key in sorted(GPU_BF16_PEAK, key=len, reverse=True):
        if key.upper() in upper:
            if key == "H100" and any(tag in upper for tag in _H100_NOT_SXM):
                return None
            return GPU_BF16_PEAK[key], GPU_PEAK_SOURCES[key]
    return None


# ---- timing -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    median: float
    p90: float
    mean: float
    n: int


def summary(samples: Sequence[float]) -> Summary:
    """Median, p90 (linear interpolation between ranks) and mean of timing samples."""
    values = np.asarray([float(s) for s in samples], dtype=np.float64)
    if values.size == 0:
        raise ValueError("summary() needs at least one sample")
    return Summary(
        median=float(np.median(values)),
        p90=float(np.percentile(values, 90)),
        mean=float(values.mean()),
        n=int(values.size),
    )


class Timer:
    """Seconds a callable takes: CUDA events on a CUDA device (the GPU's time, queued work
    included), ``perf_counter`` on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    @property
    def kind(self) -> str:
        return "cuda-events" if self.cuda else "perf_counter"

    def time(self, fn: Callable[[], T]) -> tuple[T, float]:
        if not self.cuda:
            t0 = time.perf_counter()
            out = fn()
            return out, time.perf_counter() - t0
        torch.cuda.synchronize(self.device)  # earlier queued work is not this call's
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end) / 1e3


# ---- components -------------------------------------------------------------------------------
@dataclass
class ComponentCall:
    engine: str
    label: str
    inputs: dict[str, Tensor]
    stages: list[str]
    flops: float | None = None


def _stage_names(wf: Workflow) -> list[str]:
    return [stage.name or f"stage{i + 1}" for i, stage in enumerate(wf.stages)]


def _needs_uncond(wf: Workflow) -> bool:
    return any(not math.isclose(stage.cfg, 1.0) for stage in wf.stages)


def _dit_config(pipeline: Pipeline) -> DiTConfig | None:
    """The DiT config behind a torch-module denoiser (compiled engines do not carry one)."""
    module = getattr(pipeline.engines.denoiser, "module", None)
    config = getattr(module, "config", None)
    return config if isinstance(config, DiTConfig) else None


def _peak_for(pipeline: Pipeline) -> tuple[float, str] | None:
    device = pipeline.engines.device
    if device.type != "cuda":
        return None
    return gpu_bf16_peak(torch.cuda.get_device_name(device))


def component_calls(
    pipeline: Pipeline, wf: Workflow, dit_config: DiTConfig | None = None
) -> list[ComponentCall]:
    """One call per engine and distinct shape the workflow makes: the text encoder and caption
    path per prompt, the denoiser per stage shape (batch, latent, caption slots; cond and uncond
    batched as the guider batches them), the VAE decoder per decoded size."""
    engines = pipeline.engines
    device, dtype = engines.device, engines.dtype
    tokenizer = pipeline.prompts.tokenizer
    names = _stage_names(wf)
    prompts = [("positive", wf.prompts.positive_text, "cond")]
    if _needs_uncond(wf):
        prompts.append(("negative", wf.prompts.negative_text(), "uncond"))
    calls: list[ComponentCall] = []
    conds: dict[str, Cond] = {}
    for label, text, cond_name in prompts:
        ids = tokenizer.encode_prompt(text)
        shape = f"{label} prompt, {len(ids)} tokens"
        calls.append(
            ComponentCall(
                "text_encoder",
                shape,
                {
                    "input_ids": torch.tensor([ids], dtype=torch.int64, device=device),
                    "attention_mask": torch.tensor(
                        [attention_mask(ids)], dtype=torch.int64, device=device
                    ),
                },
                list(names),
            )
        )
        hidden = pipeline.prompts(text)
        conds[cond_name] = pipeline.caption(text, cond_name)
        caption_flops = None
        if dit_config is not None:  # no image token enters the caption path
            caption_flops = dit_flops(dit_config, 1, len(ids)).caption_path
        calls.append(
            ComponentCall(
                "caption_path",
                shape,
                {
                    "cap_feats": hidden.to(dtype),
                    "cap_mask": torch.ones(hidden.shape[:2], dtype=torch.bool, device=device),
                },
                list(names),
                caption_flops,
            )
        )

    generator = torch.Generator().manual_seed(0)
    by_key: dict[tuple[Any, ...], ComponentCall] = {}

    def add(key: tuple[Any, ...], stage: str, make: Callable[[], ComponentCall]) -> None:
        if key not in by_key:
            by_key[key] = make()
            calls.append(by_key[key])
        by_key[key].stages.append(stage)

    def denoiser(group: list[Cond], h: int, w: int) -> ComponentCall:
        b, slots = len(group), group[0].context.shape[1]
        flops = None
        if dit_config is not None:
            flops = b * dit_flops(dit_config, image_tokens(dit_config, h, w), slots).denoiser
        latents = torch.randn(b, LATENT_CHANNELS, h, w, generator=generator)
        return ComponentCall(
            "denoiser",
            f"{b}×{LATENT_CHANNELS}×{h}×{w}, {slots} caption slots",
            {
                "latents": latents.to(device=device, dtype=dtype),
                "sigma": torch.full((b,), 0.5, dtype=torch.float32, device=device),
                "cap_tokens": torch.cat([c.context for c in group]).to(dtype),
                "cap_valid": torch.ones(b, slots, dtype=torch.bool, device=device),
            },
            [],
            flops,
        )

    def decoder(h: int, w: int) -> ComponentCall:
        latents = torch.randn(1, LATENT_CHANNELS, h, w, generator=generator)
        return ComponentCall(
            "vae_decoder",
            f"1×{LATENT_CHANNELS}×{h}×{w} → {VAE_SCALE * w}×{VAE_SCALE * h} px",
            {"latents": latents.to(device)},
            [],
        )

    def encoder(h: int, w: int) -> ComponentCall:
        image = torch.rand(1, 3, VAE_SCALE * h, VAE_SCALE * w, generator=generator) * 2 - 1
        return ComponentCall(
            "vae_encoder",
            f"{VAE_SCALE * w}×{VAE_SCALE * h} px → 1×{LATENT_CHANNELS}×{h}×{w}",
            {"image": image.to(device)},
            [],
        )

    for i, (stage, (h, w)) in enumerate(zip(wf.stages, wf.latent_sizes(), strict=True)):
        uses = [conds["cond"]]
        if not math.isclose(stage.cfg, 1.0):
            uses.append(conds["uncond"])
        # the guider batches cond and uncond only when their contexts match
        batched = len(uses) == 2 and uses[0].batch_key == uses[1].batch_key
        for group in [uses] if batched else [[c] for c in uses]:
            key = ("denoiser", len(group), h, w, group[0].context.shape[1])
            add(key, names[i], partial(denoiser, group, h, w))
        if stage.preview or i == len(wf.stages) - 1:
            add(("vae_decoder", h, w), names[i], partial(decoder, h, w))
        if stage.latent.source == "image" and engines.vae_encoder is not None:
            add(("vae_encoder", h, w), names[i], partial(encoder, h, w))
    return calls


def _engine(pipeline: Pipeline, name: str) -> Callable[..., dict[str, Tensor]]:
    engine = getattr(pipeline.engines, name)
    if engine is None:
        raise ValueError(f"the {pipeline.engines.backend} engines have no {name}")
    return engine


def _rate(flops: float | None, seconds: float, peak: tuple[float, str] | None) -> dict[str, Any]:
    if flops is None:
        return {"flops": None, "tflops_per_s": None, "fraction_of_bf16_peak": None}
    achieved = flops / seconds
    return {
        "flops": flops,
        "tflops_per_s": achieved / 1e12,
        "fraction_of_bf16_peak": achieved / peak[0] if peak is not None else None,
    }


def bench_components(
    pipeline: Pipeline,
    wf: Workflow,
    warmup: int,
    iters: int,
    *,
    dit_config: DiTConfig | None = None,
    log: Log = lambda msg: None,
) -> list[dict[str, Any]]:
    """Each engine at each stage shape of ``wf``: ``warmup`` untimed calls, then ``iters`` timed."""
    _check_count("warmup", warmup, 0)
    _check_count("iters", iters, 1)
    dit_config = dit_config or _dit_config(pipeline)
    timer = Timer(pipeline.engines.device)
    peak = _peak_for(pipeline)
    rows = []
    for call in component_calls(pipeline, wf, dit_config):
        engine = _engine(pipeline, call.engine)
        log(f"[{pipeline.engines.backend}] {call.engine} {call.label}")

        # in the grad mode the pipeline calls it in (the prompt encoder's inference mode for the
        # text encoder): a compiled engine guards on it and would compile again
        def once(
            engine: Callable[..., dict[str, Tensor]] = engine, call: ComponentCall = call
        ) -> None:
            inference = call.engine == "text_encoder"
            with torch.inference_mode() if inference else contextlib.nullcontext():
                engine(**call.inputs)

        for _ in range(warmup):
            once()
        stats = summary([timer.time(once)[1] for _ in range(iters)])
        rows.append(
            {
                "engine": call.engine,
                "shape": call.label,
                "inputs": {k: list(v.shape) for k, v in call.inputs.items()},
                "stages": call.stages,
                "seconds": asdict(stats),
                **_rate(call.flops, stats.median, peak),
            }
        )
    return rows


# ---- end to end -------------------------------------------------------------------------------
class _DenoiserShapes:
    """Records the shape of every denoiser call (for exact DiT FLOPs per stage); each step's
    calls are claimed by the stage the progress callback names after it."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.name = engine.name
        self.pending: list[tuple[int, int, int, int]] = []
        self.by_stage: dict[str, list[tuple[int, int, int, int]]] = {}

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        b, _, h, w = inputs["latents"].shape
        self.pending.append((b, h, w, inputs["cap_tokens"].shape[1]))
        return self.engine(**inputs)

    def step_done(self, stage: str, step: int, steps: int) -> None:
        self.by_stage.setdefault(stage, []).extend(self.pending)
        self.pending = []


def _timed_run(
    pipeline: Pipeline, wf: Workflow, timer: Timer
) -> tuple[Generation, float, _DenoiserShapes]:
    recorder = _DenoiserShapes(pipeline.engines.denoiser)
    pipeline.engines.denoiser = recorder
    try:
        generation, seconds = timer.time(lambda: pipeline.run(wf, recorder.step_done))
    finally:
        pipeline.engines.denoiser = recorder.engine
    return generation, seconds, recorder


def _shape_counts(calls: Sequence[tuple[int, int, int, int]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for b, h, w, slots in calls:
        key = f"{b}×{LATENT_CHANNELS}×{h}×{w}, {slots} caption slots"
        counts[key] = counts.get(key, 0) + 1
    return counts


def bench_end_to_end(
    pipeline: Pipeline,
    wf: Workflow,
    repeats: int,
    *,
    warmup: int = 0,
    dit_config: DiTConfig | None = None,
    log: Log = lambda msg: None,
) -> tuple[dict[str, Any], Generation]:
    """The whole workflow ``warmup`` + ``repeats`` times: per-part seconds (text, each stage,
    decode, other = previews and preflight), DiT calls and cache skips, images/s, and each
    stage's DiT FLOPs from the shapes the denoiser was called with. Also returns the last run's
    Generation (runs are deterministic: seeds are fixed)."""
    _check_count("warmup", warmup, 0)
    _check_count("repeats", repeats, 1)
    dit_config = dit_config or _dit_config(pipeline)
    timer = Timer(pipeline.engines.device)
    peak = _peak_for(pipeline)
    backend = pipeline.engines.backend
    walls: list[float] = []
    parts: dict[str, list[float]] = {}
    first: float | None = None
    generation: Generation | None = None
    recorder: _DenoiserShapes | None = None
    for run in range(warmup + repeats):
        log(f"[{backend}] end to end, run {run + 1}/{warmup + repeats}")
        generation, wall, recorder = _timed_run(pipeline, wf, timer)
        first = wall if first is None else first
        if run < warmup:
            continue
        walls.append(wall)
        for name, seconds in generation.seconds.items():
            parts.setdefault(name, []).append(seconds)
        parts.setdefault("other", []).append(max(0.0, wall - sum(generation.seconds.values())))
    assert generation is not None and recorder is not None and first is not None

    rows: list[dict[str, Any]] = [{"name": "text", "kind": "text",
                                   "seconds": asdict(summary(parts["text"]))}]  # fmt: skip
    for stage, report in zip(wf.stages, generation.stages, strict=True):
        stats = summary(parts[report.name])
        steps = len(stage.sigmas()) - 1
        calls = recorder.by_stage.get(report.name, [])
        flops = None
        if dit_config is not None:
            flops = sum(
                b * dit_flops(dit_config, image_tokens(dit_config, h, w), slots).denoiser
                for b, h, w, slots in calls
            )
        rows.append(
            {
                "name": report.name,
                "kind": "stage",
                "latent_shape": list(report.latent_shape),
                "steps": steps,
                "model_calls": report.model_calls,
                "calls_skipped": report.calls_skipped,
                "denoiser_shapes": _shape_counts(calls),
                "seconds": asdict(stats),
                "seconds_per_step": stats.median / steps if steps else None,
                **_rate(flops, stats.median, peak),
            }
        )
    rows.append({"name": "decode", "kind": "decode",
                 "seconds": asdict(summary(parts["decode"]))})  # fmt: skip
    rows.append({"name": "other", "kind": "other",
                 "seconds": asdict(summary(parts["other"]))})  # fmt: skip
    total = summary(walls)
    result = {
        "backend": backend,
        "device": str(pipeline.engines.device),
        "dtype": str(pipeline.engines.dtype).removeprefix("torch."),
        "timer": timer.kind,
        "warmup": warmup,
        "repeats": repeats,
        "first_run_seconds": first,
        "total_seconds": asdict(total),
        "images_per_second": 1.0 / total.median,
        "parts": rows,
        "final_latent_shape": list(generation.latent.shape),
        "image_shape": list(generation.image.shape),
    }
    return result, generation


# ---- cache effect -----------------------------------------------------------------------------
def _clear_prompt_caches(pipeline: Pipeline) -> None:
    pipeline.prompts.cache.clear()
    pipeline._captions.clear()


def _text_phase(pipeline: Pipeline, wf: Workflow) -> None:
    """What ``Pipeline.run`` does before the first stage."""
    pipeline.caption(wf.prompts.positive_text, "cond")
    if _needs_uncond(wf):
        pipeline.caption(wf.prompts.negative_text(), "uncond")


def bench_cache_effect(
    pipeline: Pipeline,
    wf: Workflow,
    *,
    cached: Generation | None = None,
    log: Log = lambda msg: None,
) -> dict[str, Any]:
    """EasyCache: per stage, calls run and saved against the same workflow with every cache
    removed, and the final latent's max |Δ| between the two. Prompt cache: text seconds of a
    first request (caches cleared) and of the same request repeated. ``cached``: a Generation of
    ``wf`` already made (runs are deterministic), to save one run."""
    backend = pipeline.engines.backend
    timer = Timer(pipeline.engines.device)
    cached_seconds = None
    if cached is None:
        log(f"[{backend}] cache effect: the workflow as given")
        generation, cached_seconds = timer.time(lambda: pipeline.run(wf))
        cached = generation
    uncached_wf = wf.model_copy(deep=True)
    for stage in uncached_wf.stages:
        stage.cache = None
    log(f"[{backend}] cache effect: the workflow without EasyCache")
    uncached, uncached_seconds = timer.time(lambda: pipeline.run(uncached_wf))
    stages = []
    for stage, with_cache, without in zip(wf.stages, cached.stages, uncached.stages, strict=True):
        stages.append(
            {
                "name": with_cache.name,
                "easycache": stage.cache.model_dump() if stage.cache is not None else None,
                "calls_cached_run": with_cache.model_calls,
                "calls_saved": with_cache.calls_skipped,
                "calls_uncached_run": without.model_calls,
                "seconds_cached_run": with_cache.seconds,
                "seconds_uncached_run": without.seconds,
            }
        )
    image_delta = np.abs(cached.image.astype(np.int16) - uncached.image.astype(np.int16)).max()

    _clear_prompt_caches(pipeline)
    counts = [(pipeline.prompts.encoder_calls, pipeline.caption_path_calls)]
    texts = []
    for _ in range(2):
        texts.append(timer.time(lambda: _text_phase(pipeline, wf))[1])
        counts.append((pipeline.prompts.encoder_calls, pipeline.caption_path_calls))
    return {
        "backend": backend,
        "stages": stages,
        "calls_saved": sum(s["calls_saved"] for s in stages),
        "final_latent_max_abs_delta": float((cached.latent - uncached.latent).abs().max()),
        "image_max_abs_delta": int(image_delta),
        "total_seconds_cached_run": cached_seconds,
        "total_seconds_uncached_run": uncached_seconds,
        "prompt_cache": {
            "prompts": 2 if _needs_uncond(wf) else 1,
            "text_seconds_first": texts[0],
            "text_seconds_repeat": texts[1],
            "encoder_calls_first": counts[1][0] - counts[0][0],
            "encoder_calls_repeat": counts[2][0] - counts[1][0],
            "caption_path_calls_first": counts[1][1] - counts[0][1],
            "caption_path_calls_repeat": counts[2][1] - counts[1][1],
        },
    }


# ---- the diffusers baseline -------------------------------------------------------------------
def single_stage_workflow(wf: Workflow, shift: float = 3.0) -> Workflow:
    """One stage at ``wf``'s final size and its last stage's steps, as diffusers'
    ``ZImagePipeline`` runs by default: the diffusers_zimage schedule, Euler, cfg 1, no LoRA."""
    last = wf.stages[-1]
    h, w = wf.latent_sizes()[-1]
    return Workflow.from_dict(
        {
            "name": f"{wf.name}-single-stage",
            "models": {**wf.models.model_dump(), "loras": []},
            "prompts": {"positive": wf.prompts.positive_text},
            "stages": [
                {
                    "name": "single",
                    "latent": {"source": "empty", "width": VAE_SCALE * w, "height": VAE_SCALE * h},
                    "sampler": {"name": "euler"},
                    "scheduler": {"name": "diffusers_zimage", "steps": last.scheduler.steps},
                    "shift": shift,
                    "cfg": 1.0,
                    "seed": last.seed,
                }
            ],
        }
    )


def diffusers_model_dir(model: str | None) -> Path | None:
    """The diffusers folder of ``model`` (``tiny``, a folder, a cached repo id), else None."""
    if model is None:
        return None
    if model == "tiny":
        from zimage_trt.models.tiny import tiny_model_dir

        root = tiny_model_dir()
    elif Path(model).expanduser().is_dir():
        root = Path(model).expanduser()
    else:
        from zimage_trt.models.checkpoints import resolve_model

        try:
            root = resolve_model(model, download=False).transformer.parent
        except (ValueError, OSError):
            return None
    return root if (root / "model_index.json").is_file() else None


def _scheduler_shift(model_dir: Path) -> float:
    import json

    config = model_dir / "scheduler" / "scheduler_config.json"
    if config.is_file():
        return float(json.loads(config.read_text(encoding="utf-8")).get("shift", 3.0))
    return 3.0


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _diffusers_runs(
    pipeline_class: Any,
    model_dir: Path,
    call: dict[str, Any],
    noise: Tensor,
    timer: Timer,
    dtype: torch.dtype,
    runs: int,
) -> tuple[list[float], int, Tensor]:
    """Seconds of each run, transformer calls of the last, and its final (model-space) latent."""
    import warnings

    with warnings.catch_warnings():  # newer diffusers renames torch_dtype; older lack dtype
        warnings.simplefilter("ignore", FutureWarning)
        # the prompt embeddings are given, so diffusers needs no text encoder of its own
        pipe = pipeline_class.from_pretrained(
            model_dir, text_encoder=None, tokenizer=None, torch_dtype=dtype
        ).to(timer.device)
    pipe.set_progress_bar_config(disable=True)
    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    pipe.transformer.register_forward_pre_hook(count)
    seconds = []
    for _ in range(runs):
        calls[0] = 0
        out, elapsed = timer.time(lambda: pipe(latents=noise.to(timer.device), **call))
        seconds.append(elapsed)
    return seconds, calls[0], out.images


def bench_diffusers_baseline(
    model_dir: Path | None,
    wf_single_stage: Workflow,
    *,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int = 1,
    repeats: int = 1,
    log: Log = lambda msg: None,
) -> dict[str, Any]:
    """diffusers' ``ZImagePipeline`` (eager) against this project's torch backend on the same
    weights, size, steps, prompt embeddings and initial noise: denoising seconds each (text
    encoding and VAE decode excluded on both sides), seconds per step and the per-step overhead
    difference, and the final latents' max |Δ| (the same run, or the comparison is void).

    Skipped, with the reason recorded, when diffusers is missing or the model is not a diffusers
    folder."""
    try:
        import diffusers
    except ImportError:
        return {"skipped": "diffusers is not installed"}
    if not hasattr(diffusers, "ZImagePipeline"):
        return {"skipped": f"diffusers {diffusers.__version__} has no ZImagePipeline (>= 0.36)"}
    if model_dir is None:
        return {"skipped": "the model is not a diffusers folder (no model_index.json)"}
    _check_count("warmup", warmup, 0)
    _check_count("repeats", repeats, 1)
    stage = wf_single_stage.stages[0]
    shape = (
        len(wf_single_stage.stages),
        stage.scheduler.name,
        stage.sampler.name,
        stage.cfg,
        stage.latent.source,
    )
    if shape != (1, "diffusers_zimage", "euler", 1.0, "empty") or wf_single_stage.models.loras:
        raise ValueError(
            "the diffusers baseline needs one stage from an empty latent with the "
            "diffusers_zimage schedule, euler, cfg 1 and no LoRA; got "
            f"{len(wf_single_stage.stages)} stage(s), {stage.scheduler.name}, "
            f"{stage.sampler.name}, cfg {stage.cfg}, {stage.latent.source} latent, "
            f"{len(wf_single_stage.models.loras)} LoRA(s) (see single_stage_workflow)"
        )
    from zimage_trt.runtime.backends import load_torch_pipeline
    from zimage_trt.runtime.latents import process_out
    from zimage_trt.runtime.noise import initial_noise

    timer = Timer(device)
    steps = len(stage.sigmas()) - 1
    (h, w) = wf_single_stage.latent_sizes()[0]
    log(f"[baseline] this project's torch backend, one stage {VAE_SCALE * w}×{VAE_SCALE * h}")
    ours = load_torch_pipeline(wf_single_stage, str(model_dir), device=device, dtype=dtype, log=log)
    our_seconds: list[float] = []
    for run in range(warmup + repeats):
        generation = ours.run(wf_single_stage)
        if run >= warmup:
            our_seconds.append(generation.seconds[generation.stages[0].name])
    our_calls = generation.stages[0].model_calls
    hidden = ours.prompts(wf_single_stage.prompts.positive_text)
    del ours
    _free(device)

    log("[baseline] diffusers ZImagePipeline (eager)")
    noise = initial_noise((1, LATENT_CHANNELS, h, w), stage.seed)
    call = {
        "prompt_embeds": [hidden[0].to(dtype)],
        "guidance_scale": 0.0,  # diffusers skips the unconditional pass only at 0
        "height": VAE_SCALE * h,
        "width": VAE_SCALE * w,
        "num_inference_steps": steps,
        "output_type": "latent",
    }
    their_seconds, their_calls, their_latent = _diffusers_runs(
        diffusers.ZImagePipeline, model_dir, call, noise, timer, dtype, warmup + repeats
    )
    their_seconds = their_seconds[warmup:]
    _free(device)
    delta = float((generation.latent - process_out(their_latent.float().cpu())).abs().max())

    ours_stats, theirs_stats = summary(our_seconds), summary(their_seconds)
    return {
        "model_dir": str(model_dir),
        "width": VAE_SCALE * w,
        "height": VAE_SCALE * h,
        "steps": steps,
        "schedule": stage.scheduler.name,
        "seed": stage.seed,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "timer": timer.kind,
        "ours": {
            "backend": "torch",
            "dit_calls": our_calls,
            "seconds": asdict(ours_stats),
            "seconds_per_step": ours_stats.median / steps,
        },
        "diffusers": {
            "version": diffusers.__version__,
            "transformer_calls": their_calls,
            "seconds": asdict(theirs_stats),
            "seconds_per_step": theirs_stats.median / steps,
        },
        "per_step_overhead_seconds": (ours_stats.median - theirs_stats.median) / steps,
        "speedup_vs_diffusers": theirs_stats.median / ours_stats.median,
        "final_latent_max_abs_delta": delta,
    }


# ---- one bench run ----------------------------------------------------------------------------
def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """The machine without naming it: platform, CPU, core count, GPU."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = props.total_memory
        info["compute_capability"] = f"{props.major}.{props.minor}"
    return info


def versions() -> dict[str, str | None]:
    packages = ("torch", "numpy", "pillow", "onnx", "onnxruntime", "onnxruntime-gpu",
                "tensorrt", "diffusers", "transformers")  # fmt: skip
    found = {name: _package_version(name) for name in packages}
    return {"zimage_trt": __version__, **found, "cuda": torch.version.cuda}


def _model_dit_config(wf: Workflow, model: str | None, log: Log) -> DiTConfig | None:
    """The DiT's config from its checkpoint, read on the meta device (no weights loaded)."""
    from zimage_trt.models.checkpoints import load_dit
    from zimage_trt.runtime.backends import model_sources

    try:
        files = model_sources(wf, model, log=lambda msg: None).files
        return load_dit(files.transformer, torch.float32, meta=True).config
    except (ValueError, OSError) as exc:
        log(f"no DiT config for the roofline: {exc}")
        return None


def engine_folder_pipeline(
    backend: str,
    folder: Path | None,
    wf: Workflow,
    model: str | None,
    device: torch.device | None,
    engines_root: Path,
    log: Log,
) -> tuple[Pipeline, dict[str, Any]]:
    """A compiled backend's pipeline: the given folder, or one built (or reused by cache key)
    under ``engines_root``; build seconds are recorded apart from every run time."""
    from zimage_trt.runtime.engine_folder import check_request, load_engine_folder

    build: dict[str, Any] = {"folder": str(folder) if folder else None, "built_here": False}
    if folder is None:
        from zimage_trt.build_engines.build import BuildOptions, plan_build, run_build

        precision = BUILD_PRECISION[backend]
        folder = engines_root / _slug(
            f"{model or 'workflow-models'}-{wf.name}-{backend}-{precision}"
        )
        log(f"[{backend}] building (or reusing by cache key) {folder}")
        options = BuildOptions(backend=backend, precision=precision)
        t0 = time.perf_counter()
        plan = plan_build(options, model=model, workflow=wf, log=log)
        result = run_build(plan, options, folder, log=log)
        build.update(
            folder=str(folder),
            built_here=True,
            seconds=time.perf_counter() - t0,
            engines_reused=[r.name for r in result.engines if r.reused],
            engines_built=[r.name for r in result.engines if not r.reused],
        )
    t0 = time.perf_counter()
    pipeline, manifest = load_engine_folder(folder, device=device, log=log)
    check_request(manifest, wf, folder)
    pipeline.preflight(wf)
    build.update(load_seconds=time.perf_counter() - t0, precision=manifest.precision,
                 manifest_versions=manifest.versions)  # fmt: skip
    return pipeline, build


def _engine_dirs(dirs: Sequence[Path], backends: Sequence[str]) -> dict[str, Path]:
    from zimage_trt.runtime.manifest import read_manifest

    by_backend: dict[str, Path] = {}
    for folder in dirs:
        backend = read_manifest(folder).backend
        if backend not in backends:
            raise ValueError(
                f"engine folder {folder} holds {backend} engines, but the backends asked for "
                f"are {', '.join(backends)}; add {backend} to --backends"
            )
        if backend in by_backend:
            raise ValueError(f"two {backend} engine folders given: {by_backend[backend]}, {folder}")
        by_backend[backend] = Path(folder)
    return by_backend


def parse_backends(text: str | Sequence[str]) -> list[str]:
    names = [b.strip() for b in text.split(",")] if isinstance(text, str) else list(text)
    names = [b for b in names if b]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise ValueError(
            f"unknown backend(s) {', '.join(unknown) or '(none given)'}; choose from: "
            + ", ".join(BACKENDS)
        )
    return list(dict.fromkeys(names))


def bench_pipeline(
    pipeline: Pipeline,
    wf: Workflow,
    *,
    warmup: int,
    iters: int,
    repeats: int,
    dit_config: DiTConfig | None = None,
    log: Log = lambda msg: None,
) -> tuple[dict[str, Any], Generation]:
    """Components, end to end and cache effect of one pipeline (a backend's record in the JSON),
    and the last end-to-end Generation."""
    components = bench_components(pipeline, wf, warmup, iters, dit_config=dit_config, log=log)
    end_to_end, generation = bench_end_to_end(
        pipeline, wf, repeats, warmup=warmup, dit_config=dit_config, log=log
    )
    cache = bench_cache_effect(pipeline, wf, cached=generation, log=log)
    record = {"components": components, "end_to_end": end_to_end, "cache_effect": cache}
    return record, generation


def _compiled_pipeline(eager: Pipeline) -> Pipeline | str:
    """The torch-compile pipeline over the eager engines, or why there is none."""
    try:
        from zimage_trt.runtime.compiled import compiled_engines  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        return f"not available ({exc})"
    return Pipeline(compiled_engines(eager.engines), eager.prompts.tokenizer)


def _compile_record(pipeline: Pipeline) -> dict[str, Any] | None:
    """torch.compile's first-call seconds per engine and shape, apart from the steady state."""
    from zimage_trt.runtime.compiled import compile_stats  # type: ignore[import-not-found,unused-ignore]

    stats = compile_stats(pipeline.engines)
    if stats is None:
        return None
    rows = [{**asdict(row), "status": row.status} for row in stats.report()]
    return {"seconds": stats.compile_seconds(), "shapes": rows}


def run_bench(
    model: str | None,
    workflow: str | Workflow,
    backends: str | Sequence[str],
    engines_dirs: Sequence[Path] = (),
    *,
    device: str = "auto",
    dtype: str = "auto",
    warmup: int = 1,
    iters: int = 5,
    repeats: int = 3,
    skip_baseline: bool = False,
    engines_root: Path | None = None,
    log: Log = lambda msg: None,
) -> dict[str, Any]:
    """Every figure of one bench run as a JSON-ready dict (see ``benchmarks/README.md``).

    The torch backend is added when the baselines are wanted (this project's eager math is the
    multi-stage baseline). Compiled backends without a folder get one built (or reused by cache
    key) under ``engines_root`` (default: the zimage-trt cache's ``engines/``).
    """
    from zimage_trt.runtime.backends import load_torch_pipeline, pick_device, pick_dtype

    for name, value, minimum in (("warmup", warmup, 0), ("iters", iters, 1),
                                 ("repeats", repeats, 1)):  # fmt: skip
        _check_count(name, value, minimum)
    wanted = parse_backends(backends)
    added_torch = not skip_baseline and "torch" not in wanted
    if added_torch:
        wanted.insert(0, "torch")
    # torch first: torch-compile wraps its engines, the others compare against it
    wanted.sort(key=lambda b: BACKENDS.index(b) if b in ("torch", "torch-compile") else 9)
    folders = _engine_dirs(engines_dirs, wanted)
    if "tensorrt" in wanted:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise ValueError(
                "backend tensorrt asked for, but the tensorrt package is not installed "
                "(pip install 'zimage-trt[tensorrt]' on a machine with an NVIDIA GPU)"
            ) from None
    wf = load_workflow(workflow) if isinstance(workflow, str) else workflow
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    folder_device = None if device == "auto" else torch_device
    if engines_root is None:
        from zimage_trt.models.tiny import cache_dir

        engines_root = cache_dir() / "engines"
    dit_config = _model_dit_config(wf, model, log)
    gpu = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else None
    peak = gpu_bf16_peak(gpu)

    result: dict[str, Any] = {
        "schema": SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(torch_device),
        "versions": versions(),
        "device": str(torch_device),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "timer": Timer(torch_device).kind,
        "settings": {
            "model": model,
            "workflow": wf.name,
            "backends": wanted,
            "torch_added_as_baseline": added_torch,
            "engines": {b: str(p) for b, p in folders.items()},
            "warmup": warmup,
            "iters": iters,
            "repeats": repeats,
            "skip_baseline": skip_baseline,
        },
        "workflow": _workflow_record(wf),
        "dit_config": asdict(dit_config) if dit_config is not None else None,
        "backends": {},
    }
    latents: dict[str, Tensor] = {}
    eager: Pipeline | None = None
    for backend in wanted:
        t0 = time.perf_counter()
        record: dict[str, Any] = {"status": "ok"}
        if backend in COMPILED_BACKENDS:
            pipeline, record["build"] = engine_folder_pipeline(
                backend, folders.get(backend), wf, model, folder_device, engines_root, log
            )
        else:
            if eager is None:
                eager = load_torch_pipeline(
                    wf, model, device=torch_device, dtype=torch_dtype, log=log
                )
            pipeline = eager
            if backend == "torch-compile":
                compiled = _compiled_pipeline(eager)
                if isinstance(compiled, str):
                    result["backends"][backend] = {"status": "skipped", "reason": compiled}
                    continue
                pipeline = compiled
                record["note"] = "compilation happens in the first calls: see first_run_seconds"
            record["load_seconds"] = time.perf_counter() - t0
        measured, generation = bench_pipeline(
            pipeline, wf, warmup=warmup, iters=iters, repeats=repeats, dit_config=dit_config,
            log=log,
        )  # fmt: skip
        if backend == "torch-compile":
            record["compile"] = _compile_record(pipeline)
        result["backends"][backend] = {**record, **measured}
        latents[backend] = generation.latent
        del pipeline, generation
        _free(torch_device)
    del eager
    _free(torch_device)

    result["agreement"] = {
        backend: {"final_latent_max_abs_delta_vs_torch": float((x - latents["torch"]).abs().max())}
        for backend, x in latents.items()
        if backend != "torch" and "torch" in latents
    }
    result["baselines"] = _baselines(result, model, wf, torch_device, torch_dtype, warmup,
                                     repeats, skip_baseline, log)  # fmt: skip
    result["roofline"] = _roofline(result, gpu, peak)
    return result


def _workflow_record(wf: Workflow) -> dict[str, Any]:
    stages = []
    for name, stage, (h, w) in zip(_stage_names(wf), wf.stages, wf.latent_sizes(), strict=True):
        stages.append(
            {
                "name": name,
                "latent": [LATENT_CHANNELS, h, w],
                "pixels": [VAE_SCALE * w, VAE_SCALE * h],
                "sampler": stage.sampler.name,
                "scheduler": stage.scheduler.name,
                "steps": len(stage.sigmas()) - 1,
                "cfg": stage.cfg,
                "easycache": stage.cache is not None,
            }
        )
    return {"name": wf.name, "stages": stages}


def _baselines(
    result: dict[str, Any],
    model: str | None,
    wf: Workflow,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
    skip: bool,
    log: Log,
) -> dict[str, Any]:
    if skip:
        return {"skipped": "--skip-baseline"}
    eager = result["backends"].get("torch", {}).get("end_to_end")
    multi: dict[str, Any] = {"backend": "torch", "workflow": wf.name}
    if eager is not None:
        base = eager["total_seconds"]["median"]
        multi["total_seconds_median"] = base
        multi["speedup_vs_torch"] = {
            b: base / r["end_to_end"]["total_seconds"]["median"]
            for b, r in result["backends"].items()
            if r.get("status") == "ok"
        }
    model_dir = diffusers_model_dir(model)
    single = single_stage_workflow(wf, _scheduler_shift(model_dir) if model_dir else 3.0)
    diffusers_result = bench_diffusers_baseline(
        model_dir, single, device=device, dtype=dtype, warmup=min(warmup, 1), repeats=repeats,
        log=log,
    )  # fmt: skip
    return {"diffusers_single_stage": diffusers_result, "torch_eager_multi_stage": multi}


def _roofline(result: dict[str, Any], gpu: str | None, peak: tuple[float, str] | None) -> dict:
    rows = []
    for backend, record in result["backends"].items():
        for row in record.get("components", []):
            if row["engine"] == "denoiser" and row["flops"] is not None:
                rows.append({"backend": backend, "shape": row["shape"], "stages": row["stages"],
                             "flops_per_call": row["flops"],
                             "median_seconds": row["seconds"]["median"],
                             "tflops_per_s": row["tflops_per_s"],
                             "fraction_of_bf16_peak": row["fraction_of_bf16_peak"]})  # fmt: skip
    return {
        "gpu": gpu,
        "bf16_peak_flops": peak[0] if peak else None,
        "peak_source": peak[1] if peak else None,
        "note": "FLOPs per DiT call from the config and the padded token counts "
        "(speed-anchors §5.2); the caption path runs once per prompt and is not in them",
        "denoiser": rows,
    }


# ---- outputs ----------------------------------------------------------------------------------
def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.2f}"


def _s(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds:.3f}"


def _pct(fraction: float | None) -> str:
    return "–" if fraction is None else f"{100 * fraction:.1f} %"


def _tflops(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


Row = tuple[Any, ...]


def _md_components(ok: Mapping[str, Any]) -> list[str]:
    rows: list[Row] = [
        (b, c["engine"], c["shape"], _ms(c["seconds"]["median"]), _ms(c["seconds"]["p90"]),
         c["seconds"]["n"], _tflops(c["tflops_per_s"]), _pct(c["fraction_of_bf16_peak"]))
        for b, r in ok.items() for c in r["components"]
    ]  # fmt: skip
    header = ("backend", "engine", "shape", "median ms", "p90 ms", "n", "TFLOP/s", "bf16 peak")
    return ["## Components", "", *_table(header, rows)]


def _build_seconds(record: Mapping[str, Any]) -> float | None:
    """Engine build (compiled folders) or torch.compile time, whichever the backend has."""
    done = record.get("build") or record.get("compile") or {}
    return done.get("seconds")


def _md_end_to_end(ok: Mapping[str, Any], result: Mapping[str, Any]) -> list[str]:
    multi = result.get("baselines", {}).get("torch_eager_multi_stage", {})
    speedups = multi.get("speedup_vs_torch", {})
    totals: list[Row] = []
    parts: list[Row] = []
    for b, r in ok.items():
        e = r["end_to_end"]
        totals.append((b, e["device"], e["repeats"], _s(e["total_seconds"]["median"]),
                       _s(e["total_seconds"]["p90"]), f"{e['images_per_second']:.3g}",
                       _s(e["first_run_seconds"]), _s(_build_seconds(r)),
                       f"{speedups[b]:.2f}×" if b in speedups else "–"))  # fmt: skip
        for p in e["parts"]:
            latent = "×".join(map(str, p["latent_shape"][1:])) if "latent_shape" in p else ""
            parts.append((b, p["name"], latent, p.get("steps", ""), p.get("model_calls", ""),
                          p.get("calls_skipped", ""), _s(p["seconds"]["median"]),
                          _s(p["seconds"]["p90"]), _ms(p.get("seconds_per_step")),
                          _tflops(p.get("tflops_per_s"))))  # fmt: skip
    lines = ["## End to end", ""]
    lines += _table(("backend", "device", "runs", "median s", "p90 s", "images/s",
                     "first run s", "build/compile s", "vs torch eager"), totals)  # fmt: skip
    lines += _table(("backend", "part", "latent", "steps", "DiT calls", "cache skips",
                     "median s", "p90 s", "ms/step", "DiT TFLOP/s"), parts)  # fmt: skip
    for b, a in result.get("agreement", {}).items():
        delta = a["final_latent_max_abs_delta_vs_torch"]
        lines += [f"{b}: final latent max |Δ| vs torch {delta:.3g}", ""]
    return lines


def _md_baselines(result: Mapping[str, Any]) -> list[str]:
    lines = ["## Baselines", ""]
    baselines = result.get("baselines", {})
    base = baselines.get("diffusers_single_stage") or {}
    if not base or "skipped" in base:
        reason = base.get("skipped") or baselines.get("skipped") or "not run"
        return [*lines, f"diffusers single stage: skipped ({reason})", ""]
    size = f"{base['width']}×{base['height']}"
    theirs, ours = base["diffusers"], base["ours"]
    rows: list[Row] = [
        ("diffusers ZImagePipeline (eager)", size, base["steps"], theirs["transformer_calls"],
         _s(theirs["seconds"]["median"]), _ms(theirs["seconds_per_step"])),
        ("zimage-trt torch (eager)", size, base["steps"], ours["dit_calls"],
         _s(ours["seconds"]["median"]), _ms(ours["seconds_per_step"])),
    ]  # fmt: skip
    lines += _table(("run", "size", "steps", "DiT calls", "median s", "ms/step"), rows)
    return [
        *lines,
        f"Per-step overhead, ours − diffusers: {_ms(base['per_step_overhead_seconds'])} ms; "
        f"final latent max |Δ| {base['final_latent_max_abs_delta']:.3g} (denoising only: text "
        "encoding and VAE decode excluded on both sides).",
        "",
    ]


def _md_cache(ok: Mapping[str, Any]) -> list[str]:
    stages: list[Row] = []
    prompts: list[Row] = []
    for b, r in ok.items():
        c = r["cache_effect"]
        for s in c["stages"]:
            stages.append((b, s["name"], "yes" if s["easycache"] else "no", s["calls_cached_run"],
                           s["calls_saved"], s["calls_uncached_run"], _s(s["seconds_cached_run"]),
                           _s(s["seconds_uncached_run"])))  # fmt: skip
        p = c["prompt_cache"]
        prompts.append((b, f"{c['final_latent_max_abs_delta']:.3g}", _ms(p["text_seconds_first"]),
                        _ms(p["text_seconds_repeat"]),
                        f"{p['encoder_calls_first']} / {p['encoder_calls_repeat']}"))  # fmt: skip
    lines = ["## Cache effect", ""]
    lines += _table(("backend", "stage", "EasyCache", "DiT calls", "calls saved",
                     "calls without cache", "s cached", "s uncached"), stages)  # fmt: skip
    lines += _table(("backend", "final latent max abs Δ vs uncached", "text ms first request",
                     "text ms repeated", "encoder calls first / repeated"), prompts)  # fmt: skip
    return lines


def _md_roofline(roof: Mapping[str, Any]) -> list[str]:
    peak = roof["bf16_peak_flops"]
    where = f"{peak / 1e12:.1f} TFLOP/s ({roof['peak_source']})" if peak else "not tabulated"
    rows: list[Row] = [
        (r["backend"], r["shape"], f"{r['flops_per_call'] / 1e9:.4g}", _ms(r["median_seconds"]),
         _tflops(r["tflops_per_s"]), _pct(r["fraction_of_bf16_peak"]))
        for r in roof["denoiser"]
    ]  # fmt: skip
    header = ("backend", "denoiser call", "GFLOP/call", "median ms", "TFLOP/s", "bf16 peak")
    return [
        "## Roofline",
        "",
        f"GPU {roof['gpu'] or 'none'}; bf16 peak {where}. {roof['note']}.",
        "",
        *_table(header, rows),
    ]


def markdown(result: Mapping[str, Any]) -> str:
    """The bench as markdown tables: components, end to end, baselines, cache effect, roofline."""
    m, settings = result["machine"], result["settings"]
    where = m["gpu"] or f"{m['cpu']} ({m['cpu_count']} cores)"
    lines = [
        f"# zimage-trt bench: {settings['workflow']} on {settings['model'] or 'workflow models'}",
        "",
        f"{where}; device {result['device']}, {result['dtype']}; timer {result['timer']}; "
        f"warm-up {settings['warmup']}, {settings['iters']} timed calls per component, "
        f"{settings['repeats']} timed end-to-end runs; {result['created']}.",
        "",
    ]
    ok = {b: r for b, r in result["backends"].items() if r.get("status") == "ok"}
    for b, r in result["backends"].items():
        if r.get("status") != "ok":
            lines += [f"- {b}: skipped, {r.get('reason')}", ""]
    lines += _md_components(ok) + _md_end_to_end(ok, result) + _md_baselines(result)
    lines += _md_cache(ok)
    if "roofline" in result:
        lines += _md_roofline(result["roofline"])
    return "\n".join(lines)


CHART_WIDTH = 960
CHART_TOP = 48
CHART_BAR = 28
CHART_GAP = 20
CHART_LABEL = 150
CHART_AXIS = 40
CHART_LEGEND_ROW = 22
CHART_LEGEND_PER_ROW = 6
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac")  # fmt: skip


def chart_size(bars: int, parts: int) -> tuple[int, int]:
    """(width, height) of the chart for this many bars (backends) and parts (legend entries)."""
    legend_rows = -(-parts // CHART_LEGEND_PER_ROW)
    height = (
        CHART_TOP + bars * (CHART_BAR + CHART_GAP) + CHART_AXIS + legend_rows * CHART_LEGEND_ROW
    )
    return CHART_WIDTH, height + 12


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def draw_chart(result: Mapping[str, Any], path: str | Path) -> tuple[int, int]:
    """A stacked horizontal bar per backend: median seconds of text, each stage, decode, other.
    Written atomically; returns the image size."""
    from PIL import Image, ImageDraw, ImageFont

    from zimage_trt.models.checkpoints import atomic_path

    bars = [(b, r["end_to_end"]["parts"]) for b, r in result["backends"].items()
            if r.get("status") == "ok"]  # fmt: skip
    names = list(dict.fromkeys(p["name"] for _, parts in bars for p in parts))
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    size = chart_size(len(bars), len(names))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    title = f"{result['settings']['workflow']}: median seconds per part ({result['timer']})"
    draw.text((10, 14), title, fill="black", font=font)
    longest = max((sum(p["seconds"]["median"] for p in parts) for _, parts in bars), default=1.0)
    step = _nice_step(longest or 1.0)
    span = step * math.ceil(longest / step) if longest > 0 else step
    x0, x1 = CHART_LABEL, CHART_WIDTH - 30
    scale = (x1 - x0) / span
    y = CHART_TOP
    for backend, parts in bars:
        draw.text((10, y + 8), backend, fill="black", font=font)
        x = float(x0)
        for p in parts:
            width = p["seconds"]["median"] * scale
            if width >= 0.5:
                draw.rectangle((x, y, x + width, y + CHART_BAR), fill=colors[p["name"]])
            x += width
        total = sum(p["seconds"]["median"] for p in parts)
        draw.text((min(x + 4, x1 - 40), y + 8), f"{total:.3g} s", fill="black", font=font)
        y += CHART_BAR + CHART_GAP
    draw.line((x0, y, x1, y), fill="black")
    for i in range(round(span / step) + 1):
        tx = x0 + i * step * scale
        draw.line((tx, y, tx, y + 5), fill="black")
        draw.text((tx - 8, y + 8), f"{i * step:g}", fill="black", font=font)
    y += CHART_AXIS
    for i, name in enumerate(names):
        row, col = divmod(i, CHART_LEGEND_PER_ROW)
        lx, ly = 10 + col * 155, y + row * CHART_LEGEND_ROW
        draw.rectangle((lx, ly, lx + 14, ly + 14), fill=colors[name])
        draw.text((lx + 20, ly + 2), name, fill="black", font=font)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return size


def write_outputs(
    result: Mapping[str, Any],
    json_path: str | Path | None,
    md_path: str | Path | None,
    png_path: str | Path | None,
) -> None:
    """The JSON (every figure), the markdown tables and the PNG chart; each written atomically,
    each skipped when its path is None."""
    import json

    from zimage_trt.models.checkpoints import write_text

    if json_path is not None:
        # allow_nan=False: a NaN or Inf figure is a bench bug, not something to write
        write_text(json_path, json.dumps(result, indent=2, ensure_ascii=False, allow_nan=False))
    if md_path is not None:
        write_text(md_path, markdown(result))
    if png_path is not None:
        draw_chart(result, png_path)


# ---- the command ------------------------------------------------------------------------------
def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``bench`` sub-command on an argparse sub-parsers object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="time each engine, the workflow end to end, baselines, caches and the roofline",
        description="Times each engine at each stage shape (median, p90 after warm-up), the "
        "workflow end to end per part with images/s, diffusers' ZImagePipeline and this "
        "project's eager torch backend as baselines on the same weights, EasyCache and the "
        "prompt cache, and DiT FLOPs against the GPU's bf16 peak. Prints markdown tables; "
        "--json/--md/--png write the figures. Nothing asserts a time.",
        epilog="examples:\n  zimage-trt bench --model tiny --workflow zimage-121101 "
        "--backends torch,onnxruntime --json out.json\n  zimage-trt bench --model "
        "~/models/Z-Image-Turbo --backends torch,tensorrt --engines engines/ --warmup 5 "
        "--json results/h100.json",
    )
    p.add_argument("--model", default=None, metavar="PATH|REPO|tiny",
                   help="model folder, Hugging Face repo id, or 'tiny' "
                   "(default: the workflow's models)")  # fmt: skip
    p.add_argument("-w", "--workflow", default="zimage-121101", metavar="NAME|FILE",
                   help="workflow preset or YAML file (default: zimage-121101)")  # fmt: skip
    p.add_argument("--backends", default="torch", metavar="LIST",
                   help=f"comma list of {', '.join(BACKENDS)} (default: torch)")  # fmt: skip
    p.add_argument("--engines", type=Path, action="append", default=[], metavar="DIR",
                   help="a built engine folder for onnxruntime/tensorrt (repeatable); without "
                   "one, a folder is built or reused under the cache")  # fmt: skip
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        metavar="N",
        help="untimed calls per component and untimed end-to-end runs (default 1)",
    )
    p.add_argument(
        "--iters",
        type=int,
        default=5,
        metavar="N",
        help="timed calls per component shape (default 5)",
    )
    p.add_argument(
        "--repeats", type=int, default=3, metavar="N", help="timed end-to-end runs (default 3)"
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every figure")
    p.add_argument(
        "--md",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the tables (default: beside --json)",
    )
    p.add_argument(
        "--png",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the per-part chart (default: beside --json)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument(
        "--dtype",
        default="auto",
        help="torch backend dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp32",
    )
    p.add_argument(
        "--skip-baseline",
        action="store_true",
        help="no diffusers baseline and no torch eager run unless asked for",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    result = run_bench(
        args.model,
        args.workflow,
        args.backends,
        args.engines,
        device=args.device,
        dtype=args.dtype,
        warmup=args.warmup,
        iters=args.iters,
        repeats=args.repeats,
        skip_baseline=args.skip_baseline,
        log=log,
    )
    md, png = args.md, args.png
    if args.json is not None:
        md = md or args.json.with_suffix(".md")
        png = png or args.json.with_suffix(".png")
    write_outputs(result, args.json, md, png)
    print(markdown(result))
    for path in (args.json, md, png):
        if path is not None:
            print(f"wrote {path}")
    return 0
