"""Where a run's weights come from — the model files and the LoRAs to fuse — and the DiT with
those LoRAs fused in, as the torch backend runs it and the builder exports it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from zimage_trt.errors import InputError
from zimage_trt.models.checkpoints import load_dit
from zimage_trt.models.dit import ZImageDiT
from zimage_trt.models.lora import fuse_loras, load_lora
from zimage_trt.models.model_files import ModelFiles

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


@dataclass(frozen=True)
class ModelSources:
    """Where a run's weights come from: the model files and the LoRAs to fuse, each as
    (file, strength, the workflow's name for it)."""

    files: ModelFiles
    loras: list[tuple[Path, float, str]]


def load_fused_dit(
    sources: ModelSources,
    dtype: torch.dtype,
    *,
    lora_ignore_unmatched: bool = False,
    gguf_in_memory: bool = False,
    log: Log = _stderr,
) -> ZImageDiT:
    """The DiT with the sources' LoRAs fused in (in order, at their strengths); the LoRA files
    are read (and a damaged one refused) before the DiT. ``gguf_in_memory``: a GGUF DiT's
    quantized weights stay quantized (``models.gguf_resident``); no LoRA can be fused then."""
    loras = [(load_lora(path), strength) for path, strength, _ in sources.loras]
    log(f"loading the DiT from {sources.files.transformer}")
    if gguf_in_memory:
        return _gguf_in_memory(sources, dtype, log)
    dit = load_dit(sources.files.transformer, dtype)
    if loras:
        fused = fuse_loras(dit.state_dict(), loras, ignore_unmatched=lora_ignore_unmatched)
        dit.load_state_dict(fused, strict=False)
        log(f"fused {len(loras)} LoRA(s) into {len(fused)} weights")
    return dit


def _gguf_in_memory(sources: ModelSources, dtype: torch.dtype, log: Log) -> ZImageDiT:
    from zimage_trt.models.gguf_resident import GGUFLinear, load_dit_quantized

    source = Path(sources.files.transformer)
    if source.suffix != ".gguf":
        raise InputError(f"--gguf-in-memory keeps a GGUF DiT quantized; {source} is not a .gguf "
                         "file")  # fmt: skip
    if sources.loras:
        raise InputError(
            f"--gguf-in-memory cannot fuse the {len(sources.loras)} LoRA(s) of this run into "
            "quantized weights (ComfyUI-GGUF patches them per call; not done here): run "
            "without the LoRAs, or without --gguf-in-memory (the DiT dequantized at load)"
        )
    dit = load_dit_quantized(source, dtype)
    kept = [m for m in dit.modules() if isinstance(m, GGUFLinear)]
    size = sum(m.blocks.numel() for m in kept)
    log(f"kept {len(kept)} Linear weights quantized in memory ({size / 2**20:.1f} MiB)")
    return dit


def lora_target_keys(sources: ModelSources, *, ignore_unmatched: bool = False) -> list[str]:
    """The DiT weights the sources' LoRAs change, found on the meta device (no weight is read;
    the LoRA files are)."""
    loras = [(load_lora(path), strength) for path, strength, _ in sources.loras]
    dit = load_dit(sources.files.transformer, torch.float32, meta=True)
    return sorted(fuse_loras(dit.state_dict(), loras, ignore_unmatched=ignore_unmatched))
