"""Pick a backend and build the engines a Workflow needs from a model reference.

Only the ``torch`` backend exists so far; the ONNX Runtime and TensorRT backends serve compiled
engine folders (``zimage-trt build``). Asking for one that is not available says so and names the
backend that will run instead — nothing falls back silently.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from zimage_trt.runtime.engines import torch_engines
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.workflow import Workflow

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


def load_torch_pipeline(
    wf: Workflow,
    model: str | None = None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    search: tuple[Path, ...] = (),
    lora_ignore_unmatched: bool = False,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> Pipeline:
    """Load the workflow's models (or ``model``: a folder, a repo id or ``tiny``) onto ``device``,
    fuse its LoRAs, and wrap them in the eager torch backend."""
    from zimage_trt.models.checkpoints import (
        load_dit,
        load_text_encoder_weights,
        load_vae_weights,
        model_files,
        resolve_model,
    )
    from zimage_trt.models.lora import fuse_loras, load_lora

    if model == TINY:
        from zimage_trt.models.tiny import tiny_model_dir

        root = tiny_model_dir()
        files = resolve_model(root)
        if wf.models.loras:
            log(
                f"--model tiny: applying the tiny LoRA in place of {len(wf.models.loras)} "
                "workflow LoRA(s)"
            )
            tiny_lora = next((root / "loras").glob("*.safetensors"))
            lora_paths = [(tiny_lora, lora.strength) for lora in wf.models.loras[:1]]
        else:
            lora_paths = []
    else:
        lora_paths = [(_find_file(lora.path, search), lora.strength) for lora in wf.models.loras]
        if model is not None:
            files = resolve_model(model)
        else:
            models = wf.models
            files = model_files(models.transformer, models.text_encoder, models.vae, search=search)

    log(f"loading the DiT from {files.transformer}")
    dit = load_dit(files.transformer, dtype)
    if lora_paths:
        loras = [(load_lora(path), strength) for path, strength in lora_paths]
        fused = fuse_loras(dit.state_dict(), loras, ignore_unmatched=lora_ignore_unmatched)
        dit.load_state_dict(fused, strict=False)
        log(f"fused {len(loras)} LoRA(s) into {len(fused)} weights")
    log(f"loading the text encoder from {files.text_encoder}")
    text_encoder = load_text_encoder_weights(files.text_encoder, torch.float32)
    log(f"loading the VAE from {files.vae}")
    vae = load_vae_weights(files.vae, dtype)
    engines = torch_engines(dit, text_encoder, vae, device=device, dtype=dtype)
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
