"""diffusers' ``ZImagePipeline`` (eager) against this project's torch backend on one stage with
the same weights, prompt embeddings and noise: seconds per step, the per-step overhead and the
final latents' difference. diffusers is imported only in here: the runtime never needs it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zimage_trt.bench.timing import Log, Timer, check_count, free_memory, summary
from zimage_trt.errors import InputError
from zimage_trt.sampling.latents import LATENT_CHANNELS, VAE_SCALE
from zimage_trt.workflow import Workflow


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
        from zimage_trt.models.model_files import resolve_model

        try:
            root = resolve_model(model, download=False).transformer.parent
        except (ValueError, OSError):
            return None
    return root if (root / "model_index.json").is_file() else None


def scheduler_shift(model_dir: Path) -> float:
    """The shift in the model folder's scheduler config (3.0 where it has none)."""
    import json

    config = model_dir / "scheduler" / "scheduler_config.json"
    if config.is_file():
        return float(json.loads(config.read_text(encoding="utf-8")).get("shift", 3.0))
    return 3.0


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
    check_count("warmup", warmup, 0)
    check_count("repeats", repeats, 1)
    stage = wf_single_stage.stages[0]
    shape = (
        len(wf_single_stage.stages),
        stage.scheduler.name,
        stage.sampler.name,
        stage.cfg,
        stage.latent.source,
    )
    if shape != (1, "diffusers_zimage", "euler", 1.0, "empty") or wf_single_stage.models.loras:
        raise InputError(
            "the diffusers baseline needs one stage from an empty latent with the "
            "diffusers_zimage schedule, euler, cfg 1 and no LoRA; got "
            f"{len(wf_single_stage.stages)} stage(s), {stage.scheduler.name}, "
            f"{stage.sampler.name}, cfg {stage.cfg}, {stage.latent.source} latent, "
            f"{len(wf_single_stage.models.loras)} LoRA(s) (see single_stage_workflow)"
        )
    from zimage_trt.runtime.pipeline import Pipeline
    from zimage_trt.sampling.latents import process_out
    from zimage_trt.sampling.noise import initial_noise

    timer = Timer(device)
    steps = len(stage.sigmas()) - 1
    (h, w) = wf_single_stage.latent_sizes()[0]
    log(f"[baseline] this project's torch backend, one stage {VAE_SCALE * w}×{VAE_SCALE * h}")
    ours = Pipeline.open(
        model=model_dir, workflow=wf_single_stage, device=device, dtype=dtype, search=(), log=log
    )
    our_seconds: list[float] = []
    for run in range(warmup + repeats):
        generation = ours.run(wf_single_stage)
        if run >= warmup:
            our_seconds.append(generation.seconds[generation.stages[0].name])
    our_calls = generation.stages[0].model_calls
    hidden = ours.prompts(wf_single_stage.prompts.positive_text)
    del ours
    free_memory(device)

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
    free_memory(device)
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
