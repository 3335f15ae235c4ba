"""One pipeline measured on one workflow: each engine at each stage shape (components), the
workflow end to end per part with exact DiT FLOPs per stage, and the effect of EasyCache and of
the prompt cache."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from zimage_trt.bench.memory import attach, bench_memory, measurable
from zimage_trt.bench.roofline import dit_flops, flops_rate, gpu_bf16_peak, image_tokens
from zimage_trt.bench.timing import Log, Timer, check_count, summary
from zimage_trt.errors import InputError
from zimage_trt.models.dit import DiTConfig
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.runtime.requests import Generation
from zimage_trt.runtime.text import attention_mask
from zimage_trt.runtime.vae_tiles import tile_shapes
from zimage_trt.sampling.guider import Cond
from zimage_trt.sampling.latents import LATENT_CHANNELS, VAE_SCALE
from zimage_trt.workflow import Workflow


@dataclass
class ComponentCall:
    engine: str
    label: str
    inputs: dict[str, Tensor]
    stages: list[str]
    flops: float | None = None


def stage_names(wf: Workflow) -> list[str]:
    """Each stage's name, ``stage<i>`` (from 1) where it has none."""
    return [stage.name or f"stage{i + 1}" for i, stage in enumerate(wf.stages)]


def _needs_uncond(wf: Workflow) -> bool:
    return any(not math.isclose(stage.cfg, 1.0) for stage in wf.stages)


def pipeline_dit_config(pipeline: Pipeline) -> DiTConfig | None:
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
    batched as the guider batches them), the VAE decoder per decoded size (decoding in tiles:
    per piece)."""
    engines = pipeline.engines
    device, dtype = engines.device, engines.dtype
    tokenizer = pipeline.prompts.tokenizer
    names = stage_names(wf)
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
            tiles = pipeline.vae_tiles  # then every piece the tiled decode cuts
            pieces = [(h, w)] if tiles is None else tile_shapes(h, w, tiles)
            for rows, cols in pieces:
                add(("vae_decoder", rows, cols), names[i], partial(decoder, rows, cols))
        if stage.latent.source == "image" and engines.vae_encoder is not None:
            add(("vae_encoder", h, w), names[i], partial(encoder, h, w))
    return calls


def _engine(pipeline: Pipeline, name: str) -> Callable[..., dict[str, Tensor]]:
    engine = getattr(pipeline.engines, name)
    if engine is None:
        raise InputError(f"the {pipeline.engines.backend} engines have no {name}")
    return engine


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
    check_count("warmup", warmup, 0)
    check_count("iters", iters, 1)
    dit_config = dit_config or pipeline_dit_config(pipeline)
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
                **flops_rate(call.flops, stats.median, peak),
            }
        )
    return rows


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
    check_count("warmup", warmup, 0)
    check_count("repeats", repeats, 1)
    dit_config = dit_config or pipeline_dit_config(pipeline)
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
                **flops_rate(flops, stats.median, peak),
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

    pipeline.clear_caches()
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


def bench_pipeline(
    pipeline: Pipeline,
    wf: Workflow,
    *,
    warmup: int,
    iters: int,
    repeats: int,
    dit_config: DiTConfig | None = None,
    on_part: Callable[[dict[str, Any]], None] = lambda record: None,
    log: Log = lambda msg: None,
) -> tuple[dict[str, Any], Generation]:
    """Components, end to end, cache effect and memory of one pipeline (a backend's record in the
    JSON), and the last end-to-end Generation. ``on_part``: called with the record so far after
    each of the four parts."""
    record: dict[str, Any] = {}
    record["components"] = bench_components(
        pipeline, wf, warmup, iters, dit_config=dit_config, log=log
    )
    on_part(record)
    record["end_to_end"], generation = bench_end_to_end(
        pipeline, wf, repeats, warmup=warmup, dit_config=dit_config, log=log
    )
    on_part(record)
    record["cache_effect"] = bench_cache_effect(pipeline, wf, cached=generation, log=log)
    on_part(record)
    if measurable(torch.device(pipeline.engines.device)):
        record["memory"] = bench_memory(pipeline, wf, log=log)
        attach(record["end_to_end"], record["memory"])
    else:
        record["memory"] = {"skipped": "per-phase peaks need CUDA or Linux's /proc (clear_refs)"}
    on_part(record)
    return record, generation
