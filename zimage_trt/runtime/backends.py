"""Pick a backend and build the engines a Workflow needs from a model reference.

Only the ``torch`` backend exists so far; the ONNX Runtime and TensorRT backends serve compiled
engine folders (``zimage-trt build``). Asking for one that is not available says so and names the
backend that will run instead — nothing falls back silently.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from zimage_trt.runtime.engines import torch_engines
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.workflow import Workflow

if TYPE_CHECKING:
    from zimage_trt.models.checkpoints import ModelFiles
    from zimage_trt.models.dit import ZImageDiT

BACKENDS = ("torch",)
TINY = "tiny"


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs (as ComfyUI), fp32 on CPU; fp16 is refused for Z-Image."""
    choices = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in choices:
        raise ValueError(
            f"dtype {dtype!r} is not supported; choose one of: auto, bf16, fp32 "
            "(fp16 gives NaN / black images with Z-Image)"
        )
    return choices[dtype]


@dataclass(frozen=True)
class ModelSources:
    """Where a run's weights come from: the model files and the LoRAs to fuse, each as
    (file, strength, the workflow's name for it)."""

    files: ModelFiles
    loras: list[tuple[Path, float, str]]


def model_sources(
    wf: Workflow,
    model: str | None = None,
    *,
    search: tuple[Path, ...] = (),
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> ModelSources:
    """The workflow's models (or ``model``: a folder, a repo id or ``tiny``) and its LoRAs."""
    from zimage_trt.models.checkpoints import model_files, resolve_model

    if model == TINY:
        from zimage_trt.models.tiny import tiny_model_dir

        root = tiny_model_dir()
        loras = []
        if wf.models.loras:
            log(
                f"--model tiny: applying the tiny LoRA in place of {len(wf.models.loras)} "
                "workflow LoRA(s)"
            )
            tiny_lora = next((root / "loras").glob("*.safetensors"))
            loras = [(tiny_lora, lora.strength, lora.path) for lora in wf.models.loras[:1]]
        return ModelSources(resolve_model(root), loras)
    loras = [(_find_file(ref.path, search), ref.strength, ref.path) for ref in wf.models.loras]
    if model is not None:
        return ModelSources(resolve_model(model), loras)
    m = wf.models
    return ModelSources(model_files(m.transformer, m.text_encoder, m.vae, search=search), loras)


def load_fused_dit(
    sources: ModelSources,
    dtype: torch.dtype,
    *,
    lora_ignore_unmatched: bool = False,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> ZImageDiT:
    """The DiT with the sources' LoRAs fused in (in order, at their strengths)."""
    from zimage_trt.models.checkpoints import load_dit
    from zimage_trt.models.lora import fuse_loras, load_lora

    log(f"loading the DiT from {sources.files.transformer}")
    dit = load_dit(sources.files.transformer, dtype)
    if sources.loras:
        loras = [(load_lora(path), strength) for path, strength, _ in sources.loras]
        fused = fuse_loras(dit.state_dict(), loras, ignore_unmatched=lora_ignore_unmatched)
        dit.load_state_dict(fused, strict=False)
        log(f"fused {len(loras)} LoRA(s) into {len(fused)} weights")
    return dit


def lora_target_keys(sources: ModelSources, *, ignore_unmatched: bool = False) -> list[str]:
    """The DiT weights the sources' LoRAs change, found on the meta device (no weight is read;
    the LoRA files are)."""
    from zimage_trt.models.checkpoints import load_dit
    from zimage_trt.models.lora import fuse_loras, load_lora

    dit = load_dit(sources.files.transformer, torch.float32, meta=True)
    loras = [(load_lora(path), strength) for path, strength, _ in sources.loras]
    return sorted(fuse_loras(dit.state_dict(), loras, ignore_unmatched=ignore_unmatched))


def load_torch_pipeline(
    wf: Workflow,
    model: str | None = None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    search: tuple[Path, ...] = (),
    lora_ignore_unmatched: bool = False,
    compile: bool = False,
    compile_scope: str = "whole",
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> Pipeline:
    """Load the workflow's models (or ``model``: a folder, a repo id or ``tiny``) onto ``device``,
    fuse its LoRAs, and wrap them in the eager torch backend (``compile``: each engine compiled
    per stage shape, whole networks or their repeated blocks by ``compile_scope``, see
    ``runtime.compiled``)."""
    from zimage_trt.models.checkpoints import load_text_encoder_weights, load_vae_weights

    sources = model_sources(wf, model, search=search, log=log)
    files = sources.files
    dit = load_fused_dit(sources, dtype, lora_ignore_unmatched=lora_ignore_unmatched, log=log)
    log(f"loading the text encoder from {files.text_encoder}")
    text_encoder = load_text_encoder_weights(files.text_encoder, torch.float32)
    log(f"loading the VAE from {files.vae}")
    vae = load_vae_weights(files.vae, dtype)
    engines = torch_engines(dit, text_encoder, vae, device=device, dtype=dtype)
    if compile:
        from zimage_trt.runtime.compiled import compiled_engines

        engines = compiled_engines(engines, scope=compile_scope)
    return Pipeline(engines, files.load_tokenizer())


def _find_file(name: str, search: tuple[Path, ...]) -> Path:
    path = Path(name).expanduser()
    if path.is_file():
        return path
    for folder in search:
        for candidate in (folder / name, folder / "loras" / name):
            if candidate.is_file():
                return candidate
    looked = ", ".join(str(f) for f in search) or "the current folder"
    raise FileNotFoundError(f"LoRA file {name!r} not found (looked in {looked})")
