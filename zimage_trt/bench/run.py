"""One bench run as a JSON-ready dict: the backends asked for (torch added as the baseline),
their pipelines (engine folders given, or built or reused by cache key), each one measured, the
agreement of their final latents, the baselines, the roofline, the machine and the versions."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zimage_trt import __version__
from zimage_trt.bench.diffusers_baseline import (
    bench_diffusers_baseline,
    diffusers_model_dir,
    scheduler_shift,
    single_stage_workflow,
)
from zimage_trt.bench.measure import bench_pipeline, pipeline_dit_config, stage_names
from zimage_trt.bench.roofline import gpu_bf16_peak
from zimage_trt.bench.timing import Log, Timer, check_count, free_memory
from zimage_trt.engines.compiled import compile_stats, compiled_engines
from zimage_trt.errors import InputError
from zimage_trt.models.dit import DiTConfig
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.sampling.latents import LATENT_CHANNELS, VAE_SCALE
from zimage_trt.workflow import Workflow, load_workflow

BACKENDS = ("torch", "torch-compile", "onnxruntime", "tensorrt")
COMPILED_BACKENDS = ("onnxruntime", "tensorrt")
BUILD_PRECISION = {"onnxruntime": "fp32", "tensorrt": "bf16"}  # ORT's CPU provider has no bf16
SCHEMA = "zimage-trt-bench/1"


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
    from zimage_trt.workflow.resolve import model_sources

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
    build: dict[str, Any] = {"folder": str(folder) if folder else None, "built_here": False}
    if folder is None:
        from zimage_trt.build_engines.build import run_build
        from zimage_trt.build_engines.plan import BuildOptions, plan_build

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
    # other LoRAs than the folder's are swapped in from the base DiT, ``model``
    pipeline = Pipeline.open(
        engines=folder, workflow=wf, model=model, device=device or "auto", search=(), log=log
    )
    manifest = pipeline.manifest
    assert manifest is not None
    if pipeline.lora_swap is not None:
        build["lora_swap"] = pipeline.lora_swap.describe()
    build.update(load_seconds=time.perf_counter() - t0, precision=manifest.precision,
                 manifest_versions=manifest.versions)  # fmt: skip
    return pipeline, build


def _engine_dirs(dirs: Sequence[Path], backends: Sequence[str]) -> dict[str, Path]:
    from zimage_trt.engines.manifest import read_manifest

    by_backend: dict[str, Path] = {}
    for folder in dirs:
        backend = read_manifest(folder).backend
        if backend not in backends:
            raise InputError(
                f"engine folder {folder} holds {backend} engines, but the backends asked for "
                f"are {', '.join(backends)}; add {backend} to --backends"
            )
        if backend in by_backend:
            raise InputError(f"two {backend} engine folders given: {by_backend[backend]}, {folder}")
        by_backend[backend] = Path(folder)
    return by_backend


def parse_backends(text: str | Sequence[str]) -> list[str]:
    names = [b.strip() for b in text.split(",")] if isinstance(text, str) else list(text)
    names = [b for b in names if b]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise InputError(
            f"unknown backend(s) {', '.join(unknown) or '(none given)'}; choose from: "
            + ", ".join(BACKENDS)
        )
    return list(dict.fromkeys(names))


def _compiled_pipeline(eager: Pipeline, options: Mapping[str, Any]) -> Pipeline:
    """The torch-compile pipeline over the eager engines."""
    return Pipeline(compiled_engines(eager.engines, **options), eager.prompts.tokenizer)


def _compile_record(pipeline: Pipeline) -> dict[str, Any] | None:
    """torch.compile's first-call seconds per engine and shape, apart from the steady state."""
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
    eager: Pipeline | None = None,
    compile_options: Mapping[str, Any] | None = None,
    deadline: float | None = None,
    on_backend: Callable[[dict[str, Any]], None] | None = None,
    max_vram: int | None = None,
    log: Log = lambda msg: None,
) -> dict[str, Any]:
    """Every figure of one bench run as a JSON-ready dict (see ``benchmarks/README.md``).

    ``eager``: an eager torch pipeline already built (e.g. the GPU benchmark's random full-size
    weights) instead of loading ``model``; ``compile_options``: keywords of ``compiled_engines``
    for the torch-compile backend (``scope``, ``backend``: the CPU dry run passes "eager").
    ``deadline`` (a ``time.perf_counter()`` value): a backend not started by then is recorded as
    skipped, with the reason, instead of run. ``on_backend``: called with the result so far after
    each part of each backend (components, end to end, cache effect; until the last, the
    backend's status is "incomplete"): a caller with a hard time limit writes it out, so a kill
    keeps what was done.

    The torch backend is added when the baselines are wanted (this project's eager math is the
    multi-stage baseline). Compiled backends without a folder get one built (or reused by cache
    key) under ``engines_root`` (default: the zimage-trt cache's ``engines/``). ``max_vram``:
    the eager torch backend opened under that memory budget's plan (``runtime.memory_plan``);
    no other backend follows one.
    """
    from zimage_trt.engines.torch_engines import pick_device, pick_dtype

    for name, value, minimum in (("warmup", warmup, 0), ("iters", iters, 1),
                                 ("repeats", repeats, 1)):  # fmt: skip
        check_count(name, value, minimum)
    wanted = parse_backends(backends)
    added_torch = not skip_baseline and "torch" not in wanted
    if added_torch:
        wanted.insert(0, "torch")
    # torch first: torch-compile wraps its engines, the others compare against it
    wanted.sort(key=lambda b: BACKENDS.index(b) if b in ("torch", "torch-compile") else 9)
    folders = _engine_dirs(engines_dirs, wanted)
    if max_vram is not None and (wanted != ["torch"] or not skip_baseline):
        raise InputError("--max-vram plans the eager torch backend alone: pass --backends "
                         "torch --skip-baseline (the other backends and diffusers' baseline "
                         "follow no budget)")  # fmt: skip
    if "tensorrt" in wanted:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise InputError(
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
    dit_config = (
        pipeline_dit_config(eager) if eager is not None else _model_dit_config(wf, model, log)
    )
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
    for backend in wanted:
        t0 = time.perf_counter()
        if deadline is not None and t0 > deadline:
            reason = f"past the time budget by {t0 - deadline:.0f} s when it was due to start"
            log(f"[{backend}] skipped: {reason}")
            result["backends"][backend] = {"status": "skipped", "reason": reason}
            continue
        record: dict[str, Any] = {"status": "ok"}
        if backend in COMPILED_BACKENDS:
            pipeline, record["build"] = engine_folder_pipeline(
                backend, folders.get(backend), wf, model, folder_device, engines_root, log
            )
        else:
            if eager is None:
                eager = Pipeline.open(
                    model=model, workflow=wf, device=torch_device, dtype=torch_dtype, search=(),
                    max_vram=max_vram, log=log,
                )  # fmt: skip
            pipeline = eager
            if backend == "torch-compile":
                pipeline = _compiled_pipeline(eager, compile_options or {})
                record["note"] = "compilation happens in the first calls: see first_run_seconds"
            record["load_seconds"] = time.perf_counter() - t0

        def part_done(measured: dict[str, Any], backend: str = backend, record: dict = record,
                      pipeline: Pipeline = pipeline) -> None:  # fmt: skip
            """The backend's record so far, for a caller that saves as it goes."""
            if backend == "torch-compile":
                record["compile"] = _compile_record(pipeline)
            state: dict[str, str] = {"status": "ok"}
            if "cache_effect" not in measured:  # until the last part, say where it stands
                state = {
                    "status": "incomplete",
                    "reason": f"measured so far: {', '.join(measured)}",
                }
            result["backends"][backend] = {**record, **measured, **state}
            if on_backend is not None:
                on_backend(result)

        _, generation = bench_pipeline(
            pipeline, wf, warmup=warmup, iters=iters, repeats=repeats, dit_config=dit_config,
            on_part=part_done, log=log,
        )  # fmt: skip
        latents[backend] = generation.latent
        del pipeline, generation, part_done  # the closure holds the pipeline too
        free_memory(torch_device)
    del eager
    free_memory(torch_device)

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
    for name, stage, (h, w) in zip(stage_names(wf), wf.stages, wf.latent_sizes(), strict=True):
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
    single = single_stage_workflow(wf, scheduler_shift(model_dir) if model_dir else 3.0)
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
