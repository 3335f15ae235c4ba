"""Memory measured per phase of one run, beside the planner's prediction (``runtime.memory_plan``).

One extra run after the timed ones (the prompt cache cleared, so the text encoder runs): every
engine call is wrapped and its peak read above what was held just before it (weights, latents,
cached captions: the call's activations), and the peak of a phase is the most any of its calls
reached (``baseline_bytes``: what the run held before its first call):

- ``cuda_allocated``: ``torch.cuda.max_memory_allocated`` (``cuda_reserved`` beside it: the
  caching allocator's blocks);
- ``rss``: the process's peak resident set (Linux ``VmHWM``, reset through ``clear_refs``),
  with glibc's mmap threshold fixed at 128 KiB for the pass, so that freed tensors leave the
  RSS (by default glibc keeps them for the next allocation and the RSS stops following).

The prediction is the planner's activation peak for the phase, for the torch backend (compiled
engines keep memory of their own: TensorRT's, ONNX Runtime's arenas; no prediction there).
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zimage_trt.bench.timing import Log
from zimage_trt.runtime.memory_plan import MemoryPlanner, Strategy, model_configs_of
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.runtime.preflight import phase_name, prompt_tokens
from zimage_trt.workflow import Workflow

M_MMAP_THRESHOLD = -3  # mallopt's parameter number
PHASE_ENGINES = ("text_encoder", "caption_path", "denoiser", "vae_decoder")


class _Meter:
    """Reads a peak above a baseline: CUDA's allocator or the process's RSS."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.kind = "cuda_allocated" if self.cuda else "rss"
        self.baseline = self.now()

    def now(self) -> int:
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return _proc_status("VmRSS:")

    def reset(self) -> int:
        """The peak reset to now; returns now."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")
        return self.now()

    def peak(self, since: int) -> tuple[int, int | None]:
        """(the peak above ``since``, CUDA's reserved peak or None)."""
        if self.cuda:
            reserved = int(torch.cuda.max_memory_reserved(self.device))
            return int(torch.cuda.max_memory_allocated(self.device)) - since, reserved
        return _proc_status("VmHWM:") - since, None


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _mmap_threshold(size: int) -> bool:
    """glibc's mmap threshold fixed at ``size`` bytes and the free heap given back (False where
    there is no glibc): blocks the heap kept from earlier runs would otherwise be reused without
    the RSS growing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        done = bool(libc.mallopt(M_MMAP_THRESHOLD, size))
        libc.malloc_trim(0)
        return done
    except (OSError, AttributeError):
        return False


def measurable(device: torch.device) -> bool:
    """Whether this process can measure per-phase peaks on ``device``."""
    return device.type == "cuda" or (
        sys.platform.startswith("linux") and Path("/proc/self/clear_refs").exists()
    )


def bench_memory(pipeline: Pipeline, wf: Workflow, log: Log = lambda msg: None) -> dict[str, Any]:
    """Per phase (text, captions, each stage, each decode): the measured peak above the
    baseline and the planner's prediction (module docstring)."""
    device = torch.device(pipeline.engines.device)
    names = [stage.name for stage in wf.stages]
    state = {"stage": 0}
    peaks: dict[str, int] = {}
    reserved: dict[str, int] = {}

    def phase(engine: str) -> str:  # a decode follows its stage's last step
        done = engine == "vae_decoder" and state["stage"] > 0
        return phase_name(engine, names[min(state["stage"] - done, len(names) - 1)])

    def wrap(engine: str, call: Callable[..., dict[str, Tensor]]) -> Callable[..., Any]:
        hold = getattr(call, "hold", None)  # a network taking turns: brought in unmeasured

        def measured(**inputs: Tensor) -> dict[str, Tensor]:
            if hold is not None:
                hold()
            before = meter.reset()
            out = call(**inputs)
            if meter.cuda:
                torch.cuda.synchronize(device)
            peak, held = meter.peak(before)
            name = phase(engine)
            peaks[name] = max(peaks.get(name, 0), peak)
            if held is not None:
                reserved[name] = max(reserved.get(name, 0), held)
            return out

        return measured

    def step_done(stage: str, step: int, steps: int) -> None:
        if step == steps:
            state["stage"] += 1

    log(f"[{pipeline.engines.backend}] memory, one more run")
    pipeline.clear_caches()
    gc.collect()
    fixed = device.type != "cuda" and _mmap_threshold(128 * 1024)
    meter = _Meter(device)
    held_engines = {name: getattr(pipeline.engines, name) for name in PHASE_ENGINES}
    try:
        for name, engine in held_engines.items():
            setattr(pipeline.engines, name, wrap(name, engine))
        pipeline.run(wf, step_done)
    finally:
        for name, engine in held_engines.items():
            setattr(pipeline.engines, name, engine)
        if fixed:
            _mmap_threshold(32 * 2**20)  # glibc's largest dynamic threshold
    predicted = _predicted(pipeline, wf, device)
    return {
        "kind": meter.kind,
        "baseline_bytes": meter.baseline,
        "note": "each phase's most any of its engine calls added above what was held before it; "
        "predicted: the planner's activations (zimage-trt plan), torch backend only",
        "phases": [
            {
                "name": name,
                "measured_peak_bytes": peak,
                "predicted_peak_bytes": predicted.get(name),
                **({"cuda_reserved_bytes": reserved[name]} if name in reserved else {}),
            }
            for name, peak in peaks.items()
        ],
    }


def _predicted(pipeline: Pipeline, wf: Workflow, device: torch.device) -> dict[str, int]:
    if pipeline.engines.backend != "torch":
        return {}
    budget = pipeline.budget
    if budget is not None:  # the plan's own planner: its precisions, its upcast text encoder
        tokens = prompt_tokens(wf, pipeline.prompts.tokenizer)
        rows = budget.planner.like(wf, tokens).predict(budget.plan.strategy)
        return {row.name: row.activations for row in rows}
    planner = MemoryPlanner(
        wf, prompt_tokens(wf, pipeline.prompts.tokenizer), model_configs_of(pipeline.engines),
        device="cuda" if device.type == "cuda" else "cpu", dtype=pipeline.engines.dtype,
        text_dtype=_module_dtype(pipeline.engines.text_encoder),
    )  # fmt: skip
    rows = planner.predict(Strategy(vae_tiles=pipeline.vae_tiles))
    return {row.name: row.activations for row in rows}


def _module_dtype(engine: Any) -> torch.dtype | None:
    module = getattr(engine, "module", None)
    return next(module.parameters()).dtype if isinstance(module, torch.nn.Module) else None


def attach(end_to_end: dict[str, Any], memory: dict[str, Any]) -> None:
    """Each end-to-end part's ``memory`` (text, each stage, decode: the most of its phases)."""
    phases = {p["name"]: p for p in memory.get("phases", [])}
    stages = [part["name"] for part in end_to_end["parts"] if part["kind"] == "stage"]
    decodes = {phase_name("vae_decoder", stage) for stage in stages}
    for part in end_to_end["parts"]:
        if part["kind"] == "decode":
            mine = [p for name, p in phases.items() if name in decodes]
        else:
            mine = [phases[part["name"]]] if part["name"] in phases else []
        if not mine:
            continue
        predicted = [p["predicted_peak_bytes"] for p in mine]
        part["memory"] = {
            "kind": memory["kind"],
            "measured_peak_bytes": max(p["measured_peak_bytes"] for p in mine),
            "predicted_peak_bytes": None if None in predicted else max(predicted),
        }
